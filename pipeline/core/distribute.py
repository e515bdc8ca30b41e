"""Distributors: run one worker call per shard, serially or as Ray tasks.

Both report the same way — a summary per finished shard and a running count of rows
for the progress bar — so the driver does not care where the work ran. Ray is
imported lazily: planning, tests of the worker and the serial path do not need it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

WorkFn = Callable[..., dict[str, Any]]


class ShardTaskError(RuntimeError):
    def __init__(self, shard: int, message: str) -> None:
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard


def _bar(total_rows: int, total_shards: int, desc: str) -> tqdm:
    return tqdm(total=total_rows, unit="pair", desc=desc, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.1)


def run_serial(items: Sequence[Any], work: WorkFn, rows_of: Callable[[Any], int], desc: str,
               show_progress: bool = True, **kwargs: Any) -> Iterable[dict[str, Any]]:
    """Run in this process (benchmarks of one core, debugging with pdb)."""
    bar = _bar(sum(rows_of(i) for i in items), len(items), desc) if show_progress else None
    done = 0
    try:
        for item in items:
            try:
                result = work(item, progress=bar.update if bar else None, **kwargs)
            except Exception as e:  # reported like a failed Ray task; the other shards go on
                result = {"error": ShardTaskError(getattr(item, "shard", -1), f"{type(e).__name__}: {e}")}
            done += 1
            if bar is not None:
                bar.set_postfix_str(f"shards {done}/{len(items)}")
            yield result
    finally:
        if bar is not None:
            bar.close()


def init_ray(workers: int | None) -> None:
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


def _counter() -> Any:
    """A tiny actor the tasks add finished rows to, so the bar moves inside a shard."""
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


def _error(item: Any, e: BaseException) -> dict[str, Any]:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return {"error": ShardTaskError(_shard_id(item), f"{type(cause).__name__}: {text[-1] if text else ''}")}


def _shard_id(item: Any) -> int:
    return item if isinstance(item, int) else getattr(item, "shard", -1)


def _drain(pending: dict[Any, Any], counter: Any, total_rows: int | None, n_items: int, desc: str,
           show_progress: bool, unit: str, resubmit: Callable[[Any], tuple[Any, Any] | None] | None = None,
           ) -> Iterable[dict[str, Any]]:
    """Yield results as they finish, keeping the progress bar fed from `counter`.

    `resubmit(ref)` may hand the finished slot new work (an actor taking the next shard).
    """
    import ray

    bar = tqdm(total=total_rows, unit=unit, desc=desc, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.1) if show_progress else None
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if bar is not None:
                bar.n = ray.get(counter.get.remote())
                bar.refresh()
            for ref in ready:
                item = pending.pop(ref)
                done += 1
                if bar is not None:
                    bar.set_postfix_str(f"shards {done}/{n_items}")
                if resubmit is not None:
                    nxt = resubmit(ref)
                    if nxt is not None:
                        pending[nxt[0]] = nxt[1]
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:
                    yield _error(item, e)
    finally:
        if bar is not None:
            bar.n = ray.get(counter.get.remote())
            bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)


def run_ray(items: Sequence[Any], work: WorkFn, rows_of: Callable[[Any], int], desc: str,
            workers: int | None = None, show_progress: bool = True, max_retries: int = 3,
            **kwargs: Any) -> Iterable[dict[str, Any]]:
    """One Ray task per shard, each returning only a small summary.

    `max_retries` re-runs a task whose worker process or node died; an exception raised
    by the work itself is not retried (it would fail the same way) and is reported.
    """
    import ray

    init_ray(workers)
    counter = _counter()

    def task(item: Any, counter: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return work(item, progress=lambda k: counter.add.remote(k), **kwargs)

    remote = ray.remote(num_cpus=1, max_retries=max_retries)(task)
    pending = {remote.remote(item, counter, kwargs): item for item in items}
    yield from _drain(pending, counter, sum(rows_of(i) for i in items), len(items), desc, show_progress, "pair")


def run_actor_pool(items: Sequence[Any], runner_cls: type, runner_kwargs: dict[str, Any], actors: int,
                   resources: dict[str, float], desc: str, unit: str, total_rows: int | None = None,
                   workers: int | None = None, show_progress: bool = True) -> Iterable[dict[str, Any]]:
    """`actors` long-lived actors, each holding one `runner_cls(**runner_kwargs)` (e.g. a
    caption engine on one GPU), take shards from a queue until none are left.

    Loading a 7B model per shard would cost more than captioning it, hence actors rather
    than tasks. `runner.run(item, progress=...)` returns the shard's small summary.
    """
    import ray

    init_ray(workers)
    counter = _counter()

    class Holder:
        def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
            self.runner = cls(**kwargs)

        def run(self, item: Any, counter: Any) -> dict[str, Any]:
            return self.runner.run(item, progress=lambda k: counter.add.remote(k))

    remote_cls = ray.remote(max_restarts=1, max_task_retries=1, **resources)(Holder)
    pool = [remote_cls.remote(runner_cls, runner_kwargs) for _ in range(max(1, min(actors, len(items))))]
    queue = list(items)
    owner: dict[Any, Any] = {}
    pending: dict[Any, Any] = {}
    for actor in pool:
        if queue:
            item = queue.pop(0)
            ref = actor.run.remote(item, counter)
            owner[ref], pending[ref] = actor, item

    def resubmit(ref: Any) -> tuple[Any, Any] | None:
        actor = owner.pop(ref)
        if not queue:
            return None
        item = queue.pop(0)
        nxt = actor.run.remote(item, counter)
        owner[nxt] = actor
        return nxt, item

    try:
        yield from _drain(pending, counter, total_rows, len(items), desc, show_progress, unit, resubmit)
    finally:
        for actor in pool:
            ray.kill(actor)
