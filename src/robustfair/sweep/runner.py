"""Run a list of independent jobs: in a local pool of processes or as Ray tasks.

A job is a picklable payload handed to a module-level function ``fn(payload)``. Results come back
as the jobs finish, each with its index in the list. Locally, ``workers`` processes run at once
(spawned, each pinned to one GPU where there are GPUs, else to its share of the CPU cores); with
``engine="ray"``, each job is a Ray task (one GPU per task when the cluster has GPUs), on a local
Ray instance or on the cluster at ``address``.

A job whose process dies (killed, out of memory, a crash in native code) is run again, at most
``retries`` times (a job that raised an exception is not: its result, or the exception, stands);
a job can carry on from what its killed attempt saved (a sweep's trial resumes from its last
checkpoint). A dead local worker stops the pool's other workers too: the jobs they were running
count as died as well and are run again the same way. When a job has died ``retries + 1`` times
it gets the result of ``on_crash(payload, why)`` when that is given (the other jobs go on), or the
error is raised. When this generator is left early (an exception, Ctrl-C, SIGTERM turned into an
exception by the command line), every worker process it started is stopped before it returns:
no job keeps running behind the caller's back."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import UserError

log = logging.getLogger("robustfair")

ENGINES = ("local", "ray")

#: a job's result when its process died: ``on_crash(payload, why)``
OnCrash = Callable[[Any, str], Any]

_started: Any = None  # in a pool worker: one flag per job, set when the job starts


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


def _worker_stop(signum: int, frame: Any) -> None:
    """SIGTERM in a pool worker (the pool is being stopped): release the run locks the job
    holds and exit at once. Its files are written atomically, so what it saved stays whole."""
    from ..engine.lock import release_all

    release_all()
    os._exit(128 + signum)


def _worker_init(slots: Any, gpus: int, threads: int, started: Any = None) -> None:
    """Pin a pool worker to one GPU (by the slot it draws) and to ``threads`` CPU threads; on
    SIGTERM it releases its locks and exits."""
    global _started
    _started = started
    signal.signal(signal.SIGTERM, _worker_stop)
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    import torch

    torch.set_num_threads(threads)


def _job(fn: Callable[[Any], Any], i: int, payload: Any) -> Any:
    """Run job ``i`` in a pool worker, first marking it started."""
    if _started is not None:
        _started[i] = 1
    return fn(payload)


_DIED = ("a worker process of the pool died while this job ran (killed, out of memory or a "
         "crash), which stops the pool's other workers too")


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop every worker process of ``pool`` now (SIGTERM, then SIGKILL after 5 s), whatever
    job it runs, and wait for them: the caller is leaving and no job may outlive it."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


#: told ``(index, why)`` each time a job whose process died is run again
OnRetry = Callable[[int, str], None]


def _died(i: int, attempts: list[int], retries: int, why: str,
          on_retry: OnRetry | None) -> bool:
    """Count a death of job ``i``; True when it may run again."""
    attempts[i] += 1
    if attempts[i] <= retries:
        if on_retry is not None:
            on_retry(i, why)
        else:
            log.warning("job %d: %s; running it again (retry %d of %d)", i, why, attempts[i],
                        retries)
        return True
    return False


def _local(fn: Callable[[Any], Any], payloads: Sequence[Any], workers: int,
           on_crash: OnCrash | None = None, retries: int = 0,
           on_retry: OnRetry | None = None) -> Iterator[tuple[int, Any]]:
    if workers <= 1 or len(payloads) <= 1:
        for i, p in enumerate(payloads):
            yield i, fn(p)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    started = ctx.RawArray("b", len(payloads))
    attempts = [0] * len(payloads)
    todo = list(range(len(payloads)))
    while todo:
        n = min(workers, len(todo))
        slots = ctx.Queue()
        for k in range(n):
            slots.put(k)
        pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init,
                                   initargs=(slots, gpu_count(), max(1, cpu_count() // n),
                                             started))
        done: set[int] = set()
        broken = False
        left_early = True
        try:
            futures = {pool.submit(_job, fn, i, payloads[i]): i for i in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    done.add(futures[fut])
                    yield futures[fut], result
            left_early = False
        finally:
            if left_early:  # an exception, Ctrl-C or SIGTERM: no worker may go on running
                _stop_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)  # jobs not started are dropped
        todo = [i for i in todo if i not in done]
        if not broken:
            return
        # the jobs running when the pool broke died; the others go to a new pool (all died
        # when none had started: the workers die before they run anything)
        lost = [i for i in todo if started[i]] or todo
        for i in lost:
            started[i] = 0
            if _died(i, attempts, retries, "its worker process died", on_retry):
                continue
            todo.remove(i)
            if on_crash is None:
                raise BrokenProcessPool(_DIED)
            yield i, on_crash(payloads[i], _DIED)


def _ray(fn: Callable[[Any], Any], payloads: Sequence[Any], address: str | None,
         gpus_per_job: float | None, on_crash: OnCrash | None = None, retries: int = 0,
         on_retry: OnRetry | None = None) -> Iterator[tuple[int, Any]]:
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray; pip install 'robustfair[ray]' (or use the "
                        "default --engine local)") from None
    started = not ray.is_initialized()
    environ = dict(os.environ)  # ray.init sets variables of its own in this process
    if started:
        handlers = _signal_handlers()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address!r} ({exc}); start it "
                            f"with 'ray start --head' or check --address") from None
        finally:  # ray.init replaces the SIGTERM handler and never puts it back
            _restore_signal_handlers(handlers)
    try:
        if gpus_per_job is None:
            gpus_per_job = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        task = ray.remote(fn).options(num_cpus=1, num_gpus=gpus_per_job, max_retries=0)
        refs = {task.remote(p): i for i, p in enumerate(payloads)}
        attempts = [0] * len(payloads)
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError:
                        raise  # the job raised: as the local pool does
                    except ray.exceptions.RayError as exc:  # its worker or node died
                        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        why = f"its Ray worker failed ({type(exc).__name__}: {why[:200]})"
                        if _died(i, attempts, retries, why, on_retry):
                            refs[task.remote(payloads[i])] = i
                            continue
                        if on_crash is None:
                            raise
                        result = on_crash(payloads[i], why)
                    yield i, result
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            os.environ.update(environ)


_SIGNALS = ("SIGTERM", "SIGINT")


def _signal_handlers() -> dict[int, Any]:
    """The handlers of SIGTERM and SIGINT (empty outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in _SIGNALS
            if hasattr(signal, n)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def run_jobs(fn: Callable[[Any], Any], payloads: Sequence[Any], *, engine: str = "local",
             workers: int | None = None, address: str | None = None,
             gpus_per_job: float | None = None, on_crash: OnCrash | None = None,
             retries: int = 0, on_retry: OnRetry | None = None
             ) -> Iterator[tuple[int, Any]]:
    """Run ``fn(payload)`` for every payload; yield ``(index, result)`` as jobs finish.

    ``engine="local"``: ``workers`` spawned processes (default :func:`default_workers`; one runs
    the jobs in this process). ``engine="ray"``: Ray tasks on the cluster at ``address`` (default:
    a Ray instance started here, or the one already initialised), ``gpus_per_job`` GPUs each
    (default: one when the cluster has GPUs). ``fn`` must be importable by the workers. An
    exception in a job is raised here; remaining jobs are cancelled. A job whose process dies
    is run again, at most ``retries`` times; after that it gets ``on_crash(payload, why)`` as its
    result (without ``on_crash``, that is raised too); ``on_retry(index, why)`` is told of each
    new run. Leaving the iteration early stops every
    worker process still running."""
    if retries < 0:
        raise UserError(f"retries must be 0 or more, not {retries}")
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    if engine == "ray":
        return _ray(fn, payloads, address, gpus_per_job, on_crash, retries, on_retry)
    if address is not None:
        raise UserError("--address applies to --engine ray only")
    return _local(fn, payloads, default_workers() if workers is None else workers, on_crash,
                  retries, on_retry)
