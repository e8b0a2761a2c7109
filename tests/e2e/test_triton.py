"""The encoder on a real NVIDIA Triton Inference Server.

A stock ``tritonserver`` (from the Triton environment, ``deploy/triton/setup-env.sh``) serves the
repository that ``midasheng triton-repo`` wrote for the demo model, unedited, on a free loopback
port, with its inference protocol restricted to callers that send a token header. Shown here:

* the repository loads; the ``triton`` backend's features and tokens equal the ``torch``
  backend's within ATOL, for offline clips and for live streams (final and tentative tokens),
  several sessions at once;
* a missing model, a repository whose dims disagree with the checkpoint, and a wrong token are
  refused at start with one clear error; TLS works, and a plaintext client is refused;
* killing Triton mid-stream gives retries, then UNAVAILABLE with a resume hint to the client;
  once Triton is back the session resumes and new sessions start, the encoder never restarted;
* ``midasheng up --encoder-backend triton`` starts a local Triton and serves a stream through it.

Where the Triton environment is missing the tests skip and say why (CI creates it).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import torch
from prometheus_client import REGISTRY

from encoder_service.backends import TorchBackend, Window
from encoder_service.backends.triton_backend import TritonBackend, TritonSettings
from encoder_service.backends.triton_local import LocalTriton, TritonInstall, find_install, start_local_triton
from encoder_service.batcher import EncoderBatcher
from encoder_service.server import EncoderServer, start_encoder_server
from encoder_service.sessions import EncoderSessions
from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.cli import main
from services.errors import ConfigError, MidashengError, Unavailable
from services.gateway.server import start_gateway
from services.model.checkpoint import CONFIG_NAME, build_model, resolve_model_dir, save_model
from services.model.config import MiDashengLMConfig
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from services.transport import keys
from services.wire.tokens import TokenMessage, decode_tokens
from tests.e2e.helpers import (
    CALL_TIMEOUT_S,
    STREAM_TIMEOUT_S,
    Feeder,
    audio_req,
    clip,
    collect,
    config,
    pcm_chunks,
    remember,
    requests_for,
)

SR = 16000
ATOL = 1e-5  # stated tolerance of the triton backend vs the torch backend (fp32 on the CPU)
TOKEN_KEY = "x-midasheng-token"
TOKEN = "s3cret-token"
HEADER = f"triton-grpc-protocol-{TOKEN_KEY}"  # what tritonserver 2.51 expects for TOKEN_KEY


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> TritonInstall:
    """The Triton environment, once its server has started on an empty repository here (so that a
    model that fails to load later is a failure, not a skip)."""
    try:
        found = find_install()
        start_local_triton(tmp_path_factory.mktemp("triton-empty-repo"), found, timeout=60).stop()
    except MidashengError as e:
        pytest.skip(f"Triton cannot be started on this machine: {e}")
    return found


@pytest.fixture(scope="module")
def repo(install: TritonInstall, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's repository, plus one from a checkpoint with a narrower encoder."""
    repo = tmp_path_factory.mktemp("triton-repo")
    assert main(["triton-repo", "--out", str(repo)]) == 0
    cfg = MiDashengLMConfig.from_file(resolve_model_dir(None) / CONFIG_NAME)
    enc = dataclasses.replace(cfg.audio_encoder_config, embed_dim=64)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, audio_encoder_config=enc), "cpu")
    narrow = save_model(model, tmp_path_factory.mktemp("narrow-checkpoint"))
    assert main(["triton-repo", "--model", str(narrow), "--out", str(repo), "--name", "narrow_encoder"]) == 0
    return repo


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("triton-auth") / "token"
    path.write_text(TOKEN + "\n")
    return path


def start_triton(install: TritonInstall, repo: Path, port: int = 0) -> LocalTriton:
    restrict = f"--grpc-restricted-protocol=inference:{TOKEN_KEY}={TOKEN}"
    return start_local_triton(repo, install, grpc_port=port, extra_args=(restrict,))


@pytest.fixture(scope="module")
def triton(install: TritonInstall, repo: Path) -> Iterator[LocalTriton]:
    server = start_triton(install, repo)
    yield server
    server.stop()


