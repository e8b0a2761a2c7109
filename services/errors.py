"""Named exceptions shared by every component.

Domain code raises these; the gRPC layer maps them to status codes in one place
and the CLI turns them into a message and a non-zero exit code.
"""

from __future__ import annotations


class MidashengError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidArgument(MidashengError, ValueError):
    """The caller sent something malformed (maps to INVALID_ARGUMENT)."""


class AudioDecodeError(InvalidArgument):
    """Audio could not be read, decoded or was empty."""


class CheckpointError(MidashengError):
    """A checkpoint directory is missing files or holds keys that do not fit the model."""


class ConfigError(MidashengError, ValueError):
    """A configuration value is invalid."""


class NotFound(MidashengError, LookupError):
    """A named resource (session, job, adapter, model) does not exist (maps to NOT_FOUND)."""


class ResourceExhausted(MidashengError):
    """A bounded queue or buffer is full (maps to RESOURCE_EXHAUSTED). ``retry_after`` (seconds)
    is sent to gRPC clients as the ``retry-after-ms`` trailer and to HTTP clients as ``Retry-After``."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(MidashengError):
    """A required token is missing or wrong (maps to UNAUTHENTICATED)."""


class PermissionDenied(MidashengError):
    """The caller is known but may not do this (maps to PERMISSION_DENIED)."""


class DatasetError(InvalidArgument):
    """A dataset has bad rows; ``problems`` lists (row_number, message) pairs."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class FailedPrecondition(MidashengError):
    """The request is valid but not in this state (e.g. audio before the session config)."""


class DeadlineExceeded(MidashengError, TimeoutError):
    """A wait ran out (e.g. a client that never sends its first message)."""


class Unavailable(MidashengError):
    """A service this one depends on did not answer; retrying later may work (maps to UNAVAILABLE)."""
