"""Worker crash (kill -9) mid-stream: another LM worker takes the session over; nothing is lost
and nothing is shown twice.

Both LM workers are real processes (``python -m services lm``) so the crash is a real SIGKILL.
The ``lm`` command has no flag for the lease TTL, so they run with the default
TransportDefaults (lease_ttl_ms=3000, heartbeat_ms=1000): takeover takes about 3 s, well within
a 30 s clip streamed at 3x real time (10 s). Encoder and gateway run in-process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from services.training.synth import types_in_caption
from services.transport import keys
from services.transport.lease import Lease
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import Collected, Tier, clip, paced

PARTS = [("high_tone", 10.0), ("white_noise", 10.0), ("low_tone", 10.0)]


class LMProcess(Tier):
    """``python -m services lm`` with one live worker named ``worker_id``."""

    def __init__(self, worker_id: str, redis_url: str, log: Path) -> None:
        self.worker_id = worker_id
        args = ["lm", "--listen", "127.0.0.1:0", "--redis-url", redis_url, "--workers", "1"]
        super().__init__(worker_id, [*args, "--worker-id", worker_id, "--device", "cpu"], log, env={})


@pytest.fixture
def lm_processes(redis_url: str, tmp_path: Path) -> Iterator[dict[str, LMProcess]]:
    procs = {wid: LMProcess(wid, redis_url, tmp_path / f"{wid}.log") for wid in ("lmA", "lmB")}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_sigkill_of_the_lease_holder_loses_nothing_and_shows_nothing_twice(
    make_stack: Callable[..., LiveStack], lm_processes: dict[str, LMProcess], redis_url: str
) -> None:
    stack = make_stack(lm_workers=-1)  # no in-process LM: the two subprocesses serve the session
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    lease = Lease(client)
    audio = clip(PARTS, seed=1)
    call = stack.stub.StreamCaptions(paced(audio), timeout=120)
    res = Collected()
    killed: LMProcess | None = None
    captions_before_kill = 0
    try:
        for resp in call:
            res.responses.append(resp)
            if killed is None and len(res.captions) >= 3:
                sid = res.started.session_id
                owner = lease.owner(keys.session_lease(sid))
                assert owner is not None, "a live session must be leased"
                killed = lm_processes[owner.split("-")[0]]
                os.kill(killed.proc.pid, signal.SIGKILL)
                killed.proc.wait(timeout=10)
                captions_before_kill = len(res.captions)
    finally:
        client.close()
    assert killed is not None and killed.proc.returncode == -signal.SIGKILL
    survivor = next(p for p in lm_processes.values() if p is not killed)
    assert survivor.proc.poll() is None

    kinds = res.kinds()
    assert kinds[0] == "started" and kinds[-1] == "ended", res.table()
    assert res.ended.total_audio_seconds == pytest.approx(30.0, abs=0.05), res.table()
    assert len(res.captions) > captions_before_kill, "the survivor made no captions\n" + res.table()
    assert not [e for e in res.errors if e.fatal], res.table()
    pairs = [(c.segment_id, c.revision) for c in res.captions]
    assert len(pairs) == len(set(pairs)), "a (segment, revision) was shown twice\n" + res.table()
    ids = [c.event_id for c in res.captions]
    assert len(ids) == len(set(ids))
    finals = res.finals
    assert [(c.segment_id, c.window_start_seconds, c.window_end_seconds) for c in finals] == [
        (0, 0.0, 10.0),
        (1, 10.0, 20.0),
        (2, 20.0, 30.0),
    ], res.table()
    for c in res.captions:  # revisions of a segment keep counting up across the takeover
        same = [d.revision for d in res.captions if d.segment_id == c.segment_id]
        assert same == list(range(len(same))), res.table()
    # The survivor rebuilt the token buffer: its captions describe the right audio.
    for c, (name, _) in zip(finals, PARTS, strict=True):
        assert set(types_in_caption(c.text)) == {name}, f"segment {c.segment_id}: {c.text!r}\n{res.table()}"