def settings(server: LocalTriton, token_file: Path, **kw: object) -> TritonSettings:
    base: dict[str, object] = dict(
        triton_url=server.url, triton_auth_header=HEADER, triton_auth_file=str(token_file)
    )
    return TritonSettings(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture
def servers(
    triton: LocalTriton, token_file: Path, redis_url: str, encoder_model: MiDashengLM
) -> Iterator[tuple[EncoderServer, EncoderServer]]:
    """(torch-backed, triton-backed) encoder services on one Redis."""
    backend = TritonBackend(settings(triton, token_file), encoder_model.config.audio_encoder_config)
    pair = (
        start_encoder_server(encoder_model, redis_url),
        start_encoder_server(encoder_model, redis_url, backend=backend),
    )
    yield pair
    for srv in pair:
        srv.stop(grace=0.5)


def encode_clip(srv: EncoderServer, wav: np.ndarray, encoder_only: bool) -> torch.Tensor:
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        req = encoder_pb2.EncodeClipRequest(
            data=wav.astype("<f4").tobytes(),
            format=encoder_pb2.SAMPLE_FORMAT_FLOAT32,
            encoder_only=encoder_only,
        )
        t = encoder_pb2_grpc.EncoderServiceStub(channel).EncodeClip(req, timeout=CALL_TIMEOUT_S).embeddings
    assert t.dtype == encoder_pb2.DTYPE_FLOAT32
    return torch.from_numpy(np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)).copy())


def test_generated_repository_loads_and_offline_clips_match_torch(
    servers: tuple[EncoderServer, EncoderServer], triton: LocalTriton, token_file: Path
) -> None:
    torch_srv, triton_srv = servers
    client = triton_srv.backend.client  # type: ignore[attr-defined]
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index == {"dasheng_encoder": "READY", "narrow_encoder": "READY"}
    served = client.get_model_config("dasheng_encoder", as_json=True)["config"]
    assert served["max_batch_size"] == 64 and served["dynamic_batching"]["preferred_batch_size"] == [
        8,
        16,
        32,
    ]
    assert served["instance_group"][0]["kind"] == "KIND_CPU"
    rng = np.random.default_rng(3)
    for seconds in (0.1, 4.0, 10.08, 23.0):
        wav = clip([("low_tone", seconds / 2), ("white_noise", seconds / 2)], seed=4)
        wav = (wav + 0.01 * rng.standard_normal(wav.size)).astype(np.float32)
        for encoder_only in (False, True):
            want = encode_clip(torch_srv, wav, encoder_only)
            got = encode_clip(triton_srv, wav, encoder_only)
            assert got.shape == want.shape and got.shape[0] > 0
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def publications(redis_url: str, sid: str) -> list[TokenMessage]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [decode_tokens(f[b"pb"])[1] for _, f in client.xrange(keys.session_tokens(sid))]
    finally:
        client.close()


def test_live_streams_match_torch_final_and_tentative_several_at_once(
    servers: tuple[EncoderServer, EncoderServer], redis_url: str, encoder_model: MiDashengLM
) -> None:
    """Three sessions push concurrently into the triton-backed service; every publication (final
    tokens and the tentative tail) equals the one the torch backend makes from the same pushes."""
    _, triton_srv = servers
    clips = {
        f"live-{i}": clip([(name, 6.5), ("white_noise", 6.5)], seed=10 + i)
        for i, name in enumerate(("low_tone", "high_tone", "beeps"))
    }
    chunk = SR // 4

    def stream(sid: str, wav: np.ndarray) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{triton_srv.port}") as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            stub.OpenSession(
                encoder_pb2.OpenSessionRequest(session_id=sid, emit_interval_seconds=1.0),
                timeout=CALL_TIMEOUT_S,
            )
            pieces = [wav[k : k + chunk] for k in range(0, wav.size, chunk)]
            for seq, piece in enumerate(pieces, start=1):
                req = encoder_pb2.PushAudioRequest(
                    session_id=sid,
                    seq=seq,
                    format=encoder_pb2.SAMPLE_FORMAT_FLOAT32,
                    data=piece.astype("<f4").tobytes(),
                    end_of_stream=seq == len(pieces),
                )
                stub.PushAudio(req, timeout=CALL_TIMEOUT_S)

    errors: list[BaseException] = []

    def run(sid: str, wav: np.ndarray) -> None:
        try:
            stream(sid, wav)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=item) for item in clips.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STREAM_TIMEOUT_S)
    assert not errors, errors

    reference: list[tuple[str, bytes]] = []
    batcher = EncoderBatcher(TorchBackend(encoder_model.audio_encoder))
    batcher.start()
    sessions = EncoderSessions(encoder_model, batcher, lambda sid, payload: reference.append((sid, payload)))
    try:
        for sid, wav in clips.items():
            sessions.open(sid, 1.0)
            pieces = [wav[k : k + chunk] for k in range(0, wav.size, chunk)]
            for seq, piece in enumerate(pieces, start=1):
                sessions.push(sid, seq, piece, end_of_stream=seq == len(pieces))
    finally:
        batcher.stop()
    finals = tentatives = 0
    for sid in clips:
        want = [decode_tokens(p)[1] for s, p in reference if s == sid]
        got = publications(redis_url, sid)
        assert [(m.seq, m.token_start, m.num_final, m.tokens.shape[0], m.end_of_stream) for m in got] == [
            (m.seq, m.token_start, m.num_final, m.tokens.shape[0], m.end_of_stream) for m in want
        ]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.tokens, w.tokens, atol=ATOL, rtol=0)
            finals += g.num_final
            tentatives += g.tokens.shape[0] - g.num_final
    assert finals == sum(encoder_model.token_count(w.size) for w in clips.values())
    assert tentatives > 0


