"""`afina serve --engine llama.cpp`: the served model runs in llama.cpp, from a verified GGUF export.

The HTTP side is the same app (serve/app.py): the same request checks, chat template, stop strings,
logs, feedback and metrics. What changes is who computes the next token. The prompt is still
rendered and tokenized by afina's own tokenizer (serve/generation.py encode_chat), and llama.cpp gets
those token ids, so both engines see identical prompt tokens; new tokens are decoded to text by the
same tokenizer. (A verified GGUF export tokenizes exactly as the trained tokenizer does: the export
check fails a file that does not.)

One worker thread owns llama.cpp's model and context (neither is thread-safe). Jobs queue for it, as
for the transformers engine (serve/batching.py), but here every job joins the running batch as soon
as one of `max_batch` sequence slots is free (continuous batching): each step is one `llama_decode`
call holding the next token of every running sequence and a chunk of any prompt being read, each
token tagged with its sequence's id. So 16 clients share each pass over the weights instead of
waiting for each other, and a short request does not wait for a long one to finish. Each sequence
samples on its own (greedy, or temperature, top-k and top-p with its own seeded generator), with its
own stop strings, JSON-schema constraint and logprobs, computed from llama.cpp's logits of that sequence.

Each slot has a KV-cache stream of its own (llama.cpp's non-unified cache), which makes batching
invisible in the answers: a sequence's attention sums over its own cells in the same order whatever
runs beside it, and the weight products are computed row by row, so a request answers the same alone
or in a batch, and the same as llama-cpp-python's `Llama` on the same file and tokens (measured on
the quickstart model: in one shared cache, 2 of 8 greedy answers changed in a batch;
with flash attention, llama.cpp's default, 3 of 8 even alone). A slot keeps its last request's tokens,
and a new prompt goes to the free slot whose kept tokens share the longest start with it (a system
prompt, a conversation so far), reading only the rest, as `Llama` reuses its previous tokens.

What differs from the transformers engine, and is said where it matters: one model per server (no
`--adapter`, no `--watch` hot switch: refused at start naming the engine); the slots' caches are
allocated up front, so a request may be as long as max_prompt_tokens (1024 unless set) plus
max_tokens, not the model's whole context; and sampled answers use numpy's generator, so a `seed`
reproduces an answer within this engine (alone or batched), not across the two.

    served = load_gguf_served("runs/quickstart", gguf_type="q4_k_m")
    engine = LlamaCppEngine(served.gguf, served.tokenizer, max_batch=8, context=served.max_context)
    engine.submit(job)     # a serve.batching.Job; job.future gets a Generated
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from afina.rundir import RunDir
from afina.serve.batching import Generated, Job
from afina.serve.models import ServedModels, ServeError

ENGINE = "llama.cpp"
# The file picked from a run's verified exports when --gguf-type is not given: closest to the trained model first.
PREFERRED_TYPES = ("q8_0", "f16", "q6_k", "q4_k_m", "q5_k_m")
# Text the tokenizer check splits both ways: words, digits, punctuation, runs of spaces and newlines, non-ASCII.
PROBE = "Hello, wörld! Code 1234 means: rinse   for 5 minutes.\n\n  Ünïcödé — 東京 ok?"
TOP_K = 50  # transformers' default top-k when sampling (GenerationConfig.top_k), kept so both engines sample alike
_INSTALL_HINT = (
    "run `afina setup llama-cpp` (from a clone: `make llama-cpp`); it builds llama-cpp-python from source with "
    "settings that work on CPUs"
)


def require_llama_cpp() -> None:
    """ServeError naming the fix when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ServeError(f"--engine {ENGINE} needs llama-cpp-python, which is not installed: {_INSTALL_HINT}")


