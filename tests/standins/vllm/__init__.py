"""A STAND-IN for the ``vllm`` package (0.33.0's offline API), not vLLM.

vLLM cannot run on the CPU machines this project is built on (its wheel is a CUDA build),
so ``pipeline.caption.engines.VllmEngine`` is tested against this package, put first on
``sys.path``. It is strict where vLLM is strict, so that what passes here does not fail
on the GPU host for a reason a CPU could have caught. Everything below was read from the
vllm-0.33.0 wheel (PyPI):

* ``LLM(model, **kwargs)`` accepts exactly vLLM's names (``_signatures.py``: EngineArgs
  fields from vllm/engine/arg_utils.py, ``chat_template`` from vllm/entrypoints/llm.py);
  any other name is the ``TypeError`` that EngineArgs' dataclass ``__init__`` raises.
* The options the caption host sets are validated as vLLM's pydantic configs do, raising
  the same ``pydantic.ValidationError`` (a ``ValueError``): ``gpu_memory_utilization`` in
  (0, 1] (vllm/config/cache.py), ``tensor_parallel_size``, ``max_num_seqs`` and
  ``max_num_batched_tokens`` >= 1 (vllm/config/parallel.py, scheduler.py), ``dtype`` one
  of ModelDType, and ``max_model_len`` at most the model's own limit, derived from
  ``max_position_embeddings`` of the text config (``_get_and_verify_max_len`` in
  vllm/config/model.py, same message). Unset, ``max_model_len`` is the model's own.
* A start that runs out of GPU memory fails as it does in vLLM: the engine core process
  logs the ``ValueError`` ("Free memory on device ... is less than desired GPU memory
  utilization", vllm/v1/worker/utils.py) and the caller gets ``RuntimeError("Engine core
  initialization failed. See root cause above. ...")`` (vllm/v1/engine/utils.py).
* ``LLM.generate(prompts, sampling_params, *, use_tqdm, ...)``: prompts
  ``{"prompt": str, "multi_modal_data": {"image": PIL.Image}}``; every prompt is checked
  before any runs (one bad prompt fails the call, ``VLLMValidationError`` for a prompt
  longer than max_model_len, vllm/v1/engine/input_processor.py); ``use_tqdm`` may be a
  callable making the bar, used as vllm/entrypoints/common/offline.py does (``total=``,
  ``update``, ``format_dict["elapsed"]``, ``postfix``, ``close``); outputs come back sorted
  by request id, ``outputs[0].finish_reason`` in stop | length | abort | error
  (vllm/v1/engine/__init__.py), ``length`` when ``max_tokens`` or max_model_len ran out.
* ``SamplingParams`` takes only vLLM's field names (vllm/sampling_params.py) and refuses
  ``max_tokens < 1`` and a negative temperature with ``VLLMValidationError``.
* Engine death: once the engine core is dead every ``generate`` raises
  ``vllm.v1.engine.exceptions.EngineDeadError`` and returns nothing of that call.

Faults are switched on through :data:`CONTROL` (tests in the same process) or the
environment variable ``VLLM_STANDIN`` (JSON, for a job run as a subprocess):
``{"die_after": N}`` kills the engine once N requests of this process have finished
(mid-batch), ``{"finish": {"3": "abort"}}`` ends request number 3 (0-based)
with that finish reason (request numbers count per ``LLM``), ``{"free_memory_fraction": 0.5}`` makes the "GPU" that full.

What it does NOT prove: generation runs through transformers, one request after another,
on the CPU (no paged attention, no continuous batching, no CUDA), and it applies the whole
``generation_config.json`` of the model (vLLM takes only sampling defaults from it), which
is what makes its greedy tokens equal the transformers engine's on the tiny model. Real
vLLM's throughput, memory use, and its own LLaVA implementation are untested here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from vllm._signatures import ENGINE_ARGS, GENERATE, LLM_ONLY, SAMPLING_PARAMS
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

__version__ = "0.33.0+standin"

_ACCEPTED = frozenset(ENGINE_ARGS) | frozenset(LLM_ONLY)
_GPU_TOTAL_GIB = 80.0


@dataclass
class Control:
    """Faults for the next engines and calls (see the module docstring)."""

    die_after: int | None = None
    finish: dict[int, str] = field(default_factory=dict)
    free_memory_fraction: float = 1.0
    finished: int = 0  # requests finished by every engine of this process so far

    @classmethod
    def from_env(cls) -> "Control":
        raw = json.loads(os.environ.get("VLLM_STANDIN") or "{}")
        return cls(die_after=raw.get("die_after"), finish={int(k): v for k, v in raw.get("finish", {}).items()},
                   free_memory_fraction=float(raw.get("free_memory_fraction", 1.0)))

    def reset(self) -> None:
        fresh = Control()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


CONTROL = Control.from_env()


# ------------------------------------------------------------ sampling, outputs --


class SamplingParams:
    """vLLM's SamplingParams: its field names only; greedy when temperature is 0."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(SAMPLING_PARAMS))
        if unknown:
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        self.n = kwargs.get("n", 1)
        self.temperature = float(kwargs.get("temperature", 1.0))
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.skip_special_tokens = kwargs.get("skip_special_tokens", True)
        self.seed = kwargs.get("seed")
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      parameter="max_tokens", value=self.max_tokens)
        if self.n != 1:
            raise NotImplementedError("the stand-in generates n=1 only")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


