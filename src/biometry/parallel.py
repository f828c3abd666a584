"""Processes on this machine: the cores this process may use, and the local Dask cluster that
``biometry prepare``, ``biometry infer`` and the batches of runs start.

A local cluster is made through :func:`local_cluster` only. Dask starts its worker processes with
``MALLOC_TRIM_THRESHOLD_=65536`` (its ``distributed.nanny.pre-spawn-environ``), so that glibc
hands freed memory back to the system at once; for this package's work, which allocates and
frees arrays of tens of megabytes per subject or training step, that turns allocations into
system calls: preparing UKB zips took 1.16 core-s per subject with it and 0.83 without (a third
of it in system mode), a training ~1.7x longer (BENCHMARKS.md). The clusters made here start
their workers with glibc's default instead (Dask's documented way: the variable set to None in
the configuration). Workers of a cluster started by hand (``dask worker``) keep Dask's default.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager

#: the variable Dask sets on its worker processes, unset on ours
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


def available_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS tells, else the count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _dask():
    import dask.distributed  # here, not at the top: a figure notebook imports no dask

    return dask


@contextmanager
def dask_client(workers: int = 1, scheduler: str | None = None, cluster=None):
    """A ``dask.distributed.Client``: on the running scheduler at ``scheduler``, else on
    ``cluster`` (a cluster object, e.g. dask-jobqueue's), else on a :func:`local_cluster` of
    ``workers`` made here. A cluster object is closed on exit with the client (a Client given a
    cluster object leaves it, and its worker processes, running); a scheduler is left running."""
    distributed = _dask().distributed
    if scheduler:
        with distributed.Client(scheduler) as client:
            yield client
        return
    with (cluster if cluster is not None else local_cluster(workers)) as made, \
            distributed.Client(made) as client:
        yield client


def local_cluster(workers: int, **kwargs):
    """A ``dask.distributed.LocalCluster`` of ``workers`` one-thread processes, no dashboard,
    whose workers start without Dask's ``MALLOC_TRIM_THRESHOLD_`` (see the module's text).
    ``kwargs`` go to ``LocalCluster``. The caller closes it (it is a context manager)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a worker process importing a script without a main guard, which now asks for a
        # cluster of its own: stop it quietly (the script's own process says what to change)
        raise SystemExit(1)
    dask = _dask()
    kwargs = {"threads_per_worker": 1, "processes": True, "dashboard_address": None, **kwargs}
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None}):
        try:
            return dask.distributed.LocalCluster(n_workers=int(workers), **kwargs)
        except RuntimeError as exc:
            # the usual cause: a script without a main guard, which each worker process
            # (started by spawn) imports again and which then starts a cluster of its own
            raise RuntimeError(
                f"{workers} local Dask worker process(es) could not start ({exc}); a script that "
                f"runs biometry with workers > 1 must put its calls under `if __name__ == "
                f"'__main__':`, since every worker process imports the script again (or pass "
                f"workers=1)") from None
