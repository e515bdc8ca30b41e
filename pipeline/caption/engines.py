"""Caption engines: one interface over three ways of running LLaVA-1.5.

The caption worker hands an engine a list of LQ images and gets back one
:class:`CaptionResult` per image, in the same order. Per-image failures are results,
not exceptions, so one bad image or one failed request never loses a shard; only an
engine that cannot start at all raises :class:`EngineError`, with a message that says
what to do.

* ``vllm``: vLLM in-process (``vllm.LLM.generate`` with ``multi_modal_data``), the
  fastest for offline batches on a GPU host.
* ``server``: an OpenAI-compatible ``vllm serve`` endpoint; images travel as base64 PNG
  data URLs, with bounded concurrency, timeouts and retries with backoff.
* ``transformers``: ``LlavaForConditionalGeneration`` on the CPU (or one GPU), for small
  runs and tests.

All three build the same prompt, ``cfg.prompt()`` = ``USER: <image>\\n{instruction}
ASSISTANT:``, tokenised with BOS in front: the transformers and vLLM engines pass that
string (their tokenisers add BOS), and the server renders it from [image, instruction]
through the model's chat template (checked against ``cfg.prompt()`` by the transformers
engine at start), with ``add_special_tokens`` requested so that BOS is added there too
(vLLM's chat endpoint adds none by default, and LLaVA-1.5's template has none).

vLLM does not run on the CPU machines this project is developed on: the ``vllm`` and
``server`` engines are tested against stand-ins speaking the same API and protocol
(``tests/standins/vllm``, ``tests/standin_server.py``), not against vLLM itself.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from pipeline.caption.config import CaptionConfig

Progress = Callable[[int], None] | None


class EngineError(RuntimeError):
    """The engine cannot start at all; the message says what to do about it."""


@dataclass(frozen=True)
class CaptionResult:
    """One image's outcome: exactly one of ``caption`` and ``error`` is set."""

    caption: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.caption is None) == (self.error is None):
            raise ValueError("exactly one of caption and error must be set")

    @property
    def ok(self) -> bool:
        return self.caption is not None