def test_missing_model_mismatched_dims_and_a_wrong_token_are_refused_at_start(
    triton: LocalTriton,
    token_file: Path,
    tmp_path: Path,
    encoder_model: MiDashengLM,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enc = encoder_model.config.audio_encoder_config
    with pytest.raises(ConfigError) as missing:
        TritonBackend(settings(triton, token_file, triton_model="no_such_encoder"), enc)
    assert "'no_such_encoder'" in str(missing.value) and "not loaded" in str(missing.value)
    assert "dasheng_encoder (READY)" in str(missing.value)

    with pytest.raises(ConfigError) as narrow:
        TritonBackend(settings(triton, token_file, triton_model="narrow_encoder"), enc)
    text = str(narrow.value)
    assert (
        "'narrow_encoder'" in text
        and "output FEATURES has shape [-1, 252, 64], expected [-1, 252, 128]" in text
    )
    assert "encoder_config.embed_dim is 64 there, 128 in this checkpoint" in text

    wrong = tmp_path / "wrong-token"
    wrong.write_text("not the token")
    with pytest.raises(ConfigError, match="refused.*restricted.*--triton-auth-header"):
        TritonBackend(settings(triton, wrong), enc)

    # The service itself: one line on stderr, exit code 2, nothing served.
    code = main(
        [
            "encoder",
            "--backend",
            "triton",
            "--triton-url",
            triton.url,
            "--triton-model",
            "narrow_encoder",
            "--triton-auth-header",
            HEADER,
            "--triton-auth-file",
            str(token_file),
            "--redis-url",
            redis_url,
            "--listen",
            "127.0.0.1:0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("midasheng encoder: error:")]
    assert len(lines) == 1 and "narrow_encoder" in lines[0] and "FEATURES" in lines[0], err
    assert "Traceback" not in err


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.slow
def test_tls(install: TritonInstall, repo: Path, tmp_path: Path, encoder_model: MiDashengLM) -> None:
    cert, key = self_signed(tmp_path)
    server = start_local_triton(repo, install, tls=(cert, key))
    try:
        enc = encoder_model.config.audio_encoder_config
        backend = TritonBackend(
            TritonSettings(triton_url=server.url, triton_tls=True, triton_tls_ca=str(cert)), enc
        )
        try:
            g = backend.geometry
            window = Window(
                torch.randn(g.n_mels, 700, generator=torch.Generator().manual_seed(1)) * 10 - 40, 150
            )
            (got,) = backend.encode([window])
            (want,) = TorchBackend(encoder_model.audio_encoder).encode([window])
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        finally:
            backend.close()
        with pytest.raises(Unavailable, match="not ready after"):
            TritonBackend(TritonSettings(triton_url=server.url, triton_ready_timeout_s=1.0), enc)
    finally:
        server.stop()


def retries() -> float:
    return REGISTRY.get_sample_value("midasheng_triton_retries_total") or 0.0


@pytest.mark.slow
def test_triton_outage_mid_stream_then_resume_without_restarting_the_encoder(
    install: TritonInstall,
    repo: Path,
    token_file: Path,
    redis_url: str,
    engine: CaptionEngine,
    encoder_model: MiDashengLM,
) -> None:
    server = start_triton(install, repo)
    cleanup = [server.stop]
    try:
        backend = TritonBackend(
            settings(server, token_file, triton_timeout_s=5.0, triton_backoff_ms=100.0),
            encoder_model.config.audio_encoder_config,
        )
        enc = start_encoder_server(encoder_model, redis_url, backend=backend)
        cleanup.append(lambda: enc.stop(grace=0.5))
        lm = start_lm_server(engine, redis_url, workers=1, worker_prefix="lm")
        cleanup.append(lambda: lm.stop(grace=0.5))
        gw = start_gateway(redis_url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}")
        cleanup.append(lambda: gw.stop(grace=0.5))
        channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
        cleanup.append(channel.close)
        stub = captions_pb2_grpc.CaptionServiceStub(channel)

        audio = clip([("low_tone", 6.0)], seed=5)
        chunks = pcm_chunks(audio)
        feeder = Feeder()
        feeder.put(
            config(window_seconds=2.0, hop_seconds=1.0),
            *[audio_req(d, i + 1) for i, d in enumerate(chunks[:30])],
        )
        call = stub.StreamCaptions(iter(feeder), timeout=STREAM_TIMEOUT_S)
        sid = remember(next(call)).started.session_id
        assert next(call).WhichOneof("response") == "caption"  # captions flow through Triton

        before = retries()
        server.kill()
        feeder.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i >= 30])
        feeder.close()
        res = collect(call)
        assert res.error is not None, res.table()
        assert res.error.code() == grpc.StatusCode.UNAVAILABLE, f"{res.error.code()}: {res.error.details()}"
        assert f"session {sid} can be resumed" in res.error.details(), res.error.details()
        assert retries() - before >= 3, "no retries before giving up"

        # Triton comes back on the same port; the encoder service was never restarted.
        port = server.grpc_port
        server = start_triton(install, repo, port=port)
        cleanup.append(server.stop)
        deadline = time.monotonic() + 30
        while True:
            again = Feeder()
            again.put(config(session_id=sid))
            resumed_call = stub.StreamCaptions(iter(again), timeout=STREAM_TIMEOUT_S)
            first = next(resumed_call)
            assert first.WhichOneof("response") == "started" and first.started.resumed, first
            last_seq = first.started.last_seq
            again.put(*[audio_req(d, i + 1) for i, d in enumerate(chunks) if i + 1 > last_seq])
            again.close()
            rest = collect(resumed_call)
            if rest.error is None or time.monotonic() > deadline:
                break
            assert rest.error.code() == grpc.StatusCode.UNAVAILABLE, rest.error.details()
            time.sleep(0.5)
        assert rest.error is None, f"{rest.error}\n{rest.table()}"
        assert rest.finals and rest.ended.total_audio_seconds == pytest.approx(6.0, abs=0.05), rest.table()

        fresh = collect(stub.StreamCaptions(requests_for(audio[: 3 * SR]), timeout=STREAM_TIMEOUT_S))
        assert fresh.error is None, f"{fresh.error}\n{fresh.table()}"
        assert fresh.finals and fresh.ended.total_audio_seconds == pytest.approx(3.0, abs=0.05)
    finally:
        for fn in reversed(cleanup):
            fn()


@pytest.mark.slow
def test_up_with_the_triton_encoder_backend(install: TritonInstall) -> None:
    from services.cli.up import start_stack

    out = io.StringIO()
    stack = start_stack(gateway_port=0, http_port=None, device="cpu", out=out, encoder_backend="triton")
    try:
        assert stack.triton is not None and stack.triton.process.poll() is None
        channel = grpc.insecure_channel(stack.gateway)
        try:
            stub = captions_pb2_grpc.CaptionServiceStub(channel)
            res = collect(
                stub.StreamCaptions(
                    requests_for(clip([("high_tone", 3.0)], seed=2)), timeout=STREAM_TIMEOUT_S
                )
            )
        finally:
            channel.close()
        assert res.error is None, f"{res.error}\n{res.table()}"
        assert res.finals and res.ended.total_audio_seconds == pytest.approx(3.0, abs=0.05)
        log = out.getvalue()
        assert "[triton]" in log and "(triton backend)" in log, log[-3000:]
    finally:
        stack.stop()
    assert stack.triton.process.poll() is not None
    assert stack.triton_repo is not None and not stack.triton_repo.exists()
