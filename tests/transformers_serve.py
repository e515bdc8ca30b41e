"""A real OpenAI-compatible server for tests and benchmarks: ``transformers serve`` on
loopback, serving a local (tiny) LLaVA folder on the CPU.

Facts this relies on (transformers 5.23, its ``serving`` extra: fastapi, uvicorn, openai,
pydantic, starlette, rich): ``transformers serve MODEL`` pins the server to MODEL and
answers 400 to a request naming another model; replies name the model ``MODEL@main``;
``/v1/models`` lists only Hugging Face hub-cache models (not a local folder) and answers
500 if ``HF_HUB_CACHE`` does not exist; unknown request fields (vLLM's
``add_special_tokens``) are refused with 422; uvicorn logs one access line per request,
which is how a test counts what reached the server. The console script may be missing in
a layered venv, so the CLI is started through ``transformers.cli.transformers.main``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHAT_LINE = '"POST /v1/chat/completions HTTP/1.1"'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TransformersServe:
    """``transformers serve MODEL --device cpu`` in its own process, on 127.0.0.1."""

    def __init__(self, model_dir: str | Path, workdir: Path, port: int | None = None) -> None:
        self.model = str(model_dir)
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180.0) -> "TransformersServe":
        """Start (or restart, on the same port) and wait until /v1/models answers 200."""
        hub = self.workdir / "hf_hub_cache"
        hub.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.log_path = self.workdir / f"serve-{self.starts}.log"
        env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
                 self.model, "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as resp:
                    if resp.status == 200:
                        json.loads(resp.read())
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"transformers serve did not answer within {timeout_s:g} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def chat_requests(self) -> int:
        """Chat completion requests this run of the server has logged (any status)."""
        return sum(CHAT_LINE in line for line in self.log().splitlines())

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as a crashed or preempted host does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "TransformersServe":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
