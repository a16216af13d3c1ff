"""Run a list of independent jobs: in a local pool of processes or as Ray tasks.

A job is a picklable payload handed to a module-level function ``fn(payload)``. Results come back
as the jobs finish, each with its index in the list. Locally, ``workers`` processes run at once
(spawned, each pinned to one GPU where there are GPUs, else to its share of the CPU cores); with
``engine="ray"``, each job is a Ray task (one GPU per task when the cluster has GPUs), on a local
Ray instance or on the cluster at ``address``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from ..errors import UserError

log = logging.getLogger("robustfair")

ENGINES = ("local", "ray")


def cpu_count() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_workers() -> int:
    """Concurrent local jobs: one per GPU; on CPU one per two cores (at least one)."""
    gpus = gpu_count()
    return gpus if gpus else max(1, cpu_count() // 2)


def _worker_init(slots: Any, gpus: int, threads: int) -> None:
    """Pin a pool worker to one GPU (by the slot it draws) and to ``threads`` CPU threads."""
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    import torch

    torch.set_num_threads(threads)


def _local(fn: Callable[[Any], Any], payloads: Sequence[Any], workers: int
           ) -> Iterator[tuple[int, Any]]:
    if workers <= 1 or len(payloads) <= 1:
        for i, p in enumerate(payloads):
            yield i, fn(p)
        return
    import multiprocessing as mp

    n = min(workers, len(payloads))
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for k in range(n):
        slots.put(k)
    threads = max(1, cpu_count() // n)
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init,
                               initargs=(slots, gpu_count(), threads))
    try:
        futures = {pool.submit(fn, p): i for i, p in enumerate(payloads)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield futures[fut], fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # jobs not started are dropped


def _ray(fn: Callable[[Any], Any], payloads: Sequence[Any], address: str | None,
         gpus_per_job: float | None) -> Iterator[tuple[int, Any]]:
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray; pip install 'robustfair[ray]' (or use the "
                        "default --engine local)") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address!r} ({exc}); start it "
                            f"with 'ray start --head' or check --address") from None
    try:
        if gpus_per_job is None:
            gpus_per_job = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        task = ray.remote(fn).options(num_cpus=1, num_gpus=gpus_per_job, max_retries=0)
        refs = {task.remote(p): i for i, p in enumerate(payloads)}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    yield refs.pop(ref), ray.get(ref)
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


def run_jobs(fn: Callable[[Any], Any], payloads: Sequence[Any], *, engine: str = "local",
             workers: int | None = None, address: str | None = None,
             gpus_per_job: float | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``fn(payload)`` for every payload; yield ``(index, result)`` as jobs finish.

    ``engine="local"``: ``workers`` spawned processes (default :func:`default_workers`; one runs
    the jobs in this process). ``engine="ray"``: Ray tasks on the cluster at ``address`` (default:
    a Ray instance started here, or the one already initialised), ``gpus_per_job`` GPUs each
    (default: one when the cluster has GPUs). ``fn`` must be importable by the workers. An
    exception in a job is raised here; remaining jobs are cancelled."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    if engine == "ray":
        return _ray(fn, payloads, address, gpus_per_job)
    if address is not None:
        raise UserError("--address applies to --engine ray only")
    return _local(fn, payloads, default_workers() if workers is None else workers)
