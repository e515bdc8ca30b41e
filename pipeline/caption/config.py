"""Settings of the caption stage (the manifest's ``caption`` section).

The prompt is fixed by the model family: LLaVA-1.5 was trained on
``USER: <image>\\n{instruction} ASSISTANT:``, and every engine must build exactly that
string (the vLLM server does so through the model's chat template).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.settings import Settings

ENGINES = ("vllm", "server", "transformers")
LLAVA_PROMPT = "USER: <image>\n{instruction} ASSISTANT:"
DEFAULT_INSTRUCTION = (
    "Describe the image in a very detailed manner if we remove the degradation artifacts from the image."
)


@dataclasses.dataclass(frozen=True)
class CaptionConfig(Settings):
    engine: str = "vllm"
    model: str = "llava-hf/llava-1.5-7b-hf"
    instruction: str = DEFAULT_INSTRUCTION
    prompt_template: str = LLAVA_PROMPT
    max_tokens: int = 256
    server: str = "http://127.0.0.1:8000/v1"
    api_key: str = ""
    concurrency: int = 32
    timeout_s: float = 120.0
    retries: int = 5
    batch_size: int = 64
    max_failed_fraction: float = 0.01



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
        if self.retries < 0 or self.timeout_s <= 0:
            out.append("retries must be >= 0 and timeout_s > 0")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            out.append("max_failed_fraction must lie in [0, 1]")
        return out

    def prompt(self) -> str:
        return self.prompt_template.format(instruction=self.instruction)

    def sampling(self) -> dict[str, Any]:
        """Greedy decoding with a token cap: the same on every engine."""
        return {"temperature": 0.0, "max_tokens": self.max_tokens}

    def output_affecting(self) -> dict[str, Any]:
        """What changes a caption; the engine and its transport settings do not."""
        return {"model": self.model, "prompt": self.prompt(), "sampling": self.sampling()}

