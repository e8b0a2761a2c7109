"""Who may call what, and over which transport: TLS credentials, service tokens, API keys.

Every gRPC server of the project (gateway, encoder, LM, jobs) runs the same interceptor
(:class:`AuthInterceptor`), which asks an :class:`Authenticator` for the caller's
:class:`Principal` before any handler runs:

- a **service token** (``authorization: Bearer TOKEN`` metadata; the token comes from a file or
  ``$MIDASHENG_SERVICE_TOKEN``, never from argv) identifies another tier of this project;
- a **client certificate** verified against ``--tls-client-ca`` (mutual TLS) does the same, by
  its common name or subject alternative names (``--tls-allowed-clients`` narrows them);
- an **API key** from the keys file (``--api-keys-file``, JSON, re-read whenever it changes, so a
  key is revoked by deleting its line) identifies a tenant and its scopes (public gateway, jobs).

A server with none of these configured is *open*: every caller is :data:`ANONYMOUS` (every scope
but ``admin``). ``midasheng up`` refuses to listen beyond loopback in that state.

``grpc.health.v1.Health`` and server reflection stay open on every server, so load balancers and
orchestrators can probe (with mutual TLS the probe still needs a client certificate: the TLS
handshake happens before any method is known). Secrets are compared with
``hmac.compare_digest`` and never logged; API keys are stored as SHA-256 hashes.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import grpc

from services.errors import ConfigError, MidashengError, PermissionDenied, Unauthenticated
from services.principal import (
    ADMIN,
    ANONYMOUS,
    CAPTION,
    JOBS,
    MONITOR,
    SCOPES,
    SERVICE,
    STREAM,
    Principal,
    secret_hash,
    secret_matches,
)

log = logging.getLogger(__name__)

SERVICE_TOKEN_ENV = "MIDASHENG_SERVICE_TOKEN"  # the token every tier shares (internal calls)
API_KEY_ENV = "MIDASHENG_API_KEY"  # a client's API key (midasheng stream/watch/jobs)
AUTH_HEADER = "authorization"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # reachable without credentials
KEY_PREFIX = "mdk_"
__all__ = [
    "ADMIN",
    "ANONYMOUS",
    "CAPTION",
    "JOBS",
    "MONITOR",
    "SCOPES",
    "SERVICE",
    "STREAM",
    "Principal",
    "secret_hash",
    "secret_matches",
]

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value (None when absent or malformed)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def read_secret(path: str, what: str) -> str:
    """A secret from a file (stripped; must not be empty)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} file {path}: {e.strerror}") from e
    if not text:
        raise ConfigError(f"the {what} file {path} is empty")
    return text


# --- API keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    tenant: str
    scopes: frozenset[str]
    sha256: str
    key_id: str = ""  # first characters of the hash: names a key without revealing it


