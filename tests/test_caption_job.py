"""The caption stage end to end: pairs shards → captions shards, reruns, overrides, faults, --all.

Captions come from the tiny random LLaVA through the transformers engine, or through the
server engine talking to tests/standin_server.py, a stand-in for `vllm serve` (vLLM does
not run on these CPU machines). Random weights write nonsense; the tests check the
bookkeeping, which is the same whatever the model says.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_script, write_manifest
from pipeline.caption.stage import run_captions
from pipeline.degrade.stage import run_degrade
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, read_table, shard_path

JOB = str(ROOT / "jobs" / "caption.py")


@pytest.fixture()
def build(tmp_path: Path, photo_dir: Path, tiny_models: dict[str, Path]):
    """A degraded build (8 pairs in 3 shards) and its manifest, captioned by the tiny LLaVA."""
    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out",
                       sections={"caption": {"engine": "transformers", "model": str(tiny_models["llava"]),
                                             "max_tokens": 12, "batch_size": 4, "max_failed_fraction": 0.0}})
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    return m, manifest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_script(JOB, "--no-progress", *args)


def _captions(out: Path, shard: int) -> dict[str, list]:
    return read_table(shard_path(out, "captions", shard)).to_pydict()


def test_shard_end_to_end_and_rerun_is_noop(build) -> None:
    m, manifest = build
    r = _cli("--manifest", str(m), "--shard", "1")
    assert r.returncode == 0, r.stderr
    out = manifest.output
    pairs_keys = read_table(shard_path(out, "pairs", 1)).column("key").to_pylist()
    caps = _captions(out, 1)
    assert caps["key"] == pairs_keys
    assert set(caps["status"]) == {"ok"} and all(c for c in caps["caption"])
    side = read_sidecar(shard_path(out, "captions", 1))
    assert side["rows"] == 3 and side["counts"] == {"ok": 3, "failed": 0, "override": 0}
    assert side["config"]["prompt"] == ("USER: <image>\nDescribe the image in a very detailed manner if we "
                                        "remove the degradation artifacts from the image. ASSISTANT:")
    assert side["config"]["sampling"] == {"temperature": 0.0, "max_tokens": 12}
    assert side["engine"]["engine"] == "transformers"
    assert side["pairs_sha256"] == read_sidecar(shard_path(out, "pairs", 1))["sha256"]
    before = shard_path(out, "captions", 1).stat().st_mtime_ns
    r = _cli("--manifest", str(m), "--shard", "1")
    assert r.returncode == 0 and "1 already complete" in r.stdout, r.stdout + r.stderr
    assert shard_path(out, "captions", 1).stat().st_mtime_ns == before


def test_overrides_change_only_their_rows(build, tmp_path: Path) -> None:
    m, manifest = build
    out = manifest.output
    run_captions(out, manifest.caption, 0, {}, show_progress=False)
    first = _captions(out, 0)
    keys = first["key"]
    ov = tmp_path / "ov.jsonl"
    ov.write_text(json.dumps({"key": keys[0], "caption": "a red brick wall"}) + "\n\n"
                  + json.dumps({"key": keys[2], "caption": "an astronaut"}) + "\n")
    r = _cli("--manifest", str(m), "--shard", "0", "--overrides", str(ov))
    assert r.returncode == 0, r.stderr
    now = _captions(out, 0)
    assert now["key"] == keys
    assert now["caption"] == ["a red brick wall", first["caption"][1], "an astronaut"]
    assert now["status"] == ["override", "ok", "override"]
    assert read_sidecar(shard_path(out, "captions", 0))["captioned_now"] == 0  # the model was not run
    # Overrides survive a later rerun without the file, and --force recaptions the rest only.
    run_captions(out, manifest.caption, 0, {}, force=True, show_progress=False)
    assert _captions(out, 0)["status"] == ["override", "ok", "override"]
    # A key that is not in the shard is an error that names it, and changes nothing.
    ov.write_text(json.dumps({"key": "sk/nope.png#0", "caption": "x"}) + "\n")
    r = _cli("--manifest", str(m), "--shard", "0", "--overrides", str(ov))
    assert r.returncode == 2 and "sk/nope.png#0" in r.stderr
    ov.write_text('{"key": 1}\n')
    r = _cli("--manifest", str(m), "--shard", "0", "--overrides", str(ov))
    assert r.returncode == 2 and f"{ov}:1" in r.stderr


def test_missing_pairs_shard_is_a_clear_error(build) -> None:
    m, _ = build
    r = _cli("--manifest", str(m), "--shard", "7")
    assert r.returncode == 2
    assert "pairs shard 7" in r.stderr and "jobs/degrade.py" in r.stderr


def test_server_engine_faults_then_rerun_fills_failed_rows(build, tiny_models: dict[str, Path]) -> None:
    from standin_server import Fault, StandInServer

    _, manifest = build
    out = manifest.output
    with StandInServer(tiny_models["llava"]) as server:
        cfg = dataclasses.replace(manifest.caption, engine="server", server=server.url, retries=1,
                                  timeout_s=1.0, concurrency=2)
        # Images arrive in some order; the first and third distinct ones always fail,
        # the second fails once (retried to success).
        server.set_faults(faults_by_arrival={0: Fault("503"), 1: Fault("drop", times=1), 2: Fault("malformed")})
        res = run_captions(out, cfg, 0, {}, show_progress=False)
        assert res.exit_code == 1 and res.rows_failed == 2
        caps = _captions(out, 0)
        assert caps["key"] == read_table(shard_path(out, "pairs", 0)).column("key").to_pylist()
        assert sorted(caps["status"]) == ["failed", "failed", "ok"]
        reasons = {e for e, s in zip(caps["error"], caps["status"]) if s == "failed"}
        assert any("503" in e for e in reasons) and any("JSON" in e or "json" in e for e in reasons), reasons
        ok_before = {k: c for k, c, s in zip(caps["key"], caps["caption"], caps["status"]) if s == "ok"}
        n_requests = len(server.records)
        server.set_faults()
        res = run_captions(out, cfg, 0, {}, show_progress=False)
        assert res.exit_code == 0 and res.counts["captioned"] == 2
        assert len(server.records) - n_requests == 2  # only the failed rows were asked again
    caps = _captions(out, 0)
    assert caps["status"] == ["ok"] * 3
    assert all(caps["caption"][caps["key"].index(k)] == c for k, c in ok_before.items())


def test_all_shards_on_ray_actors_match_single_shard_runs(build) -> None:
    m, manifest = build
    out = manifest.output
    r = _cli("--manifest", str(m), "--all", "--actors", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 to build (8 captions) on 2 actor(s)" in r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["stages"]["captions"]["rows"] == 8
    actor_made = {s: _captions(out, s) for s in range(3)}
    for s in range(3):  # the same captions as a local single-shard run
        run_captions(out, manifest.caption, s, {}, force=True, show_progress=False)
        assert _captions(out, s) == actor_made[s]


def test_actors_span_the_gpus_of_one_vllm_replica(tmp_path: Path) -> None:
    """Placement only (no GPU here): 8 GPUs make 8 single-GPU actors, or 4 of 2 GPUs each
    with tensor_parallel_size 2; a server engine needs no GPU at all."""
    from pipeline.caption.config import CaptionConfig
    from pipeline.caption.stage import CaptionStage

    assert CaptionStage(tmp_path, CaptionConfig(engine="vllm")).actor_resources(8) == (8, {"num_gpus": 1})
    tp2 = CaptionConfig(engine="vllm", vllm={"tensor_parallel_size": 2})
    assert CaptionStage(tmp_path, tp2).actor_resources(8) == (4, {"num_gpus": 2})
    assert CaptionStage(tmp_path, CaptionConfig(engine="server")).actor_resources(8) == (1, {"num_cpus": 1})
    assert CaptionStage(tmp_path, CaptionConfig(engine="transformers")).actor_resources(0) == (1, {"num_cpus": 1})
