"""Distributors: where a stage's shards are built — this process, Ray tasks, or Ray actors.

All three call the same `pipeline.core.stage.build_shard`, yield one small summary per
finished shard (or ``{"error": ...}``) and feed one progress bar, so the driver does not
care where the work ran. Ray is imported lazily: planning, tests of a stage's operation
and the serial path do not need it.

* tasks: one Ray task per shard, for stateless stages (degradation): small arguments,
  small return values, retried when a worker process dies.
* actors: a `ray.util.ActorPool` of long-lived actors, each holding the stage with its
  model loaded once (a 7B captioner takes minutes to load, longer than a shard takes to
  caption), one per GPU where the cluster has GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm

from pipeline.core.stage import ShardWork, Stage, StageInputError, build_shard


def progress_bar(total: int | None, unit: str, desc: str, show: bool) -> tqdm | None:
    if not show:
        return None
    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.1)


def _error(work: ShardWork, e: BaseException) -> dict[str, Any]:
    """A failed shard's summary. The error travels as text: it crosses process boundaries
    (a Ray actor returns it) and an exception object may not survive pickling."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return {"error": f"shard {work.shard}: {type(cause).__name__}: {text[-1] if text else ''}"}


def run_serial(stage: Stage, todo: Sequence[ShardWork], show_progress: bool = True) -> Iterator[dict[str, Any]]:
    """Build in this process: `--shard N`, benchmarks of one core, debugging with pdb."""
    bar = progress_bar(sum(w.rows for w in todo), stage.unit, stage.name, show_progress)
    stage.open()
    try:
        for done, work in enumerate(todo, 1):
            try:
                result = build_shard(stage, work, progress=bar.update if bar else None)
            except (*stage.fatal_errors, StageInputError):  # nothing more can succeed here: exit 2/3 with why
                raise
            except Exception as e:  # reported like a failed Ray task; the other shards go on
                result = _error(work, e)
            if bar is not None:
                bar.set_postfix_str(f"shards {done}/{len(todo)}")
            yield result
    finally:
        stage.close()
        if bar is not None:
            bar.close()


def init_ray(workers: int | None = None) -> None:
    """Join the cluster a submitted job runs in, or start a private local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: the cluster decides resources
        return
    # Workers inherit this environment: make the project importable without installing it,
    # and keep glibc from returning each pair's multi-MB temporaries to the kernel only to
    # fault them in again (measured: ~15% of a worker's time; docs/benchmarks.md).
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 << 20))
    ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
             object_store_memory=80 * 1024 * 1024, logging_level="WARNING", log_to_driver=True)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _counter() -> Any:
    """A tiny actor the workers add finished rows to, so the bar moves inside a shard."""
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> None:
            self.n += k

        def get(self) -> int:
            return self.n

    return Counter.remote()


def _report(counter: Any) -> Any:
    return lambda k: counter.add.remote(k)


def run_tasks(stage: Stage, todo: Sequence[ShardWork], show_progress: bool = True, workers: int | None = None,
              max_retries: int = 3) -> Iterator[dict[str, Any]]:
    """One Ray task per shard, each returning only a small summary.

    `max_retries` re-runs a task whose worker process or node died; an exception raised
    by the work itself is not retried (it would fail the same way) and is reported.
    """
    import ray

    init_ray(workers)
    counter = _counter()

    def task(stage: Stage, work: ShardWork, counter: Any) -> dict[str, Any]:
        stage.open()
        try:
            return build_shard(stage, work, progress=_report(counter))
        finally:
            stage.close()

    remote = ray.remote(num_cpus=1, max_retries=max_retries)(task)
    stage_ref = ray.put(stage)
    pending = {remote.remote(stage_ref, w, counter): w for w in todo}
    bar = progress_bar(sum(w.rows for w in todo), stage.unit, stage.name, show_progress)
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            _refresh(bar, counter)
            for ref in ready:
                work = pending.pop(ref)
                done += 1
                if bar is not None:
                    bar.set_postfix_str(f"shards {done}/{len(todo)}")
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:
                    yield _error(work, e)
    finally:
        _refresh(bar, counter, close=True)
        for ref in pending:
            ray.cancel(ref, force=True)


def _refresh(bar: tqdm | None, counter: Any, close: bool = False) -> None:
    import ray

    if bar is None:
        return
    bar.n = ray.get(counter.get.remote())
    bar.refresh()
    if close:
        bar.close()


class _StageActor:
    """What one actor holds: the stage, opened (model loaded) once for all its shards."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.open()

    def build(self, work: ShardWork, counter: Any) -> dict[str, Any]:
        try:
            return build_shard(self.stage, work, progress=_report(counter))
        except self.stage.fatal_errors as e:
            return {**_error(work, e), "fatal": True}
        except Exception as e:  # a bad shard must not kill the actor holding a loaded model
            return _error(work, e)


def run_actors(stage: Stage, todo: Sequence[ShardWork], actors: int, resources: dict[str, float],
               show_progress: bool = True) -> Iterator[dict[str, Any]]:
    """Shards handed to a pool of `actors` actors as each becomes free (ray.util.ActorPool)."""
    import ray
    from ray.util import ActorPool

    init_ray()
    counter = _counter()
    remote_cls = ray.remote(max_restarts=1, max_task_retries=1, **resources)(_StageActor)
    pool_actors = [remote_cls.remote(stage) for _ in range(max(1, min(actors, len(todo))))]
    pool = ActorPool(pool_actors)
    for w in todo:
        pool.submit(lambda a, w: a.build.remote(w, counter), w)
    bar = progress_bar(sum(w.rows for w in todo), stage.unit, stage.name, show_progress)
    done = 0
    try:
        while pool.has_next():
            try:
                result = pool.get_next_unordered(timeout=1.0, ignore_if_timedout=False)
            except TimeoutError:
                _refresh(bar, counter)
                continue
            except ray.exceptions.RayError as e:  # an actor died past its restarts
                lines = str(e).strip().splitlines()
                result = {"error": f"an actor died ({type(e).__name__}: {lines[-1] if lines else ''}); "
                                   "its shard is built by the next run"}
            done += 1
            if bar is not None:
                bar.set_postfix_str(f"shards {done}/{len(todo)}")
            _refresh(bar, counter)
            yield result
            if result.get("fatal"):
                break  # e.g. the disk is full: every further shard would fail the same way
    finally:
        _refresh(bar, counter, close=True)
        for a in pool_actors:
            ray.kill(a)
