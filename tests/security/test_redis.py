"""Redis with a password and TLS everywhere (M4): every tier works through a ``rediss://`` URL
with a password and never logs it; ``midasheng up``'s private Redis refuses clients without its
random password and, with ``--redis-persist``, keeps its data across restarts."""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from encoder_service.server import start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import start_lm_server
from services.cli.up import protect_private_redis
from services.gateway.server import start_gateway
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.security import mask_url
from services.transport.redis_server import free_port, start_private_redis
from tests.e2e.helpers import clip, collect, requests_for
from tests.security.certs import Pki


@pytest.fixture
def tls_redis(pki: Pki, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A redis-server that speaks only TLS and wants a password (from its config file, not argv)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port, password = free_port(), secrets.token_urlsafe(16)
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"port 0\nbind 127.0.0.1\ntls-port {port}\ntls-cert-file {pki.server.cert}\n"
        f"tls-key-file {pki.server.key}\ntls-ca-cert-file {pki.ca.path}\ntls-auth-clients no\n"
        f'requirepass {password}\nsave ""\nappendonly no\ndir {tmp_path}\n'
    )
    conf.chmod(0o600)
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={pki.ca.path}"
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("this redis-server cannot serve TLS")
                time.sleep(0.05)
        yield url, password
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_every_tier_works_through_a_tls_redis_with_a_password_and_never_logs_it(
    tls_redis: tuple[str, str],
    engine: CaptionEngine,
    encoder_model: MiDashengLM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, password = tls_redis
    plain = redis.Redis(host="127.0.0.1", port=int(url.rsplit(":", 1)[1].split("/")[0]), socket_timeout=1)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # no plaintext
    plain.close()
    caplog.set_level(logging.DEBUG)
    enc = start_encoder_server(encoder_model, url)
    lm = start_lm_server(engine, url, workers=1, worker_prefix="tls")
    gw = start_gateway(url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            stub = captions_pb2_grpc.CaptionServiceStub(ch)
            res = collect(stub.StreamCaptions(requests_for(clip([("high_tone", 3.0)])), timeout=120))
        assert res.error is None and res.finals, res.table()
    finally:
        gw.stop(1.0)
        lm.stop(1.0)
        enc.stop(1.0)
    assert password not in caplog.text
    assert password not in mask_url(url) and ":***@" in mask_url(url)


def test_the_private_redis_of_up_wants_its_password_and_can_persist(tmp_path: Path) -> None:
    server = start_private_redis(workdir=tmp_path / "data", persist=True)
    try:
        url = protect_private_redis(server)
        anon = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            anon.ping()
        anon.close()
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.set("kept", "yes")
        client.close()
    finally:
        server.stop(keep_dir=True)
    again = start_private_redis(workdir=tmp_path / "data", persist=True, port=server.port)
    try:
        url2 = protect_private_redis(again)
        assert url2 != url  # a new password each start
        client = redis.Redis.from_url(url2, socket_timeout=2)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        again.stop()
