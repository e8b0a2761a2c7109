"""Flags that several service commands share."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from services.model.loading import DTYPES
from services.security import API_KEY_ENV

if TYPE_CHECKING:
    from services.security import ClientCredentials, SecuritySettings

LEGACY_TOKEN_ENV = "MIDASHENG_TOKEN"  # the gateway's single access token of older deployments


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N (default: auto = cuda when there is one)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: bfloat16 on CUDA, else float32)",
    )


def add_server_flags(p: argparse.ArgumentParser, listen: str) -> None:
    p.add_argument("--listen", default=listen, help=f"gRPC address (default: {listen})")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")


API_KEYS_ENV = "MIDASHENG_API_KEYS_FILE"


def add_security_flags(p: argparse.ArgumentParser, api_keys: bool = False) -> None:
    """TLS, mutual TLS and service-token flags of a server (``SecuritySettings``); with
    ``api_keys`` also ``--api-keys-file`` (tenants and their scopes, re-read when it changes)."""
    from services import config
    from services.security import SecuritySettings

    config.add_flags(p, SecuritySettings)
    if api_keys:
        p.add_argument(
            "--api-keys-file",
            default=os.environ.get(API_KEYS_ENV, ""),
            metavar="PATH",
            help="JSON file of API keys (tenant, scopes, sha256), re-read whenever it changes; "
            f"manage it with `midasheng keys` (default: ${API_KEYS_ENV}; none = no API keys)",
        )


def security_from(args: argparse.Namespace) -> SecuritySettings:
    from services import config
    from services.security import SecuritySettings

    return config.from_args(SecuritySettings, args)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """How a command-line client reaches a server: TLS roots, a client certificate, an API key."""
    g = p.add_argument_group("connection", "TLS and credentials for --server")
    g.add_argument("--tls", action="store_true", help="use TLS (the system's CAs unless --tls-ca)")
    g.add_argument(
        "--tls-ca", default=None, metavar="PATH", help="PEM CA bundle that signed the server (implies --tls)"
    )
    g.add_argument("--tls-cert", default=None, metavar="PATH", help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, metavar="PATH", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", default="", help="name expected in the server's certificate")
    g.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help=f"file holding the API key or access token (default: ${API_KEY_ENV})",
    )
    g.add_argument("--token", default=None, help=argparse.SUPPRESS)  # visible in ps: use --api-key-file


def client_from(args: argparse.Namespace) -> ClientCredentials:
    """The credentials :func:`add_client_flags` describe (ConfigError when a file is unreadable)."""
    from pathlib import Path

    from services.errors import ConfigError
    from services.security import ClientCredentials, read_secret

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e

    token = args.token
    if args.api_key_file:
        token = read_secret(args.api_key_file, "API key")
    token = token or os.environ.get(API_KEY_ENV) or os.environ.get(LEGACY_TOKEN_ENV) or None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return ClientCredentials(
        tls=bool(args.tls or args.tls_ca or args.tls_cert),
        ca=read(args.tls_ca),
        cert=read(args.tls_cert),
        key=read(args.tls_key),
        server_name=args.tls_server_name,
        token=token,
    )
