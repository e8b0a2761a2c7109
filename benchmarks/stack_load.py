"""The whole stack under N real-time streams: update lag, delivery, CPU per update per tier,
Redis bytes per stream-second; this tree beside an older commit (a git worktree) in the same run.

Each run starts a private redis-server, the encoder, one LM process and the gateway (the processes
`midasheng up` starts, spawned here so that each one's CPU, memory and metrics can be read), then
a separate client process opens N StreamCaptions calls that send 100 ms LINEAR16 chunks in real
time (a synthetic scene that changes every 3 s; 1 s hop, 10 s window, interim results on) for
``--seconds``, then finalize.

- update lag: arrival of an interim caption minus the moment the audio up to its window's end
  had been sent (p50/p95/max over every interim of every stream)
- delivered: interim captions received / hops sent (coalescing makes this < 1 when the LM is behind)
- CPU ms per update, per tier: process CPU time (/proc) over the run / interims delivered; for the
  encoder and LM also without model compute (their batch/step time from their own metrics)
- Redis: bytes received and commands per stream-second (INFO stats)

    python benchmarks/stack_load.py --streams 8 32 64 128 --seconds 60 --baseline 90e0309
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))

from services.constants import SAMPLE_RATE as SR  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int, name: str) -> float:
    """A histogram's ``_sum`` (or a counter) from a service's /metrics; 0 when absent."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    m = re.search(rf"^{name}(?:_sum|_total)? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def redis_stats(port: int) -> dict[str, Any]:
    def info(section: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(port), "INFO", section], capture_output=True, text=True
        ).stdout

    stats = dict(line.split(":", 1) for line in info("stats").splitlines() if ":" in line)
    result: dict[str, Any] = {k: int(stats[k]) for k in ("total_net_input_bytes", "total_commands_processed")}
    result["calls"] = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\S+?):calls=(\d+)", info("commandstats"))
    }
    return result


class Stack:
    def __init__(self, code: Path, env: dict[str, str]) -> None:
        self.code, self.env = code, env
        self.dir = Path(tempfile.mkdtemp(prefix="stack-load-"))
        self.redis_port = free_port()
        self.ports = {name: free_port() for name in ("encoder", "lm", "gateway")}
        self.metrics = {name: free_port() for name in ("encoder", "lm", "gateway")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self.procs["redis"] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        a = {n: f"127.0.0.1:{p}" for n, p in self.ports.items()}
        cmds = {
            "encoder": ["encoder", "--listen", a["encoder"], "--redis-url", url, "--device", "cpu"],
            "lm": ["lm", "--listen", a["lm"], "--redis-url", url, "--device", "cpu"],
            "gateway": [
                "gateway",
                "--listen",
                a["gateway"],
                "--encoder",
                a["encoder"],
                "--lm",
                a["lm"],
                "--redis-url",
                url,
            ],
        }
        for name, cmd in cmds.items():
            log = (self.dir / f"{name}.log").open("wb")
            self.procs[name] = subprocess.Popen(
                [PY, "-m", "services", *cmd, "--metrics-port", str(self.metrics[name])],
                cwd=self.code,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        for name in cmds:
            while not self.healthy(name):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name} did not start: {(self.dir / f'{name}.log').read_text()[-2000:]}"
                    )
                time.sleep(0.3)

    def healthy(self, name: str) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}") as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

    def sample(self) -> dict[str, Any]:
        return {
            "cpu": {n: cpu_seconds(p.pid) for n, p in self.procs.items()},
            "rss": {n: rss_mib(p.pid) for n, p in self.procs.items()},
            "encoder_compute": scrape(self.metrics["encoder"], "midasheng_encoder_batch_seconds"),
            "lm_compute": scrape(self.metrics["lm"], "midasheng_engine_step_seconds")
            or scrape(self.metrics["lm"], "midasheng_caption_batch_seconds"),
            "redis": redis_stats(self.redis_port),
        }

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the client (a separate process) ------------------------------------------------------------


