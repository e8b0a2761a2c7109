"""Entry point of one torchrun process of a multi-GPU job: ``torchrun ... -m services.jobs.run_job``.

The launching worker keeps the job's lease and heartbeat; rank 0 trains and writes the job's
events and ending under the same owner token. The Trainer has no DistributedDataParallel yet, so
the other ranks only check in and exit (see docs/jobs.md, "Multi-GPU").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from services.jobs.store import JobStore
from services.jobs.worker import WorkerSettings, run_training
from services.runtime import redis_url_from

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.jobs.run_job")
    p.add_argument("--job-id", required=True)
    p.add_argument("--jobs-dir", type=Path, required=True)
    p.add_argument("--owner", required=True, help="worker id holding the job's lease")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        log.info("rank %d: data-parallel training is not implemented in the Trainer; exiting", rank)
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    store = JobStore.from_url(redis_url_from(None))
    settings = WorkerSettings(jobs_dir=args.jobs_dir, worker_id=args.owner, device=f"cuda:{local}")
    outcome = run_training(store, store.get(args.job_id), settings, threading.Event())
    return 0 if outcome == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
