"""Micro-batching of encoder windows across sessions, in front of an encoder backend.

Callers submit the windows of one session (or of one clip) and wait on a future. Each of the
backend's ``max_in_flight`` threads (one for the in-process torch backend) takes the first waiting
submission, gathers more until ``max_batch`` windows or ``max_wait_ms`` have passed, runs them as
one batch on the backend and resolves every future.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from encoder_service.backends.base import EncoderBackend
from services import metrics
from services.errors import MidashengError, ResourceExhausted
from services.streaming.encoder import EncoderWindow

log = logging.getLogger(__name__)


@dataclass
class _Submission:
    jobs: list[EncoderWindow]
    future: Future[list[torch.Tensor]]
    submitted: float = field(default_factory=time.monotonic)


class EncoderBatcher:
    def __init__(
        self, backend: EncoderBackend, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Submission] = queue.Queue(maxsize=max_queue)
        self.wait_s = 0.0  # how long the last batch's oldest submission waited for the device
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"encoder-batcher-{i}", daemon=True)
            for i in range(max(1, backend.max_in_flight))
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        while True:  # fail whatever is left so no caller waits forever
            try:
                sub = self._queue.get_nowait()
            except queue.Empty:
                break
            sub.future.set_exception(ResourceExhausted("the encoder is shutting down"))

    def submit(self, jobs: Sequence[EncoderWindow]) -> Future[list[torch.Tensor]]:
        fut: Future[list[torch.Tensor]] = Future()
        if not jobs:
            fut.set_result([])
            return fut
        if self._stop.is_set():
            raise ResourceExhausted("the encoder is shutting down")
        try:
            self._queue.put_nowait(_Submission(list(jobs), fut))
        except queue.Full as e:
            metrics.DROPPED_CHUNKS.labels(where="encoder_queue").inc()
            raise ResourceExhausted("the encoder queue is full; retry later") from e
        metrics.ENCODER_QUEUE.set(self._queue.qsize())
        return fut

    def run(self, jobs: Sequence[EncoderWindow], timeout: float) -> list[torch.Tensor]:
        return self.submit(jobs).result(timeout=timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            n = len(first.jobs)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    sub = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                batch.append(sub)
                n += len(sub.jobs)
            metrics.ENCODER_QUEUE.set(self._queue.qsize())
            self._execute(batch)

    def _execute(self, batch: list[_Submission]) -> None:
        jobs = [j for sub in batch for j in sub.jobs]
        t0 = time.monotonic()
        self.wait_s = t0 - min(sub.submitted for sub in batch)
        try:
            feats = self.backend.encode(jobs)
        except Exception as e:  # resolve every waiter; the server maps the error
            if isinstance(e, MidashengError):  # named (e.g. Triton unavailable): no traceback
                log.warning("encoder batch of %d windows failed: %s", len(jobs), e)
            else:
                log.exception("encoder batch of %d windows failed", len(jobs))
            for sub in batch:
                sub.future.set_exception(e)
            return
        metrics.ENCODER_BATCH.observe(len(jobs))
        metrics.ENCODER_SECONDS.observe(time.monotonic() - t0)
        k = 0
        for sub in batch:
            sub.future.set_result(feats[k : k + len(sub.jobs)])
            k += len(sub.jobs)