# --------------------------------------------------------------- validation --


def _validate_options(kwargs: dict[str, Any], derived_max_len: int) -> int:
    """The checks vLLM's pydantic configs make of the options a caption host sets;
    returns the max_model_len the engine will use."""
    from pydantic import ConfigDict, Field
    from pydantic.dataclasses import dataclass as pydantic_dataclass

    @pydantic_dataclass(config=ConfigDict(extra="forbid"))
    class CacheConfig:
        gpu_memory_utilization: float = Field(default=0.92, gt=0, le=1)

    @pydantic_dataclass(config=ConfigDict(extra="forbid"))
    class ParallelConfig:
        tensor_parallel_size: int = Field(default=1, ge=1)

    @pydantic_dataclass(config=ConfigDict(extra="forbid"))
    class SchedulerConfig:
        max_num_seqs: int = Field(default=256, ge=1)
        max_num_batched_tokens: int = Field(default=8192, ge=1)

    @pydantic_dataclass(config=ConfigDict(extra="forbid"))
    class ModelConfig:
        dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
        max_model_len: int | None = Field(default=None, ge=-1)

        def __post_init__(self) -> None:
            if self.max_model_len is not None and self.max_model_len > derived_max_len:
                raise ValueError(
                    f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                    f"max_model_len (max_position_embeddings={derived_max_len} or model_max_length=None "
                    "in model's config.json). To allow overriding this maximum, set the env var "
                    "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")

    def pick(names: tuple[str, ...]) -> dict[str, Any]:
        return {n: kwargs[n] for n in names if kwargs.get(n) is not None}

    ModelConfig(**pick(("dtype", "max_model_len")))
    CacheConfig(**pick(("gpu_memory_utilization",)))
    ParallelConfig(**pick(("tensor_parallel_size",)))
    SchedulerConfig(**pick(("max_num_seqs", "max_num_batched_tokens")))
    requested = kwargs.get("max_model_len")
    return derived_max_len if requested in (None, -1) else int(requested)


# ---------------------------------------------------------------------- LLM --


