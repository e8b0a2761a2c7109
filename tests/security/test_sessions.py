"""H2: a session belongs to someone. Its id alone no longer lets anyone resume it (hijack), read its
captions or see it in the monitoring view: that takes the resume secret SessionStarted returned,
an API key of the session's tenant, or the admin scope. A resume that reaches an encoder that does
not hold the session answers UNAVAILABLE and leaves the healthy session alone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from services.gateway.live import ABANDONED_FIELD, SECRET_FIELD
from services.pb.midasheng.v1 import captions_pb2
from services.transport import keys as rkeys
from tests.e2e.conftest import LiveStack
from tests.e2e.helpers import (
    CALL_TIMEOUT_S,
    STREAM_TIMEOUT_S,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    pcm_chunks,
)
from tests.gateway.test_http import http
from tests.security.conftest import Keys, SecureStack

pytestmark = pytest.mark.usefixtures("redis_url")


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip([("high_tone", 6.0)], seed=4)


def start_victim(stub: object, audio: np.ndarray) -> tuple[Feeder, object, captions_pb2.SessionStarted]:
    """A live session with 3 s of audio sent and the call kept open."""
    chunks = pcm_chunks(audio)
    feeder = Feeder()
    feeder.put(
        config(window_seconds=2.0, hop_seconds=1.0), *[audio_req(d, i + 1) for i, d in enumerate(chunks[:30])]
    )
    call = stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)  # type: ignore[attr-defined]
    started = next(call).started
    assert started.session_id and len(started.resume_secret) >= 32, started
    return feeder, call, started


def resume_code(stub: object, sid: str, secret: str = "") -> grpc.StatusCode:
    req = config(session_id=sid, resume_secret=secret)
    res = collect(stub.StreamCaptions(iter([req]), timeout=CALL_TIMEOUT_S))  # type: ignore[attr-defined]
    if res.error is not None:
        return res.error.code()
    assert res.started.resumed and not res.started.resume_secret, res.table()  # the secret is not repeated
    return grpc.StatusCode.OK


def finish(feeder: Feeder, call: object, audio: np.ndarray) -> None:
    """The victim sends the rest and finalizes: its call must end normally, every segment final."""
    chunks = pcm_chunks(audio)
    feeder.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i >= 30])
    feeder.close()
    res = collect(call)  # type: ignore[arg-type]
    assert res.error is None, f"{res.error}\n{res.table()}"
    assert [(c.segment_id, c.is_final) for c in res.finals] == [(0, True), (1, True), (2, True)], res.table()
    assert res.ended.total_audio_seconds == pytest.approx(6.0, abs=0.05)


def test_a_session_id_alone_does_not_resume_a_session(
    make_stack: Callable[..., LiveStack], audio: np.ndarray, redis_url: str
) -> None:
    stack = make_stack()  # an open gateway (no keys): the secret is all that protects a session
    feeder, call, started = start_victim(stack.stub, audio)
    sid = started.session_id
    assert resume_code(stack.stub, sid) == grpc.StatusCode.PERMISSION_DENIED
    assert resume_code(stack.stub, sid, "x" * 32) == grpc.StatusCode.PERMISSION_DENIED
    assert resume_code(stack.stub, sid, started.resume_secret[:-1]) == grpc.StatusCode.PERMISSION_DENIED
    # Only the secret's hash is stored.
    client = redis.Redis.from_url(redis_url)
    try:
        cfg = client.hgetall(rkeys.session_config(sid))
        assert started.resume_secret.encode() not in b"".join([*cfg.keys(), *cfg.values()])
        assert len(cfg[SECRET_FIELD.encode()]) == 64
    finally:
        client.close()
    finish(feeder, call, audio)  # the hijack attempts did not take the session from its owner


def test_the_secret_the_tenant_or_an_admin_may_resume_other_tenants_may_not(
    make_secure_stack: Callable[..., SecureStack], keys: Keys, audio: np.ndarray
) -> None:
    stack = make_secure_stack(mtls=False)
    alice, bob, admin = (stack.stub(keys.key[k]) for k in ("alice", "bob", "admin"))
    feeder, call, started = start_victim(alice, audio)
    sid = started.session_id
    assert resume_code(bob, sid) == grpc.StatusCode.PERMISSION_DENIED
    feeder.close()
    collect(call)  # alice's call ends (half-close: finalized); a resume then replays its events
    assert resume_code(bob, sid, started.resume_secret) == grpc.StatusCode.OK  # the secret is a capability
    assert resume_code(alice, sid) == grpc.StatusCode.OK  # her own tenant
    assert resume_code(admin, sid) == grpc.StatusCode.OK


def test_downloads_and_the_monitoring_view_belong_to_the_session_owner(
    make_secure_stack: Callable[..., SecureStack], keys: Keys, audio: np.ndarray
) -> None:
    stack = make_secure_stack(mtls=False, http=True)
    feeder, call, started = start_victim(stack.stub(keys.key["alice"]), audio)
    sid = started.session_id

    def get(path: str, key: str, **headers: str) -> tuple[int, object]:
        status, _, body = http("GET", stack.web + path, headers={"Authorization": f"Bearer {key}", **headers})
        return status, json.loads(body) if body else None

    def listed(key: str) -> list[str]:
        status, body = get("/api/sessions", key)
        assert status == 200, body
        return [s["id"] for s in body["sessions"] + body["recent"]]  # type: ignore[index]

    try:
        assert sid in listed(keys.key["alice"]) and sid in listed(keys.key["admin"])
        assert sid not in listed(keys.key["bob"])
        assert get("/api/sessions", keys.key["caption_only"])[0] == 403  # no monitor scope
        download = f"/api/sessions/{sid}/captions.json"
        assert get(download, keys.key["bob"])[0] == 403
        assert get(download, keys.key["bob"], **{"X-Resume-Secret": "nope"})[0] == 403
        assert get(download, keys.key["bob"], **{"X-Resume-Secret": started.resume_secret})[0] == 200
        assert get(download, keys.key["alice"])[0] == 200
        assert get(download, keys.key["admin"])[0] == 200
        assert get(f"/api/sessions/{sid}/captions.vtt", keys.key["bob"])[0] == 403
        assert http("GET", stack.web + download)[0] == 401
    finally:
        feeder.close()
        collect(call)  # type: ignore[arg-type]


def test_a_resume_through_another_gateways_encoder_is_unavailable_and_abandons_nothing(
    make_stack: Callable[..., LiveStack], audio: np.ndarray, redis_url: str
) -> None:
    a = make_stack()  # gateway A + encoder A
    b = make_stack(lm_workers=0)  # gateway B + encoder B, sharing A's Redis (an L4 balancer in front)
    feeder, call, started = start_victim(a.stub, audio)
    sid = started.session_id
    res = collect(
        b.stub.StreamCaptions(
            iter([config(session_id=sid, resume_secret=started.resume_secret)]), timeout=CALL_TIMEOUT_S
        )
    )
    assert res.error is not None and res.error.code() == grpc.StatusCode.UNAVAILABLE, res.table()
    assert "another gateway" in (res.error.details() or "")
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.hget(rkeys.session_config(sid), ABANDONED_FIELD) is None
        assert client.zscore(rkeys.ACTIVE_SESSIONS, sid) is not None
        assert not any(
            f.get(b"reason") == b"ENCODER_STATE_LOST" for _, f in client.xrange(rkeys.session_captions(sid))
        )
    finally:
        client.close()
    time.sleep(0.5)
    finish(feeder, call, audio)  # the session goes on through A as if nothing happened
