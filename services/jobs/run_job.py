"""Entry point of one process of a multi-GPU job: ``torchrun ... -m services.jobs.run_job``.

Every rank trains (data-parallel, :mod:`services.training.distributed`); the launching worker keeps
the job's lease and heartbeat. Rank 0 writes the job's events and ending under that worker's owner
token and decides when to stop (cancel); the other ranks follow it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from services.jobs.store import JobStore
from services.jobs.worker import WorkerSettings, run_training, train_config
from services.runtime import redis_url_from
from services.training.distributed import Dist

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.jobs.run_job")
    p.add_argument("--job-id", required=True)
    p.add_argument("--jobs-dir", type=Path, required=True)
    p.add_argument("--owner", required=True, help="worker id holding the job's lease")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    dist = Dist.from_env()
    store = JobStore.from_url(redis_url_from(None))
    settings = WorkerSettings(jobs_dir=args.jobs_dir, worker_id=args.owner, device="auto")
    job = store.get(args.job_id)
    if dist.main:
        outcome = run_training(store, job, settings, threading.Event())
        return 0 if outcome == "done" else 1
    from services.training.train import Trainer

    result = Trainer(train_config(job, settings)).train()
    log.info("rank %d finished: %s", dist.rank, result.get("status"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
