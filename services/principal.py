"""Who is calling, as plain data: a :class:`Principal` (tenant and scopes) and the checks that
say whether it may use a session. No gRPC here, so domain code (the live gateway) can use it;
:mod:`services.security` turns credentials into principals."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

# Scopes of an API key. ``admin`` implies every other one.
STREAM, CAPTION, MONITOR, JOBS, ADMIN = "stream", "caption", "monitor", "jobs", "admin"
SCOPES = (STREAM, CAPTION, MONITOR, JOBS, ADMIN)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (API key), another tier (service token or certificate), or nobody
    in particular (an open server)."""

    name: str  # tenant, certificate name, "service", or "" (anonymous)
    scopes: frozenset[str]
    kind: str  # "anonymous", "api_key", "service", "certificate"

    def allows(self, scope: str | None) -> bool:
        return scope is None or ADMIN in self.scopes or scope in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"

    @property
    def tenant(self) -> str:
        """The tenant a session or job belongs to ("" for anonymous callers)."""
        return self.name if self.authenticated else ""


ANONYMOUS = Principal("", frozenset(s for s in SCOPES if s != ADMIN), "anonymous")
SERVICE = Principal("service", frozenset({ADMIN}), "service")


def secret_hash(secret: str) -> str:
    """SHA-256 hex of a secret (what is stored instead of API keys and session secrets)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash`` (constant-time comparison of the hashes)."""
    return bool(secret) and bool(stored_hash) and hmac.compare_digest(secret_hash(secret), stored_hash)


def may_read(principal: Principal, owner: str, stored_hash: str, secret: str = "") -> bool:
    """Whether ``principal`` may read a session of tenant ``owner`` (its events, downloads, the
    monitoring view): an admin, the owner (anonymous callers own the sessions made on an open
    gateway), or anyone holding the session's secret."""
    return principal.is_admin or principal.tenant == owner or secret_matches(secret, stored_hash)


def may_resume(principal: Principal, owner: str, stored_hash: str, secret: str = "") -> bool:
    """Whether ``principal`` may resume (feed audio into, take over) a session: an admin, an
    authenticated caller of the owning tenant, or anyone holding the session's secret. Anonymous
    callers always need the secret."""
    if principal.is_admin or secret_matches(secret, stored_hash):
        return True
    return principal.authenticated and bool(owner) and principal.tenant == owner
