"""Service settings as frozen dataclasses, settable by flag and by environment variable.

Every field of a settings dataclass (``GatewayLimits``, ``TransportDefaults``, ``WebRtcLimits``,
``WorkerLimits``, ``EncoderLimits``, ``JobDefaults``) becomes a command-line flag of the services
that use it, named after the field (``max_sessions`` -> ``--max-sessions``), and an environment
variable ``MIDASHENG_<GROUP>_<FIELD>`` (``MIDASHENG_TRANSPORT_LEASE_TTL_MS``). A flag beats the
environment, which beats the dataclass default; the dataclass validates the result.

Settings that must agree across processes (the Redis transport's lease TTLs and stream caps)
are best set once in the environment, which ``midasheng up`` passes to every child.

Help text comes from each field's annotation: ``max_sessions: Annotated[int, "sessions at once"] = 256``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, ClassVar, Protocol, TypeVar

from services.errors import ConfigError

ENV_PREFIX = "MIDASHENG_"


class Settings(Protocol):
    ENV_GROUP: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]


S = TypeVar("S", bound=Settings)


def env_name(cls: type[Settings], name: str) -> str:
    return f"{ENV_PREFIX}{cls.ENV_GROUP}_{name.upper()}"


def flag_name(cls: type[Settings], name: str) -> str:
    """``--field-name``, after the class's ``FLAG_PREFIX`` when it has one (``--webhook-...``)."""
    return "--" + getattr(cls, "FLAG_PREFIX", "") + name.replace("_", "-")


def _dest(cls: type[Settings], name: str) -> str:
    return f"{cls.__name__}.{name}"


def _kind_and_help(cls: type[Settings]) -> dict[str, tuple[type, str]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[type, str]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        doc = ""
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extra = typing.get_args(hint)
            doc = next((e for e in extra if isinstance(e, str)), "")
        if hint not in (int, float, bool, str):
            raise TypeError(
                f"{cls.__name__}.{f.name}: settings fields are int, float, bool or str, not {hint}"
            )
        out[f.name] = (hint, doc)
    return out


def _parse(kind: type, text: str, where: str) -> Any:
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError as e:
        raise ConfigError(f"{where} must be a {kind.__name__}, got {text!r}") from e


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (except ``skip``), in a group titled by the class."""
    defaults = cls()
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for name, (kind, doc) in _kind_and_help(cls).items():
        if name in skip:
            continue
        text = f"{doc} (default: {getattr(defaults, name)}; env {env_name(cls, name)})".lstrip()
        if kind is bool:
            group.add_argument(
                flag_name(cls, name),
                dest=_dest(cls, name),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            group.add_argument(
                flag_name(cls, name),
                dest=_dest(cls, name),
                type=kind,
                default=None,
                metavar=kind.__name__.upper(),
                help=text,
            )


def from_env(cls: type[S], **overrides: Any) -> S:
    """``cls`` from its environment variables (fields not set there keep their defaults)."""
    values: dict[str, Any] = {}
    for name, (kind, _doc) in _kind_and_help(cls).items():
        raw = os.environ.get(env_name(cls, name))
        if raw is not None and raw != "":
            values[name] = _parse(kind, raw, env_name(cls, name))
    values.update(overrides)
    return cls(**values)


def from_args(cls: type[S], args: argparse.Namespace) -> S:
    """``cls`` from parsed flags (see :func:`add_flags`), then the environment, then defaults."""
    flags = {
        name: value
        for name in _kind_and_help(cls)
        if (value := getattr(args, _dest(cls, name), None)) is not None
    }
    return from_env(cls, **flags)


def to_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in another process."""
    cls = type(settings)
    out = {}
    for name, (kind, _doc) in _kind_and_help(cls).items():
        value = getattr(settings, name)
        out[env_name(cls, name)] = ("1" if value else "0") if kind is bool else str(value)
    return out
