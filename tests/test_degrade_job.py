"""The degradation job end to end: determinism, resume after SIGKILL, read-back, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, job_env, run_script, write_manifest
from pipeline.degrade.stage import run_degrade
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, shard_path

JOB = str(ROOT / "jobs" / "degrade.py")


def _cli(manifest: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_script(JOB, "--manifest", str(manifest), "--no-progress", *args, timeout=timeout)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "pairs").glob("*.arrow"))}


def _serial(manifest: Path, out: Path | None = None):
    return run_degrade(load_manifest(manifest, out=out), distributor="serial", show_progress=False)


def test_two_builds_identical_and_rerun_is_noop(small_manifest: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = _serial(small_manifest, a)
    assert (r1.shards, r1.shards_built, r1.rows_ok, r1.rows_failed, r1.exit_code) == (3, 3, 8, 0, 0)
    _serial(small_manifest, b)
    assert _shards(a) == _shards(b) and len(_shards(a)) == 3
    stamps = {p: p.stat().st_mtime_ns for p in (a / "pairs").iterdir()}
    r3 = _serial(small_manifest, a)
    assert (r3.shards_built, r3.shards_skipped, r3.rows_ok) == (0, 3, 8)
    assert stamps == {p: p.stat().st_mtime_ns for p in (a / "pairs").iterdir()}


def test_ray_build_equals_serial_and_redoes_damaged_shard(small_manifest: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "ray"
    _serial(small_manifest, ref)
    r = _cli(small_manifest, "--out", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "8/8 pairs, 0 failed" in r.stdout
    assert _shards(out) == _shards(ref)
    index = json.loads((out / "index.json").read_text())
    assert index["stages"]["pairs"]["rows"] == 8 and len(index["stages"]["pairs"]["shards"]) == 3
    # Damage one shard and drop another's sidecar: a rerun rebuilds exactly those two.
    p1 = shard_path(out, "pairs", 1)
    p1.write_bytes(p1.read_bytes()[:-5])
    (out / "pairs" / "shard-00002.arrow.json").unlink()
    r = _cli(small_manifest, "--out", str(out), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "2 built, 1 already complete" in r.stdout
    assert _shards(out) == _shards(ref)


def test_sigkill_midway_then_rerun_gives_uninterrupted_result(tmp_path: Path, photo_dir: Path) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], out,
                       gt_size=512, crops_per_image=4, rows_per_shard=2)
    _serial(m, ref)
    assert len(_shards(ref)) == 8
    proc = subprocess.Popen([sys.executable, JOB, "--manifest", str(m), "--no-progress", "--workers", "1"],
                            env=job_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "pairs").glob("*.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # driver, local Ray and its workers
    proc.wait()
    done = list((out / "pairs").glob("*.json"))
    assert 1 <= len(done) < 8, f"kill landed outside the build ({len(done)} shards done)"
    time.sleep(1.0)  # let orphaned workers, if any, notice their raylet is gone
    r = _cli(m, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert _shards(out) == _shards(ref)
    assert not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in (out / "pairs").iterdir()) == sorted(
        n for i in range(8) for n in (f"shard-{i:05d}.arrow", f"shard-{i:05d}.arrow.json"))


def test_read_back_with_datasets_and_regenerate_from_recipe(tmp_path: Path, photo_dir: Path) -> None:
    import datasets

    from pipeline.degrade.ops import degrade_gt, prepare_gt
    from pipeline.core.image_io import decode_png, load_source
    from pipeline.degrade.recipe import recipe_from_json

    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir), "limit": 2}],
                       tmp_path / "out", gt_size=512, crops_per_image=2, rows_per_shard=4)
    manifest = load_manifest(m)
    assert _serial(m).exit_code == 0
    ds = datasets.Dataset.from_file(str(shard_path(tmp_path / "out", "pairs", 0)))
    assert ds.num_rows == 4
    assert ds.column_names[:8] == ["key", "source", "path", "crop_box", "hq_png", "lq_png", "recipe", "seed"]
    for row in ds:
        hq, lq = decode_png(row["hq_png"]), decode_png(row["lq_png"])
        assert hq.shape == (512, 512, 3) and lq.shape == (128, 128, 3)
        assert hq.dtype == np.uint8 and lq.dtype == np.uint8
        recipe = recipe_from_json(row["recipe"])
        assert list(row["crop_box"]) == list(recipe["crop"])
        source, _ = load_source(photo_dir / row["path"], manifest.degrade.max_pixels, manifest.degrade.min_side)
        gt = prepare_gt(source, recipe, manifest.degrade)
        np.testing.assert_array_equal(gt, hq)
        np.testing.assert_array_equal(degrade_gt(gt, recipe, manifest.degrade), lq)


def test_bad_inputs_are_all_accounted_for(tmp_path: Path) -> None:
    from badfiles import make_bad_inputs

    folder = tmp_path / "bad"
    folder.mkdir()
    expect = make_bad_inputs(folder)
    m = write_manifest(tmp_path / "m.json", [{"name": "bad", "root": str(folder), "glob": "*"}],
                       tmp_path / "out", crops_per_image=1, rows_per_shard=4, max_failed_fraction=0.0)
    r = _cli(m, "--serial")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout
    ok, failed = {}, {}
    for side in sorted((tmp_path / "out" / "pairs").glob("*.json")):
        s = read_sidecar(side.with_suffix(""))
        assert s["rows"] + len(s["failed"]) == s["planned_rows"]
        failed.update({f["key"]: f["reason"] for f in s["failed"]})
        import pyarrow as pa
        with pa.memory_map(str(side.with_suffix(""))) as src:
            ok.update({k: True for k in pa.ipc.open_stream(src).read_all().column("key").to_pylist()})
    names = {k.split("/", 1)[1].rsplit("#", 1)[0] for k in list(ok) + list(failed)}
    assert names == set(expect), "every source file must appear as a pair or a failed row"
    assert {k.split("/", 1)[1].rsplit("#", 1)[0] for k in failed} == {n for n, e in expect.items() if e == "failed"}
    assert all(reason for reason in failed.values())
    # The same build with a tolerant threshold succeeds, and nothing is redone.
    body = json.loads(m.read_text())
    body["degrade"]["max_failed_fraction"] = 1.0
    m.write_text(json.dumps(body))
    r = _cli(m, "--serial")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 built" in r.stdout


def test_full_disk_is_a_clear_error_and_keeps_nothing_partial(tmp_path: Path, photo_dir: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], mnt / "out",
                           gt_size=512, crops_per_image=2, rows_per_shard=2)
        r = _cli(m, "--serial")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "disk full" in r.stdout
        assert not list(mnt.rglob("*.tmp"))
        from pipeline.core.shards import verify_shard
        for side in (mnt / "out" / "pairs").glob("*.json"):
            assert verify_shard(side.with_suffix("")) is None
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
