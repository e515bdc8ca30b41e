"""The stage framework on a toy stage: what every real stage inherits, tested once.

The toy stage's rows are numbers; a shard can be told to fail rows or to raise. Ray runs
for real (a private local instance) for the task and actor distributors.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar, Sequence

import pyarrow as pa
import pytest

from pipeline.core.shards import DiskFullError, LockHeldError, build_lock, read_sidecar, read_table, shard_path
from pipeline.core.stage import ShardOutcome, ShardWork, Stage, run_stage


class Toy(Stage):
    name: ClassVar[str] = "toy"
    batch_rows: ClassVar[int] = 4

    def __init__(self, out: Path, shards: int = 3, rows: int = 5, salt: str = "a",
                 fail_rows: dict[int, int] | None = None, raise_in: Sequence[int] = (),
                 fatal_in: Sequence[int] = ()) -> None:
        super().__init__(out)
        self.n, self.rows, self.salt = shards, rows, salt
        self.fail_rows, self.raise_in, self.fatal_in = fail_rows or {}, set(raise_in), set(fatal_in)

    def schema(self) -> pa.Schema:
        return pa.schema([("key", pa.string()), ("value", pa.int64())])

    def config(self) -> dict[str, Any]:
        return {"salt": self.salt}

    def config_hash(self) -> str:
        return f"toy-{self.salt}"

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        works = [ShardWork(s, self.rows, {"inputs_hash": f"in{s}"}) for s in range(self.n)]
        return works if shards is None else [w for w in works if w.shard in shards]

    def build(self, work: ShardWork, writer: Any, progress: Any) -> ShardOutcome:
        if work.shard in self.fatal_in:
            raise DiskFullError(28, f"disk full while writing shard {work.shard}")
        if work.shard in self.raise_in:
            raise RuntimeError(f"shard {work.shard} broke")
        failed = []
        for i in range(work.rows):
            if i < self.fail_rows.get(work.shard, 0):
                failed.append({"key": f"{work.shard}/{i}", "reason": "unreadable: toy"})
                continue
            writer.add({"key": f"{work.shard}/{i}", "value": work.shard * 100 + i})
        return ShardOutcome(failed=failed, counts={"made": work.rows - len(failed)})


def _quiet(**kw: Any) -> dict[str, Any]:
    return {"show_progress": False, "log": io.StringIO(), **kw}


def test_build_skip_and_redo_on_a_changed_fingerprint_config_or_version(tmp_path: Path) -> None:
    r = run_stage(Toy(tmp_path), **_quiet())
    assert (r.shards, r.shards_built, r.rows_ok, r.rows_failed, r.exit_code) == (3, 3, 15, 0, 0)
    assert read_table(shard_path(tmp_path, "toy", 2)).column("value").to_pylist() == [200, 201, 202, 203, 204]
    side = read_sidecar(shard_path(tmp_path, "toy", 1))
    assert (side["inputs_hash"], side["config_hash"], side["stage_version"], side["rows"]) == ("in1", "toy-a", 1, 5)
    assert json.loads((tmp_path / "index.json").read_text())["stages"]["toy"]["rows"] == 15
    again = run_stage(Toy(tmp_path), **_quiet())
    assert (again.shards_built, again.shards_skipped) == (0, 3)
    assert run_stage(Toy(tmp_path, salt="b"), **_quiet()).shards_built == 3  # config changed
    # a sidecar written before stage versions existed counts as version 1 ...
    p = shard_path(tmp_path, "toy", 0).with_name("shard-00000.arrow.json")
    legacy = json.loads(p.read_text())
    del legacy["stage_version"]
    p.write_text(json.dumps(legacy))
    assert run_stage(Toy(tmp_path, salt="b"), **_quiet()).shards_built == 0

    class Toy2(Toy):  # ... and a stage whose algorithm changed redoes every shard
        version = 2

    assert run_stage(Toy2(tmp_path, salt="b"), **_quiet()).shards_built == 3


def test_failed_rows_are_accounted_from_sidecars_and_pass_the_threshold(tmp_path: Path) -> None:
    toy = Toy(tmp_path, fail_rows={1: 2})
    toy.max_failed_fraction = 0.1
    r = run_stage(toy, **_quiet())
    assert (r.rows_ok, r.rows_failed, r.exit_code) == (13, 2, 1) and r.reasons == {"unreadable": 2}
    assert "FAILED" in r.summary()
    skipped = Toy(tmp_path, fail_rows={1: 2})
    skipped.max_failed_fraction = 0.1
    r2 = run_stage(skipped, **_quiet())  # nothing rebuilt, the failures still count
    assert (r2.shards_built, r2.rows_failed, r2.exit_code) == (0, 2, 1)


def test_a_broken_shard_does_not_stop_the_others_and_orphans_are_removed(tmp_path: Path) -> None:
    r = run_stage(Toy(tmp_path, shards=4, raise_in=[1]), **_quiet())
    assert r.exit_code == 3 and r.shards_built == 3 and "shard 1 broke" in r.errors[0]
    assert read_sidecar(shard_path(tmp_path, "toy", 1)) is None and not list((tmp_path / "toy").glob("*.tmp"))
    r = run_stage(Toy(tmp_path, shards=2), **_quiet())  # a smaller plan: shards 2 and 3 are orphans
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "toy").glob("*.arrow")) == [
        "shard-00000.arrow", "shard-00001.arrow"]


def test_disk_full_stops_the_run_and_a_held_lock_refuses(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError):
        run_stage(Toy(tmp_path, fatal_in=[0]), **_quiet())
    assert read_sidecar(shard_path(tmp_path, "toy", 1)) is None  # stopped at once: nothing after it
    with build_lock(tmp_path, "toy"):
        with pytest.raises(LockHeldError, match="another job"):
            run_stage(Toy(tmp_path), **_quiet())
        with pytest.raises(LockHeldError):
            run_stage(Toy(tmp_path), [0], **_quiet())


@pytest.mark.parametrize("distributor", ["tasks", "actors"])
def test_ray_distributors_build_the_same_bytes_and_report_a_broken_shard(tmp_path: Path, distributor: str) -> None:
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    ref = tmp_path / "serial"
    run_stage(Toy(ref, shards=4), **_quiet())
    out = tmp_path / distributor
    r = run_stage(Toy(out, shards=4, raise_in=[2]), **_quiet(distributor=distributor, actors=2, workers=2))
    assert r.exit_code == 3 and r.shards_built == 3 and len(r.errors) == 1 and "shard 2 broke" in r.errors[0]
    assert r.counts == {"made": 15}
    for s in (0, 1, 3):
        assert shard_path(out, "toy", s).read_bytes() == shard_path(ref, "toy", s).read_bytes()
