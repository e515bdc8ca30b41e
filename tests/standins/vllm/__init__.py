"""A STAND-IN for the ``vllm`` package, not vLLM.

It implements the small part of vLLM's documented offline API that
``pipeline.caption.engines.VllmEngine`` uses — ``LLM(model=..., limit_mm_per_prompt=...,
max_model_len=...)``, ``LLM.generate(prompts, SamplingParams(temperature=..., max_tokens=...))``
with prompts ``{"prompt": str, "multi_modal_data": {"image": PIL.Image}}``, and outputs with
``.outputs[0].text`` — on top of a (tiny) LLaVA through transformers, so that the engine can
be tested on CPU machines where the real vLLM cannot run (see /work/shared/ENVIRONMENT.md).
The real vLLM was not run against this project.

Tests use it by putting ``tests/standins`` first on ``sys.path``. Like vLLM it tokenises
each prompt with special tokens (BOS), expands ``<image>`` to the model's image tokens,
generates each request on its own (no padding), decodes with ``skip_special_tokens`` and
does not strip. Unlike vLLM it applies the whole ``generation_config.json`` of the model
through ``transformers.generate`` (the tiny test model's ``min_new_tokens`` and
``suppress_tokens`` included; vLLM takes only sampling defaults from it) — which is what
makes it give the same greedy tokens as the transformers engine on the tiny model.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

__version__ = "0.0.0+standin"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError("the stand-in supports n=1 only")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    """``vllm.LLM`` for LLaVA checkpoints, on transformers (CPU)."""

    def __init__(self, model: str, *, limit_mm_per_prompt: dict[str, int] | None = None,
                 max_model_len: int | None = None, seed: int = 0, **kwargs: Any) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_id = model
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt or {"image": 1})
        self.max_model_len = max_model_len
        self.kwargs = kwargs
        self._torch = torch
        self._seed = seed
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = LlavaForConditionalGeneration.from_pretrained(model).eval()

    def get_tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _one(self, prompt: Any, params: SamplingParams) -> RequestOutput:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        text = prompt["prompt"]
        images = (prompt.get("multi_modal_data") or {}).get("image")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or [])
        limit = self.limit_mm_per_prompt.get("image", 1)
        if len(images) > limit:
            raise ValueError(f"You set image={limit} (or defaulted to 1) in `--limit-mm-per-prompt`, "
                             f"but passed {len(images)} images in the same prompt.")
        placeholders = text.count(self.processor.image_token)
        if placeholders != len(images):
            raise ValueError(f"prompt has {placeholders} image placeholders but {len(images)} images")
        inputs = self.processor(text=text, images=images or None, return_tensors="pt")
        n_prompt = inputs["input_ids"].shape[1]
        if self.max_model_len is not None and n_prompt >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {n_prompt}) is longer than the maximum "
                             f"model length of {self.max_model_len}.")
        max_new = params.max_tokens or ((self.max_model_len or 4096) - n_prompt)
        gen: dict[str, Any] = {"max_new_tokens": max_new}
        if params.temperature == 0:
            gen["do_sample"] = False
        else:
            gen.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                       top_k=params.top_k if params.top_k > 0 else None)
            self._torch.manual_seed(self._seed if params.seed is None else params.seed)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new = [int(t) for t in out[0, n_prompt:]]
        decoded = self.processor.decode(new, skip_special_tokens=params.skip_special_tokens)
        eos = self.model.generation_config.eos_token_id
        finish = "stop" if (new and new[-1] == eos) or len(new) < max_new else "length"
        return RequestOutput(request_id=uuid.uuid4().hex, prompt=text,
                             prompt_token_ids=[int(t) for t in inputs["input_ids"][0]],
                             outputs=[CompletionOutput(0, decoded, new, finish_reason=finish)])

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, **kwargs: Any) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        # vLLM validates every request before running any: one bad prompt fails the call
        return [self._one(p, sp) for p, sp in zip(prompts, params)]


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
