"""Settings of the trainer (the manifest's ``train`` section).

Defaults are the paper's: the release's attention layout ("paper"), Adam, lr 5e-5, global
batch 32, 100K steps, λ_rgb 0.1, λ_fft 0.01, null-text ratio 0.5 (the authors' release).
`processor` holds constructor arguments of the layout's Processor (docs/model.md): for
"paper" `{"channels": [16, 32, 96, 256]}` (the ControlNet's conditioning embedding), for
"adapter" the Processor's stem/stage widths.

The ablation switches of Tables III–V (`text_prior`, `image_prior`, `refine`,
`image_attention`, `structure_attention`; model/networks/switches.py) and the two λ's say
which variant is trained; `run_dir` (relative to the build's output root) lets several
variants share one build.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model.networks.switches import PriorSwitches
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
    # Ablation switches (model/networks/switches.py); defaults: the full model.
    text_prior: str = "caption"  # "none": the empty prompt for every sample
    image_prior: str = "refined"  # "none": the null image embedding (zeros for the CLIP tokens)
    refine: str = "mlp"  # "linear": the Refine Layer as one linear layer
    image_attention: bool = True  # false: no image-attention transformers (nor Refine Layer)
    structure_attention: bool = True  # false: no structure-attention transformers
    run_dir: str = "train"  # the run folder, relative to the build's output root (--train-dir wins)
    # VAE latents: "cached" reads the latents stage's moments (refuses without a complete one
    # made by train.pretrained's VAE), "encode" runs the VAE encoder every step, "auto" the
    # first when it can and the second otherwise (the log and the checkpoint say which).
    latents: str = "auto"
    # Which captions' embeddings to train on: "" = text_emb/, "blip" = text_emb-blip/
    # (model/train.py fills it from the manifest's caption.variant).
    caption_variant: str = ""

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
        if self.latents not in ("auto", "cached", "encode"):
            out.append(f"latents must be auto, cached or encode, got {self.latents!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            out.append("mixed_precision must be auto, no, bf16 or fp16")
        if not 0.0 <= self.null_text_ratio <= 1.0:
            out.append("null_text_ratio must lie in [0, 1]")
        if self.lambda_rgb < 0 or self.lambda_fft < 0:
            out.append("lambda_rgb and lambda_fft must be >= 0 (0 switches the loss off)")
        out += self.switches(checked=False).problems(self.attention_layout)
        run = Path(self.run_dir)
        if not self.run_dir or run.is_absolute() or ".." in run.parts or run == Path("."):
            out.append(f"run_dir must be a folder name relative to the build's output root, got {self.run_dir!r} "
                       "(use --train-dir for a folder elsewhere)")
        if self.learning_rate <= 0 or self.num_workers < 0 or self.validation_pairs < 0:
            out.append("learning_rate must be > 0, num_workers and validation_pairs >= 0")
        return out

    def switches(self, checked: bool = True) -> PriorSwitches:
        """The ablation switches this run trains with (the model records them)."""
        sw = PriorSwitches(text_prior=self.text_prior, image_prior=self.image_prior, refine=self.refine,
                           image_attention=self.image_attention, structure_attention=self.structure_attention)
        return sw.check(self.attention_layout) if checked else sw

    @property
    def text_dropout(self) -> float:
        """The null-text ratio the loader applies: 1 (every sample) with text_prior none."""
        return 1.0 if self.text_prior == "none" else self.null_text_ratio

    def accumulation(self, processes: int) -> int:
        """Gradient accumulation steps that make the global batch on `processes` processes."""
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            raise ValueError(f"global batch {self.batch_size} is not a multiple of micro_batch_size × processes "
                             f"= {self.micro_batch_size} × {processes}; change train.micro_batch_size")
        return self.batch_size // per_step

