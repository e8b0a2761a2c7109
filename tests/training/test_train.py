"""Training loop: bad rows, exact resume, LoRA save/reload/merge on a tiny model."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.errors import DatasetError
from services.model.adapters import merge_adapter
from services.model.checkpoint import load_model
from services.training.data import read_dataset
from services.training.synth import generate_dataset
from services.training.train import Trainer, config_from_args, lr_factor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), n_clips=24, seed=7, progress=False)


def _bad_csv(base: Path, good: Path) -> Path:
    with good.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1]["audio"] = "audio/does-not-exist.wav"  # row 2
    rows[2]["prediction"] = "  "  # row 3
    out = base / "bad.csv"
    (base / "audio").symlink_to(good.parent / "audio")
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_bad_rows_are_reported_with_row_numbers(small_data: Path, tmp_path: Path) -> None:
    bad = _bad_csv(tmp_path, small_data)
    with pytest.raises(DatasetError) as err:
        read_dataset(bad, on_error="fail")
    assert {r for r, _ in err.value.problems} == {2, 3}
    assert "row 2" in str(err.value) and "does-not-exist.wav" in str(err.value)
    assert "row 3" in str(err.value) and "empty prediction" in str(err.value)
    rows, problems = read_dataset(bad, on_error="skip")
    assert len(rows) == 22 and [r for r, _ in problems] == [2, 3]
    assert all(r.row not in (2, 3) for r in rows)


def test_train_cli_fails_on_bad_rows_when_asked(small_data: Path, tmp_path: Path) -> None:
    bad = _bad_csv(tmp_path, small_data)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "services",
            "train",
            "--data",
            str(bad),
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--on-bad-rows",
            "fail",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "row 2" in res.stderr and "row 3" in res.stderr


def test_wrong_columns_are_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("file,text\na.wav,hello\n")
    with pytest.raises(DatasetError, match="lacks the columns"):
        read_dataset(p)


def test_lr_schedule_warmup_then_cosine_to_ten_percent() -> None:
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    mids = [lr_factor(s, 10, 100) for s in range(10, 101, 10)]
    assert mids == sorted(mids, reverse=True)


def _cfg(data: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    base = dict(
        data=data,
        out=out,
        architecture="tiny",
        max_steps=6,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_fraction=0.1,
        eval_samples=2,
        checkpoint_every=3,
        progress=False,
        device="cpu",
        seed=3,
    )
    base.update(kw)
    return config_from_args(**base)


def test_resume_continues_exactly(small_data: Path, tmp_path: Path) -> None:
    straight = Trainer(_cfg(small_data, tmp_path / "a")).train()
    assert straight["status"] == "succeeded" and straight["step"] == 6

    stop_after = {"n": 0}

    def stop_at_three() -> bool:
        stop_after["n"] += 1
        return stop_after["n"] > 3  # polled before each step: steps 1..3 run, then stop

    interrupted = Trainer(_cfg(small_data, tmp_path / "b"), should_stop=stop_at_three).train()
    assert interrupted["status"] == "stopped" and interrupted["step"] == 3
    resumed_trainer = Trainer(_cfg(small_data, tmp_path / "b", resume=True))
    events: list[dict] = []
    resumed_trainer.on_event = events.append
    resumed = resumed_trainer.train()
    assert resumed["status"] == "succeeded" and resumed["step"] == 6
    assert any(e["event"] == "resumed" and e["step"] == 3 for e in events)
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps and min(steps) > 3  # continued, did not start over
    # Optimizer state came back: Adam's step counter continued from 3.
    state = resumed_trainer.optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 6 for s in state.values())

    a = load_model(tmp_path / "a" / "model").state_dict()
    b = load_model(tmp_path / "b" / "model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_lora_adapter_saves_reloads_and_merges(small_data: Path, tmp_path: Path) -> None:
    base = Trainer(_cfg(small_data, tmp_path / "base", max_steps=2)).train()["model"]
    trainer = Trainer(
        _cfg(
            small_data,
            tmp_path / "lora",
            model=base,
            architecture=None,
            method="lora",
            lora_rank=4,
            max_steps=3,
        )
    )
    result = trainer.train()
    # A pretrained model's input BatchNorm keeps its running statistics (the adapter stores none).
    bn, base_bn = trainer.base_model.audio_encoder.init_bn, load_model(base).audio_encoder.init_bn
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, base_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, base_bn.running_var, rtol=0, atol=0)
    adapter, merged = Path(result["adapter"]), Path(result["merged"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
    assert (merged / "tokenizer.json").exists()
    m = load_model(merged)
    base_sd = load_model(base).state_dict()
    assert m.state_dict().keys() == base_sd.keys()  # published layout, no lora_* keys
    changed = [k for k in base_sd if not torch.equal(base_sd[k], m.state_dict()[k])]
    assert any("attn.qkv" in k for k in changed) and any("q_proj" in k for k in changed)
    again = merge_adapter(base, adapter, tmp_path / "merged2")
    m2 = load_model(again)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, m2.state_dict()[k], msg=k)


def test_merge_datasets_keeps_every_row_with_absolute_paths(small_data: Path, tmp_path: Path) -> None:
    from services.training.data import merge_datasets

    merged = merge_datasets(tmp_path / "elsewhere.csv", small_data, small_data)
    rows, problems = read_dataset(merged)
    single, _ = read_dataset(small_data)
    assert not problems and len(rows) == 2 * len(single)
    assert [r.prediction for r in rows] == [r.prediction for r in single] * 2
    assert all(Path(r.audio).is_absolute() for r in rows)
