"""The shard commit protocol: Arrow stream files, sidecars, verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.index import rebuild_index
from pipeline.core.shards import (ShardWriter, atomic_write_json, read_table, sha256_file, shard_path,
                             sidecar_path, verify_shard)

SCHEMA = pa.schema([("key", pa.string()), ("blob", pa.binary()),
                    ("hidden", pa.list_(pa.list_(pa.float16(), 8)))])


def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"key": f"k{i}", "blob": rng.bytes(100 + i),
             "hidden": rng.standard_normal((77 * (1 + i % 2), 8)).astype(np.float16).tolist()} for i in range(n)]


def _commit(out: Path, n: int = 37) -> tuple[Path, int, str]:
    path = shard_path(out, "pairs", 3)
    w = ShardWriter(path, SCHEMA, batch_rows=5)
    for r in _rows(n):
        w.add(r)
    size, digest = w.commit()
    atomic_write_json(sidecar_path(path), {"stage": "pairs", "shard": 3, "rows": n, "failed": [],
                                           "bytes": size, "sha256": digest, "config_hash": "c"})
    return path, size, digest


def test_stream_readable_by_pyarrow_and_datasets(tmp_path: Path) -> None:
    import datasets

    path, size, digest = _commit(tmp_path)
    assert path.stat().st_size == size and sha256_file(path) == digest
    with pa.OSFile(str(path)) as f:
        t = pa.ipc.open_stream(f).read_all()
    assert t.num_rows == 37 and t.column("key").to_pylist()[:2] == ["k0", "k1"]
    ds = datasets.Dataset.from_file(str(path))
    assert ds.num_rows == 37
    h = np.asarray(ds.with_format("numpy")[1]["hidden"])
    assert h.shape == (154, 8)
    np.testing.assert_array_equal(h.astype(np.float16), np.asarray(_rows(37)[1]["hidden"], np.float16))
    assert read_table(path).equals(t)
    assert not list(tmp_path.rglob("*.tmp"))


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    path = shard_path(tmp_path, "pairs", 0)
    w = ShardWriter(path, SCHEMA, batch_rows=2)
    for r in _rows(5):
        w.add(r)
    w.abort()
    assert not path.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_verify_detects_tampering(tmp_path: Path) -> None:
    path, _, _ = _commit(tmp_path)
    assert verify_shard(path, {"config_hash": "c"}) is None
    assert "config_hash" in verify_shard(path, {"config_hash": "other"})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "sha256" in verify_shard(path)
    path.write_bytes(bytes(data[:-10]))
    assert "size" in verify_shard(path)
    sidecar_path(path).unlink()
    assert "no sidecar" in verify_shard(path)


def test_index_lists_sidecars(tmp_path: Path) -> None:
    _commit(tmp_path)
    index = rebuild_index(tmp_path)
    assert index["stages"]["pairs"]["rows"] == 37
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk["stages"]["pairs"]["shards"][0]["file"] == "pairs/shard-00003.arrow"


def test_atomic_json_failure_keeps_old(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))
