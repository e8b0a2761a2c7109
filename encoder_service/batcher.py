"""Micro-batching of encoder windows across sessions on one device.

Callers submit the :class:`WindowJob` list of one session and wait on a future. One device
thread takes the first waiting submission, gathers more until ``max_batch`` windows or
``max_wait_ms`` have passed, runs them as one batch and resolves every future.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from services import metrics
from services.errors import ResourceExhausted
from services.model.dasheng import DashengEncoder
from services.streaming.encoder import WindowJob, run_jobs

log = logging.getLogger(__name__)


@dataclass
class _Submission:
    jobs: list[WindowJob]
    future: Future[list[torch.Tensor]]


class EncoderBatcher:
    def __init__(
        self, encoder: DashengEncoder, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256
    ) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Submission] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="encoder-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        while True:  # fail whatever is left so no caller waits forever
            try:
                sub = self._queue.get_nowait()
            except queue.Empty:
                break
            sub.future.set_exception(ResourceExhausted("the encoder is shutting down"))

    def submit(self, jobs: list[WindowJob]) -> Future[list[torch.Tensor]]:
        fut: Future[list[torch.Tensor]] = Future()
        if not jobs:
            fut.set_result([])
            return fut
        if self._stop.is_set():
            raise ResourceExhausted("the encoder is shutting down")
        try:
            self._queue.put_nowait(_Submission(jobs, fut))
        except queue.Full as e:
            metrics.DROPPED_CHUNKS.labels(where="encoder_queue").inc()
            raise ResourceExhausted("the encoder queue is full; retry later") from e
        metrics.ENCODER_QUEUE.set(self._queue.qsize())
        return fut

    def run(self, jobs: list[WindowJob], timeout: float) -> list[torch.Tensor]:
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
        try:
            feats = run_jobs(self.encoder, jobs)
        except Exception as e:  # resolve every waiter; the server logs and maps the error
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
