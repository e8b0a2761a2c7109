"""The encoder backend seam without a Triton server: EncodeClip through the batcher and backend equals
the offline model; the Triton model's row encoding equals the torch backend's windows; generated
``config.pbtxt`` files parse as Triton model configs; bad Triton settings are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from encoder_service.backends import TorchBackend, Window
from encoder_service.backends.triton_backend import TritonSettings
from encoder_service.backends.triton_model import check_rows, encode_rows
from encoder_service.backends.triton_repo import RepoOptions, encoder_config_json, write_repository
from encoder_service.server import EncoderServer, start_encoder_server
from services.errors import ConfigError
from services.model.modeling import MiDashengLM
from services.model.processor import prepare_audio
from services.pb.midasheng.v1 import encoder_pb2, encoder_pb2_grpc

SR = 16000
ATOL = 1e-5  # fp32 on the CPU: the same kernels on differently composed batches


@pytest.fixture
def encoder(redis_url: str, encoder_model: MiDashengLM) -> Iterator[tuple[EncoderServer, grpc.Channel]]:
    srv = start_encoder_server(encoder_model, redis_url)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, channel
    channel.close()
    srv.stop(grace=0.5)


def offline(model: MiDashengLM, wav: np.ndarray, encoder_only: bool) -> torch.Tensor:
    """The model on the whole clip, as offline captioning runs it (clips under 0.2 s zero-padded)."""
    audio = prepare_audio(wav)
    with torch.inference_mode():
        lengths = torch.tensor([audio.numel()])
        if encoder_only:
            return model.audio_encoder.forward_audio(audio[None], lengths)[0][0]
        return model.encode_audio(audio[None], lengths)[0][0, : model.token_count(audio.numel())]


def encode_clip(channel: grpc.Channel, wav: np.ndarray, encoder_only: bool) -> torch.Tensor:
    stub = encoder_pb2_grpc.EncoderServiceStub(channel)
    req = encoder_pb2.EncodeClipRequest(
        data=wav.astype("<f4").tobytes(), format=encoder_pb2.SAMPLE_FORMAT_FLOAT32, encoder_only=encoder_only
    )
    t = stub.EncodeClip(req, timeout=30).embeddings
    assert t.dtype == encoder_pb2.DTYPE_FLOAT32
    return torch.from_numpy(np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)).copy())


@pytest.mark.parametrize("seconds", [0.1, 4.0, 10.08, 10.1, 23.0])
def test_encode_clip_through_the_backend_equals_the_offline_model(
    encoder: tuple[EncoderServer, grpc.Channel], encoder_model: MiDashengLM, seconds: float
) -> None:
    rng = np.random.default_rng(int(seconds * 100))
    wav = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    for encoder_only in (False, True):
        got = encode_clip(encoder[1], wav, encoder_only)
        want = offline(encoder_model, wav, encoder_only)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0)


def test_triton_model_rows_equal_torch_backend_windows(encoder_model: MiDashengLM) -> None:
    """What the Python-backend model computes for padded rows is what the torch backend computes
    for the windows alone, zero beyond each window's patches (windows without valid patches too)."""
    g = TorchBackend(encoder_model.audio_encoder).geometry
    gen = torch.Generator().manual_seed(0)
    shapes = [(g.window_frames, g.window_patches), (501, 100), (4, 0), (37, 9), (g.window_frames, 3)]
    windows = [Window(torch.randn(g.n_mels, t, generator=gen) * 10 - 40, v) for t, v in shapes]
    mel = np.full((len(windows), g.n_mels, g.window_frames), 123.0, dtype=np.float32)  # padding is ignored
    for i, w in enumerate(windows):
        mel[i, :, : w.mel.shape[1]] = w.mel.numpy()
    frames = np.array([[w.mel.shape[1]] for w in windows], dtype=np.int32)
    valid = np.array([[w.valid_patches] for w in windows], dtype=np.int32)
    assert check_rows(mel, frames, valid, g.patch_frames) is None
    rows = encode_rows(encoder_model.audio_encoder, mel, frames.ravel(), valid.ravel())
    assert rows.shape == (len(windows), g.window_patches, g.embed_dim)
    backend = TorchBackend(encoder_model.audio_encoder)
    for i, w in enumerate(windows):
        (alone,) = backend.encode([w])
        p = w.mel.shape[1] // g.patch_frames
        torch.testing.assert_close(torch.from_numpy(rows[i, :p]), alone, atol=ATOL, rtol=0)
        assert not rows[i, p:].any()
    bad = frames.copy()
    bad[1, 0] = g.window_frames + 1
    assert "FRAMES must be within" in str(check_rows(mel, bad, valid, g.patch_frames))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_generated_config_is_a_valid_triton_model_config(
    tmp_path: Path, encoder_model: MiDashengLM, kind: str
) -> None:
    opts = RepoOptions(
        kind=kind, instances=2, gpus=(0, 1) if kind == "gpu" else (), preferred_batch_sizes=(4, 8)
    )
    model_dir = write_repository(None, tmp_path, opts)
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    enc = encoder_model.config.audio_encoder_config
    assert cfg.name == "dasheng_encoder" and cfg.backend == "python" and cfg.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("MEL", model_config_pb2.TYPE_FP32, [enc.n_mels, enc.target_length]),
        ("FRAMES", model_config_pb2.TYPE_INT32, [1]),
        ("VALID_PATCHES", model_config_pb2.TYPE_INT32, [1]),
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("FEATURES", [enc.window_patches, enc.embed_dim])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = cfg.instance_group
    assert group.count == 2
    if kind == "gpu":
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1]
        assert cfg.parameters["dtype"].string_value == "bfloat16"
    else:
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert cfg.parameters["dtype"].string_value == "float32"
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["encoder_config"].string_value == encoder_config_json(enc)
    assert (model_dir / "1" / "model.py").read_text().startswith('"""The Dasheng encoder as a Triton')
    assert Path(cfg.parameters["project_root"].string_value, "services", "model", "dasheng.py").exists()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="go together"):
        TritonSettings(triton_auth_header="authorization")
    with pytest.raises(ConfigError, match="need --triton-tls"):
        TritonSettings(triton_tls_ca=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="triton_max_in_flight"):
        TritonSettings(triton_max_in_flight=0)
    with pytest.raises(ConfigError, match="cannot read the Triton auth file"):
        TritonSettings(triton_auth_header="authorization", triton_auth_file=str(tmp_path / "none")).headers()
    with pytest.raises(ConfigError, match="preferred batch sizes"):
        RepoOptions(max_batch_size=8, preferred_batch_sizes=(16,))