def client_main(target: str, streams: int, seconds: int, out: Path) -> None:
    import grpc
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from services.pb.midasheng.v1 import captions_pb2, captions_pb2_grpc

    rng = np.random.default_rng(0)
    t = np.arange(seconds * SR) / SR
    freqs = rng.uniform(200, 3000, size=seconds // 3 + 1)
    scene = np.where((t // 3).astype(int) % 2 == 0, np.sin(2 * np.pi * freqs[(t // 3).astype(int)] * t), 0)
    audio = (0.3 * scene + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    chunk = SR // 10 * 2  # 100 ms of LINEAR16
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    channel = grpc.insecure_channel(target)
    stub = captions_pb2_grpc.CaptionServiceStub(channel)
    start_barrier = time.monotonic() + 2.0

    def one(i: int) -> None:
        t0 = start_barrier + i * (1.0 / max(1, streams))  # streams start spread over one second
        sent_at: dict[int, float] = {}

        def reqs():  # type: ignore[no-untyped-def]
            yield captions_pb2.StreamCaptionsRequest(
                config=captions_pb2.SessionConfig(
                    sample_rate_hz=SR,
                    encoding=captions_pb2.LINEAR16,
                    channels=1,
                    interim_results=True,
                    hop_seconds=1.0,
                    window_seconds=10.0,
                )
            )
            for k in range(0, len(pcm), chunk):
                due = t0 + k / chunk * 0.1
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent_at[k // chunk + 1] = time.monotonic()
                yield captions_pb2.StreamCaptionsRequest(
                    audio=captions_pb2.AudioChunk(data=pcm[k : k + chunk])
                )
            yield captions_pb2.StreamCaptionsRequest(
                control=captions_pb2.Control(action=captions_pb2.Control.FINALIZE)
            )

        row: dict[str, Any] = {"lags": [], "interims": 0, "finals": [], "error": ""}
        try:
            for r in stub.StreamCaptions(reqs(), timeout=seconds + 300):
                if r.WhichOneof("response") == "caption":
                    c = r.caption
                    if c.is_final:
                        row["finals"].append(c.segment_id)
                    else:
                        row["interims"] += 1
                        chunk_no = round(c.window_end_seconds * 10)
                        if chunk_no in sent_at:
                            row["lags"].append(time.monotonic() - sent_at[chunk_no])
                elif r.WhichOneof("response") == "error":
                    row["error"] = r.error.reason
        except grpc.RpcError as e:
            row["error"] = e.code().name
        with lock:
            results.append(row)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 400)
    out.write_text(json.dumps(results))


def run(code: Path, streams: int, seconds: int, label: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=str(code),
        OMP_NUM_THREADS="1",
        MIDASHENG_LM_MAX_SESSIONS="512",
        MIDASHENG_GATEWAY_MAX_SESSIONS="1024",
        MIDASHENG_GATEWAY_MAX_STREAMS_PER_ADDRESS="0",  # every stream comes from one client address
    )
    stack = Stack(code, env)
    stack.start()
    try:
        before = stack.sample()
        out = stack.dir / "client.json"
        t = time.monotonic()
        subprocess.run(
            [
                PY,
                __file__,
                "--client",
                f"127.0.0.1:{stack.ports['gateway']}",
                str(streams),
                str(seconds),
                str(out),
            ],
            check=True,
            timeout=seconds + 600,
        )
        wall = time.monotonic() - t
        after = stack.sample()
        rows = json.loads(out.read_text())
    finally:
        stack.stop()
    lags = sorted(x for r in rows for x in r["lags"])
    interims = sum(r["interims"] for r in rows)
    admitted = [r for r in rows if r["error"] not in ("RESOURCE_EXHAUSTED",)]
    expected_finals = seconds // 10 + (1 if seconds % 10 else 0)
    complete = sum(
        1
        for r in admitted
        if sorted(set(r["finals"])) == list(range(expected_finals)) and len(r["finals"]) == expected_finals
    )
    cpu = {n: after["cpu"][n] - before["cpu"][n] for n in after["cpu"]}
    per = max(1, interims)
    stream_seconds = max(1, len(admitted)) * seconds
    return {
        "code": label,
        "streams": streams,
        "admitted": len(admitted),
        "wall_s": round(wall, 1),
        "lag_p50_s": round(statistics.median(lags), 3) if lags else None,
        "lag_p95_s": round(lags[int(0.95 * (len(lags) - 1))], 3) if lags else None,
        "lag_max_s": round(lags[-1], 3) if lags else None,
        "delivered": round(interims / (len(admitted) * seconds), 3) if admitted else 0.0,
        "streams_with_every_final_once": complete,
        "errors": sorted({r["error"] for r in rows if r["error"]}),
        "cpu_ms_per_update": {n: round(1000 * v / per, 2) for n, v in cpu.items()},
        "encoder_ms_per_update_without_model": round(
            1000 * (cpu["encoder"] - (after["encoder_compute"] - before["encoder_compute"])) / per, 2
        ),
        "lm_ms_per_update_without_model": round(
            1000 * (cpu["lm"] - (after["lm_compute"] - before["lm_compute"])) / per, 2
        ),
        "rss_mib": {n: round(v) for n, v in after["rss"].items()},
        "redis_kb_per_stream_second": round(
            (after["redis"]["total_net_input_bytes"] - before["redis"]["total_net_input_bytes"])
            / 1024
            / stream_seconds,
            1,
        ),
        "redis_calls_per_stream_second": {
            k: round((v - before["redis"]["calls"].get(k, 0)) / stream_seconds, 2)
            for k, v in sorted(after["redis"]["calls"].items(), key=lambda kv: -kv[1])[:8]
        },
        "redis_commands_per_stream_second": round(
            (after["redis"]["total_commands_processed"] - before["redis"]["total_commands_processed"])
            / stream_seconds,
            1,
        ),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument(
        "--baseline", default=None, help="a commit to run beside this tree (checked out in a worktree)"
    )
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    versions = [("this tree", ROOT)]
    worktree = None
    if args.baseline:
        worktree = Path(tempfile.mkdtemp(prefix="baseline-"))
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
            check=True,
            capture_output=True,
        )
        versions.append((f"baseline {args.baseline}", worktree))
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only; demo model"
    )
    results = []
    try:
        for n in args.streams:
            for label, code in versions:
                r = run(code, n, args.seconds, label)
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
