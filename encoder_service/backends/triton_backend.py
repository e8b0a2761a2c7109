"""The ``triton`` backend: encoder windows to an NVIDIA Triton Inference Server over gRPC.

Each batch the micro-batcher forms goes out as one request (split at the model's
``max_batch_size``), with up to ``triton_max_in_flight`` requests in flight, so that Triton's
dynamic batcher can merge requests from every encoder front into its preferred sizes. Windows are
padded to the full window width (one shape for every request); the model ignores the padding.

Every call has a deadline; a call that fails UNAVAILABLE is retried with exponential backoff
within that deadline, then raises :class:`Unavailable` (the gateway tells its client the session
can be resumed). At start the backend waits for the server, then checks the model's readiness,
metadata and encoder config against the checkpoint: a missing model or a mismatch is one
:class:`ConfigError` naming the model and the field.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from encoder_service.backends import triton_model as tm
from encoder_service.backends.base import EncoderGeometry, Window
from encoder_service.backends.triton_repo import DEFAULT_MODEL_NAME, encoder_config_json
from services import metrics
from services.errors import ConfigError, FailedPrecondition, MidashengError, ResourceExhausted, Unavailable
from services.model.config import EncoderConfig
from services.streaming.encoder import EncoderWindow

log = logging.getLogger(__name__)
_CHANNEL_MAX_BYTES = 1 << 30  # 64 full windows: 17 MB of mel in, 83 MB of 1280-dim features out


@dataclass(frozen=True)
class TritonSettings:
    """How the encoder reaches its Triton Inference Server (``--backend triton``)."""

    ENV_GROUP: ClassVar[str] = "ENCODER"

    triton_url: Annotated[str, "Triton gRPC address host:port"] = "127.0.0.1:8001"
    triton_model: Annotated[str, "Triton model name of the encoder"] = DEFAULT_MODEL_NAME
    triton_model_version: Annotated[str, "model version ('' = the server's version policy)"] = ""
    triton_timeout_s: Annotated[float, "deadline of one encoder batch, retries included (s)"] = 10.0
    triton_retries: Annotated[int, "retries of a call that failed UNAVAILABLE"] = 3
    triton_backoff_ms: Annotated[float, "first retry delay (ms), doubled each retry"] = 200.0
    triton_max_in_flight: Annotated[int, "inference requests in flight at once"] = 4
    triton_ready_timeout_s: Annotated[float, "s to wait at start for the server to be ready"] = 30.0
    triton_tls: Annotated[bool, "connect with TLS"] = False
    triton_tls_ca: Annotated[str, "PEM file of root certificates ('' = the system's)"] = ""
    triton_tls_cert: Annotated[str, "PEM client certificate chain for mutual TLS"] = ""
    triton_tls_key: Annotated[str, "PEM client private key for mutual TLS"] = ""
    triton_auth_header: Annotated[str, "metadata key sent with every call, e.g. authorization"] = ""
    triton_auth_file: Annotated[str, "file holding that header's value (never on the command line)"] = ""

    def __post_init__(self) -> None:
        if not self.triton_url or not self.triton_model:
            raise ConfigError("TritonSettings: triton_url and triton_model are required.")
        if min(self.triton_timeout_s, self.triton_ready_timeout_s) <= 0 or self.triton_backoff_ms < 0:
            raise ConfigError("TritonSettings: timeouts must be > 0 and triton_backoff_ms >= 0.")
        if self.triton_retries < 0 or self.triton_max_in_flight < 1:
            raise ConfigError("TritonSettings: triton_retries must be >= 0 and triton_max_in_flight >= 1.")
        if bool(self.triton_auth_header) != bool(self.triton_auth_file):
            raise ConfigError("TritonSettings: triton_auth_header and triton_auth_file go together.")
        if (self.triton_tls_ca or self.triton_tls_cert or self.triton_tls_key) and not self.triton_tls:
            raise ConfigError("TritonSettings: TLS files need --triton-tls.")

    def headers(self) -> dict[str, str]:
        if not self.triton_auth_header:
            return {}
        try:
            value = Path(self.triton_auth_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the Triton auth file {self.triton_auth_file}: {e}") from e
        return {self.triton_auth_header.lower(): value}


def _code(e: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE' (tritonclient keeps the gRPC status as text)."""
    return str(e.status() or "UNKNOWN").rsplit(".", 1)[-1]


def _refused(code: str, e: InferenceServerException) -> bool:
    """Triton answers a call without its restricted protocol's header UNAVAILABLE; it is no outage."""
    return code == "UNAVAILABLE" and "restricted" in (e.message() or "")


def _dims(shape: list[Any]) -> list[int]:
    return [int(d) for d in shape]


