"""The degradation job submitted to a real Ray head with the real `ray job submit`.

The test starts a head on loopback, submits exactly the command users run, checks the
job SUCCEEDED and the shards it wrote, and stops the head.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, write_manifest
from pipeline.shards import verify_shard

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    env = dict(os.environ)
    # Token auth turns on once any local ray.init() left ~/.ray/auth_token; a loopback
    # test head does not need it (see ENVIRONMENT.md).
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp = f"/tmp/ray-t{uuid.uuid4().hex[:6]}"
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
                    f"--temp-dir={temp}"], env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit(ray_head, tmp_path: Path, photo_dir: Path) -> None:
    address, env = ray_head
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], out)
    sid = f"degrade-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
           "--", "python", "jobs/degrade.py", "--manifest", str(manifest), "--no-progress"]
    submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = submit.stdout + submit.stderr
    status = subprocess.run([RAY, "job", "status", "--address", address, sid], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout + status.stderr, log + status.stdout + status.stderr
    assert "8/8 pairs, 0 failed" in log, log
    shards = sorted((out / "pairs").glob("*.arrow"))
    assert [p.name for p in shards] == [f"shard-0000{i}.arrow" for i in range(3)]
    for p in shards:
        assert verify_shard(p) is None
    assert (out / "index.json").exists()
