"""A local ``tritonserver`` for ``midasheng up --encoder-backend triton``, the tests and the benchmark.

The server binary and its Python backend come from the ``nvidia-pytriton`` wheel, which pins
``numpy<2``; it therefore lives in its own environment (``.venv-triton`` beside the project, or
``$MIDASHENG_TRITON_ENV``), created by one command: ``bash deploy/triton/setup-env.sh``. That
environment also holds torch, transformers and safetensors: the model imports this project.

Two things make the wheel's server load Python models (see ``deploy/triton/README.md``): the
environment's interpreter first on ``PATH`` and its ``libpython`` plus the wheel's bundled
libraries on ``LD_LIBRARY_PATH``; and a backend directory holding the Python-backend stub built
for that interpreter's version (prepared here in a private directory, as pytriton does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from encoder_service.backends.triton_repo import project_root
from services.errors import ConfigError, MidashengError
from services.transport.redis_server import free_port

ENV_VAR = "MIDASHENG_TRITON_ENV"
SETUP_COMMAND = "bash deploy/triton/setup-env.sh"
START_TIMEOUT_S = 180.0  # model loading imports torch and transformers in the Python backend
STOP_TIMEOUT_S = 15.0
_PROBE = """
import importlib.util, json, pathlib, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "pytriton": str(pathlib.Path(spec.origin).parent) if spec and spec.origin else "",
    "libdir": sysconfig.get_config_var("LIBDIR") or "",
    "version": "%d.%d" % sys.version_info[:2],
}))
"""


def default_env() -> Path:
    return Path(os.environ.get(ENV_VAR) or project_root() / ".venv-triton")


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a pytriton-bundled Triton are."""

    env: Path  # the virtual environment
    server: Path  # tritonserver binary
    backends: Path  # the wheel's backend directory (python/libtriton_python.so, ...)
    stub: Path  # triton_python_backend_stub for the environment's Python version
    lib_dirs: tuple[Path, ...]  # for LD_LIBRARY_PATH: the interpreter's libpython, the wheel's libs

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        libs = [str(p) for p in self.lib_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        return env


def find_install(env: str | Path | None = None) -> TritonInstall:
    """The Triton environment at ``env`` (default: :func:`default_env`), or ConfigError saying how
    to create it."""
    root = Path(env) if env else default_env()
    python = root / "bin" / "python3"
    hint = f"create it with `{SETUP_COMMAND}` (or point {ENV_VAR} at one)"
    if not python.exists():
        raise ConfigError(f"no Triton environment at {root}: {hint}")
    try:
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        info = json.loads(probe.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        raise ConfigError(f"the Triton environment at {root} does not run ({e}): {hint}") from e
    if not info["pytriton"]:
        raise ConfigError(f"the environment at {root} has no nvidia-pytriton: {hint}")
    dist = Path(info["pytriton"]) / "tritonserver"
    install = TritonInstall(
        env=root,
        server=dist / "bin" / "tritonserver",
        backends=dist / "backends",
        stub=dist / "python_backend_stubs" / info["version"] / "triton_python_backend_stub",
        lib_dirs=tuple(
            Path(p)
            for p in (info["libdir"], str(Path(info["pytriton"]).parent / "nvidia_pytriton.libs"))
            if p
        ),
    )
    missing = [str(p) for p in (install.server, install.backends / "python", install.stub) if not p.exists()]
    if missing:
        raise ConfigError(f"the Triton environment at {root} lacks {', '.join(missing)}: {hint}")
    return install


@dataclass
class LocalTriton:
    """A tritonserver child process serving one model repository on loopback; stopped by PID."""

    process: subprocess.Popen[str]
    host: str
    grpc_port: int
    metrics_port: int
    workdir: Path
    log_path: Path | None
    _log: IO[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _kill_group(self) -> None:
        """SIGKILL the server's process group (its Python-backend stubs), which it leads."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and its model processes, as a crash of the machine would."""
        self._kill_group()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()  # what did not stop in time, and stubs left behind
        self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _backend_dir(install: TritonInstall, workdir: Path) -> Path:
    """A copy of the wheel's backends with the Python-backend stub in place."""
    backends = workdir / "backends"
    shutil.copytree(install.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, backends / "python" / "triton_python_backend_stub")
    return backends


def start_local_triton(
    repo: str | Path,
    install: TritonInstall | None = None,
    host: str = "127.0.0.1",
    grpc_port: int = 0,
    metrics_port: int = 0,
    output: Callable[[str], None] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = START_TIMEOUT_S,
    tls: tuple[Path, Path] | None = None,
) -> LocalTriton:
    """Start tritonserver on ``repo`` (gRPC only, on ``host``; metrics when ``metrics_port``) and
    wait until it is ready. Its output goes to a log file, or line by line to ``output`` (from a
    reader thread). ``tls`` = (certificate, key) PEM files serves gRPC over TLS (the certificate
    also being the readiness check's root). A server that exits or does not get ready raises
    MidashengError with its log."""
    install = install or find_install()
    workdir = Path(tempfile.mkdtemp(prefix="midasheng-triton-"))
    grpc_port = grpc_port or free_port(host)
    args = [
        str(install.server),
        f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={_backend_dir(install, workdir)}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        "--allow-http=false",
        f"--allow-metrics={'true' if metrics_port else 'false'}",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
        *([f"--metrics-port={metrics_port}"] if metrics_port else []),
        *(
            ["--grpc-use-ssl=true", f"--grpc-server-cert={tls[0]}", f"--grpc-server-key={tls[1]}"]
            if tls
            else []
        ),
        *extra_args,
    ]
    log_path = None if output else workdir / "tritonserver.log"
    log = None if log_path is None else log_path.open("w")
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE if output else log,
        stderr=subprocess.STDOUT,
        text=True,
        env=install.environ(),
        cwd=workdir,
        start_new_session=True,
    )
    server = LocalTriton(proc, host, grpc_port, metrics_port, workdir, log_path, log)
    if output is not None:
        threading.Thread(target=_relay, args=(proc, output), name="triton-log", daemon=True).start()
    try:
        wait_ready(server, timeout, root_cert=tls[0] if tls else None)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        if tail:
            raise MidashengError(f"tritonserver did not start; its log ends with:\n{tail}") from None
        raise
    return server


def _relay(proc: subprocess.Popen[str], output: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    with proc.stdout:  # closed here, at the end of the server's output
        for line in proc.stdout:
            output(line.rstrip())


def wait_ready(server: LocalTriton, timeout: float, root_cert: Path | None = None) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(
        server.url, ssl=root_cert is not None, root_certificates=str(root_cert) if root_cert else None
    )
    try:
        while True:
            if server.process.poll() is not None:
                raise MidashengError(f"tritonserver exited with code {server.process.returncode}")
            try:
                if client.is_server_ready(client_timeout=1.0):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise MidashengError(f"tritonserver was not ready within {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        client.close()
