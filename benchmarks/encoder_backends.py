"""Encoder backends compared in one run: the in-process torch backend vs a Triton Inference Server.

For each session count N, N live sessions push 100 ms chunks as fast as they can (from N threads,
as N gateway calls would) through the encoder service's own sessions and micro-batcher, publishing
every ``--emit`` seconds of audio to an in-memory sink (no Redis). Measured per backend:

* throughput: encoder windows per second (each tentative or final window forward counts once)
  and seconds of audio per wall-clock second;
* latency: p50 / p95 of the pushes that published (the emit: windows through the batcher and the
  backend, then the projector), in ms;
* the hop: p50 of one backend call on B full windows (no sessions, no batcher), both backends; the
  difference is what the gRPC hop and Triton add per call.

With ``--fronts K`` the sessions are spread over K encoder fronts (K session tables and
micro-batchers, as K encoder processes behind K gateways would have), which batch only their own
sessions; a Triton server batches the requests of all of them together.

The Triton backend talks gRPC to a local ``tritonserver`` that this script starts on a repository
it writes (``midasheng triton-repo``), from the Triton environment (``deploy/triton/setup-env.sh``).
Both share this machine: on a CPU the server's Python backend competes with the sessions for the
same cores.

    python benchmarks/encoder_backends.py --sessions 1,4,16,64 --seconds 12
    python benchmarks/encoder_backends.py --model DIR --device cuda --kind gpu   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_service.backends import EncoderBackend, TorchBackend  # noqa: E402
from encoder_service.backends.triton_backend import TritonBackend, TritonSettings  # noqa: E402
from encoder_service.backends.triton_local import start_local_triton  # noqa: E402
from encoder_service.backends.triton_repo import RepoOptions, write_repository  # noqa: E402
from encoder_service.batcher import EncoderBatcher  # noqa: E402
from encoder_service.sessions import EncoderSessions  # noqa: E402
from services.constants import SAMPLE_RATE  # noqa: E402
from services.model.modeling import MiDashengLM  # noqa: E402
from services.streaming.encoder import EncoderWindow  # noqa: E402

CHUNK = SAMPLE_RATE // 10  # samples per push: 100 ms


class Counted:
    """Delegates to a backend and counts the windows it encoded."""

    def __init__(self, backend: EncoderBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self.geometry = backend.geometry
        self.max_in_flight = backend.max_in_flight
        self.windows = 0
        self._lock = threading.Lock()

    def encode(self, windows: Sequence[EncoderWindow]) -> list[torch.Tensor]:
        out = self.backend.encode(windows)
        with self._lock:
            self.windows += len(windows)
        return out

    def close(self) -> None:
        pass  # the caller closes the backend it made


def run(
    model: MiDashengLM, backend: EncoderBackend, sessions: int, seconds: float, emit: float, fronts: int = 1
) -> dict:
    counted = Counted(backend)
    batchers = [
        EncoderBatcher(counted, max_batch=32, max_wait_ms=5.0, max_queue=max(256, 2 * sessions))
        for _ in range(fronts)
    ]
    for b in batchers:
        b.start()
    published: dict[str, int] = {}
    lock = threading.Lock()

    def sink(sid: str, payload: bytes) -> None:
        with lock:
            published[sid] = published.get(sid, 0) + 1

    fronts_ = [EncoderSessions(model, b, sink, max_sessions=sessions) for b in batchers]
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    latencies: list[float] = []
    for i in range(sessions):
        fronts_[i % fronts].open(f"s{i}", emit)

    def feed(i: int) -> None:
        sid = f"s{i}"
        enc = fronts_[i % fronts]
        pieces = [audio[k : k + CHUNK] for k in range(0, audio.size, CHUNK)]
        for seq, piece in enumerate(pieces, start=1):
            before = published.get(sid, 0)
            t0 = time.perf_counter()
            enc.push(sid, seq, piece, end_of_stream=seq == len(pieces))
            if published.get(sid, 0) > before:
                with lock:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=feed, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for b in batchers:
        b.stop()
    lat = np.array(latencies) * 1000
    return {
        "backend": backend.name,
        "fronts": fronts,
        "sessions": sessions,
        "windows_per_s": round(counted.windows / elapsed, 1),
        "audio_s_per_s": round(sessions * seconds / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
    }


def call_latency(backend: EncoderBackend, model: MiDashengLM, batch: int, calls: int = 15) -> float:
    """p50 ms of ``backend.encode`` on ``batch`` full windows of noise."""
    from encoder_service.backends import Window

    g = backend.geometry
    gen = torch.Generator().manual_seed(0)
    windows = [
        Window(torch.randn(g.n_mels, g.window_frames, generator=gen) * 10 - 50, g.window_patches)
    ] * batch
    backend.encode(windows)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        backend.encode(windows)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 1)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    ap.add_argument("--device", default="cpu", help="torch backend and projector device")
    ap.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="Triton instance kind")
    ap.add_argument("--sessions", default="1,4,16,64", help="comma-separated session counts")
    ap.add_argument("--seconds", type=float, default=12.0, help="audio per session")
    ap.add_argument("--emit", type=float, default=1.0, help="seconds of audio between publications")
    ap.add_argument("--in-flight", type=int, default=4, help="Triton requests in flight")
    ap.add_argument("--instances", type=int, default=1, help="Triton model instances")
    ap.add_argument("--fronts", type=int, default=1, help="encoder fronts the sessions are spread over")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point; the fastest is reported")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    from services.model.checkpoint import load_model

    dev = torch.device(args.device)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    model = load_model(args.model, dtype=dtype, device=dev, audio_only=True)
    counts = [int(n) for n in args.sessions.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="midasheng-bench-repo-") as repo:
        write_repository(args.model, repo, RepoOptions(kind=args.kind, instances=args.instances))
        server = start_local_triton(repo)
        triton = TritonBackend(
            TritonSettings(
                triton_url=server.url, triton_max_in_flight=args.in_flight, triton_timeout_s=120.0
            ),
            model.config.audio_encoder_config,
        )
        local = TorchBackend(model.audio_encoder)
        try:
            for backend in (local, triton):
                run(model, backend, 2, 3.0, args.emit)  # warm-up
            for n in counts:
                runs: dict[str, list[dict]] = {"torch": [], "triton": []}
                for _ in range(args.repeat):  # interleaved, so that load from elsewhere hits both
                    for backend in (local, triton):
                        runs[backend.name].append(
                            run(model, backend, n, args.seconds, args.emit, args.fronts)
                        )
                rows += [max(r, key=lambda row: row["audio_s_per_s"]) for r in runs.values()]
            hops = [
                {
                    "batch": b,
                    "torch_ms": call_latency(local, model, b),
                    "triton_ms": call_latency(triton, model, b),
                }
                for b in (1, 8, 32)
            ]
        finally:
            triton.close()
            server.stop()
    for row in rows:
        base = next(r for r in rows if r["sessions"] == row["sessions"] and r["backend"] == "torch")
        row["ratio_vs_torch"] = round(row["audio_s_per_s"] / base["audio_s_per_s"], 2)
    head = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(dev),
        "model": args.model or "demo",
        "triton": f"local tritonserver, {args.instances} {args.kind} instance(s), max_in_flight {args.in_flight}",
        "audio_seconds_per_session": args.seconds,
        "emit_seconds": args.emit,
        "reported": f"the fastest of {args.repeat} runs per point",
    }
    if args.json:
        print(json.dumps({**head, "rows": rows, "call_p50": hops}, indent=2))
        return 0
    for k, v in head.items():
        print(f"{k}: {v}")
    cols = [
        "backend",
        "fronts",
        "sessions",
        "windows_per_s",
        "audio_s_per_s",
        "p50_ms",
        "p95_ms",
        "ratio_vs_torch",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print("\none backend call on B full windows, p50 ms:")
    print("| B | torch | triton | triton - torch |\n|---|---|---|---|")
    for h in hops:
        print(
            f"| {h['batch']} | {h['torch_ms']} | {h['triton_ms']} | {round(h['triton_ms'] - h['torch_ms'], 1)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
