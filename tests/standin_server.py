"""A stand-in for ``vllm serve``: an OpenAI-compatible caption server with fault injection.

The server engine is tested against a real OpenAI-compatible server, ``transformers
serve`` (tests/test_caption_server.py). This stand-in is for what a real server cannot be
made to do on demand: fail one chosen image's request in one chosen way, count every
attempt, answer after a fixed delay for the client benchmark. It speaks the part of
vLLM's OpenAI API the engine uses: ``GET /v1/models`` and ``POST /v1/chat/completions``
with one user message holding an ``image_url`` (base64 data URL) part and a ``text``
part. It is not vLLM: no batching, no streaming, none of vLLM's other endpoints.

Its answers follow vLLM 0.33.0 (read from its wheel): error bodies are vLLM's
``ErrorResponse`` (``{"error": {"message", "type", "param", "code"}}``,
vllm/entrypoints/serve/engine/protocol.py) with the status codes vLLM's handlers give
(vllm/entrypoints/serve/exception_handling/error_response.py): 400 for a request that
fails validation, 404 for an unknown model, 500 for an internal error (a dead engine,
finish_reason "error"), 501 for NotImplementedError, 503 for a full queue
(QueueOverflowError, vllm/exceptions.py); 401 is vLLM's ``{"error": "Unauthorized"}``
(vllm/entrypoints/serve/middleware/authenticate.py). vLLM never sends 429 or
``Retry-After``, so neither does this server. ``max_completion_tokens`` is read before
the deprecated ``max_tokens``; ``add_special_tokens`` defaults to false, as in vLLM's
ChatCompletionRequest.

Modes:
* ``"model"`` (A): answers from a (tiny) LLaVA checkpoint through transformers the way
  vLLM's chat endpoint does: the OpenAI content parts become [image, text], the
  processor's chat template renders the prompt, which is tokenised with special tokens
  only if the request asks for ``add_special_tokens``, and decoded greedily when
  ``temperature`` is 0. Generation runs on one worker thread, like a single GPU.
* ``"fixed"`` (B): answers a fixed text after ``delay_s``, for client benchmarks.

Faults are injected per image, keyed by :func:`image_key` (sha256 of the decoded
pixels) or by the order in which distinct images first arrive: HTTP 500 / 503 / 501 /
400, a stalled reply, malformed JSON, a dropped connection, or a 200 whose
``finish_reason`` is ``length`` (the text cut short) or ``abort``; each for the first
``times`` attempts of that image (transient) or for all of them (permanent). Every
request is recorded (:class:`RequestRecord`) so tests can count attempts. A
``started``/``release`` pair of events lets a test hold replies until it has seen how
many requests are in flight, without timing.

Run it on its own (used by benchmarks/caption.py, so the client is measured alone):
``python tests/standin_server.py --mode fixed --delay 0.2`` prints ``READY <base url>``
and serves until stdin closes or the process is terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import logging
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

FAULT_KINDS = ("500", "503", "501", "400", "stall", "malformed", "drop", "length", "abort")

# What vLLM 0.33.0 answers with each status (message, error type), for the injected faults.
VLLM_ERRORS = {
    500: ("The server had an error while processing your request.", "InternalServerError"),
    503: ("The engine is currently busy and cannot accept new requests. Please try again later or on a "
          "different instance.", "Service Unavailable"),
    501: ("not implemented for this model", "NotImplementedError"),
    400: ("The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure "
          "that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens.",
          "BadRequestError"),
}


def vllm_error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """vLLM's ErrorResponse body with its status."""
    return web.json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                             status=status)