class LLM:
    """``vllm.LLM`` for LLaVA checkpoints, on transformers (CPU)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in _ACCEPTED]
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        import torch
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        try:
            hf_config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ValueError(f"Invalid repository ID or local directory specified: '{model}'.") from exc
        derived = int(hf_config.get_text_config().max_position_embeddings)
        max_model_len = _validate_options(kwargs, derived)
        wanted = float(kwargs.get("gpu_memory_utilization") or 0.92)
        if wanted > CONTROL.free_memory_fraction:
            free = CONTROL.free_memory_fraction * _GPU_TOTAL_GIB
            print(f"(EngineCore_DP0 pid={os.getpid()}) ValueError: Free memory on device cuda:0 "
                  f"({free:.2f}/{_GPU_TOTAL_GIB:.2f} GiB) on startup is less than desired GPU memory "
                  f"utilization ({wanted}, {wanted * _GPU_TOTAL_GIB:.2f} GiB). Decrease GPU memory "
                  "utilization or reduce GPU memory used by other processes.", file=sys.stderr)
            raise RuntimeError("Engine core initialization failed. See root cause above. "
                               "Failed core proc(s): {'EngineCore_DP0': 1}")
        self.kwargs = dict(kwargs)
        self.limit_mm_per_prompt = dict(kwargs.get("limit_mm_per_prompt") or {"image": 1})
        self.model_config = _ModelConfigView(model=model, max_model_len=max_model_len)
        self._torch = torch
        self._seed = int(kwargs.get("seed") or 0)
        self._counter = itertools.count()
        self._dead = False
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = LlavaForConditionalGeneration.from_pretrained(model).eval()

    def get_tokenizer(self) -> Any:
        return self.processor.tokenizer

    # -- one request

    def _prepare(self, prompt: Any) -> tuple[str, dict[str, Any]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        text = prompt["prompt"]
        images = (prompt.get("multi_modal_data") or {}).get("image")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or [])
        limit = self.limit_mm_per_prompt.get("image", 1)
        if len(images) > limit:
            raise VLLMValidationError(f"At most {limit} image(s) may be provided in one prompt.",
                                      parameter="multi_modal_data")
        placeholders = text.count(self.processor.image_token)
        if placeholders != len(images):
            raise VLLMValidationError(f"prompt has {placeholders} image placeholders but {len(images)} images")
        inputs = self.processor(text=text, images=images or None, return_tensors="pt")
        n_prompt = int(inputs["input_ids"].shape[1])
        limit_len = self.model_config.max_model_len
        if n_prompt >= limit_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {n_prompt}) is longer than the maximum model length of "
                f"{limit_len}. Make sure that `max_model_len` is no smaller than the number of text "
                "tokens plus multimodal tokens.")
        return text, inputs

    def _run(self, number: int, text: str, inputs: dict[str, Any], params: SamplingParams) -> RequestOutput:
        n_prompt = int(inputs["input_ids"].shape[1])
        room = self.model_config.max_model_len - n_prompt
        max_new = min(params.max_tokens or room, room)
        gen: dict[str, Any] = {"max_new_tokens": max_new}
        if params.temperature == 0:
            gen["do_sample"] = False
        else:
            gen.update(do_sample=True, temperature=params.temperature)
            self._torch.manual_seed(self._seed if params.seed is None else params.seed)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new = [int(t) for t in out[0, n_prompt:]]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        finish = "stop" if (new and new[-1] in eos_ids) or len(new) < max_new else "length"
        forced = CONTROL.finish.get(number)
        if forced in ("abort", "error"):
            new, finish = new[: len(new) // 2], forced
        decoded = self.processor.decode(new, skip_special_tokens=params.skip_special_tokens)
        return RequestOutput(request_id=str(number), prompt=text,
                             prompt_token_ids=[int(t) for t in inputs["input_ids"][0]], prompt_logprobs=None,
                             outputs=[CompletionOutput(0, decoded, new, None, None, finish_reason=finish)],
                             finished=True)

    # -- the offline API

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs: Any) -> list[RequestOutput]:
        unknown = sorted(set(kwargs) - set(GENERATE))
        if unknown:
            raise TypeError(f"LLM.generate() got an unexpected keyword argument '{unknown[0]}'")
        if self._dead:
            raise EngineDeadError()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        prepared = [self._prepare(p) for p in prompts]  # all are checked before any runs
        use_tqdm: bool | Callable[..., Any] = kwargs.get("use_tqdm", True)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            make = use_tqdm if callable(use_tqdm) else tqdm
            bar = make(total=len(prepared), desc="Processed prompts", dynamic_ncols=True,
                       postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        outputs = []
        try:
            for (text, inputs), sp in zip(prepared, params):
                if CONTROL.die_after is not None and CONTROL.finished >= CONTROL.die_after:
                    self._dead = True
                    raise EngineDeadError()
                outputs.append(self._run(next(self._counter), text, inputs, sp))
                CONTROL.finished += 1
                if bar is not None:
                    elapsed = bar.format_dict["elapsed"]  # as vLLM reads it for its speed postfix
                    bar.postfix = f"est. speed: {len(outputs) / max(elapsed, 1e-9):.2f} req/s"
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return sorted(outputs, key=lambda o: int(o.request_id))


@dataclass(frozen=True)
class _ModelConfigView:
    """The two fields of vLLM's ``LLM.model_config`` (a ModelConfig) the engine reads."""

    model: str
    max_model_len: int


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "CONTROL", "__version__"]
