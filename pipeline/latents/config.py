"""Settings of the latents stage (the manifest's ``latents`` section)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.settings import Settings

DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LatentsConfig(Settings):
    # An SD1.5 folder or hub id whose vae/ encodes; "" = the manifest's train.pretrained
    # (the VAE the trainer will use), else text_embed.model.
    vae: str = ""
    # The encoder's compute dtype. Stored moments are float16 whatever it is; float32 is the
    # trainer's own encode path bit for bit (up to that rounding), float16 is ~2x faster on GPUs.
    dtype: str = "float32"
    batch_size: int = 8
    device: str = "auto"
    max_failed_fraction: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if self.dtype not in DTYPES:
            out.append(f"dtype {self.dtype!r} must be one of {list(DTYPES)}")
        if self.batch_size < 1:
            out.append("batch_size must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append("device must be auto, cpu or cuda")
        return out

    def output_affecting(self) -> dict[str, Any]:
        """The VAE's identity joins these in the stage's config hash; batch and device do not
        change what is stored (beyond float16 rounding, checked by the tests)."""
        return {"dtype": self.dtype, "stored_dtype": "float16", "what": "latent_dist.parameters"}
