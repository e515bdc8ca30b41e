"""Settings of the caption stage (the manifest's ``caption`` section).

The prompt is fixed by the model family: LLaVA-1.5 was trained on
``USER: <image>\\n{instruction} ASSISTANT:``, and every engine must build exactly that
string (an OpenAI-compatible server does so through the model's chat template).

``caption.vllm`` holds vLLM engine options, checked here, at manifest load, because a
misspelt option would otherwise surface only on the GPU host, after the job was queued
and the model half loaded. Only options listed in :data:`VLLM_OPTIONS` are accepted;
each one's rule is the one vLLM 0.33.0 enforces (file named beside it), so a value that
passes here is not refused by vLLM's own validation either.
"""

from __future__ import annotations

import dataclasses
import re
import json
from typing import Any, Callable

from pipeline.core.settings import Settings

ENGINES = ("vllm", "server", "transformers")
LLAVA_PROMPT = "USER: <image>\n{instruction} ASSISTANT:"
DEFAULT_INSTRUCTION = (
    "Describe the image in a very detailed manner if we remove the degradation artifacts from the image."
)

# vLLM 0.33.0's ModelDType (vllm/config/model.py).
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclasses.dataclass(frozen=True)
class VllmOption:
    """One ``vllm.LLM`` keyword the manifest may set: its JSON type and vLLM's own rule."""

    kind: type
    rule: str
    ok: Callable[[Any], bool]


# Keyword arguments of vllm.LLM / EngineArgs (vllm/entrypoints/llm.py, vllm/engine/arg_utils.py)
# that a caption host may need; unset ones keep vLLM's defaults (max_model_len: the model's own).
VLLM_OPTIONS: dict[str, VllmOption] = {
    # vllm/config/cache.py: Field(default=0.92, gt=0, le=1)
    "gpu_memory_utilization": VllmOption(float, "in (0, 1]", lambda v: 0 < v <= 1),
    # vllm/config/parallel.py: Field(default=1, ge=1)
    "tensor_parallel_size": VllmOption(int, ">= 1", lambda v: v >= 1),
    # vllm/config/scheduler.py: Field(ge=1)
    "max_num_seqs": VllmOption(int, ">= 1", lambda v: v >= 1),
    # vllm/config/model.py: the model's own limit when unset; larger than it is refused
    "max_model_len": VllmOption(int, ">= 1 (and at most the model's own limit)", lambda v: v >= 1),
    # vllm/config/scheduler.py
    "max_num_batched_tokens": VllmOption(int, ">= 1", lambda v: v >= 1),
    "dtype": VllmOption(str, f"one of {list(VLLM_DTYPES)}", lambda v: v in VLLM_DTYPES),
    "enforce_eager": VllmOption(bool, "true or false", lambda v: True),
}


def vllm_option_problems(options: dict[str, Any]) -> list[str]:
    """Each unknown name or bad value in ``caption.vllm``, named."""
    out = []
    for name, value in options.items():
        spec = VLLM_OPTIONS.get(name)
        if spec is None:
            close = [k for k in VLLM_OPTIONS if k.split("_")[0] == str(name).split("_")[0]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"unknown vLLM option vllm.{name}{hint}; known: {sorted(VLLM_OPTIONS)}")
            continue
        if spec.kind is float:
            typed = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif spec.kind is int:
            typed = isinstance(value, int) and not isinstance(value, bool)
        else:
            typed = isinstance(value, spec.kind)
        if not typed or not spec.ok(value):
            out.append(f"vllm.{name} must be {spec.kind.__name__} {spec.rule}, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class CaptionConfig(Settings):
    engine: str = "vllm"
    model: str = "llava-hf/llava-1.5-7b-hf"
    instruction: str = DEFAULT_INSTRUCTION
    prompt_template: str = LLAVA_PROMPT
    max_tokens: int = 256
    # server engine
    server: str = "http://127.0.0.1:8000/v1"
    api_key: str = ""
    concurrency: int = 32
    timeout_s: float = 120.0
    retries: int = 5
    # Ask the server to put BOS in front of the rendered template (vLLM's request field
    # `add_special_tokens`; its chat endpoint adds none by default, offline generation
    # does). False for servers that add BOS themselves and refuse unknown fields, such as
    # `transformers serve` (HTTP 422).
    add_special_tokens: bool = True
    # transformers engine: images per generate call
    batch_size: int = 64
    # vllm engine: vllm.LLM options (VLLM_OPTIONS) and images per LLM.generate call
    # (0: everything the engine is given, a whole shard, in one call: vLLM schedules it)
    vllm: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A second set of captions built beside the first from the same pairs (e.g. "blip" for
    # Table III's BLIP row): the caption and embed stages write captions-<variant>/ and
    # text_emb-<variant>/, and the trainer reads text_emb-<variant>/.
    variant: str = ""
    vllm_batch_size: int = 0
    max_failed_fraction: float = 0.01

    def __hash__(self) -> int:  # the dict field would make the generated hash fail
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def problems(self) -> list[str]:
        out = []
        if self.engine not in ENGINES:
            out.append(f"engine {self.engine!r} must be one of {list(ENGINES)}")
        if "{instruction}" not in self.prompt_template or "<image>" not in self.prompt_template:
            out.append("prompt_template must contain <image> and {instruction}")
        if not self.server.rstrip("/").endswith("/v1"):
            out.append(f"server {self.server!r} must be a base URL ending in /v1")
        for name in ("max_tokens", "concurrency", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        if self.vllm_batch_size < 0:
            out.append("vllm_batch_size must be >= 0 (0: a whole shard per generate call)")
        if self.retries < 0 or self.timeout_s <= 0:
            out.append("retries must be >= 0 and timeout_s > 0")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            out.append("max_failed_fraction must lie in [0, 1]")
        if not isinstance(self.vllm, dict):
            out.append(f"vllm must be an object of vLLM engine options, got {type(self.vllm).__name__}")
        else:
            out += vllm_option_problems(self.vllm)
        if self.variant and not re.fullmatch(r"[A-Za-z0-9_]+", self.variant):
            out.append(f"variant {self.variant!r} must use only letters, digits and '_' (it names folders)")
        return out

    def prompt(self) -> str:
        return self.prompt_template.format(instruction=self.instruction)

    def sampling(self) -> dict[str, Any]:
        """Greedy decoding with a token cap: the same on every engine."""
        return {"temperature": 0.0, "max_tokens": self.max_tokens}

    def output_affecting(self) -> dict[str, Any]:
        """What changes a caption; the engine and its transport settings do not."""
        return {"model": self.model, "prompt": self.prompt(), "sampling": self.sampling()}
