"""jobs/caption.py --engine vllm, run as a user runs it, against the strict vLLM 0.33.0
stand-in (tests/standins/vllm, put on PYTHONPATH; faults through VLLM_STANDIN).

What this proves: a manifest with an unknown vLLM option stops before any work (exit 2);
aborted/errored requests become failed rows that a rerun captions again; captions cut by
max_tokens are kept and flagged per row and counted in the sidecar; an engine death stops
the shard with one error (exit 3) and leaves the shard on disk as it was; a start that
runs out of GPU memory says so. What it does not prove: real vLLM on a GPU (see
tests/standins/vllm/__init__.py for what the stand-in does and does not do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, job_env, write_manifest
from demo_fixtures.tiny_llava import build_tiny_llava
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.degrade.stage import run_degrade

JOB = str(ROOT / "jobs" / "caption.py")
STANDINS = Path(__file__).resolve().parent / "standins"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("vllm_llava") / "llava", seed=0)


def _manifest(tmp_path: Path, photo_dir: Path, model_dir: Path, **caption) -> Path:
    section = {"engine": "vllm", "model": str(model_dir), "max_tokens": 12, "max_failed_fraction": 0.0,
               **caption}
    return write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out",
                          sections={"caption": section})


def _cli(manifest: Path, *args: str, standin: dict | None = None) -> subprocess.CompletedProcess:
    env = job_env()
    env["PYTHONPATH"] = os.pathsep.join([str(STANDINS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["VLLM_STANDIN"] = json.dumps(standin or {})
    return subprocess.run([sys.executable, JOB, "--no-progress", "--manifest", str(manifest), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_unknown_vllm_option_exits_2_before_any_work(tmp_path, photo_dir, model_dir) -> None:
    m = _manifest(tmp_path, photo_dir, model_dir, vllm={"gpu_memory_utilisation": 0.8})
    r = _cli(m, "--shard", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "vllm.gpu_memory_utilisation (did you mean gpu_memory_utilization?)" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was planned, locked or written


def test_finish_reasons_death_and_rerun(tmp_path, photo_dir, model_dir) -> None:
    m = _manifest(tmp_path, photo_dir, model_dir)
    out = load_manifest(m).output
    assert run_degrade(load_manifest(m), distributor="serial", show_progress=False).exit_code == 0
    arrow = shard_path(out, "captions", 0)

    # Request 1 is aborted by the engine: a failed row; the others are cut at 12 tokens: ok, flagged.
    r = _cli(m, "--shard", "0", standin={"finish": {"1": "abort"}})
    assert r.returncode == 1, r.stdout + r.stderr
    t = read_table(arrow).to_pydict()
    assert t["status"] == ["ok", "failed", "ok"] and t["finish_reason"] == ["length", "abort", "length"]
    assert "finish_reason 'abort'" in t["error"][1]
    side = read_sidecar(arrow)
    assert side["finish_reasons"] == {"abort": 1, "length": 2} and side["cut"] == 2
    assert side["engine"]["engine"] == "vllm" and side["engine"]["max_model_len"] == 512
    assert side["engine"]["batch_size"] == "shard"
    before = arrow.read_bytes()

    # The engine dies on the rerun's first request: one clear error, exit 3, the shard untouched.
    r = _cli(m, "--shard", "0", standin={"die_after": 0})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "EngineDied: vLLM's engine died while captioning 1 images" in r.stderr
    assert r.stderr.count("engine died") == 1
    assert arrow.read_bytes() == before and read_sidecar(arrow) == side
    assert not list(arrow.parent.glob("*.tmp*"))

    # A healthy rerun captions only the failed row.
    r = _cli(m, "--shard", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    t2 = read_table(arrow).to_pydict()
    assert t2["status"] == ["ok"] * 3 and t2["finish_reason"] == ["length"] * 3
    assert [t2["caption"][0], t2["caption"][2]] == [t["caption"][0], t["caption"][2]]
    assert read_sidecar(arrow)["captioned_now"] == 1


def test_vllm_start_failures_name_the_cause(tmp_path, photo_dir, model_dir) -> None:
    m = _manifest(tmp_path, photo_dir, model_dir)
    assert run_degrade(load_manifest(m), distributor="serial", show_progress=False).exit_code == 0
    r = _cli(m, "--shard", "0", standin={"free_memory_fraction": 0.5})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "less than desired GPU memory utilization" in r.stderr  # vLLM's own log line, then ours:
    assert "Engine core initialization failed" in r.stderr and "caption.vllm.gpu_memory_utilization" in r.stderr
    assert r.stderr.count("error: EngineError") == 1  # the run stopped at the first shard
    m2 = _manifest(tmp_path, photo_dir, model_dir, vllm={"max_model_len": 4096})
    r = _cli(m2, "--shard", "0")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "max_model_len (4096) is greater than the derived max_model_len" in r.stderr
    assert "leave it unset to use the model's own limit" in r.stderr
    assert not shard_path(load_manifest(m).output, "captions", 0).exists()