def parse_keys(text: str, where: str = "the API keys file") -> list[ApiKey]:
    """``{"keys": [{"tenant", "scopes": [...], "sha256"}]}`` -> keys (ConfigError when malformed)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where} is not JSON: {e}") from e
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'{where} must be a JSON object {{"keys": [...]}}')
    out = []
    for i, item in enumerate(entries):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: entry {i} is not an object")
        tenant, scopes, digest = item.get("tenant"), item.get("scopes"), item.get("sha256")
        if not isinstance(tenant, str) or not _NAME.match(tenant):
            raise ConfigError(f"{where}: entry {i}: tenant must match {_NAME.pattern}")
        if not isinstance(scopes, list) or not scopes or not all(s in SCOPES for s in scopes):
            raise ConfigError(f"{where}: entry {i}: scopes must be a non-empty list of {', '.join(SCOPES)}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}: entry {i}: sha256 must be 64 lowercase hex digits")
        out.append(ApiKey(tenant, frozenset(scopes), digest, digest[:12]))
    return out


class ApiKeys:
    """The keys file, re-read whenever it changes (size, mtime or inode), so revoking a key needs
    no restart. A file that becomes unreadable or malformed accepts no key at all (fail closed)
    until it is fixed; the error is logged once per change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[ApiKey] = []
        self._load(strict=True)

    def _load(self, strict: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text(), f"API keys file {self.path}")
        except (OSError, ConfigError) as e:
            if strict:
                raise ConfigError(f"cannot use the API keys file {self.path}: {e}") from e
            if self._stamp is not None or self._keys:
                log.error("API keys file %s: %s; no API key is accepted until it is fixed", self.path, e)
            self._stamp, self._keys = None, []
            return
        self._stamp, self._keys = stamp, keys
        log.info(
            "API keys file %s: %d key(s) for %d tenant(s)",
            self.path,
            len(keys),
            len({k.tenant for k in keys}),
        )

    def lookup(self, key: str) -> ApiKey | None:
        """The entry whose hash matches ``key``; every entry is compared, in constant time."""
        with self._lock:
            self._load()
            keys = list(self._keys)
        digest = secret_hash(key)
        found = None
        for k in keys:
            if hmac.compare_digest(digest, k.sha256):
                found = k
        return found

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._keys)


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: str | os.PathLike[str], tenant: str, scopes: Sequence[str]) -> tuple[str, ApiKey]:
    """Append a new key to the keys file (created 0600 when missing; replaced atomically).
    Returns the key (shown once) and its entry."""
    if not _NAME.match(tenant):
        raise ConfigError(f"tenant must match {_NAME.pattern}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"scopes must be some of {', '.join(SCOPES)}, got {', '.join(scopes) or 'none'}")
    p = Path(path)
    doc: dict[str, Any] = {"keys": []}
    if p.exists():
        parse_keys(p.read_text(), str(p))
        doc = json.loads(p.read_text())
    key = new_api_key()
    digest = secret_hash(key)
    doc["keys"].append({"tenant": tenant, "scopes": sorted(set(scopes)), "sha256": digest})
    _write_private(p, json.dumps(doc, indent=1) + "\n")
    return key, ApiKey(tenant, frozenset(scopes), digest, digest[:12])


def remove_keys(path: str | os.PathLike[str], tenant: str = "", key_id: str = "") -> int:
    """Remove every key of ``tenant`` or the key whose id is ``key_id``; returns how many."""
    p = Path(path)
    parse_keys(p.read_text(), str(p))
    doc = json.loads(p.read_text())
    keep = [
        e
        for e in doc["keys"]
        if not ((tenant and e["tenant"] == tenant) or (key_id and e["sha256"].startswith(key_id)))
    ]
    removed = len(doc["keys"]) - len(keep)
    doc["keys"] = keep
    _write_private(p, json.dumps(doc, indent=1) + "\n")
    return removed


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecuritySettings:
    """TLS and credentials of a service: what it serves with and what it calls other tiers with.

    Paths only: the service token itself comes from ``--service-token-file`` or
    ``$MIDASHENG_SERVICE_TOKEN``, never from the command line."""

    ENV_GROUP: ClassVar[str] = "SECURITY"

    tls_cert: Annotated[str, "PEM certificate chain this server presents (with --tls-key: serve TLS)"] = ""
    tls_key: Annotated[str, "PEM private key of --tls-cert"] = ""
    tls_client_ca: Annotated[
        str, "PEM CA bundle; clients must present a certificate it signed (mutual TLS)"
    ] = ""
    tls_allowed_clients: Annotated[
        str, "comma-separated client certificate names (CN or SAN) accepted; empty = any the CA signed"
    ] = ""
    tls_ca: Annotated[str, "PEM CA bundle that signed the services this process calls (TLS to them)"] = ""
    tls_client_cert: Annotated[
        str, "PEM certificate this process presents to the services it calls (default: --tls-cert)"
    ] = ""
    tls_client_key: Annotated[str, "PEM private key of --tls-client-cert (default: --tls-key)"] = ""
    tls_server_name: Annotated[
        str, "name expected in the called services' certificates (default: their host)"
    ] = ""
    service_token_file: Annotated[
        str, f"file holding the token the tiers share (default: ${SERVICE_TOKEN_ENV}; neither = none)"
    ] = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ConfigError("--tls-client-cert and --tls-client-key go together")

    @property
    def serves_tls(self) -> bool:
        return bool(self.tls_cert)

    def service_token(self) -> str | None:
        if self.service_token_file:
            return read_secret(self.service_token_file, "service token")
        return os.environ.get(SERVICE_TOKEN_ENV) or None

    def allowed_clients(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.tls_allowed_clients.split(",") if n.strip())


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}") from e


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None = plaintext); with a client CA, client certificates are
    required and verified (mutual TLS)."""
    if not settings.serves_tls:
        return None
    pair = (_read(settings.tls_key, "TLS key"), _read(settings.tls_cert, "TLS certificate"))
    ca = _read(settings.tls_client_ca, "client CA bundle") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientCredentials:
    """How this process calls a gRPC server: TLS roots, an optional client certificate (mutual
    TLS), the expected server name and a bearer token (service token or API key)."""

    tls: bool = False
    ca: bytes | None = None  # None with tls = the system roots
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""
    token: str | None = field(default=None, repr=False)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``target`` with these credentials; the token rides on every call."""
        opts = [*options, *self.channel_options()]
        creds = self.channel_credentials()
        if creds is not None:
            channel = grpc.secure_channel(target, creds, options=opts)
        else:
            if self.token and not is_loopback(target.rpartition(":")[0]):
                log.warning("sending credentials to %s without TLS; configure --tls-ca", target)
            channel = grpc.insecure_channel(target, options=opts)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerInterceptor(self.token))
        return channel


