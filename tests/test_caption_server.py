"""The server engine and the caption job against a REAL OpenAI-compatible server:
``transformers serve`` (transformers' own server, its ``serving`` extra) on loopback,
serving the tiny LLaVA on the CPU (tests/transformers_serve.py).

What this proves: the engine's requests (image data URL, chat template, greedy decoding,
``max_completion_tokens``) are understood by a server we did not write, give the same
captions and finish reasons as the in-process transformers engine, a server that does
not list the model is used with a warning and its reported model lands in the sidecar,
and a server killed mid-shard loses nothing: the rerun asks it only for the missing rows.
What it does not prove: vLLM's server (its wheel is a CUDA build; its status codes are
exercised against tests/standin_server.py instead).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, job_env, write_manifest
from demo_fixtures.tiny_llava import build_tiny_llava
from pipeline.caption.config import CaptionConfig
from pipeline.caption.engines import ServerEngine, make_engine
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.degrade.stage import run_degrade
from test_caption_engines import lq_images
from transformers_serve import TransformersServe

JOB = str(ROOT / "jobs" / "caption.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("serve_llava") / "llava", seed=0)


@pytest.fixture(scope="module")
def serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with TransformersServe(model_dir, tmp_path_factory.mktemp("serve")) as server:
        yield server


def _cfg(model_dir: Path, server: str, **changes) -> CaptionConfig:
    base = CaptionConfig(engine="server", model=str(model_dir), max_tokens=12, batch_size=4, server=server,
                         concurrency=2, timeout_s=60.0, retries=1, add_special_tokens=False)
    return dataclasses.replace(base, **changes)


def _build(tmp_path: Path, photo_dir: Path, model_dir: Path, server: str, concurrency: int = 2,
           **degrade) -> tuple[Path, Path]:
    """A degraded build whose manifest captions through `server` (add_special_tokens off:
    transformers serve adds BOS itself and refuses the field)."""
    caption = {"engine": "server", "model": str(model_dir), "server": server, "max_tokens": 12,
               "batch_size": 4, "concurrency": concurrency, "retries": 1, "timeout_s": 60.0,
               "add_special_tokens": False, "max_failed_fraction": 0.0}
    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out",
                       sections={"caption": caption}, **degrade)
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    return m, manifest.output


def _cli(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, JOB, "--no-progress", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env(),
                                cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=job_env(), cwd=ROOT)


def _captions(out: Path, shard: int) -> dict[str, list]:
    return read_table(shard_path(out, "captions", shard)).to_pydict()


def test_server_engine_through_transformers_serve_matches_in_process(serve, model_dir) -> None:
    images = lq_images()[:8]
    cfg = _cfg(model_dir, serve.url)
    reference = make_engine(dataclasses.replace(cfg, engine="transformers")).caption(images)
    with ServerEngine(cfg) as engine:
        results = engine.caption(images)
        info = engine.describe()
    assert all(r.ok for r in results), results
    assert results == reference  # captions and finish reasons (all `length` at 12 tokens)
    assert {r.finish_reason for r in results} == {"length"}
    assert info["served_models"] == [] and "lists [] in /v1/models" in info["model_warning"]
    assert info["reported_models"] == [f"{model_dir}@main"]


def test_vllm_only_field_refused_by_transformers_serve_says_what_to_set(serve, model_dir) -> None:
    with ServerEngine(_cfg(model_dir, serve.url, add_special_tokens=True)) as engine:
        (res,) = engine.caption(lq_images()[:1])
    assert not res.ok and "HTTP 422" in res.error and "not retried" in res.error
    assert "set caption.add_special_tokens to false" in res.error


def test_caption_job_through_transformers_serve(serve, model_dir, tmp_path, photo_dir) -> None:
    """jobs/caption.py --engine server: every row ok, the captions the in-process engine
    writes, the served model recorded in the sidecar, the cut captions flagged."""
    m, out = _build(tmp_path, photo_dir, model_dir, serve.url)
    r = _cli("--manifest", str(m), "--shard", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lists [] in /v1/models" in r.stderr  # the warning, naming what the server lists
    through_server = _captions(out, 0)
    assert through_server["status"] == ["ok"] * 3 and through_server["finish_reason"] == ["length"] * 3
    side = read_sidecar(shard_path(out, "captions", 0))
    assert side["engine"]["reported_models"] == [f"{model_dir}@main"]
    assert side["cut"] == 3 and side["finish_reasons"] == {"length": 3}
    assert "3 ok captions ended early" in r.stdout
    r = _cli("--manifest", str(m), "--shard", "0", "--engine", "transformers", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    in_process = _captions(out, 0)
    assert in_process == through_server
    assert read_sidecar(shard_path(out, "captions", 0))["engine"]["engine"] == "transformers"


def test_server_killed_mid_shard_rerun_asks_only_for_missing_rows(model_dir, tmp_path, photo_dir) -> None:
    server = TransformersServe(model_dir, tmp_path / "serve").start()
    try:
        # One request at a time: once the server has logged its second reply, the client has
        # received the first (it sends the next request only then), so at least one row is ok.
        m, out = _build(tmp_path, photo_dir, model_dir, server.url, concurrency=1, rows_per_shard=8)
        job = _cli("--manifest", str(m), "--shard", "0", wait=False)
        killed = threading.Event()

        def kill_after_two_replies() -> None:
            deadline = time.monotonic() + 300
            while job.poll() is None and time.monotonic() < deadline:
                if server.chat_requests() >= 2:
                    server.kill()
                    killed.set()
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=kill_after_two_replies)
        watcher.start()
        stdout, stderr = job.communicate(timeout=600)
        watcher.join()
        assert killed.is_set(), stdout + stderr
        assert job.returncode == 1, stdout + stderr  # failed rows above max_failed_fraction
        first = _captions(out, 0)
        ok = [k for k, s in zip(first["key"], first["status"]) if s == "ok"]
        failed = [k for k, s in zip(first["key"], first["status"]) if s == "failed"]
        assert len(first["key"]) == 8 and ok and failed, first
        assert all("connection error" in e or "not sent" in e for e, s in zip(first["error"], first["status"])
                   if s == "failed")

        server.start()  # the same port, a fresh process whose log counts only its own requests
        r = _cli("--manifest", str(m), "--shard", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        assert server.chat_requests() == len(failed)
        again = _captions(out, 0)
        assert again["status"] == ["ok"] * 8
        kept = {k: c for k, c in zip(first["key"], first["caption"]) if k in ok}
        assert all(again["caption"][again["key"].index(k)] == c for k, c in kept.items())
        assert read_sidecar(shard_path(out, "captions", 0))["captioned_now"] == len(failed)
    finally:
        server.stop()
