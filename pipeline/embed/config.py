"""Settings of the text-embedding stage (the manifest's ``text_embed`` section)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.settings import Settings


@dataclasses.dataclass(frozen=True)
class EmbedConfig(Settings):
    # An SD1.5 directory or hub id: its tokenizer/ and text_encoder/ are used.
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    max_chunks: int = 4
    batch_size: int = 64
    device: str = "auto"



    def problems(self) -> list[str]:
        out = []
        if self.max_chunks < 1:
            out.append("max_chunks must be at least 1")
        if self.batch_size < 1:
            out.append("batch_size must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append("device must be auto, cpu or cuda")
        return out

    def output_affecting(self) -> dict[str, Any]:
        return {"model": self.model, "max_chunks": self.max_chunks, "chunk": 75, "dtype": "float16"}

