"""Bearer-token checks shared by the gateway's gRPC and HTTP sides (constant-time)."""

from __future__ import annotations

import hmac


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value is exactly ``Bearer <token>`` (compared in constant time)."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
