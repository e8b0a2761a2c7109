"""``midasheng triton-repo``: a Triton Inference Server model repository for the encoder."""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_parser(sub: argparse._SubParsersAction) -> None:
    from encoder_service.backends.triton_repo import DEFAULT_MODEL_NAME, KINDS, RepoOptions

    d = RepoOptions()
    p = sub.add_parser(
        "triton-repo",
        help="write a Triton model repository for the encoder",
        description="Write REPO/NAME/{config.pbtxt, VERSION/model.py, VERSION/model.safetensors}: the "
        "checkpoint's Dasheng encoder for tritonserver's Python backend, with dynamic batching. "
        "Serve it with `tritonserver --model-repository REPO` (deploy/triton/README.md) and run "
        "`midasheng encoder --backend triton`.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--out", required=True, help="model repository directory (created if missing)")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help=f"model name (default: {DEFAULT_MODEL_NAME})")
    p.add_argument("--version", type=int, default=d.version, help=f"model version (default: {d.version})")
    p.add_argument("--kind", choices=KINDS, default=d.kind, help=f"instance kind (default: {d.kind})")
    p.add_argument(
        "--instances", type=int, default=d.instances, help="model instances per device (default: 1)"
    )
    p.add_argument("--gpus", type=_ints, default=(), help="GPU ids for --kind gpu, e.g. 0,1 (default: all)")
    p.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, help=f"default: {d.max_batch_size}"
    )
    p.add_argument(
        "--preferred-batch-sizes",
        type=_ints,
        default=d.preferred_batch_sizes,
        help="dynamic batcher's preferred sizes (default: {})".format(
            ",".join(map(str, d.preferred_batch_sizes))
        ),
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=d.max_queue_delay_us,
        help=f"how long Triton waits to fill a preferred batch (default: {d.max_queue_delay_us})",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="",
        help="weights dtype (default: float32 on cpu, bfloat16 on gpu)",
    )
    p.add_argument(
        "--project-root",
        default="",
        help="where the server finds this project's `services` package (default: this installation)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encoder_service.backends.triton_repo import RepoOptions, write_repository

    opts = RepoOptions(
        name=args.name,
        version=args.version,
        kind=args.kind,
        instances=args.instances,
        gpus=args.gpus,
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=args.preferred_batch_sizes,
        max_queue_delay_us=args.max_queue_delay_us,
        dtype=args.dtype,
        project_root=args.project_root,
    )
    path = write_repository(args.model, args.out, opts)
    print(f"wrote {path} (serve it: tritonserver --model-repository {path.parent})", flush=True)
    return 0
