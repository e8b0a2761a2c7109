"""End to end: a LoRA job teaches the demo model a new sound (a siren); a live stream uses the adapter.

Hyperparameters found to make this reliable in about a CPU minute: LoRA on the decoder projections,
rank 16, alpha 32, lr 3e-3 (10 warmup steps, cosine), batch 8, 400 steps, on 120 clips of every
type plus 120 siren-heavy clips. Decoder-only targets matter here: the live path runs the *base*
encoder and projector in the encoder service, so LoRA layers there would not be applied live.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from encoder_service.server import start_encoder_server
from lm_service.server import build_engine, start_lm_server
from services.cli.stream import stream_file
from services.gateway.server import start_gateway
from services.model.checkpoint import load_model
from services.pb.midasheng.v1 import jobs_pb2
from services.training.data import merge_datasets
from services.training.synth import DEFAULT_TYPES, generate_dataset, make_clip, types_in_caption
from tests.jobs.conftest import DECODER_TARGETS, done, events, wait_job

SIREN_HP = dict(
    learning_rate=3e-3,
    max_steps=400,
    batch_size=8,
    warmup_steps=10,
    lora_rank=16,
    lora_alpha=32.0,
    lora_targets=list(DECODER_TARGETS),
    checkpoint_every=100,
)


def _dataset(root: Path) -> Path:
    return merge_datasets(
        root / "train.csv",
        generate_dataset(root / "mix", 120, seed=11, types=[*DEFAULT_TYPES, "siren"], progress=False),
        generate_dataset(
            root / "siren", 120, seed=12, types=["siren", "pink_noise", "silence"], progress=False
        ),
    )


def _captions(target: str, wav: Path, adapter: str) -> list[str]:
    return [
        r.caption.text
        for r in stream_file(wav, target, speed=0, adapter=adapter, timeout=120)
        if r.WhichOneof("response") == "caption" and r.caption.is_final
    ]


@pytest.mark.slow
def test_lora_job_teaches_a_siren_and_a_live_stream_uses_the_adapter(
    jobs, worker_thread, redis_url: str, tmp_path: Path
) -> None:
    _, stub = jobs
    worker_thread(checkpoint_every=100, metrics_every=10)
    job = stub.CreateJob(
        jobs_pb2.CreateJobRequest(
            name="sirens",
            dataset_uri=str(_dataset(tmp_path / "data")),
            hyperparameters=jobs_pb2.Hyperparameters(**SIREN_HP),
        ),
        timeout=60,
    )
    job = wait_job(stub, job.id, done, timeout=600)
    assert job.status == jobs_pb2.SUCCEEDED, job.error.message
    evs = events(stub, job.id)
    losses = [e.loss for e in evs if e.kind == jobs_pb2.JobEvent.METRICS]
    assert len(losses) == 40 and all(e.learning_rate > 0 for e in evs if e.kind == jobs_pb2.JobEvent.METRICS)
    third = len(losses) // 3
    assert np.mean(losses[-third:]) < np.mean(losses[:third]), losses
    assert any(e.kind == jobs_pb2.JobEvent.EVAL and "word_f1" in e.eval_scores for e in evs)
    assert [e.status for e in evs if e.kind == jobs_pb2.JobEvent.STATUS] == [
        jobs_pb2.VALIDATING,
        jobs_pb2.QUEUED,
        jobs_pb2.RUNNING,
        jobs_pb2.SUCCEEDED,
    ]

    clip = make_clip(np.random.default_rng([99, 0]), ["siren"])
    wav = tmp_path / "siren.wav"
    sf.write(wav, clip.samples, clip.sr)
    torch.set_grad_enabled(False)
    try:
        enc = start_encoder_server(load_model(None), redis_url)
        lm = start_lm_server(build_engine(None, "cpu", adapters_redis_url=redis_url), redis_url)
        gw = start_gateway(redis_url, f"127.0.0.1:{enc.port}", f"127.0.0.1:{lm.port}")
        try:
            target = f"127.0.0.1:{gw.port}"
            tuned = _captions(target, wav, "sirens")
            plain = _captions(target, wav, "")
        finally:
            gw.stop(grace=0.5)
            lm.stop(grace=0.5)
            enc.stop(grace=0.5)
    finally:
        torch.set_grad_enabled(True)
    assert tuned and any("siren" in types_in_caption(t) for t in tuned), tuned
    assert plain and not any("siren" in types_in_caption(t) for t in plain), plain
