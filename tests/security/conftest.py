"""Fixtures of the security tests: fresh certificates, API key files, and live stacks whose tiers
authenticate each other (service token and/or mutual TLS) and their clients (API keys)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from encoder_service.server import EncoderServer, start_encoder_server
from lm_service.engines.base import CaptionEngine
from lm_service.server import LMServer, start_lm_server
from services.gateway.live import GatewayLimits
from services.gateway.server import GatewayServer, start_gateway
from services.model.modeling import MiDashengLM
from services.pb.midasheng.v1 import captions_pb2_grpc
from services.security import (
    INSECURE,
    ClientCredentials,
    SecuritySettings,
    add_key,
    client_credentials,
    server_security,
)
from tests.e2e.conftest import make_stack  # the open in-process stack, for tests here too
from tests.security.certs import Pki, make_pki

SERVICE_TOKEN = "service-token-for-tests-0123456789"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Keys:
    """An API keys file with a few tenants; ``key[name]`` is each one's secret."""

    path: Path
    key: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, tenant: str, scopes: list[str]) -> str:
        self.key[name], _ = add_key(self.path, tenant, scopes)
        return self.key[name]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    k = Keys(tmp_path / "api-keys.json")
    k.add("alice", "alice", ["stream", "caption", "monitor"])
    k.add("bob", "bob", ["stream", "caption", "monitor"])
    k.add("caption_only", "carol", ["caption"])
    k.add("admin", "ops", ["admin"])
    return k


def token_file(tmp_path: Path, token: str = SERVICE_TOKEN) -> str:
    p = tmp_path / "service-token"
    p.write_text(token + "\n")
    p.chmod(0o600)
    return str(p)


def tier_settings(pki: Pki, tmp_path: Path, mtls: bool = True, token: bool = True) -> SecuritySettings:
    """Settings of an internal tier: TLS with the server certificate, client certificates from the
    test CA required (only CN "gateway" or "server"), and/or the service token."""
    return SecuritySettings(
        tls_cert=str(pki.server.cert) if mtls else "",
        tls_key=str(pki.server.key) if mtls else "",
        tls_client_ca=str(pki.ca.path) if mtls else "",
        tls_allowed_clients="gateway,server" if mtls else "",
        service_token_file=token_file(tmp_path) if token else "",
    )


def gateway_settings(pki: Pki, tmp_path: Path, mtls: bool = True, token: bool = True) -> SecuritySettings:
    """The gateway serves TLS to the public (no client certificates: API keys) and calls the
    tiers with its client certificate (CN "gateway") and the service token."""
    return SecuritySettings(
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_ca=str(pki.ca.path) if mtls else "",
        tls_client_cert=str(pki.gateway.cert) if mtls else "",
        tls_client_key=str(pki.gateway.key) if mtls else "",
        tls_server_name="server",
        service_token_file=token_file(tmp_path) if token else "",
    )


def public_client(pki: Pki, key: str | None) -> ClientCredentials:
    return ClientCredentials(tls=True, ca=pki.ca.path.read_bytes(), server_name="server", token=key)


@dataclass
class SecureStack:
    encoder: EncoderServer
    lm: LMServer
    gateway: GatewayServer
    pki: Pki
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def stub(
        self, key: str | None, credentials: ClientCredentials | None = None
    ) -> captions_pb2_grpc.CaptionServiceStub:
        channel = (credentials or public_client(self.pki, key)).channel(self.target)
        self.channels.append(channel)
        return captions_pb2_grpc.CaptionServiceStub(channel)

    def stop(self) -> None:
        for c in self.channels:
            c.close()
        self.gateway.stop(grace=1.0)
        self.lm.stop(grace=1.0)
        self.encoder.stop(grace=1.0)


@pytest.fixture
def make_secure_stack(
    redis_url: str,
    engine: CaptionEngine,
    encoder_model: MiDashengLM,
    pki: Pki,
    keys: Keys,
    tmp_path: Path,
) -> Iterator[Callable[..., SecureStack]]:
    """``make_secure_stack(mtls=True, token=True, limits=None)``: encoder and LM that require
    mutual TLS and/or the service token, a TLS gateway that requires API keys (``keys``)."""
    stacks: list[SecureStack] = []

    def make(
        mtls: bool = True, token: bool = True, limits: GatewayLimits | None = None, http: bool = False
    ) -> SecureStack:
        tier = server_security(tier_settings(pki, tmp_path, mtls, token))
        enc = start_encoder_server(encoder_model, redis_url, security=tier)
        lm = start_lm_server(engine, redis_url, workers=1, worker_prefix="lm", security=tier)
        gw_settings = gateway_settings(pki, tmp_path, mtls, token)
        gw = start_gateway(
            redis_url,
            f"127.0.0.1:{enc.port}",
            f"127.0.0.1:{lm.port}",
            limits=limits,
            security=server_security(gw_settings, str(keys.path), service_token=False),
            internal=client_credentials(gw_settings),
            http_address="127.0.0.1:0" if http else None,
        )
        stack = SecureStack(enc, lm, gw, pki)
        stacks.append(stack)
        return stack

    yield make
    for s in reversed(stacks):
        s.stop()


__all__ = ["INSECURE", "SERVICE_TOKEN", "Keys", "SecureStack", "make_stack"]