def find_gguf(target: str, gguf_type: str | None = None) -> Path:
    """The GGUF file to serve: `target` itself (a .gguf file), or a run directory's verified export of `gguf_type`
    (default: the first verified of PREFERRED_TYPES)."""
    path = Path(target)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ServeError(f"{target}: no such GGUF file")
        if gguf_type:
            raise ServeError(f"--gguf-type picks among a run directory's exports; {target} is a GGUF file already")
        return path
    how = (
        "make one with `afina export RECIPE.yaml export.formats=[gguf] export.gguf_types=[{type}]` (the recipe "
        "that trained this run), or give a .gguf file as the target"
    )
    if not (path / "manifest.json").is_file():
        raise ServeError(
            f"--engine {ENGINE} serves a GGUF file: {target} is neither a .gguf file nor a run directory "
            f"(runs/NAME with manifest.json); {how.format(type=gguf_type or 'q8_0')}"
        )
    exports = RunDir(path).read_manifest().get("export") or {}
    verified = {
        key.removeprefix("gguf_"): Path(check["path"])
        for key, check in exports.items()
        if key.startswith("gguf_") and key != "gguf_adapter" and isinstance(check, dict) and check.get("ok")
    }
    verified = {kind: file for kind, file in verified.items() if file.is_file()}
    if gguf_type:
        if gguf_type in verified:
            return verified[gguf_type]
        why = (
            f"its {gguf_type} export failed its check: {exports[f'gguf_{gguf_type}'].get('failed') or 'skipped'}"
            if f"gguf_{gguf_type}" in exports
            else f"it has no verified {gguf_type} export"
        )
        have = f" (verified here: {', '.join(sorted(verified))})" if verified else ""
        raise ServeError(f"{target}: --gguf-type {gguf_type}: {why}{have}; {how.format(type=gguf_type)}")
    for kind in (*PREFERRED_TYPES, *sorted(verified)):
        if kind in verified:
            return verified[kind]
    raise ServeError(
        f"{target}: --engine {ENGINE} needs a GGUF export whose verification passed, and this run has none; "
        + how.format(type="q8_0")
    )


