"""Distributors: run one worker call per shard, serially or as Ray tasks.

Both report the same way — a summary per finished shard and a running count of rows
for the progress bar — so the driver does not care where the work ran. Ray is
imported lazily: planning, tests of the worker and the serial path do not need it.
"""

from __future__ import annotations

import os
import sys
import time
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
            if bar:
                bar.set_postfix_str(f"shards {done}/{len(items)}")
            yield result
    finally:
        if bar:
            bar.close()


def init_ray(workers: int | None) -> None:
    """Join the cluster a submitted job runs in, or start a private local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: the cluster decides resources
        return
    # Workers inherit this environment: make the project importable without installing it.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
             object_store_memory=80 * 1024 * 1024, logging_level="WARNING", log_to_driver=True)


def run_ray(items: Sequence[Any], work: WorkFn, rows_of: Callable[[Any], int], desc: str,
            workers: int | None = None, show_progress: bool = True, max_retries: int = 3,
            **kwargs: Any) -> Iterable[dict[str, Any]]:
    """One Ray task per shard, each returning only a small summary.

    `max_retries` re-runs a task whose worker process or node died; an exception raised
    by the work itself is not retried (it would fail the same way) and is reported.
    """
    import ray

    init_ray(workers)

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> None:
            self.n += k

        def get(self) -> int:
            return self.n

    counter = Counter.remote()

    def task(item: Any, counter: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return work(item, progress=lambda k: counter.add.remote(k), **kwargs)

    remote = ray.remote(num_cpus=1, max_retries=max_retries)(task)
    pending = {remote.remote(item, counter, kwargs): item for item in items}
    bar = _bar(sum(rows_of(i) for i in items), len(items), desc) if show_progress else None
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if bar:
                bar.n = ray.get(counter.get.remote())
                bar.refresh()
            for ref in ready:
                item = pending.pop(ref)
                done += 1
                if bar:
                    bar.set_postfix_str(f"shards {done}/{len(items)}")
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    yield {"error": ShardTaskError(getattr(item, "shard", -1), str(cause).strip().splitlines()[-1])}
    finally:
        if bar:
            bar.n = ray.get(counter.get.remote())
            bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
        time.sleep(0)
