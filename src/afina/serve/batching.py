"""One worker thread runs the model; requests queue for it in arrival order and batch where they can.

Greedy, non-streaming requests for the same model (adapter) that are waiting at the same time run
as one left-padded `generate` call: on a CPU a batch of 8 short prompts costs little more than one,
so throughput grows with the number of clients instead of staying that of a single request.
Streaming and sampling requests run alone (the streamer follows one sequence).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Job:
    name: str  # the served model (adapter) name
    kwargs: dict[str, Any]  # generate() arguments for this request alone (input_ids of shape 1 x L)
    batchable: bool
    future: Future = field(default_factory=Future)


class Scheduler:
    def __init__(self, served, max_batch: int, observe: Callable[[str, float, int], None] | None = None):
        self.served = served
        self.max_batch = max(1, max_batch)
        self.observe = observe or (lambda name, seconds, size: None)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._work, name="afina-generate", daemon=True).start()

    def generate(self, name: str, kwargs: dict[str, Any], batchable: bool) -> torch.Tensor:
        """Queue a request and wait for its output ids (prompt + new tokens, shape 1 x N)."""
        job = Job(name, kwargs, batchable and self.max_batch > 1)
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job.future.result()

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
            batch = self._next_batch()
            start = time.perf_counter()
            try:
                with self.served.use(batch[0].name) as model, torch.no_grad(), self.served.autocast():
                    outputs = self.run_batch(model, batch)
            except Exception as exc:  # the requests get the error; the worker lives on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.observe(batch[0].name, time.perf_counter() - start, len(batch))
            for job, out in zip(batch, outputs):
                job.future.set_result(out)

    def run_batch(self, model, batch: list[Job]) -> list[torch.Tensor]:
        """Output ids per job (prompt + new tokens), as if each had run alone."""
        if len(batch) == 1:
            kwargs = dict(batch[0].kwargs)
            kwargs["input_ids"] = kwargs["input_ids"].to(model.device)
            kwargs["attention_mask"] = kwargs["attention_mask"].to(model.device)
            return [model.generate(**kwargs).cpu()]
        # Left padding: every prompt ends at the same position, where generation starts.
        prompts = [job.kwargs["input_ids"][0] for job in batch]
        width = max(len(p) for p in prompts)
        pad, eos = batch[0].kwargs["pad_token_id"], batch[0].kwargs["eos_token_id"]
        ids = torch.full((len(batch), width), pad, dtype=prompts[0].dtype)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        kwargs = {**batch[0].kwargs, "input_ids": ids.to(model.device), "attention_mask": mask.to(model.device),
                  "max_new_tokens": max(job.kwargs["max_new_tokens"] for job in batch)}
        out = model.generate(**kwargs).cpu()
        results = []
        for row, (job, prompt) in enumerate(zip(batch, prompts)):
            new = out[row, width:][: job.kwargs["max_new_tokens"]]
            ends = (new == eos).nonzero()
            if len(ends):
                new = new[: int(ends[0]) + 1]  # up to and with the first EOS, as a lone generate() stops
            results.append(torch.cat([prompt, new])[None])
        return results
