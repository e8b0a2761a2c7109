"""Service settings reach every service as flags and environment variables."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from encoder_service.sessions import EncoderLimits
from lm_service.worker import WorkerLimits
from services import config
from services.cli import build_parser
from services.errors import ConfigError
from services.gateway.live import GatewayLimits
from services.gateway.webrtc import WebRtcLimits
from services.jobs.store import JobDefaults
from services.monitor.limits import MonitorLimits
from services.monitor.webhook import WebhookLimits
from services.transport.keys import TransportDefaults

# Which settings each service command takes.
SERVICES: dict[tuple[str, ...], tuple[type[config.Settings], ...]] = {
    ("gateway",): (GatewayLimits, WebRtcLimits, MonitorLimits, WebhookLimits, TransportDefaults),
    ("encoder",): (EncoderLimits, TransportDefaults),
    ("lm",): (WorkerLimits, TransportDefaults),
    ("jobs", "serve"): (JobDefaults,),
    ("worker", "--jobs-dir", "/tmp"): (JobDefaults,),
    ("up",): (TransportDefaults,),
}


STRINGS = {"payload_dtype": "float16"}  # a valid non-default value of each text field


def _changed(cls: type[config.Settings]) -> dict[str, object]:
    """A valid non-default value for every field."""
    d = cls()  # type: ignore[call-arg]
    out: dict[str, object] = {}
    for f in dataclasses.fields(d):  # type: ignore[arg-type]
        v = getattr(d, f.name)
        if isinstance(v, str):
            out[f.name] = STRINGS[f.name]
            continue
        out[f.name] = (not v) if isinstance(v, bool) else v * 2 + 1 if isinstance(v, int) else v * 2 + 0.5
    if cls is TransportDefaults:
        out["heartbeat_ms"] = out["lease_ttl_ms"] // 4  # type: ignore[operator]
    if cls is JobDefaults:
        out["heartbeat_ms"], out["claim_min_idle_ms"] = 1000, out["lease_ttl_ms"]
    return out


@pytest.mark.parametrize(
    "argv,classes",
    list(SERVICES.items()),
    ids=lambda x: " ".join(x) if isinstance(x, tuple) and isinstance(x[0], str) else "",
)
def test_every_field_is_a_flag_and_arrives(
    argv: tuple[str, ...], classes: tuple[type[config.Settings], ...]
) -> None:
    parser = build_parser()
    flags: list[str] = []
    for cls in classes:
        for name, value in _changed(cls).items():
            flag = config.flag_name(cls, name)
            flags += (
                [flag, str(value)] if not isinstance(value, bool) else [flag if value else "--no-" + flag[2:]]
            )
    args = parser.parse_args([*argv, *flags])
    for cls in classes:
        got = config.from_args(cls, args)
        assert dataclasses.asdict(got) == _changed(cls), cls.__name__  # type: ignore[call-overload]


def test_environment_then_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("MIDASHENG_TRANSPORT_LEASE_TTL_MS", "9000")
    monkeypatch.setenv("MIDASHENG_GATEWAY_MAX_SESSIONS", "7")
    args = parser.parse_args(["gateway", "--max-sessions", "9"])
    assert config.from_args(TransportDefaults, args).lease_ttl_ms == 9000  # from the environment
    assert config.from_args(GatewayLimits, args).max_sessions == 9  # the flag wins
    assert config.from_env(GatewayLimits).max_sessions == 7


def test_bad_values_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDASHENG_TRANSPORT_LEASE_TTL_MS", "soon")
    with pytest.raises(ConfigError, match="MIDASHENG_TRANSPORT_LEASE_TTL_MS must be a int"):
        config.from_env(TransportDefaults)
    monkeypatch.delenv("MIDASHENG_TRANSPORT_LEASE_TTL_MS")
    args = build_parser().parse_args(["lm", "--heartbeat-ms", "5000"])  # not shorter than the lease
    with pytest.raises(ConfigError, match="heartbeat_ms"):
        config.from_args(TransportDefaults, args)


def test_to_env_reproduces_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = TransportDefaults(lease_ttl_ms=8000, heartbeat_ms=2000, tokens_maxlen=50)
    for k, v in config.to_env(s).items():
        monkeypatch.setenv(k, v)
    assert config.from_env(TransportDefaults) == s


def test_help_names_the_environment_variable() -> None:
    p = argparse.ArgumentParser()
    config.add_flags(p, GatewayLimits)
    text = p.format_help()
    assert "--idle-timeout-seconds" in text and "MIDASHENG_GATEWAY_IDLE_TIMEOUT_SECONDS" in text
