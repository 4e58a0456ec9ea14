"""One worker thread runs the model; requests queue for it in arrival order and batch where they can.

Greedy, non-streaming requests for the same model (adapter) that are waiting at the same time run
as one left-padded `generate` call: on a CPU a batch of 8 short prompts costs little more than one,
so throughput grows with the number of clients instead of staying that of a single request.
Streaming, sampling, stop-string, logprobs and JSON-constrained requests run alone (each follows
one sequence).

A request can be cancelled at any time (`Job.cancel()`: its client disconnected): still queued, it
is dropped without running; running, generation stops at the next decoding step (its batch
mates go on). Handlers never block a thread waiting: they await `Job.future`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from afina.serve.generation import StopOnStrings, StopWhenCancelled, token_logprobs


@dataclass(eq=False)
class Generated:
    ids: torch.Tensor  # prompt + new tokens, shape 1 x N
    prompt_length: int
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    aborted: bool = False  # cancelled before or while generating

    @property
    def new_tokens(self) -> list[int]:
        return self.ids[0, self.prompt_length :].tolist()


@dataclass(eq=False)
class Job:
    name: str  # the served model (adapter) name
    kwargs: dict[str, Any]  # generate() arguments for this request alone (input_ids of shape 1 x L)
    batchable: bool
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token's and this many alternatives
    processors: list[Any] = field(default_factory=list)  # logits processors (JSON output)
    on_token: Callable[[int], None] | None = None  # called from the worker thread with each new token
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def prompt_length(self) -> int:
        return int(self.kwargs["input_ids"].shape[1])


class _TokenSink:
    """A generate() streamer that hands each new token to the job (the first put is the prompt)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class Engine(Protocol):
    """What the app queues jobs on: this module's Scheduler (transformers) or serve/llamacpp_engine.py's engine."""

    def submit(self, job: Job) -> Job: ...

    def close(self) -> None: ...


class Scheduler:
    def __init__(self, served, max_batch: int, observe: Callable[[str, float, int], None] | None = None):
        self.served = served
        self.max_batch = max(1, max_batch)
        self.observe = observe or (lambda name, seconds, size: None)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._work, name="afina-generate", daemon=True).start()

    def submit(self, job: Job) -> Job:
        """Queue a job; its future gets a Generated (or the exception generation raised)."""
        job.batchable = job.batchable and self.max_batch > 1
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Nothing to free: the worker thread is a daemon and the model belongs to ServedModels."""

    def generate(self, name: str, kwargs: dict[str, Any], batchable: bool) -> torch.Tensor:
        """Queue a request and wait for its output ids (prompt + new tokens, shape 1 x N)."""
        return self.submit(Job(name, kwargs, batchable)).future.result().ids

    def _next_batch(self) -> list[Job]:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._pending))
            first = self._pending.popleft()
            batch = [first]
            if first.batchable:
                for job in list(self._pending):
                    if len(batch) == self.max_batch:
                        break
                    if job.batchable and job.name == first.name:
                        self._pending.remove(job)
                        batch.append(job)
            return batch

    def _work(self) -> None:
        while True:
            batch = []
            for job in self._next_batch():
                if job.cancelled.is_set():  # its client left while it waited: never run it
                    job.future.set_result(Generated(job.kwargs["input_ids"], job.prompt_length, aborted=True))
                else:
                    batch.append(job)
            if not batch:
                continue
            start = time.perf_counter()
            try:
                with self.served.use(batch[0].name) as model, torch.no_grad(), self.served.autocast():
                    outputs = self.run_batch(model, batch)
            except Exception as exc:  # the requests get the error; the worker lives on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.observe(batch[0].name, time.perf_counter() - start, len(batch))
            for job, out in zip(batch, outputs, strict=True):
                job.future.set_result(out)

    def run_batch(self, model, batch: list[Job]) -> list[Generated]:
        """Output per job (prompt + new tokens), as if each had run alone."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        stopping: list[Any] = [StopWhenCancelled(batch)]
        if len(batch) == 1:
            job = batch[0]
            kwargs = dict(job.kwargs)
            kwargs["input_ids"] = kwargs["input_ids"].to(model.device)
            kwargs["attention_mask"] = kwargs["attention_mask"].to(model.device)
            if job.stop:
                stopping.append(StopOnStrings(self.served.tokenizer, job.stop, job.prompt_length))
            if job.processors:
                kwargs["logits_processor"] = LogitsProcessorList(job.processors)
            if job.on_token is not None:
                kwargs["streamer"] = _TokenSink(job.on_token)
            if job.seed is not None and kwargs.get("do_sample"):
                torch.manual_seed(job.seed)
            top = job.top_logprobs
            scored = top is not None
            out = model.generate(
                **kwargs,
                stopping_criteria=StoppingCriteriaList(stopping),
                return_dict_in_generate=True,
                output_logits=scored,
            )
            ids = out.sequences.cpu()
            result = Generated(ids, job.prompt_length, aborted=job.cancelled.is_set())
            if scored:
                result.logprobs = token_logprobs(out.logits, 0, result.new_tokens, top or 0)
            return [result]
        # Left padding: every prompt ends at the same position, where generation starts.
        prompts = [job.kwargs["input_ids"][0] for job in batch]
        width = max(len(p) for p in prompts)
        pad, eos = batch[0].kwargs["pad_token_id"], batch[0].kwargs["eos_token_id"]
        ids = torch.full((len(batch), width), pad, dtype=prompts[0].dtype)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        kwargs = {
            **batch[0].kwargs,
            "input_ids": ids.to(model.device),
            "attention_mask": mask.to(model.device),
            "max_new_tokens": max(job.kwargs["max_new_tokens"] for job in batch),
        }
        out = model.generate(**kwargs, stopping_criteria=StoppingCriteriaList(stopping)).cpu()
        results = []
        for row, (job, prompt) in enumerate(zip(batch, prompts, strict=True)):
            new = out[row, width:][: job.kwargs["max_new_tokens"]]
            ends = (new == eos).nonzero()
            if len(ends):
                new = new[: int(ends[0]) + 1]  # up to and with the first EOS, as a lone generate() stops
            results.append(Generated(torch.cat([prompt, new])[None], len(prompt), aborted=job.cancelled.is_set()))
        return results
