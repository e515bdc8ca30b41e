"""Caption engines: one interface over three ways of running LLaVA-1.5.

The caption stage hands an engine a list of LQ images and gets back one
:class:`CaptionResult` per image, in the same order: a caption or an error, and the
finish reason the model ended with. Per-image failures are results, not exceptions, so
one bad image or one failed request never loses a shard. Two exceptions stop work:
:class:`EngineError` (the engine cannot start; the message says what to do) and
:class:`EngineDied` (an in-process engine died mid-call: nothing that call produced can
be trusted, so the stage must let it propagate and commit nothing of the shard).

Finish reasons are vLLM's (``vllm/v1/engine/__init__.py``: stop, length, abort, error,
repetition) and OpenAI's: ``stop`` is a finished caption; ``length`` (and
``repetition``, vLLM's early end of a looping output) is a caption that was cut, kept as
ok and flagged, because a rerun with the same greedy settings would cut it again;
``abort`` and ``error`` are failures, so a rerun captions those rows again.

* ``vllm``: vLLM in-process (``vllm.LLM.generate`` with ``multi_modal_data``), a whole
  shard (or ``vllm_batch_size`` images) per call so that vLLM's scheduler keeps its batch
  full; engine options from ``caption.vllm``.
* ``server``: any OpenAI-compatible endpoint (``vllm serve``, ``transformers serve``, ...);
  images travel as base64 PNG data URLs, with bounded concurrency, timeouts and retries.
* ``transformers``: ``LlavaForConditionalGeneration`` on the CPU (or one GPU), for small
  runs and tests.

All three build the same prompt, ``cfg.prompt()`` = ``USER: <image>\\n{instruction}
ASSISTANT:``, tokenised with BOS in front: the transformers and vLLM engines pass that
string (their tokenisers add BOS), and a server renders it from [image, instruction]
through the model's chat template (checked against ``cfg.prompt()`` by the in-process
engines at start); vLLM's chat endpoint adds BOS only when the request says
``add_special_tokens`` (``caption.add_special_tokens``), ``transformers serve`` always does.

vLLM does not run on the CPU machines this project is developed on: the ``vllm`` engine
is tested against a strict stand-in of vLLM 0.33.0's offline API (``tests/standins/vllm``);
the ``server`` engine against a real ``transformers serve`` and, for faults a real server
cannot be made to produce, ``tests/standin_server.py``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from pipeline.caption.config import VLLM_OPTIONS, CaptionConfig

Progress = Callable[[int], None] | None
log = logging.getLogger(__name__)

STOP, LENGTH, ABORT, ERROR, REPETITION = "stop", "length", "abort", "error", "repetition"
FAILED_FINISH = frozenset({ABORT, ERROR})  # the request did not complete: caption it again
CUT_FINISH = frozenset({LENGTH, REPETITION})  # a caption that ended early: kept, flagged


class EngineError(RuntimeError):
    """The engine cannot start at all; the message says what to do about it."""


class EngineDied(RuntimeError):
    """The engine died while captioning (vLLM's EngineDeadError): the results of the
    running call are lost and every later call would fail too. Let it propagate: the
    shard must not be committed half done, and the engine must be rebuilt."""


@dataclass(frozen=True)
class CaptionResult:
    """One image's outcome: exactly one of ``caption`` and ``error`` is set.

    ``finish_reason`` is what generation ended with (None when no generation ran, e.g.
    an unreadable image or an HTTP failure).
    """

    caption: str | None = None
    error: str | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if (self.caption is None) == (self.error is None):
            raise ValueError("exactly one of caption and error must be set")

    @property
    def ok(self) -> bool:
        return self.caption is not None

    @property
    def cut(self) -> bool:
        """A caption that ended before the model finished it (token limit, repetition)."""
        return self.ok and self.finish_reason in CUT_FINISH

    @classmethod
    def from_generation(cls, text: str | None, finish_reason: str | None) -> "CaptionResult":
        """Map a generation's text and finish reason to a result (see the module docstring)."""
        if finish_reason in FAILED_FINISH:
            return cls(error=f"generation ended with finish_reason {finish_reason!r}; a rerun captions "
                             "it again", finish_reason=finish_reason)
        text = (text or "").strip()
        if not text:
            return cls(error="model returned an empty caption", finish_reason=finish_reason)
        return cls(caption=text, finish_reason=finish_reason)


class CaptionEngine(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """Engine, model id, prompt, sampling and transport settings (for the sidecar).
        Call it after ``caption``: a server engine adds the model its replies named."""

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        """One result per image, same order; per-image failures are results."""

    def close(self) -> None:
        """Release the model / connections."""


# ------------------------------------------------------------------ helpers --


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """The conversation every engine captions with, in transformers' format: one user
    turn holding the image, then the instruction (what an OpenAI-compatible server builds
    from a request with an ``image_url`` part and a ``text`` part)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def render_chat_prompt(processor: Any, instruction: str) -> str:
    """The prompt string the processor's chat template makes of [image, instruction]."""
    if not getattr(processor, "chat_template", None):
        raise EngineError("the model's processor has no chat_template; a caption server could not "
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


Generate = Callable[[list[Image.Image], Callable[[int], None]], list[CaptionResult]]


def caption_in_batches(images: list[Any], batch_size: int, generate: Generate, failure: str,
                       progress: Progress = None) -> list[CaptionResult]:
    """Batched generation for the in-process engines.

    ``generate(batch, tick)`` captions one batch and may call ``tick(n)`` as images
    finish (vLLM does, so a whole-shard call still moves the bar); whatever it does not
    report is reported when the batch is done, never more than the batch holds. An
    unreadable image fails alone; a batch that fails as a whole (one image the model
    rejects) is retried image by image so the failure lands on the image that caused it.
    :class:`EngineDied` is never caught: a dead engine ends the call.
    """
    results: list[CaptionResult | None] = [None] * len(images)
    for batch in _batches(len(images), batch_size):
        reported = 0

        def tick(n: int, size: int = len(batch)) -> None:
            nonlocal reported
            n = min(n, size - reported)
            if n > 0:
                reported += n
                if progress:
                    progress(n)

        good: list[tuple[int, Image.Image]] = []
        for i in batch:
            try:
                good.append((i, to_rgb(images[i])))
            except Exception as exc:  # noqa: BLE001 — any unreadable input is that row's failure
                results[i] = _bad_image(exc)
        try:
            outs = generate([im for _, im in good], tick) if good else []
            if len(outs) != len(good):
                raise RuntimeError(f"{len(outs)} results for {len(good)} images")
        except EngineDied:
            raise
        except Exception:  # noqa: BLE001 — isolate the image that broke the batch
            outs = []
            for _, im in good:
                try:
                    outs += generate([im], tick)
                except EngineDied:
                    raise
                except Exception as exc:  # noqa: BLE001
                    outs.append(CaptionResult(error=f"{failure}: {type(exc).__name__}: {exc}"))
        for (i, _), res in zip(good, outs):
            results[i] = res
        tick(len(batch))
    return results  # type: ignore[return-value]


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _base_describe(cfg: CaptionConfig, engine: str) -> dict[str, Any]:
    return {"engine": engine, "model": cfg.model, "instruction": cfg.instruction,
            "prompt": cfg.prompt(), "sampling": cfg.sampling()}


# ------------------------------------------------------------- transformers --


class TransformersEngine:
    """A captioner through transformers, greedy, in batches of ``cfg.batch_size``.

    LLaVA (the paper's MLLM: the instruction in LLaVA-1.5's prompt) or a BLIP-family
    captioner (Table III's BLIP row: unconditional captioning, no instruction), told apart
    by the checkpoint's ``model_type``. Meant for small runs and tests (a 7B model on a
    CPU makes a caption in tens of seconds); uses CUDA in float16 when available.
    """

    name = "transformers"
    FAMILIES = {"llava": "LlavaForConditionalGeneration", "blip": "BlipForConditionalGeneration",
                "blip-2": "Blip2ForConditionalGeneration"}

    def __init__(self, cfg: CaptionConfig, device: str | None = None) -> None:
        check_model_ref(cfg.model)
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor

        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.family = AutoConfig.from_pretrained(cfg.model).model_type
            if self.family not in self.FAMILIES:
                raise EngineError(f"caption.model {cfg.model!r} is a {self.family!r} model; the transformers "
                                  f"engine captions with {sorted(self.FAMILIES)} models")
            model_cls = getattr(transformers, self.FAMILIES[self.family])
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            self.model = model_cls.from_pretrained(cfg.model, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load the captioner {cfg.model!r}: {exc}") from exc
        self.model.to(self.device).eval()
        if self.family == "llava":
            check_prompt(self.processor, cfg)
            # Batched generation appends new tokens on the right: pad prompts on the left.
            self.processor.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        # BLIP's generate hands only its keyword arguments to its text decoder (it sets the
        # special tokens itself): pass the checkpoint's other generation settings explicitly.
        self._generation_kwargs: dict[str, Any] = {}
        if self.family == "blip":
            self._eos.add(self.model.config.text_config.sep_token_id)  # the decoder stops on [SEP]
            self._generation_kwargs = {k: v for k, v in self.model.generation_config.to_diff_dict().items()
                                       if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample",
                                                    "max_new_tokens", "transformers_version")}
        self._torch = torch
        self._versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def describe(self) -> dict[str, Any]:
        prompt = {} if self.family == "llava" else {"prompt": None, "conditioning": "unconditional captioning"}
        return {**_base_describe(self.cfg, self.name), "family": self.family, **prompt,
                "batch_size": self.cfg.batch_size, "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), **self._versions}

    def _generate(self, images: list[Image.Image], tick: Callable[[int], None]) -> list[CaptionResult]:
        if self.family == "llava":
            inputs = self.processor(text=[self.cfg.prompt()] * len(images), images=images,
                                    return_tensors="pt", padding=True).to(self.device)
        else:
            inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **self._generation_kwargs, do_sample=False,
                                      max_new_tokens=self.cfg.max_tokens)
        new = out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out[:, 1:]  # BLIP: drop [DEC]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        # A row that produced EOS stopped; one that did not ran out of max_new_tokens.
        finishes = [STOP if self._eos & {int(t) for t in row} else LENGTH for row in new]
        return [CaptionResult.from_generation(t, f) for t, f in zip(texts, finishes)]

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        return caption_in_batches(images, self.cfg.batch_size, self._generate, "generation failed", progress)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


# --------------------------------------------------------------------- vLLM --


def explain_vllm_start_failure(exc: BaseException, cfg: CaptionConfig) -> str:
    """What a failed ``vllm.LLM(...)`` most likely means, for a person on the GPU host.

    vLLM 0.33 starts its engine core in a child process: a failure there (out of GPU
    memory, a model it cannot load) reaches the caller only as ``RuntimeError("Engine core
    initialization failed. See root cause above...")``, the cause being in vLLM's log.
    """
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # pydantic's messages span lines
    low = text.lower()
    memory = ("lower caption.vllm.gpu_memory_utilization to what is free, or max_model_len / max_num_seqs "
              "(they size the KV cache), or free the GPU (nvidia-smi shows who holds it)")
    if "max_model_len" in low and ("greater than" in low or "derived" in low):
        cause = ("caption.vllm.max_model_len is longer than the model allows; leave it unset to use the "
                 "model's own limit")
    elif any(m in low for m in ("out of memory", "free memory", "gpu memory", "cache blocks", "kv cache")):
        cause = f"not enough GPU memory: {memory}"
    elif isinstance(exc, OSError) or any(m in low for m in ("invalid repository", "local directory",
                                                             "config.json", "no such file")):
        cause = (f"caption.model {cfg.model!r} is not a model vLLM can load: a LLaVA folder holding "
                 "config.json and weights, or a hub id such as llava-hf/llava-1.5-7b-hf")
    elif "engine core initialization failed" in low:
        cause = (f"the engine core died while starting; the root cause is in vLLM's log above. Most often "
                 f"GPU memory ({memory}) or a model folder vLLM cannot load ({cfg.model!r})")
    else:
        cause = "see vLLM's log above"
    return f"vLLM could not start {cfg.model!r} ({text[:600]}); likely cause: {cause}"


def _ticking_bar(tick: Callable[[int], None]) -> Callable[..., Any]:
    """A tqdm factory for ``LLM.generate(use_tqdm=...)`` that forwards each finished
    request to ``tick`` and draws nothing (the stage draws its own bar). vLLM reads the
    bar's ``format_dict`` and ``postfix``, so it must be a real, enabled tqdm."""
    from tqdm import tqdm

    class TickingBar(tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._sink = open(os.devnull, "w")  # noqa: SIM115 — closed in close()
            super().__init__(*args, **{**kwargs, "file": self._sink})

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            tick(int(n or 0))
            return shown

        def close(self) -> None:
            super().close()
            if not self._sink.closed:
                self._sink.close()

    return TickingBar


class VllmEngine:
    """vLLM in-process: ``LLM.generate`` with the prompt string and ``multi_modal_data``.

    Coded against vLLM 0.33.0's source (``vllm/entrypoints/llm.py``); it was NOT run
    against a real vLLM here (vLLM cannot run on these CPU machines), only against the
    strict stand-in ``tests/standins/vllm``. Engine options come from ``caption.vllm``
    (checked at manifest load); ``max_model_len`` unset is the model's own limit.
    """

    name = "vllm"

    def __init__(self, cfg: CaptionConfig, **llm_kwargs: Any) -> None:
        try:
            import vllm
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError as exc:
            raise EngineError("vLLM is not installed (or is not 0.33's layout); pip install '.[vllm]' on a "
                              "GPU host (docs/captions.md) or use --engine server/transformers") from exc
        check_model_ref(cfg.model)
        try:
            from transformers import AutoProcessor

            check_prompt(AutoProcessor.from_pretrained(cfg.model), cfg)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load the processor of {cfg.model!r}: {exc}") from exc
        self.cfg = cfg
        self._vllm = vllm
        self._dead_error: type[BaseException] = EngineDeadError
        self._dead = False
        self._llm_kwargs = {"limit_mm_per_prompt": {"image": 1}, **cfg.vllm, **llm_kwargs}
        version = getattr(vllm, "__version__", "unknown")
        try:
            self._llm = vllm.LLM(model=cfg.model, **self._llm_kwargs)
        except TypeError as exc:  # EngineArgs' __init__: a name vLLM does not know
            raise EngineError(f"vLLM {version} refused an engine option ({exc}); caption.vllm takes "
                              f"{sorted(VLLM_OPTIONS)}") from exc
        except Exception as exc:  # noqa: BLE001 — every start failure gets its likely cause
            raise EngineError(explain_vllm_start_failure(exc, cfg)) from exc
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._params = vllm.SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)

    def describe(self) -> dict[str, Any]:
        return {**_base_describe(self.cfg, self.name), "batch_size": self.cfg.vllm_batch_size or "shard",
                "llm": self._llm_kwargs, "max_model_len": self.max_model_len,
                "vllm": getattr(self._vllm, "__version__", "unknown")}

    def _died(self, exc: BaseException | None, n: int) -> EngineDied:
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "it died during an earlier call"
        return EngineDied(f"vLLM's engine died while captioning {n} images ({what}); nothing of this shard "
                          "was committed. The root cause is in vLLM's log above; rerun once the GPU host is "
                          "healthy: every row not already captioned is captioned again")

    def _generate(self, images: list[Image.Image], tick: Callable[[int], None]) -> list[CaptionResult]:
        requests = [{"prompt": self.cfg.prompt(), "multi_modal_data": {"image": im}} for im in images]
        try:
            outputs = self._llm.generate(requests, self._params, use_tqdm=_ticking_bar(tick))
        except self._dead_error as exc:
            self._dead = True
            raise self._died(exc, len(images)) from exc
        return [CaptionResult.from_generation(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]

    def caption(self, images: list[Image.Image], progress: Progress = None) -> list[CaptionResult]:
        if self._dead:
            raise self._died(None, len(images))
        batch = self.cfg.vllm_batch_size or max(1, len(images))
        return caption_in_batches(images, batch, self._generate, "vLLM generate failed", progress)

    def close(self) -> None:
        self._llm = None


# ------------------------------------------------------------------- server --

RETRY_STATUS = frozenset({408, 429})
FINAL_5XX = frozenset({501})  # vLLM answers NotImplementedError with 501: asking again cannot help


def is_retryable_status(status: int) -> bool:
    """408, 429 and 5xx other than 501 are worth another attempt; other 4xx are final."""
    return status in RETRY_STATUS or (status >= 500 and status not in FINAL_5XX)


class _Retryable(Exception):
    """A failed attempt worth repeating; ``retry_after`` is the server's hint in seconds;
    ``unreachable``: no connection could be made at all (the server is not there)."""

    def __init__(self, reason: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.unreachable = unreachable


class _Final(Exception):
    """A failed attempt that repeating will not fix (4xx other than 408/429, 501)."""


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent/garbled.
    (vLLM never sends it; rate-limiting proxies and hosted APIs do.)"""
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


def error_message(body: bytes) -> str:
    """The human part of an error reply: vLLM's ``{"error": {"message"}}``, FastAPI's
    ``{"detail"}`` (transformers serve), or the raw text, shortened."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        for key in ("detail", "message", "error"):
            if isinstance(obj.get(key), str):
                return obj[key][:300]
    return text[:300]


def encode_data_url(image: Image.Image) -> str:
    """Lossless PNG as a base64 data URL (the server decodes the very same pixels)."""
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def start_server_hint(model: str) -> str:
    return (f"start one with `vllm serve {model} --port 8000` on a GPU host (llava-hf models ship their "
            f"chat template), or `transformers serve {model} --port 8000` (pip install "
            "'transformers[serving]'; set caption.add_special_tokens to false for it), then point "
            "caption.server or --server at its http://HOST:PORT/v1")


class ServerEngine:
    """Client of an OpenAI-compatible chat completions endpoint (``cfg.server`` ends in /v1).

    At most ``cfg.concurrency`` requests are in flight; an image is PNG/base64-encoded
    only when its request starts, so memory does not grow with the number of images.
    408, 429, 5xx other than 501, timeouts, dropped connections and malformed replies are
    retried up to ``cfg.retries`` times with exponential backoff and jitter
    (``Retry-After`` honoured, capped at ``retry_after_max_s``); other 4xx and 501 are
    final. Once a request has found the server unreachable on its every attempt, the rows
    not yet sent fail at once (a rerun asks only for them) instead of each waiting out
    its own retries. ``caption()`` is synchronous: the engine owns an event loop and one
    pooled ``aiohttp.ClientSession``.

    At start ``GET /v1/models`` checks the server is there; a server that does not list
    ``cfg.model`` (``transformers serve`` lists only hub-cache models; a vLLM server may
    use ``--served-model-name``) gets a warning naming what it lists, not a refusal. The
    model each reply names is recorded (``describe()["reported_models"]``).
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
        self.reported_models: set[str] = set()
        self.model_warning: str | None = None
        self._gone: str | None = None  # why the server is considered gone during this call
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
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.read()
                if resp.status in (401, 403):
                    raise EngineError(f"caption server at {url} refused the API key (HTTP {resp.status}); "
                                      "set caption.api_key")
                if resp.status != 200:
                    raise EngineError(f"caption server at {url} answered HTTP {resp.status}: "
                                      f"{error_message(body)}")
                try:
                    served = [m["id"] for m in json.loads(body)["data"]]
                except (ValueError, KeyError, TypeError) as exc:
                    raise EngineError(f"{url} is not an OpenAI-compatible server (bad /models reply: "
                                      f"{exc!r})") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineError(f"caption server at {self.base} is unreachable ({type(exc).__name__}: "
                              f"{exc}); {start_server_hint(self.cfg.model)}") from exc
        if self.cfg.model not in served:
            self.model_warning = (
                f"caption server at {self.base} lists {served} in /v1/models, not {self.cfg.model!r}; "
                "requests name caption.model anyway (servers that list only some of what they serve, "
                "like transformers serve, answer them); the model each reply names is recorded in the "
                "sidecar. If the server answers 404, set caption.model to the served name")
            log.warning(self.model_warning)
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
                "reported_models": sorted(self.reported_models), "model_warning": self.model_warning,
                "add_special_tokens": self.cfg.add_special_tokens, "concurrency": self.cfg.concurrency,
                "timeout_s": self.cfg.timeout_s, "retries": self.cfg.retries, "backoff_s": self.backoff_s,
                "backoff_max_s": self.backoff_max_s, "retry_after_max_s": self.retry_after_max_s,
                "aiohttp": self._aiohttp.__version__}

    # -- requests

    def _payload(self, image: Image.Image) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": encode_data_url(image)}},
                {"type": "text", "text": self.cfg.instruction},
            ]}],
            "temperature": 0,
            # The current OpenAI field, and the deprecated one for servers that know only it
            # (transformers serve < 5.21 ignores max_completion_tokens); vLLM reads the first.
            "max_completion_tokens": self.cfg.max_tokens,
            "max_tokens": self.cfg.max_tokens,
        }
        if self.cfg.add_special_tokens:  # vLLM extension: BOS in front, as LLM.generate does
            payload["add_special_tokens"] = True
        return payload

    def _parse_reply(self, body: bytes) -> CaptionResult:
        try:
            reply = json.loads(body)
            choice = reply["choices"][0]
            content = choice["message"]["content"]
            finish = choice.get("finish_reason")
            if content is not None and not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Retryable(f"malformed JSON reply ({type(exc).__name__}: {exc})") from exc
        if isinstance(reply.get("model"), str):
            self.reported_models.add(reply["model"])
        return CaptionResult.from_generation(content, finish if isinstance(finish, str) else None)

    async def _attempt(self, session: Any, payload: dict[str, Any]) -> CaptionResult:
        aiohttp = self._aiohttp
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        try:
            async with session.post(f"{self.base}/chat/completions", json=payload, timeout=timeout) as resp:
                body = await resp.read()
                status = resp.status
                if status == 200:
                    return self._parse_reply(body)
                reason = f"HTTP {status}: {error_message(body)}"
                if is_retryable_status(status):
                    raise _Retryable(reason, parse_retry_after(resp.headers.get("Retry-After")))
                if "add_special_tokens" in reason:
                    reason += " (this server takes no add_special_tokens: set caption.add_special_tokens to false)"
                raise _Final(reason)
        except asyncio.TimeoutError as exc:
            raise _Retryable(f"timed out after {self.cfg.timeout_s:g} s") from exc
        except aiohttp.ClientConnectorError as exc:  # refused, no route, DNS: nothing is listening
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}", unreachable=True) from exc
        except aiohttp.ClientError as exc:  # disconnects, resets, bad payloads
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
            except _Final as exc:
                return CaptionResult(error=f"{exc} (attempt {attempt}, not retried)")
            except _Retryable as exc:
                if attempt == attempts:
                    if exc.unreachable:
                        self._gone = str(exc)
                    return CaptionResult(error=f"{exc} (gave up after {attempts} attempts)")
                await asyncio.sleep(self._delay(attempt, exc.retry_after))
        raise AssertionError("unreachable")

    async def _caption_all(self, images: Sequence[Image.Image], progress: Progress) -> list[CaptionResult]:
        """``concurrency`` workers pull the next index from one iterator: in-flight
        requests and live coroutines stay at ``concurrency`` however many images come."""
        session = await self._ensure_session()
        results: list[CaptionResult | None] = [None] * len(images)
        todo = iter(range(len(images)))
        self._gone = None

        async def worker() -> None:
            for i in todo:
                if self._gone is not None:
                    results[i] = CaptionResult(
                        error=f"not sent: caption server at {self.base} became unreachable ({self._gone}); "
                              "rerun once it is back, only rows like this one are asked again")
                else:
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
