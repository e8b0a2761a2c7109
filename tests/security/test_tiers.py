"""C1 and M1: every internal tier refuses callers without credentials, a wrong service token, a
client certificate from another CA or one it does not allow; the right credentials work, and
health checks stay open for probes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.server import start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.jobs.server import start_jobs_server
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import (
    captions_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
)
from services.security import (
    INSECURE,
    Authenticator,
    ClientCredentials,
    ServerSecurity,
    server_security,
)
from tests.security.certs import Pki
from tests.security.conftest import SERVICE_TOKEN, tier_settings

TIMEOUT = 10.0
TOKEN_ONLY = ServerSecurity(auth=Authenticator(service_token=SERVICE_TOKEN))


def health(target: str, creds: ClientCredentials) -> int:
    with creds.channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture
def tiers(redis_url: str, engine: CaptionEngine, encoder_model: MiDashengLM) -> Iterator[dict[str, str]]:
    """Encoder, LM and jobs servers that require the service token; their addresses."""
    enc = start_encoder_server(encoder_model, redis_url, security=TOKEN_ONLY)
    lm = start_lm_server(engine, None, security=TOKEN_ONLY)
    jobs = start_jobs_server(redis_url, security=TOKEN_ONLY)
    yield {"encoder": f"127.0.0.1:{enc.port}", "lm": f"127.0.0.1:{lm.port}", "jobs": f"127.0.0.1:{jobs.port}"}
    jobs.stop(1.0)
    lm.stop(1.0)
    enc.stop(1.0)


def calls(tiers: dict[str, str], creds: ClientCredentials) -> dict[str, Callable[[], object]]:
    """One harmless call per method of every internal tier."""
    enc = encoder_pb2_grpc.EncoderServiceStub(creds.channel(tiers["encoder"]))
    lm = lm_pb2_grpc.LMServiceStub(creds.channel(tiers["lm"]))
    jobs = jobs_pb2_grpc.JobServiceStub(creds.channel(tiers["jobs"]))
    pcm = np.zeros(3200, dtype="<f4").tobytes()
    return {
        "encoder.OpenSession": lambda: enc.OpenSession(
            encoder_pb2.OpenSessionRequest(session_id="victim", reattach_only=True), timeout=TIMEOUT
        ),
        "encoder.PushAudio": lambda: enc.PushAudio(
            encoder_pb2.PushAudioRequest(session_id="victim", seq=1, data=pcm), timeout=TIMEOUT
        ),
        "encoder.CloseSession": lambda: enc.CloseSession(
            encoder_pb2.CloseSessionRequest(session_id="victim"), timeout=TIMEOUT
        ),
        "encoder.EncodeClip": lambda: enc.EncodeClip(
            encoder_pb2.EncodeClipRequest(data=pcm), timeout=TIMEOUT
        ),
        "lm.GetStats": lambda: lm.GetStats(lm_pb2.GetStatsRequest(), timeout=TIMEOUT),
        "lm.Caption": lambda: lm.Caption(
            captions_pb2.CaptionRequest(
                raw_audio=captions_pb2.RawAudio(data=b"\0\0" * 3200, sample_rate_hz=16000)
            ),
            timeout=60,
        ),
        "jobs.ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=TIMEOUT),
        "jobs.CreateJob": lambda: jobs.CreateJob(
            jobs_pb2.CreateJobRequest(name="probe", dataset_uri="/etc/hostname"), timeout=TIMEOUT
        ),
        "jobs.CancelJob": lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="job-x"), timeout=TIMEOUT),
    }


@pytest.mark.parametrize(
    "creds",
    [INSECURE, ClientCredentials(token="wrong"), ClientCredentials(token=SERVICE_TOKEN + "x")],
    ids=["none", "wrong", "longer"],
)
def test_internal_tiers_refuse_calls_without_the_service_token(
    tiers: dict[str, str], creds: ClientCredentials
) -> None:
    refused = {name: code_of(call) for name, call in calls(tiers, creds).items()}
    assert set(refused.values()) == {grpc.StatusCode.UNAUTHENTICATED}, refused
    for target in tiers.values():  # probes need no credentials
        assert health(target, creds) == health_pb2.HealthCheckResponse.SERVING


def test_internal_tiers_serve_the_service_token(tiers: dict[str, str]) -> None:
    got = {name: code_of(call) for name, call in calls(tiers, ClientCredentials(token=SERVICE_TOKEN)).items()}
    assert grpc.StatusCode.UNAUTHENTICATED not in got.values(), got
    assert got["lm.GetStats"] == got["lm.Caption"] == got["encoder.EncodeClip"] == grpc.StatusCode.OK, got
    assert got["encoder.OpenSession"] == grpc.StatusCode.NOT_FOUND, got  # no such session: past auth


def mtls_client(pki: Pki, cert: object | None, ca: Path | None = None) -> ClientCredentials:
    return ClientCredentials(
        tls=True,
        ca=(ca or pki.ca.path).read_bytes(),
        cert=cert.cert.read_bytes() if cert is not None else None,  # type: ignore[attr-defined]
        key=cert.key.read_bytes() if cert is not None else None,  # type: ignore[attr-defined]
        server_name="server",
    )


def test_mutual_tls_refuses_a_wrong_ca_a_missing_or_unlisted_certificate_and_plaintext(
    redis_url: str, encoder_model: MiDashengLM, pki: Pki, tmp_path: Path
) -> None:
    enc = start_encoder_server(
        encoder_model,
        redis_url,
        security=server_security(tier_settings(pki, tmp_path, mtls=True, token=False)),
    )
    target = f"127.0.0.1:{enc.port}"

    def open_with(creds: ClientCredentials) -> grpc.StatusCode:
        with creds.channel(target) as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            return code_of(
                lambda: stub.OpenSession(
                    encoder_pb2.OpenSessionRequest(session_id="s1", emit_interval_seconds=1.0),
                    timeout=TIMEOUT,
                )
            )

    try:
        assert open_with(mtls_client(pki, pki.gateway)) == grpc.StatusCode.OK
        # A client certificate from a CA the encoder does not trust: the handshake fails.
        assert open_with(mtls_client(pki, pki.rogue_client)) == grpc.StatusCode.UNAVAILABLE
        # No client certificate at all, and plaintext: the same.
        assert open_with(mtls_client(pki, None)) == grpc.StatusCode.UNAVAILABLE
        assert open_with(INSECURE) == grpc.StatusCode.UNAVAILABLE
        # Signed by the right CA but not one of --tls-allowed-clients.
        assert open_with(mtls_client(pki, pki.other)) == grpc.StatusCode.PERMISSION_DENIED
        # A client that does not trust the encoder's CA refuses it (server authentication).
        assert open_with(mtls_client(pki, pki.gateway, ca=pki.rogue.path)) == grpc.StatusCode.UNAVAILABLE
        # The encoder still serves the right client after all of that.
        with mtls_client(pki, pki.gateway).channel(target) as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            r = stub.OpenSession(
                encoder_pb2.OpenSessionRequest(session_id="s1", reattach_only=True), timeout=TIMEOUT
            )
            assert r.reattached
    finally:
        enc.stop(1.0)
