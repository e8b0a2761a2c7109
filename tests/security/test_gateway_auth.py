"""C1/M1 at the public edge: the gateway serves TLS and takes per-tenant API keys with scopes
(compared in constant time, re-read from the keys file so a key is revoked without a restart),
and reaches the encoder and LM over mutual TLS with the service token. The jobs API takes API
keys with the ``jobs`` scope."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.jobs.server import start_jobs_server
from services.pb.midasheng.v1 import captions_pb2, jobs_pb2, jobs_pb2_grpc
from services.security import ClientCredentials, SecuritySettings, remove_keys, server_security
from tests.e2e.helpers import CALL_TIMEOUT_S, STREAM_TIMEOUT_S, clip, collect, requests_for
from tests.security.certs import Pki
from tests.security.conftest import Keys, SecureStack, public_client


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return clip([("high_tone", 3.0)], seed=3)


def caption_code(stack: SecureStack, key: str | None) -> grpc.StatusCode:
    req = captions_pb2.CaptionRequest(
        raw_audio=captions_pb2.RawAudio(data=b"\0\0" * 16000, sample_rate_hz=16000)
    )
    try:
        stack.stub(key).Caption(req, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def stream_code(stack: SecureStack, key: str | None, audio: np.ndarray) -> grpc.StatusCode:
    res = collect(stack.stub(key).StreamCaptions(requests_for(audio), timeout=STREAM_TIMEOUT_S))
    if res.error is not None:
        return res.error.code()
    assert res.finals and res.ended, res.table()
    return grpc.StatusCode.OK


def test_gateway_takes_api_keys_with_scopes_over_tls_and_calls_the_tiers_over_mtls(
    make_secure_stack: Callable[..., SecureStack], keys: Keys, audio: np.ndarray, pki: Pki
) -> None:
    stack = make_secure_stack(mtls=True, token=True)
    assert stream_code(stack, keys.key["alice"], audio) == grpc.StatusCode.OK  # through every tier
    assert caption_code(stack, keys.key["caption_only"]) == grpc.StatusCode.OK
    assert stream_code(stack, None, audio) == grpc.StatusCode.UNAUTHENTICATED
    assert stream_code(stack, "mdk_" + "x" * 43, audio) == grpc.StatusCode.UNAUTHENTICATED
    assert caption_code(stack, None) == grpc.StatusCode.UNAUTHENTICATED
    assert stream_code(stack, keys.key["caption_only"], audio) == grpc.StatusCode.PERMISSION_DENIED
    # Plaintext to a TLS gateway does not even connect.
    plain = ClientCredentials(token=keys.key["alice"])
    with pytest.raises(grpc.RpcError) as e:
        stack.stub(None, plain).Caption(captions_pb2.CaptionRequest(), timeout=CALL_TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_key_is_refused_without_a_restart(
    make_secure_stack: Callable[..., SecureStack], keys: Keys, audio: np.ndarray
) -> None:
    stack = make_secure_stack(mtls=False, token=True)  # token-only tiers: also a supported setup
    assert caption_code(stack, keys.key["bob"]) == grpc.StatusCode.OK
    assert remove_keys(keys.path, tenant="bob") == 1
    assert caption_code(stack, keys.key["bob"]) == grpc.StatusCode.UNAUTHENTICATED
    assert caption_code(stack, keys.key["alice"]) == grpc.StatusCode.OK  # the others still work
    new = keys.add("bob2", "bob", ["caption"])  # a new key for bob works at once
    assert caption_code(stack, new) == grpc.StatusCode.OK
    # A keys file broken by hand accepts nothing until it is fixed (fail closed).
    good = keys.path.read_text()
    keys.path.write_text("{not json")
    assert caption_code(stack, keys.key["alice"]) == grpc.StatusCode.UNAUTHENTICATED
    keys.path.write_text(good + " ")
    assert caption_code(stack, keys.key["alice"]) == grpc.StatusCode.OK
    doc = json.loads(good)
    assert all(set(e) == {"tenant", "scopes", "sha256"} for e in doc["keys"])  # no key in clear
    assert not any(k in good for k in keys.key.values())


def test_the_jobs_api_needs_a_key_with_the_jobs_scope(
    redis_url: str, keys: Keys, pki: Pki, tmp_path: Path
) -> None:
    runner = keys.add("runner", "lab", ["jobs"])
    settings = SecuritySettings(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    srv = start_jobs_server(redis_url, security=server_security(settings, str(keys.path)))
    target = f"127.0.0.1:{srv.port}"

    def list_code(key: str | None) -> grpc.StatusCode:
        with public_client(pki, key).channel(target) as ch:
            try:
                jobs_pb2_grpc.JobServiceStub(ch).ListJobs(jobs_pb2.ListJobsRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    try:
        assert list_code(None) == grpc.StatusCode.UNAUTHENTICATED
        assert list_code(keys.key["alice"]) == grpc.StatusCode.PERMISSION_DENIED  # no jobs scope
        assert list_code(runner) == grpc.StatusCode.OK
        assert list_code(keys.key["admin"]) == grpc.StatusCode.OK
    finally:
        srv.stop(1.0)