INSECURE = ClientCredentials()


def client_credentials(settings: SecuritySettings, token: str | None = None) -> ClientCredentials:
    """Credentials to call the other tiers: TLS when ``--tls-ca`` is set (mutual with a client
    certificate: ``--tls-client-cert`` or else ``--tls-cert``), the service token when there is one."""
    token = token if token is not None else settings.service_token()
    if not settings.tls_ca:
        return ClientCredentials(token=token)
    cert_path = settings.tls_client_cert or settings.tls_cert
    key_path = settings.tls_client_key or settings.tls_key
    return ClientCredentials(
        tls=True,
        ca=_read(settings.tls_ca, "CA bundle"),
        cert=_read(cert_path, "client certificate") if cert_path else None,
        key=_read(key_path, "client key") if key_path else None,
        server_name=settings.tls_server_name,
        token=token,
    )


class _Details(grpc.ClientCallDetails):
    def __init__(self, d: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer TOKEN`` to every call (unless the call carries its own)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = list(d.metadata or ())
        if not any(k == AUTH_HEADER for k, _ in md):
            md.append((AUTH_HEADER, self._header))
        return _Details(d, md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


# --- the server side -----------------------------------------------------------------------------


@dataclass
class Authenticator:
    """Turns a call's metadata and TLS peer into a :class:`Principal` (or refuses it)."""

    service_token: str | None = field(default=None, repr=False)
    api_keys: ApiKeys | None = None
    mtls: bool = False  # client certificates are required and verified by the TLS layer
    allowed_clients: frozenset[str] = frozenset()

    @property
    def open(self) -> bool:
        return not (self.service_token or self.api_keys is not None or self.mtls)

    def authenticate(
        self, metadata: Mapping[str, str], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Principal:
        header = metadata.get(AUTH_HEADER)
        token = bearer_token(header)
        if token is not None:
            if self.service_token and hmac.compare_digest(token.encode(), self.service_token.encode()):
                return SERVICE
            if self.api_keys is not None:
                key = self.api_keys.lookup(token)
                if key is not None:
                    return Principal(key.tenant, key.scopes, "api_key")
        names = peer_names(auth_context) if self.mtls else frozenset()
        if names:
            if self.allowed_clients and not (names & self.allowed_clients):
                raise PermissionDenied("this client certificate is not allowed to call this service")
            return Principal(sorted(names)[0], frozenset({ADMIN}), "certificate")
        if self.open:
            return ANONYMOUS
        if header:
            raise Unauthenticated(
                "the credentials in the authorization metadata are not valid "
                "(unknown, revoked or not 'Bearer <token>')"
            )
        raise Unauthenticated(
            "this service requires credentials: 'authorization: Bearer <token>' metadata"
            + (" or a client certificate" if self.mtls else "")
        )

    def principal(self, context: grpc.ServicerContext) -> Principal:
        """The caller of a running call (the interceptor already refused bad credentials)."""
        return self.authenticate(dict(context.invocation_metadata()), context.auth_context())


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """CN and SANs of a peer certificate the TLS layer verified (empty without one)."""
    names = set()
    for k in ("x509_common_name", "x509_subject_alternative_name"):
        for v in auth_context.get(k, ()):
            names.add(v.decode(errors="replace") if isinstance(v, bytes) else str(v))
    return frozenset(names)


def authenticator_for(
    settings: SecuritySettings,
    api_keys_file: str = "",
    legacy_token: str | None = None,
    service_token: bool = True,
) -> Authenticator:
    """The authenticator of a server with these settings (plus, at the gateway and the jobs API,
    an API keys file and the older single access token). ``service_token``: whether the tiers'
    shared token lets a caller in (not at the public gateway, which only calls with it)."""
    keys = ApiKeys(api_keys_file) if api_keys_file else None
    token = settings.service_token() if service_token else None
    auth = Authenticator(token, keys, bool(settings.tls_client_ca), settings.allowed_clients())
    if legacy_token:
        auth.api_keys = with_legacy_token(keys, legacy_token)
    return auth


class _LegacyKeys(ApiKeys):
    """The gateway's single ``--token-file`` token as tenant ``default`` (every scope but admin),
    beside the keys file when there is one."""

    def __init__(self, inner: ApiKeys | None, token: str) -> None:  # no file of its own
        self.inner = inner
        self._legacy = ApiKey("default", ANONYMOUS.scopes, secret_hash(token), "legacy")

    def lookup(self, key: str) -> ApiKey | None:
        found = self.inner.lookup(key) if self.inner is not None else None
        return found or (self._legacy if hmac.compare_digest(secret_hash(key), self._legacy.sha256) else None)

    def __len__(self) -> int:
        return 1 + (len(self.inner) if self.inner is not None else 0)


def with_legacy_token(keys: ApiKeys | None, token: str) -> ApiKeys:
    """``keys`` plus the single access token of older deployments (tenant ``default``)."""
    return _LegacyKeys(keys, token)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses a call before its handler runs unless its caller is authenticated and holds the
    method's scope (``scopes``: full method name -> scope; others need ``default_scope``).
    Health checks and reflection are always let through."""

    def __init__(
        self, auth: Authenticator, scopes: Mapping[str, str] | None = None, default_scope: str | None = None
    ) -> None:
        self.auth = auth
        self.scopes = dict(scopes or {})
        self.default_scope = default_scope

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        scope = self.scopes.get(details.method, self.default_scope)

        def check(context: grpc.ServicerContext) -> None:
            try:
                principal = self.auth.principal(context)
            except Unauthenticated as e:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            except PermissionDenied as e:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            if not principal.allows(scope):
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"these credentials lack the {scope!r} scope"
                )

        return wrap_handler(handler, check)


def wrap_handler(handler: Any, before: Callable[[grpc.ServicerContext], None]) -> Any:
    """The same RPC method handler, calling ``before(context)`` first (it may abort the call)."""
    if handler.unary_unary:
        fn, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        fn, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        fn, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        fn, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        before(context)
        return fn(request, context)

    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass
class ServerSecurity:
    """What a server listens with (TLS credentials, None = plaintext) and whom it lets in."""

    credentials: grpc.ServerCredentials | None = None
    auth: Authenticator = field(default_factory=Authenticator)

    def interceptors(
        self, scopes: Mapping[str, str] | None = None, default_scope: str | None = None
    ) -> list[grpc.ServerInterceptor]:
        return [AuthInterceptor(self.auth, scopes, default_scope)]

    @property
    def tls(self) -> bool:
        return self.credentials is not None


def server_security(
    settings: SecuritySettings,
    api_keys_file: str = "",
    legacy_token: str | None = None,
    service_token: bool = True,
) -> ServerSecurity:
    """A server's TLS credentials and authenticator from its flags."""
    return ServerSecurity(
        server_credentials(settings), authenticator_for(settings, api_keys_file, legacy_token, service_token)
    )


# --- addresses and URLs --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a listen/connect host is a loopback address or name."""
    h = host.strip("[]").lower()
    return h in ("localhost", "::1", "ip6-localhost") or h.startswith("127.")


def mask_url(url: str) -> str:
    """A URL with its password (and a username beside it) replaced by ``***``: safe to print."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class SecurityError(MidashengError):
    """A deployment that would expose a service without the protection it needs."""