def load_gguf_served(target: str, gguf_type: str | None = None) -> ServedModels:
    """What the app serves with the llama.cpp engine: the GGUF file, its name, and the tokenizer that renders prompts
    (a run's own tokenizer and chat template, as the transformers engine uses; for a bare .gguf file, the file's)."""
    require_llama_cpp()
    gguf = find_gguf(target, gguf_type)
    root = Path(target)
    if root.is_dir():
        from afina.models import load_tokenizer

        recipe = RunDir(root).read_manifest()["recipe"]["model"]
        tokenizer = load_tokenizer(recipe["name"], recipe.get("chat_template"))
        name = root.resolve().name
    else:
        tokenizer = _gguf_tokenizer(gguf)
        name = gguf.stem
    context = _gguf_context_length(gguf)
    return ServedModels(None, tokenizer, contextlib.nullcontext, context, name, name, gguf=gguf)


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    from afina.models.templates import ChatTemplateError, with_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with_chat_template(tokenizer, None)
    except (ValueError, KeyError, OSError, ChatTemplateError) as exc:
        raise ServeError(
            f"{path}: transformers could not read this file's tokenizer ({type(exc).__name__}: {str(exc)[:200]}); "
            "serve the run directory it was exported from instead"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_context_length(path: Path) -> int:
    from afina.models.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    return int(header.get(f"{header.get('general.architecture')}.context_length", 2048))


def check_engine_settings(settings) -> None:
    """Server options the llama.cpp engine cannot honour: refused at start, naming the engine."""
    if settings.adapters:
        raise ServeError(
            f"--adapter: the {ENGINE} engine serves one GGUF file (export each run and start one server per run, "
            "or use --engine transformers to serve adapters over one base)"
        )
    if settings.watch:
        raise ServeError(
            f"--watch: the {ENGINE} engine cannot switch adapters while serving; use --engine transformers, "
            "or restart the server on the promoted run's GGUF export"
        )


@dataclass(eq=False)
class _Sequence:
    """One job decoding in slot `slot` (its llama.cpp sequence id)."""

    job: Job
    slot: int
    prompt: list[int]
    started: float
    fed: int = 0  # prompt tokens already in the KV cache
    new: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    rng: np.random.Generator | None = None

    @property
    def reading(self) -> bool:
        return self.fed < len(self.prompt)


class LlamaCppEngine:
    """Queued jobs decoded together by llama.cpp in one worker thread (see the module docstring).

    `max_batch` sequences run at once, each in a KV-cache stream of its own of `context` cells (so a
    sequence's attention sums over its own cells only, in the same order whatever runs beside it: batched
    answers are the ones each request gets alone, and the ones llama-cpp-python's Llama gives). A stream keeps
    the tokens of its last request: a new prompt that starts the same way (the system prompt, the conversation
    so far) goes to the free stream sharing the longest start and reads only the rest, as Llama reuses its
    previous tokens.
    """

    def __init__(
        self,
        path: Path,
        tokenizer,
        max_batch: int,
        context: int,
        observe: Callable[[str, float, int], None] | None = None,
        threads: int | None = None,
    ):
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter; errors still show
        self.lib = llama_cpp
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.slots = max(1, max_batch)
        self.context = context
        self.observe = observe or (lambda name, seconds, size: None)
        self.step_tokens = max(512, self.slots)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise ServeError(f"llama.cpp could not load {path} (a damaged file, or an architecture it does not know)")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slots * context
        params.n_batch = params.n_ubatch = self.step_tokens
        params.n_seq_max = self.slots
        params.kv_unified = False  # a stream per sequence: see the class docstring
        # llama-cpp-python's Llama default: flash attention on the CPU sums in another order (and in part in F16)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # As many threads as torch uses (OMP_NUM_THREADS): on a busy machine, more threads than free cores make
        # llama.cpp's threads spin waiting for each other (measured here: 2 ms per token on 1 thread, 100 ms on 2).
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads() or os.cpu_count() or 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ServeError(f"llama.cpp could not make a context of {self.slots} x {context} cells for {path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        if self.n_vocab < len(tokenizer):
            self.close_model()
            raise ServeError(
                f"{path} has {self.n_vocab} tokens and the tokenizer {len(tokenizer)}: not the same vocabulary"
            )
        self._check_tokenization(path)
        self.batch = llama_cpp.llama_batch_init(self.step_tokens, 0, 1)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: list[_Sequence] = []
        self.kept: list[list[int]] = [[] for _ in range(self.slots)]  # the tokens each stream's cells hold
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="afina-llama-cpp", daemon=True)
        self._worker.start()

    def _check_tokenization(self, path: Path) -> None:
        """The tokenizer that renders prompts must split text as the file's own vocabulary does, or llama.cpp would
        be given ids it reads as other text (a verified export passes this; a stray .gguf file may not)."""
        from afina.serve.generation import encode_chat

        texts = [(PROBE, self.tokenizer(PROBE, add_special_tokens=False)["input_ids"], False)]
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": PROBE}]
            from afina.data.format import render_prompt

            texts.append((render_prompt(self.tokenizer, messages), encode_chat(self.tokenizer, messages), True))
        vocab = self.lib.llama_model_get_vocab(self.model)
        for text, ours, special in texts:
            raw = text.encode("utf-8")
            buffer = (self.lib.llama_token * (len(raw) + 8))()
            count = self.lib.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), False, special)
            theirs = list(buffer[: max(count, 0)])
            if theirs != ours:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                self.close_model()
                raise ServeError(
                    f"{path}: llama.cpp tokenizes {text[:60]!r}... differently from the tokenizer afina renders "
                    f"prompts with (first difference at token {at}: {ours[at : at + 3]} vs {theirs[at : at + 3]}); "
                    "serve the run directory the file was exported from, whose tokenizer its export check verified"
                )

    def close_model(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    # The app's side: the same calls as serve.batching.Scheduler.
    def submit(self, job: Job) -> Job:
        """Queue a job; its future gets a Generated (or the exception decoding raised)."""
        prompt = job.prompt_length
        if prompt == 0:
            job.future.set_exception(ValueError("the prompt is empty: there is nothing to continue"))
            return job
        if prompt + int(job.kwargs["max_new_tokens"]) > self.context:
            job.future.set_exception(
                ValueError(f"prompt of {prompt} tokens plus max_tokens exceeds this engine's {self.context}")
            )
            return job
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Stop the worker after the current step and free llama.cpp's memory."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()
        self.lib.llama_batch_free(self.batch)
        self.close_model()

    # The worker's side.
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._pending) or bool(self._running))
                if self._closed:
                    for job in [seq.job for seq in self._running] + list(self._pending):
                        job.future.set_exception(RuntimeError("the server stopped"))
                    return
                self._admit()
            if not self._running:
                continue
            try:
                self._step()
            except Exception as exc:  # llama_decode failed: the running requests get the error; the worker lives on
                for seq in self._running:
                    self._fail(seq, exc)
                self._running = []

    def _admit(self) -> None:
        """Move queued jobs, in arrival order, into free streams (holding _cond)."""
        free = set(range(self.slots)) - {s.slot for s in self._running}
        while self._pending and free:
            job = self._pending.popleft()
            if job.cancelled.is_set():  # its client left while it waited: never run it
                job.future.set_result(Generated(job.kwargs["input_ids"], job.prompt_length, aborted=True))
                continue
            prompt = job.kwargs["input_ids"][0].tolist()
            shared = {slot: _common_start(prompt[:-1], self.kept[slot]) for slot in free}  # the last token: logits
            slot = max(sorted(free), key=lambda s: shared[s])
            free.discard(slot)
            self.lib.llama_memory_seq_rm(self.memory, slot, shared[slot], -1)
            self.kept[slot] = prompt[: shared[slot]]
            seq = _Sequence(job, slot, prompt, time.perf_counter(), fed=shared[slot])
            if job.kwargs.get("do_sample"):
                seq.rng = np.random.default_rng(job.seed)
            if job.top_logprobs is not None:
                seq.logprobs = []
            self._running.append(seq)

    def _step(self) -> None:
        """One llama_decode: the last token of every decoding sequence, then prompt chunks as room allows."""
        batch, n = self.batch, 0
        outputs: list[tuple[_Sequence, int]] = []  # sequences whose next token this step's logits decide

        def put(seq: _Sequence, token: int, pos: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq.slot, logits
            if logits:
                outputs.append((seq, n))
            n += 1

        for seq in self._running:
            if not seq.reading:
                put(seq, seq.new[-1], len(seq.prompt) + len(seq.new) - 1, True)
        for seq in self._running:
            if seq.reading and n < self.step_tokens:
                chunk = seq.prompt[seq.fed : seq.fed + self.step_tokens - n]
                for offset, token in enumerate(chunk):
                    pos = seq.fed + offset
                    put(seq, token, pos, pos == len(seq.prompt) - 1)
                seq.fed += len(chunk)
        batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        failed = set()
        for seq, index in outputs:
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
            try:
                self._advance(seq, logits)
            except Exception as exc:  # one request's error (its JSON constraint, its callback) ends that one only
                self._fail(seq, exc)
                failed.add(seq)
        self._running = [seq for seq in self._running if seq not in failed and not self._finish_if_done(seq)]

    def _fail(self, seq: _Sequence, error: Exception) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
        self.kept[seq.slot] = []
        seq.job.future.set_exception(error)

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Choose the sequence's next token from its logits, as transformers' generate would."""
        job = seq.job
        scores = logits[: len(self.tokenizer)].astype(np.float32)
        if job.processors:  # JSON output: the processors take and return transformers' tensors
            ids = torch.tensor([seq.prompt + seq.new])
            masked = torch.from_numpy(scores.copy())[None]
            for processor in job.processors:
                masked = processor(ids, masked)
            scores = masked[0].numpy()
        if seq.rng is None:
            token = int(np.argmax(scores))
        else:
            token = _sample(scores, job.kwargs["temperature"], job.kwargs.get("top_p", 1.0), seq.rng)
        if seq.logprobs is not None:  # from the model's own logits, before any constraint, as transformers reports
            logp, alternatives = _log_softmax_top(logits, job.top_logprobs or 0)
            seq.logprobs.append((float(logp[token]), alternatives))
        seq.new.append(token)
        if job.on_token is not None:
            job.on_token(token)

    def _finish_if_done(self, seq: _Sequence) -> bool:
        job = seq.job
        if seq.reading:
            if not job.cancelled.is_set():
                return False
        elif not (
            job.cancelled.is_set()
            or seq.new[-1] == self.eos
            or len(seq.new) >= int(job.kwargs["max_new_tokens"])
            or self._hit_stop(seq)
        ):
            return False
        # The stream keeps what its cells hold (all but the last new token, never read) for the next prompt.
        self.kept[seq.slot] = seq.prompt[: seq.fed] + seq.new[:-1] if seq.new else seq.prompt[: seq.fed]
        ids = torch.tensor([seq.prompt + seq.new], dtype=torch.long)
        self.observe(job.name, time.perf_counter() - seq.started, len(self._running))
        job.future.set_result(Generated(ids, len(seq.prompt), seq.logprobs, aborted=job.cancelled.is_set()))
        return True

    def _hit_stop(self, seq: _Sequence) -> bool:
        """A stop string in the new text's tail, as serve.generation.StopOnStrings checks for transformers."""
        if not seq.job.stop:
            return False
        window = max(len(s) for s in seq.job.stop) + 4  # tokens: every token is at least one character
        tail = self.tokenizer.decode(seq.new[-window:], skip_special_tokens=True)
        return any(s in tail for s in seq.job.stop)


def _common_start(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share from the start."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def _log_softmax_top(logits: np.ndarray, top: int) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """The log-probabilities of every token, and the `top` most likely as (id, logprob), best first."""
    shifted = logits.astype(np.float64) - logits.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(logp, -top)[-top:] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-logp[best])]
    return logp, [(int(i), float(logp[i])) for i in best]


def _sample(scores: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Temperature, then top-k (TOP_K), then top-p, then a draw: transformers' sampling order and defaults."""
    scaled = scores.astype(np.float64) / temperature
    k = min(TOP_K, len(scaled))
    candidates = np.argpartition(scaled, -k)[-k:]
    candidates = candidates[np.argsort(scaled[candidates])]  # ascending, as transformers' top-p sorts
    values = scaled[candidates]
    values = values[np.isfinite(values)] if np.isfinite(values).any() else values
    candidates = candidates[-len(values) :]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    if top_p < 1.0:
        keep = np.cumsum(probs) > 1 - top_p  # drop the least likely whose mass is at most 1 - top_p
        keep[-1] = True
        candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
    return int(candidates[rng.choice(len(candidates), p=probs)])