class TritonBackend:
    name = "triton"

    def __init__(self, settings: TritonSettings, encoder_cfg: EncoderConfig) -> None:
        self.settings = settings
        self.geometry = EncoderGeometry.of(encoder_cfg)
        self.max_in_flight = settings.triton_max_in_flight
        self._encoder_json = encoder_config_json(encoder_cfg)
        self._headers = settings.headers()
        self._where = f"Triton model {settings.triton_model!r} at {settings.triton_url}"
        self.client = grpcclient.InferenceServerClient(
            settings.triton_url,
            ssl=settings.triton_tls,
            root_certificates=settings.triton_tls_ca or None,
            private_key=settings.triton_tls_key or None,
            certificate_chain=settings.triton_tls_cert or None,
            channel_args=[
                ("grpc.max_send_message_length", _CHANNEL_MAX_BYTES),
                ("grpc.max_receive_message_length", _CHANNEL_MAX_BYTES),
                # Reach a restarted server within about a second (gRPC's default grows to 2 min).
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 30000),
                ("grpc.keepalive_timeout_ms", 10000),
            ],
        )
        try:
            self.max_batch_size = self._check_model()
            self._warm_up()
        except BaseException:
            self.client.close()
            raise

    # --- start ------------------------------------------------------------------------------

    def _check_model(self) -> int:
        """Wait for the server, then check the model; returns its max_batch_size."""
        s = self.settings
        deadline = time.monotonic() + s.triton_ready_timeout_s
        last = "no answer"
        while True:
            try:
                if self.client.is_server_ready(headers=self._headers, client_timeout=2.0):
                    break
                last = "not ready"
            except InferenceServerException as e:
                last = f"{_code(e)}: {e.message()}"
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"Triton at {s.triton_url} is not ready after {s.triton_ready_timeout_s:.0f} s ({last})"
                )
            time.sleep(0.25)
        try:
            ready = self.client.is_model_ready(
                s.triton_model, s.triton_model_version, headers=self._headers, client_timeout=5.0
            )
            if ready:
                meta = self.client.get_model_metadata(
                    s.triton_model,
                    s.triton_model_version,
                    headers=self._headers,
                    as_json=True,
                    client_timeout=5.0,
                )
                config = self.client.get_model_config(
                    s.triton_model,
                    s.triton_model_version,
                    headers=self._headers,
                    as_json=True,
                    client_timeout=5.0,
                )["config"]
        except InferenceServerException as e:
            raise ConfigError(f"{self._where}: cannot read its metadata ({_code(e)}: {e.message()})") from e
        if not ready:
            raise ConfigError(
                f"{self._where} is not loaded or not ready (models there: {self._models()}); write one with "
                "`midasheng triton-repo --model DIR --out REPO` and start tritonserver on that repository"
            )
        problems = self._mismatches(meta, config)
        if problems:
            raise ConfigError(
                f"{self._where} does not fit this checkpoint's encoder: {'; '.join(problems)}. Write the "
                "repository from the same checkpoint with `midasheng triton-repo --model DIR --out REPO`"
            )
        return int(config.get("max_batch_size", 0))

    def _models(self) -> str:
        try:
            index = self.client.get_model_repository_index(
                headers=self._headers, as_json=True, client_timeout=5.0
            )
        except InferenceServerException as e:
            return f"unknown: {_code(e)}"
        found = [f"{m.get('name')} ({m.get('state', 'UNKNOWN')})" for m in index.get("models", [])]
        return ", ".join(found) or "none"

    def _mismatches(self, meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
        g = self.geometry
        want = {
            ("input", tm.MEL): ("FP32", [-1, g.n_mels, g.window_frames]),
            ("input", tm.FRAMES): ("INT32", [-1, 1]),
            ("input", tm.VALID_PATCHES): ("INT32", [-1, 1]),
            ("output", tm.FEATURES): ("FP32", [-1, g.window_patches, g.embed_dim]),
        }
        have = {("input", t["name"]): t for t in meta.get("inputs", [])}
        have |= {("output", t["name"]): t for t in meta.get("outputs", [])}
        problems = []
        for (kind, name), (dtype, shape) in want.items():
            t = have.get((kind, name))
            if t is None:
                problems.append(f"{kind} {name} is missing")
                continue
            if t["datatype"] != dtype:
                problems.append(f"{kind} {name} is {t['datatype']}, expected {dtype}")
            if _dims(t["shape"]) != shape:
                problems.append(f"{kind} {name} has shape {_dims(t['shape'])}, expected {shape}")
        if int(config.get("max_batch_size", 0)) < 1:
            problems.append("max_batch_size is 0 (the model must batch)")
        params = tm.parameters(config)
        theirs = params.get(tm.ENCODER_CONFIG_PARAM)
        if theirs is None:
            problems.append(f"parameter {tm.ENCODER_CONFIG_PARAM} is missing")
        elif theirs != self._encoder_json:
            mine, other = json.loads(self._encoder_json), json.loads(theirs)
            for key in sorted(set(mine) | set(other)):
                if mine.get(key) != other.get(key):
                    problems.append(
                        f"encoder_config.{key} is {other.get(key)!r} there, {mine.get(key)!r} in this checkpoint"
                    )
        return problems

    def _warm_up(self) -> None:
        """One real inference (a silent window): proves auth, the model's code and its output shape."""
        g = self.geometry
        mel = torch.full((g.n_mels, g.window_frames), -100.0)
        try:
            self._infer([Window(mel, g.window_patches)], time.monotonic() + self.settings.triton_timeout_s)
        except FailedPrecondition as e:  # refused: auth, or a model that fails on a real window
            raise ConfigError(f"the first inference was refused: {e}") from None

    # --- encode -----------------------------------------------------------------------------

    def encode(self, windows: Sequence[EncoderWindow]) -> list[torch.Tensor]:
        self.geometry.check(windows)
        deadline = time.monotonic() + self.settings.triton_timeout_s
        out: list[torch.Tensor] = []
        step = max(1, self.max_batch_size)
        for start in range(0, len(windows), step):
            out.extend(self._infer(windows[start : start + step], deadline))
        return out

    def _infer(self, windows: Sequence[EncoderWindow], deadline: float) -> list[torch.Tensor]:
        g = self.geometry
        n = len(windows)
        mel = np.zeros((n, g.n_mels, g.window_frames), dtype=np.float32)
        frames = np.zeros((n, 1), dtype=np.int32)
        valid = np.zeros((n, 1), dtype=np.int32)
        for i, w in enumerate(windows):
            m = w.mel.detach().to("cpu", torch.float32).numpy()
            mel[i, :, : m.shape[1]] = m
            frames[i, 0], valid[i, 0] = m.shape[1], w.valid_patches
        inputs = []
        for name, array, dtype in (
            (tm.MEL, mel, "FP32"),
            (tm.FRAMES, frames, "INT32"),
            (tm.VALID_PATCHES, valid, "INT32"),
        ):
            x = grpcclient.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            inputs.append(x)
        feats = self._call(inputs, deadline)
        want = (n, g.window_patches, g.embed_dim)
        if feats.shape != want:
            raise FailedPrecondition(
                f"{self._where} returned {tm.FEATURES} of shape {feats.shape}, expected {want}"
            )
        return [torch.from_numpy(feats[i, : frames[i, 0] // g.patch_frames].copy()) for i in range(n)]

    def _call(self, inputs: list[Any], deadline: float) -> np.ndarray:
        s = self.settings
        outputs = [grpcclient.InferRequestedOutput(tm.FEATURES)]
        delay = s.triton_backoff_ms / 1000
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"{self._where} did not answer within {s.triton_timeout_s:g} s")
            t0 = time.monotonic()
            metrics.TRITON_IN_FLIGHT.inc()
            try:
                result = self.client.infer(
                    s.triton_model,
                    inputs,
                    model_version=s.triton_model_version,
                    outputs=outputs,
                    client_timeout=left,
                    headers=self._headers,
                )
            except InferenceServerException as e:
                code = _code(e)
                metrics.TRITON_ERRORS.labels(code=code).inc()
                if (
                    code == "UNAVAILABLE"
                    and not _refused(code, e)
                    and attempt < s.triton_retries
                    and deadline - time.monotonic() > delay
                ):
                    attempt += 1
                    metrics.TRITON_RETRIES.inc()
                    log.warning(
                        "%s: UNAVAILABLE (%s); retry %d in %.2f s", self._where, e.message(), attempt, delay
                    )
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise self._error(code, e, attempt) from None
            finally:
                metrics.TRITON_IN_FLIGHT.dec()
            metrics.TRITON_SECONDS.observe(time.monotonic() - t0)
            array = result.as_numpy(tm.FEATURES)
            if array is None:
                raise FailedPrecondition(f"{self._where} returned no {tm.FEATURES}")
            return array

    def _error(self, code: str, e: InferenceServerException, retries: int) -> MidashengError:
        what = f"{self._where}: {code}: {e.message()}"
        if _refused(code, e):
            return FailedPrecondition(f"{what} (see --triton-auth-header and --triton-auth-file)")
        if code == "UNAVAILABLE":
            return Unavailable(f"{what} (after {retries} retries)")
        if code in ("DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND"):  # slow, or the model was unloaded
            return Unavailable(what)
        if code == "RESOURCE_EXHAUSTED":
            return ResourceExhausted(what)
        return FailedPrecondition(what)  # refused (auth, shapes, a failing model): not the client's fault

    def close(self) -> None:
        self.client.close()
