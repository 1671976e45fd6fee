"""Running many merges as jobs: in this process, on a local process pool, or on a Ray cluster.

Every job is isolated: an unreadable adapter, a failed merge or even a worker process that dies is reported as
that job's failure while the other jobs complete. Outputs are written atomically by the format writers, so an
output that exists is complete: a rerun skips it unless `force` is set, which makes batches resumable.

The Ray backend (`pip install "adaptermerge[ray]"`) runs the same functions as Ray tasks. Jobs carry absolute
paths, so on a multi-machine cluster the inputs and outputs must live on a file system every node sees, and every
node needs adaptermerge installed.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from .recipes import MergeJob

__all__ = ["BACKENDS", "JobResult", "map_tasks", "run_job", "run_jobs"]

logger = logging.getLogger(__name__)
BACKENDS = ("local", "ray")
Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class JobResult:
    """What became of one job.

    Args:
        name (`str`): the job's name.
        status (`str`): `"done"`, `"skipped"` (its output already existed) or `"failed"`.
        output (`str`): the output path.
        seconds (`float`): wall time of the job (0 for skipped ones).
        message (`str`): why it failed or was skipped; a short description of the result when done.
    """

    name: str
    status: Literal["done", "skipped", "failed"]
    output: str
    seconds: float = 0.0
    message: str = ""


def run_job(job: MergeJob, *, force: bool = False) -> JobResult:
    """Merge and save one job; every error becomes a failed result instead of propagating."""
    from .io import check_not_input, save_adapter
    from .merge import merge_adapters

    start = time.perf_counter()
    try:
        import torch

        check_not_input(job.output, job.adapters)
        merged = merge_adapters(
            list(job.adapters),
            list(job.weights),
            job.method,
            rank=job.rank,
            dtype=getattr(torch, job.dtype) if job.dtype else None,
            adapter_name=job.name,
            allow_pickle=job.allow_pickle,
            **job.params,
        )
        save_adapter(merged, job.output, format=job.format, overwrite=force)
    except Exception as err:  # fault isolation: one bad job must not stop the batch
        logger.debug("job %s failed", job.name, exc_info=True)
        return JobResult(job.name, "failed", str(job.output), time.perf_counter() - start, _describe(err))
    ranks = sorted({lr.rank for lr in merged.values()})
    message = f"{len(job.adapters)} adapters, {len(merged)} modules, rank {ranks[0]}-{ranks[-1]}" if ranks else ""
    return JobResult(job.name, "done", str(job.output), time.perf_counter() - start, message)


def _describe(err: BaseException) -> str:
    from .errors import AdapterMergeError

    return str(err) if isinstance(err, AdapterMergeError) else f"{type(err).__name__}: {err}"


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (workers start fast and do not inherit torch's thread pools), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["adaptermerge.merge", "adaptermerge.library"])
        return context
    return multiprocessing.get_context("spawn")


def _call_alone(fn: Callable[[Any], Any], task: Any) -> Any:
    """Run one task in a fresh single-worker pool, so that if it kills its process no other task is hit."""
    with ProcessPoolExecutor(1, mp_context=_mp_context()) as pool:
        try:
            return pool.submit(fn, task).result()
        except BrokenProcessPool:
            return RuntimeError("its worker process died (out of memory, or a crash in native code)")
        except Exception as err:
            return err


def _map_local(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> Iterator[tuple[int, Any]]:
    if workers == 0:
        for i, task in enumerate(tasks):
            try:
                yield i, fn(task)
            except Exception as err:
                yield i, err
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    broken = []
    with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {}
        for i, task in enumerate(tasks):
            try:
                futures[pool.submit(fn, task)] = i
            except BrokenProcessPool:  # a worker died while tasks were still being handed out
                broken += range(i, len(tasks))
                break
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:
                broken.append(futures[future])
            except Exception as err:
                yield futures[future], err
    if broken:
        logger.warning("a worker process died; rerunning %d unfinished task(s) one at a time", len(broken))
    for i in sorted(broken):
        yield i, _call_alone(fn, tasks[i])


def _map_ray(
    fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int | None, address: str | None
) -> Iterator[tuple[int, Any]]:
    try:
        import ray
    except ImportError:
        raise InvalidParameterError(
            "the ray backend needs Ray: pip install 'adaptermerge[ray]' (or use --backend local)"
        ) from None
    owns = not ray.is_initialized()
    if owns:
        local = address is None
        ray.init(
            address=address,
            num_cpus=workers if local and workers else None,
            include_dashboard=False if local else None,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_apply)
        refs = {remote.remote(fn, task): i for i, task in enumerate(tasks)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    yield refs[ref], err.cause if isinstance(err.cause, BaseException) else err
                except ray.exceptions.RayError as err:
                    yield refs[ref], err
    finally:
        if owns:
            ray.shutdown()


def _apply(fn: Callable[[Any], Any], task: Any) -> Any:
    return fn(task)


def map_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    backend: Backend = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Run `fn` on every task and yield `(index, result)` as tasks finish, in any order.

    A task that raises, or whose worker dies, yields the exception instead of a result; the others go on.

    Args:
        fn (`Callable`): a picklable top-level function (or `functools.partial` of one).
        tasks (`list`): picklable arguments, one call each.
        backend (`str`, defaults to `"local"`): `"local"` (process pool) or `"ray"`.
        workers (`int`, *optional*): worker processes (local; `0` runs in this process) or CPUs of the local Ray
            instance; the number of CPUs by default.
        ray_address (`str`, *optional*): a Ray cluster address (`"auto"`, `"ray://host:10001"`); a new local
            instance by default.

    Raises:
        InvalidParameterError: for an unknown backend, negative workers, or `"ray"` without Ray installed.
    """
    if backend not in BACKENDS:
        raise InvalidParameterError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if workers is not None and workers < 0:
        raise InvalidParameterError(f"workers must be 0 (this process) or more; got {workers}")
    if backend == "ray":
        return _map_ray(fn, tasks, workers, ray_address)
    count = min(workers if workers is not None else (os.cpu_count() or 1), len(tasks))
    return _map_local(fn, tasks, count)


def run_jobs(
    jobs: Sequence[MergeJob],
    *,
    force: bool = False,
    backend: Backend = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    progressbar: bool = False,
) -> list[JobResult]:
    """Run merge jobs, skipping those whose output exists (unless `force`), isolating failures.

    Args:
        jobs (`list[MergeJob]`): the jobs, e.g. `load_recipe(path).jobs`.
        force (`bool`, defaults to `False`): redo jobs whose output exists, replacing it.
        backend, workers, ray_address: where to run, as for :func:`map_tasks`.
        progressbar (`bool`, defaults to `False`): show a progress bar over jobs.

    Returns:
        `list[JobResult]`: one result per job, in the jobs' order.
    """
    results: list[JobResult | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if job.output.exists() and not force:
            results[i] = JobResult(job.name, "skipped", str(job.output), message="output exists")
        else:
            todo.append(i)
    finished = map_tasks(
        functools.partial(run_job, force=force),
        [jobs[i] for i in todo],
        backend=backend,
        workers=workers,
        ray_address=ray_address,
    )
    bar = tqdm(total=len(todo), desc="merges", unit="merge", disable=not progressbar or not todo)
    with bar:
        for k, result in finished:
            job = jobs[todo[k]]
            if isinstance(result, BaseException):
                result = JobResult(job.name, "failed", str(job.output), message=_describe(result))
            if result.status == "failed":
                logger.info("%s failed: %s", job.name, result.message)
            results[todo[k]] = result
            bar.update()
    return [r for r in results if r is not None]