def image_key(image: Image.Image) -> str:
    """sha256 of an image's size and RGB pixels: the same for the PIL image a test holds
    and for the PNG the client sent."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Fault:
    """What to do to one image's requests: ``kind`` in :data:`FAULT_KINDS`, for its first
    ``times`` attempts (None: every attempt, a permanent fault)."""

    kind: str
    times: int | None = None
    stall_s: float = 30.0  # "stall": reply this late (the client should have given up)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} not in {FAULT_KINDS}")

    def applies(self, attempt: int) -> bool:
        return self.times is None or attempt <= self.times


@dataclass(frozen=True)
class RequestRecord:
    """One chat request as the server saw it. ``outcome``: ``ok``, a fault kind, or
    ``bad_request`` / ``unknown_model`` / ``unauthorized``."""

    key: str | None
    attempt: int
    outcome: str
    t_start: float  # time.monotonic() when the request arrived
    t_end: float
    prompt: str | None = None  # the rendered prompt (mode "model")
    prompt_ids: tuple[int, ...] | None = None


class _BadRequest(Exception):
    pass


class StandInServer:
    """Background-thread aiohttp app on 127.0.0.1 with an ephemeral port (``.url``)."""

    def __init__(self, model_dir: str | Path | None = None, *, mode: str = "model",
                 served_model: str | None = None, text: str = "a photo of something",
                 delay_s: float = 0.2, api_key: str = "", faults: dict[str, Fault] | None = None,
                 faults_by_arrival: dict[int, Fault] | None = None, record: bool = True,
                 hold_until_in_flight: int | None = None) -> None:
        if mode not in ("model", "fixed"):
            raise ValueError("mode must be 'model' or 'fixed'")
        if mode == "model" and model_dir is None:
            raise ValueError("mode 'model' needs model_dir")
        self.mode, self.text, self.delay_s, self.api_key = mode, text, delay_s, api_key
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.served_model = served_model or self.model_dir or "standin"
        self.record = record
        self.records: list[RequestRecord] = []
        self._faults: dict[str, Fault] = dict(faults or {})
        self._faults_by_arrival: dict[int, Fault] = dict(faults_by_arrival or {})
        self._attempts: Counter[str] = Counter()
        self._arrival: dict[str, int] = {}
        self._lock = threading.Lock()
        self.in_flight = 0  # chat requests being handled now, and the most seen at once
        self.max_in_flight = 0
        # Hold every reply until this many requests are in flight at once (then never again):
        # a client that keeps that many in flight is seen doing so, whatever the machine's speed.
        self.hold_until_in_flight = hold_until_in_flight
        self._gate: asyncio.Event | None = None
        self._model: Any = None
        self._processor: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="standin-gen")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""

    # -- configuration, records

    def set_faults(self, faults: dict[str, Fault] | None = None,
                   faults_by_arrival: dict[int, Fault] | None = None) -> None:
        with self._lock:
            self._faults = dict(faults or {})
            self._faults_by_arrival = dict(faults_by_arrival or {})

    def records_for(self, key: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.records if r.key == key]

    def outcomes(self) -> Counter[str]:
        with self._lock:
            return Counter(r.outcome for r in self.records)

    def _record(self, rec: RequestRecord) -> None:
        if self.record:
            with self._lock:
                self.records.append(rec)

    # -- lifecycle

    def start(self) -> "StandInServer":
        if self.mode == "model":
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            self._processor = AutoProcessor.from_pretrained(self.model_dir)
            self._model = LlavaForConditionalGeneration.from_pretrained(self.model_dir).eval()
        self._thread = threading.Thread(target=self._serve, name="standin-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("stand-in server failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)  # type: ignore[union-attr]
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "StandInServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._stopping = asyncio.Event()
            self._gate = asyncio.Event()
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
            loop.run_until_complete(runner.setup())
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            loop.run_until_complete(web.SockSite(runner, sock).start())
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        except BaseException as exc:  # noqa: BLE001 — reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    # -- handlers

    def _unauthorized(self, request: web.Request) -> bool:
        return bool(self.api_key) and request.headers.get("Authorization") != f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if self._unauthorized(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        return web.json_response({"object": "list", "data": [
            {"id": self.served_model, "object": "model", "created": int(time.time()),
             "owned_by": "vllm", "root": self.served_model, "max_model_len": 4096}]})

    def _parse(self, body: Any) -> tuple[str, list[dict[str, Any]]]:
        """(base64 payload of the image's data URL, content parts in transformers' format)."""
        try:
            (message,) = body["messages"]
            assert message["role"] == "user"
            parts: list[dict[str, Any]] = []
            b64: str | None = None
            for part in message["content"]:
                if part["type"] == "image_url":
                    if b64 is not None:
                        raise _BadRequest("At most 1 image(s) may be provided in one request.")
                    url = part["image_url"]["url"]
                    head, _, b64 = url.partition(",")
                    if not (head.startswith("data:image/") and head.endswith(";base64")):
                        raise _BadRequest("only base64 data URLs are accepted here")
                    parts.append({"type": "image"})
                elif part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise _BadRequest(f"unsupported content type {part['type']!r}")
        except _BadRequest:
            raise
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise _BadRequest(f"malformed request: {exc!r}") from exc
        if b64 is None:
            raise _BadRequest("no image in the request")
        return b64, parts

    @staticmethod
    def _decode(b64: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            image.load()
        except (binascii.Error, OSError, ValueError) as exc:
            raise _BadRequest(f"cannot decode the image: {exc}") from exc
        return image.convert("RGB")

    def _fault(self, key: str) -> tuple[Fault | None, int]:
        with self._lock:
            self._attempts[key] += 1
            attempt = self._attempts[key]
            arrival = self._arrival.setdefault(key, len(self._arrival))
            fault = self._faults.get(key) or self._faults_by_arrival.get(arrival)
        return (fault if fault and fault.applies(attempt) else None), attempt

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            reached = self.hold_until_in_flight is not None and self.in_flight >= self.hold_until_in_flight
        try:
            if self.hold_until_in_flight is not None:
                if reached:
                    self._gate.set()  # type: ignore[union-attr]
                await asyncio.wait_for(self._gate.wait(), 60)  # type: ignore[union-attr]
            return await self._chat_inner(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _chat_inner(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        key, attempt = None, 0

        def done(outcome: str, **extra: Any) -> None:
            self._record(RequestRecord(key, attempt, outcome, t0, time.monotonic(), **extra))

        if self._unauthorized(request):
            done("unauthorized")
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            body = await request.json()
            if body.get("model") != self.served_model:
                done("unknown_model")
                return vllm_error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError",
                                  "model")
            b64, parts = self._parse(body)
            need_pixels = self.mode == "model" or self._faults or self._faults_by_arrival
            image = self._decode(b64) if need_pixels else None
        except (_BadRequest, ValueError) as exc:
            done("bad_request")
            return vllm_error(400, str(exc), "BadRequestError")
        fault = None
        if image is not None:
            key = image_key(image)
            fault, attempt = self._fault(key)
            if fault is not None and fault.kind not in ("length", "abort"):
                return await self._inject(request, fault, done)

        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if self.mode == "fixed":
            await asyncio.sleep(self.delay_s)
            text, finish, n_prompt, n_out, extra = self.text, "stop", 0, len(self.text.split()), {}
        else:
            loop = asyncio.get_running_loop()
            text, finish, prompt, ids, n_out = await loop.run_in_executor(
                self._executor, self._generate, image, parts, bool(body.get("add_special_tokens", False)),
                int(max_tokens), float(body.get("temperature", 1.0)))
            n_prompt, extra = len(ids), {"prompt": prompt, "prompt_ids": ids}
        if fault is not None:  # a reply cut short by the token limit, or aborted by the engine
            text, finish = text[: max(1, len(text) // 2)], fault.kind
        done(fault.kind if fault is not None else "ok", **extra)
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                      "total_tokens": n_prompt + n_out},
        })

    async def _inject(self, request: web.Request, fault: Fault, done: Any) -> web.StreamResponse:
        kind = fault.kind
        if kind in ("500", "503", "501", "400"):
            done(kind)
            message, err_type = VLLM_ERRORS[int(kind)]
            return vllm_error(int(kind), message, err_type)
        if kind == "malformed":
            done(kind)
            return web.Response(status=200, content_type="application/json",
                                text='{"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"conte')
        if kind == "drop":
            done(kind)
            request.transport.close()  # type: ignore[union-attr] — no status line, no body
            return web.Response(status=500)  # never reaches the client
        # stall: hold the reply past any reasonable client timeout (released on stop);
        # recorded on arrival so that counts are complete when the client gives up
        done(kind)
        try:
            await asyncio.wait_for(self._stopping.wait(), fault.stall_s)  # type: ignore[union-attr]
        except asyncio.TimeoutError:
            pass
        return vllm_error(503, *VLLM_ERRORS[503])

    def _generate(self, image: Image.Image, parts: list[dict[str, Any]], add_special_tokens: bool,
                  max_tokens: int, temperature: float) -> tuple[str, str, str, tuple[int, ...], int]:
        """What vLLM's chat endpoint does, through transformers: template → tokens → decode."""
        import torch

        processor, model = self._processor, self._model
        messages = [{"role": "user", "content": parts}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=prompt, images=[image], return_tensors="pt",
                           add_special_tokens=add_special_tokens)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=temperature > 0, max_new_tokens=max_tokens,
                                 **({"temperature": temperature} if temperature > 0 else {}))
        new = out[0, inputs["input_ids"].shape[1]:]
        text = processor.decode(new, skip_special_tokens=True)
        eos = model.generation_config.eos_token_id
        finish = "stop" if len(new) < max_tokens or int(new[-1]) == eos else "length"
        return text, finish, prompt, tuple(int(t) for t in inputs["input_ids"][0]), len(new)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("model", "fixed"), default="fixed")
    ap.add_argument("--model-dir")
    ap.add_argument("--served-model")
    ap.add_argument("--delay", type=float, default=0.2, help="seconds per reply in mode fixed")
    ap.add_argument("--text", default="a photo of something")
    args = ap.parse_args(argv)
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    server = StandInServer(args.model_dir, mode=args.mode, served_model=args.served_model,
                           text=args.text, delay_s=args.delay, record=False).start()
    print(f"READY {server.url}", flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
