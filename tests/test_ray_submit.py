"""The degradation job submitted to a real Ray head with the real `ray job submit`.

The test starts a head on loopback, submits exactly the command users run, checks the
job SUCCEEDED and the shards it wrote, and stops the head.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, write_manifest
from pipeline.core.shards import verify_shard

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_server(address: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no Ray job server at {address} after {timeout} s")


# The head answers /api/version before its dashboard agent has registered; a submission in
# that window waits 10 s (ray.dashboard.consts.WAIT_AVAILABLE_AGENT_TIMEOUT) and then gets
# HTTP 500 with this text and nothing started, so the same submission id can be sent again.
NO_AGENT = "No available agent to submit job"


def _submit(cmd: list[str], env: dict[str, str], attempts: int = 4) -> str:
    """Run `ray job submit`, sending it again only while the head says its agent is not up."""
    for attempt in range(attempts):
        submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = submit.stdout + submit.stderr
        if NO_AGENT not in log:
            return log
        time.sleep(5 * (attempt + 1))
    raise AssertionError(f"the Ray head had no job agent after {attempts} submissions:\n{log[-3000:]}")


@pytest.fixture()
def ray_head():
    """A head of our own, stopped by signalling its process group (never `ray stop`,
    which would also stop any other Ray on the machine)."""
    env = dict(os.environ)
    # Token auth turns on once any local ray.init() left ~/.ray/auth_token; a loopback
    # test head does not need it (see ENVIRONMENT.md).
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    # Every port of our own: the suite's in-process Ray (pipeline.core.distribute.init_ray in
    # earlier tests) lives until pytest exits, and its dashboard agent holds the fixed default
    # 52365, so a second head's agent would fail to bind and never register (the CI failure
    # of stops 15 and 16: "No available agent to submit job").
    ports = {flag: _free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                              "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                              "metrics-export-port", "ray-client-server-port")}
    temp = f"/tmp/ray-t{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             "--disable-usage-stats", f"--temp-dir={temp}",
                             *(f"--{flag}={port}" for flag, port in ports.items())],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dash = ports["dashboard-port"]
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_server(address, proc)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit(ray_head, tmp_path: Path, photo_dir: Path) -> None:
    address, env = ray_head
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], out)
    sid = f"degrade-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
           "--", "python", "jobs/degrade.py", "--manifest", str(manifest), "--no-progress"]
    log = _submit(cmd, env)
    status = subprocess.run([RAY, "job", "status", "--address", address, sid], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower(), log[-3000:] + status.stdout[-500:]
    assert "8/8 pairs, 0 failed" in log, log
    shards = sorted((out / "pairs").glob("*.arrow"))
    assert [p.name for p in shards] == [f"shard-0000{i}.arrow" for i in range(3)]
    for p in shards:
        assert verify_shard(p) is None
    assert (out / "index.json").exists()
