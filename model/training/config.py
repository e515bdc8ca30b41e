"""Settings of the trainer (the manifest's ``train`` section).

Defaults are the paper's: the release's attention layout ("paper"), Adam, lr 5e-5, global
batch 32, 100K steps, λ_rgb 0.1, λ_fft 0.01, null-text ratio 0.5 (the authors' release).
`processor` / `refine` are constructor arguments of the layout's Processor and Refine Layer
(docs/model.md): for "paper" `processor` is `{"channels": [16, 32, 96, 256]}` (the ControlNet's
conditioning embedding), for "adapter" the Processor's stem/stage widths.
"""

from __future__ import annotations

import dataclasses

from pipeline.core.settings import Settings


@dataclasses.dataclass(frozen=True)
class TrainConfig(Settings):
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    image_encoder: str = "vit_large_patch14_clip_224.openai"
    attention_layout: str = "paper"  # "paper" (the release's transformer blocks) or "adapter" (lighter, ours)
    batch_size: int = 32  # global: micro_batch_size × gradient accumulation × processes
    micro_batch_size: int = 8  # per process and forward pass
    learning_rate: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_steps: int = 100_000
    lambda_rgb: float = 0.1
    lambda_fft: float = 0.01
    null_text_ratio: float = 0.5
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    validate_every: int = 1000
    validation_pairs: int = 4
    validation_steps: int = 20
    num_workers: int = 8
    check_hashes: bool = True
    processor: dict = dataclasses.field(default_factory=dict)
    refine: dict = dataclasses.field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size", "micro_batch_size", "max_steps", "checkpoint_every", "keep_checkpoints",
                     "log_every", "validate_every", "validation_steps"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        if self.batch_size % self.micro_batch_size:
            out.append(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                       f"({self.micro_batch_size})")
        if self.attention_layout not in ("paper", "adapter"):
            out.append(f"attention_layout must be paper or adapter, got {self.attention_layout!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            out.append("mixed_precision must be auto, no, bf16 or fp16")
        if not 0.0 <= self.null_text_ratio <= 1.0:
            out.append("null_text_ratio must lie in [0, 1]")
        if self.learning_rate <= 0 or self.num_workers < 0 or self.validation_pairs < 0:
            out.append("learning_rate must be > 0, num_workers and validation_pairs >= 0")
        return out

    def accumulation(self, processes: int) -> int:
        """Gradient accumulation steps that make the global batch on `processes` processes."""
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            raise ValueError(f"global batch {self.batch_size} is not a multiple of micro_batch_size × processes "
                             f"= {self.micro_batch_size} × {processes}; change train.micro_batch_size")
        return self.batch_size // per_step