class CaptionEngine(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """Engine, model id, prompt, sampling and transport settings (for the sidecar)."""

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        """One result per image, same order; per-image failures are results."""

    def close(self) -> None:
        """Release the model / connections."""


# ------------------------------------------------------------------ helpers --


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """The conversation every engine captions with, in transformers' format: one user
    turn holding the image, then the instruction (what a vLLM server builds from an
    OpenAI request with an ``image_url`` part and a ``text`` part)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def render_chat_prompt(processor: Any, instruction: str) -> str:
    """The prompt string the processor's chat template makes of [image, instruction]."""
    if not getattr(processor, "chat_template", None):
        raise EngineError("the model's processor has no chat_template; a vLLM server could not "
                          "render the LLaVA prompt. Save one with the processor (chat_template.jinja)")
    return processor.apply_chat_template(chat_messages(instruction), add_generation_prompt=True,
                                         tokenize=False)


def check_prompt(processor: Any, cfg: CaptionConfig) -> None:
    """The server path relies on the chat template: it must render ``cfg.prompt()``."""
    rendered = render_chat_prompt(processor, cfg.instruction)
    if rendered != cfg.prompt():
        raise EngineError(
            f"the chat template of {cfg.model} renders {rendered!r}, but the caption prompt is "
            f"{cfg.prompt()!r}; offline and server captions would differ. Fix the model's "
            "chat_template or caption.prompt_template")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_ref(model: str) -> None:
    """A model reference is a local directory or a hub id ``owner/name``. Something that
    can only be a path (absolute, ``./``, ``~``, several components) must exist."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EngineError(f"model path {model} is a file; expected a model directory")
        return
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise EngineError(
            f"model directory {model} does not exist (caption.model); build the tiny demo "
            "models with `make demo`, or name a hub id such as llava-hf/llava-1.5-7b-hf")


def to_rgb(image: Any) -> Image.Image:
    """Force-load and convert to RGB; raises on an unreadable or non-image input."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _bad_image(exc: BaseException) -> CaptionResult:
    return CaptionResult(error=f"bad image: {type(exc).__name__}: {exc}")

def caption_in_batches(images: list[Any], batch_size: int,
                       generate: Callable[[list[Image.Image]], list[CaptionResult]], failure: str,
                       progress: Progress = None) -> list[CaptionResult]:
    """Batched generation for the in-process engines. An unreadable image fails alone;
    a batch that fails as a whole (one image the model rejects) is retried image by image
    so the failure lands on the image that caused it."""
    results: list[CaptionResult | None] = [None] * len(images)
    for batch in _batches(len(images), batch_size):
        good: list[tuple[int, Image.Image]] = []
        for i in batch:
            try:
                good.append((i, to_rgb(images[i])))
            except Exception as exc:  # noqa: BLE001 — any unreadable input is that row's failure
                results[i] = _bad_image(exc)
        try:
            outs = generate([im for _, im in good]) if good else []
        except Exception:  # noqa: BLE001 — isolate the image that broke the batch
            outs = []
            for _, im in good:
                try:
                    outs += generate([im])
                except Exception as exc:  # noqa: BLE001
                    outs.append(CaptionResult(error=f"{failure}: {type(exc).__name__}: {exc}"))
        for (i, _), res in zip(good, outs):
            results[i] = res
        if progress:
            progress(len(batch))
    return results  # type: ignore[return-value]


def _finish(text: str) -> CaptionResult:
    text = text.strip()
    return CaptionResult(caption=text) if text else CaptionResult(error="model returned an empty caption")


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _base_describe(cfg: CaptionConfig, engine: str) -> dict[str, Any]:
    return {"engine": engine, "model": cfg.model, "instruction": cfg.instruction,
            "prompt": cfg.prompt(), "sampling": cfg.sampling()}


# ------------------------------------------------------------- transformers --


class TransformersEngine:
    """LLaVA through transformers, greedy, in batches of ``cfg.batch_size``.

    Meant for small runs and tests (a 7B model on a CPU makes a caption in tens of
    seconds); uses CUDA in float16 when available.
    """

    name = "transformers"

    def __init__(self, cfg: CaptionConfig, device: str | None = None) -> None:
        check_model_ref(cfg.model)
        import torch
        import transformers
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            self.model = LlavaForConditionalGeneration.from_pretrained(cfg.model, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load LLaVA model {cfg.model!r}: {exc}") from exc
        self.model.to(self.device).eval()
        check_prompt(self.processor, cfg)
        # Batched generation appends new tokens on the right: pad prompts on the left.
        self.processor.tokenizer.padding_side = "left"
        self._torch = torch
        self._versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def describe(self) -> dict[str, Any]:
        return {**_base_describe(self.cfg, self.name), "batch_size": self.cfg.batch_size,
                "device": self.device, "dtype": str(self.dtype).removeprefix("torch."), **self._versions}

    def _generate(self, images: list[Image.Image]) -> list[CaptionResult]:
        inputs = self.processor(text=[self.cfg.prompt()] * len(images), images=images,
                                return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.cfg.max_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [_finish(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        return caption_in_batches(images, self.cfg.batch_size, self._generate, "generation failed", progress)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


# --------------------------------------------------------------------- vLLM --


class VllmEngine:
    """vLLM in-process: ``LLM.generate`` with the prompt string and ``multi_modal_data``.

    Coded against vLLM's documented offline API; it was NOT run against a real vLLM here
    (vLLM cannot run on these CPU machines), only against ``tests/standins/vllm``.
    """

    name = "vllm"

    def __init__(self, cfg: CaptionConfig, **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise EngineError("vLLM is not installed; pip install '.[vllm]' on a GPU host or use "
                              "--engine server/transformers") from exc
        check_model_ref(cfg.model)
        try:
            from transformers import AutoProcessor

            check_prompt(AutoProcessor.from_pretrained(cfg.model), cfg)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load the processor of {cfg.model!r}: {exc}") from exc
        self.cfg = cfg
        self._vllm = vllm
        self._llm_kwargs = {"limit_mm_per_prompt": {"image": 1}, "max_model_len": 4096, **llm_kwargs}
        try:
            self._llm = vllm.LLM(model=cfg.model, **self._llm_kwargs)
        except (OSError, ValueError) as exc:
            raise EngineError(f"vLLM cannot load {cfg.model!r}: {exc}") from exc
        self._params = vllm.SamplingParams(temperature=0, max_tokens=cfg.max_tokens)

    def describe(self) -> dict[str, Any]:
        return {**_base_describe(self.cfg, self.name), "batch_size": self.cfg.batch_size,
                "llm": self._llm_kwargs, "vllm": getattr(self._vllm, "__version__", "unknown")}

    def _generate(self, images: list[Image.Image]) -> list[CaptionResult]:
        requests = [{"prompt": self.cfg.prompt(), "multi_modal_data": {"image": im}} for im in images]
        outputs = self._llm.generate(requests, self._params, use_tqdm=False)
        return [_finish(o.outputs[0].text) for o in outputs]

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        return caption_in_batches(images, self.cfg.batch_size, self._generate, "vLLM generate failed", progress)

    def close(self) -> None:
        self._llm = None


# ------------------------------------------------------------------- server --

RETRY_STATUS = frozenset({408, 429})


class _Retryable(Exception):
    """A failed attempt worth repeating; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failed attempt that repeating will not fix (HTTP 4xx other than 408/429)."""


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def encode_data_url(image: Image.Image) -> str:
    """Lossless PNG as a base64 data URL (the server decodes the very same pixels)."""
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ServerEngine:
    """Client of an OpenAI-compatible ``vllm serve`` endpoint (``cfg.server`` ends in /v1).

    At most ``cfg.concurrency`` requests are in flight; an image is PNG/base64-encoded
    only when its request starts, so memory does not grow with the number of images.
    429, 408, 5xx, timeouts, dropped connections and malformed replies are retried up to
    ``cfg.retries`` times with exponential backoff and jitter (``Retry-After`` honoured,
    capped at ``retry_after_max_s``); other 4xx are final. ``caption()`` is synchronous:
    the engine owns an event loop and one pooled ``aiohttp.ClientSession``.
    """

    name = "server"

    def __init__(self, cfg: CaptionConfig, *, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 retry_after_max_s: float = 60.0, connect_timeout_s: float = 10.0) -> None:
        import aiohttp

        self.cfg = cfg
        self.base = cfg.server.rstrip("/")
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self._aiohttp = aiohttp
        self._headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._loop = asyncio.new_event_loop()
        self._encoder = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                           thread_name_prefix="caption-encode")
        self._session: Any = None
        self._rng = random.Random()
        try:
            check = self._check_server(min(connect_timeout_s, cfg.timeout_s))
            self.served = self._loop.run_until_complete(check)
        except BaseException:
            self.close()
            raise

    # -- lifecycle

    async def _ensure_session(self) -> Any:
        if self._session is None:
            aiohttp = self._aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.concurrency), headers=self._headers)
        return self._session

    async def _check_server(self, timeout_s: float) -> list[str]:
        aiohttp = self._aiohttp
        session = await self._ensure_session()
        url = f"{self.base}/models"
        hint = (f"start one with `vllm serve {self.cfg.model} --port 8000` (add --chat-template FILE "
                "if the model's own template does not render LLaVA-1.5's prompt; "
                "demo_fixtures/tiny_llava.py holds that template) or point caption.server at it")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.text()
                if resp.status in (401, 403):
                    raise EngineError(f"caption server at {url} refused the API key (HTTP {resp.status}); "
                                      "set caption.api_key")
                if resp.status != 200:
                    raise EngineError(f"caption server at {url} answered HTTP {resp.status}: {body[:200]}")
                try:
                    served = [m["id"] for m in (await resp.json(content_type=None))["data"]]
                except (ValueError, KeyError, TypeError) as exc:
                    raise EngineError(f"{url} is not an OpenAI-compatible server (bad /models reply: "
                                      f"{exc!r})") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineError(f"caption server at {self.base} is unreachable ({type(exc).__name__}: "
                              f"{exc}); {hint}") from exc
        if self.cfg.model not in served:
            raise EngineError(f"caption server at {self.base} serves {served}, not {self.cfg.model!r}; "
                              f"start it with `vllm serve {self.cfg.model}` or set caption.model to the "
                              "served name")
        return served

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()
        self._encoder.shutdown(wait=True)

    def __del__(self) -> None:  # a forgotten close() must not leak the pool's sockets
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            self.close()

    def __enter__(self) -> "ServerEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {**_base_describe(self.cfg, self.name), "server": self.base, "served_models": self.served,
                "add_special_tokens": True, "concurrency": self.cfg.concurrency,
                "timeout_s": self.cfg.timeout_s, "retries": self.cfg.retries, "backoff_s": self.backoff_s,
                "backoff_max_s": self.backoff_max_s, "retry_after_max_s": self.retry_after_max_s,
                "aiohttp": self._aiohttp.__version__}

    # -- requests

    def _payload(self, image: Image.Image) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": encode_data_url(image)}},
                {"type": "text", "text": self.cfg.instruction},
            ]}],
            "temperature": 0,
            "max_tokens": self.cfg.max_tokens,
            # vLLM extension: BOS in front of the rendered template, as LLM.generate does.
            "add_special_tokens": True,
        }

    async def _attempt(self, session: Any, payload: dict[str, Any]) -> CaptionResult:
        aiohttp = self._aiohttp
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        try:
            async with session.post(f"{self.base}/chat/completions", json=payload, timeout=timeout) as resp:
                body = await resp.read()
                status = resp.status
                if status == 200:
                    try:
                        content = json.loads(body)["choices"][0]["message"]["content"]
                        if content is not None and not isinstance(content, str):
                            raise TypeError(f"content is {type(content).__name__}")
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise _Retryable(f"malformed JSON reply ({type(exc).__name__}: {exc})") from exc
                    return _finish(content or "")
                snippet = body[:200].decode("utf-8", "replace")
                if status in RETRY_STATUS or status >= 500:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    raise _Retryable(f"HTTP {status}: {snippet}", retry_after)
                raise _Fatal(f"HTTP {status}: {snippet}")
        except asyncio.TimeoutError as exc:
            raise _Retryable(f"timed out after {self.cfg.timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:  # disconnects, resets, refused connections, bad payloads
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from exc

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        jitter = self._rng.uniform(0.0, self.backoff_s)
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_s) + jitter
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.0)

    async def _one(self, session: Any, image: Image.Image) -> CaptionResult:
        """One image, all its attempts. Encoded only now (so at most ``concurrency``
        payloads are alive), off the event loop (PNG/zlib releases the GIL) so that replies
        arriving together are not queued behind each other's encoding."""
        try:
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(self._encoder, self._payload, image)
        except Exception as exc:  # noqa: BLE001
            return _bad_image(exc)
        attempts = self.cfg.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(session, payload)
            except _Fatal as exc:
                return CaptionResult(error=f"{exc} (attempt {attempt}, not retried)")
            except _Retryable as exc:
                if attempt == attempts:
                    return CaptionResult(error=f"{exc} (gave up after {attempts} attempts)")
                await asyncio.sleep(self._delay(attempt, exc.retry_after))
        raise AssertionError("unreachable")

    async def _caption_all(self, images: Sequence[Image.Image], progress: Progress) -> list[CaptionResult]:
        """``concurrency`` workers pull the next index from one iterator: in-flight
        requests and live coroutines stay at ``concurrency`` however many images come."""
        session = await self._ensure_session()
        results: list[CaptionResult | None] = [None] * len(images)
        todo = iter(range(len(images)))

        async def worker() -> None:
            for i in todo:
                results[i] = await self._one(session, images[i])
                if progress:
                    progress(1)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.cfg.concurrency, len(images)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # leave nothing pending on the loop for the next call
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results  # type: ignore[return-value]

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        if not images:
            return []
        return self._loop.run_until_complete(self._caption_all(images, progress))


# ------------------------------------------------------------------ factory --


def make_engine(cfg: CaptionConfig, engine: str | None = None, **options: Any) -> CaptionEngine:
    """The engine named by ``engine`` (e.g. ``--engine``) or else ``cfg.engine``.

    ``options`` go to the engine's constructor (e.g. ``backoff_s`` for the server engine,
    ``device`` for transformers, extra ``vllm.LLM`` arguments for vllm).
    """
    name = engine or cfg.engine
    classes = {"transformers": TransformersEngine, "vllm": VllmEngine, "server": ServerEngine}
    if name not in classes:
        raise EngineError(f"unknown caption engine {name!r}; choose one of {sorted(classes)}")
    return classes[name](cfg, **options)
