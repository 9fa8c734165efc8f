"""``pdoflow execute-job``: one job run here, in the foreground.

Owns the verb's glue: reading the daemon config whose ``[jobs]`` applies,
handing the job to :mod:`pdoflowd.daemon.foreground` (which claims, runs
and records it through the worker's own code) and printing how it ended,
its traceback on stderr. It must not run or record a job itself.
"""

from __future__ import annotations

import argparse
import json
import sys

from pdoflowd.cli import display
from pdoflowd.cli.output import UserError, fail, print_json
from pdoflowd.client import Client, as_uuid
from pdoflowd.config import ConfigError, load
from pdoflowd.daemon import foreground
from pdoflowd.exitcodes import EXIT_ERRORED, EXIT_INTERRUPTED, EXIT_OK
from pdoflowd.status import JobStatus

__all__ = ["ConfigUnusable", "execute_job"]


class ConfigUnusable(Exception):
    """execute-job's daemon config cannot be used."""


def execute_job(client: Client, args: argparse.Namespace) -> int:
    job_uuid = as_uuid(args.job_id, "job")
    try:
        config = load(args.config)
    except ConfigError as exc:
        problems = "; ".join(f"{p.key}: {p.message}" for p in exc.problems)
        raise ConfigUnusable(problems) from None
    try:
        run = foreground.execute_job(
            config,
            dsn=client.dsn,
            password=client.target.password,
            job_uuid=job_uuid,
        )
    except foreground.JobRefused as exc:
        raise UserError(str(exc)) from None
    outcome = run.outcome
    if args.json:
        print_json(
            {
                "id": str(run.job.uuid),
                "posting_id": str(run.job.posting_uuid),
                "entry_point": run.job.entry_point,
                "attempt": run.job.attempt,
                "status": run.status.value,
                "error": outcome.error,
                "seconds": round(run.seconds, 6),
                "result": None
                if outcome.result is None
                else json.loads(outcome.result),
            }
        )
    else:
        if outcome.traceback:
            print(outcome.traceback.rstrip(), file=sys.stderr)
        detail = f": {outcome.error}" if outcome.error else ""
        print(
            f"job {run.job.uuid} ({run.job.entry_point}, attempt "
            f"{run.job.attempt}): {run.status.value} after "
            f"{display.duration(run.seconds)}{detail}"
        )
    if run.interrupted:
        fail("interrupted; the job is waiting again", EXIT_INTERRUPTED)
    return EXIT_OK if run.status is JobStatus.DONE else EXIT_ERRORED
