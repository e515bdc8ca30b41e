"""The SSP-IR training loop (the library behind model/train.py).

Exact resume without saving RNG streams: every random draw of a step (VAE sample,
noise, timesteps) comes from a generator seeded by (seed, step, micro-batch, rank), and
the loader's order and null-text coins are functions of (seed, epoch, index). So a run
resumed at step k draws exactly what an uninterrupted run draws at step k, and only the
model, optimizer, scheduler and step counter need saving. A resume is refused when the
trainable layout, the model references or the build differ from the checkpoint's
(model/training/identity.py).

Processes: one, or N started by `torchrun` / `accelerate launch`. On a host without CUDA
the Accelerator is created with `cpu=True`, which makes a launcher's N processes one DDP
group over gloo (accelerate's CPU mode); a launcher whose processes still each see a
one-process Accelerator is refused, instead of running N independent trainings into one
folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from model.training.checkpoint import (clean_partial, list_checkpoints, load_trainer_state, optimizer_from_files,
                                       save_checkpoint)
from model.training.config import TrainConfig
from model.training.identity import changes, run_identity
from model.training.losses import sspir_loss

PREDICTION_TYPES = ("epsilon", "v_prediction")


class TrainSetupError(RuntimeError):
    """The run cannot start; the message names the input and the fix."""


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(mixed[0] >> np.uint64(1)))


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, by the scheduler's `prediction_type`: the noise
    (ε, SD1.5's) or the velocity α_t·ε − σ_t·x0 (v-prediction, SD2-768's)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"prediction_type {kind!r} is not supported; SSP-IR trains {' or '.join(PREDICTION_TYPES)}")


class TrainStep(torch.nn.Module):
    """One micro-batch's losses; a module so DDP can wrap it (its trainable
    parameters are the model's)."""

    def __init__(self, model: Any, scheduler: Any, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.scheduler, self.cfg = model, scheduler, cfg

    def latents(self, batch: dict[str, Any], hq: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The HQ's VAE latents (float32) × the scaling factor, sampled from the posterior with
        the step's generator: from the latents stage's stored moments when the batch carries
        them, else by encoding hq. Both draw ε the same way from the same generator at the
        same point of the step, so the two paths are the same distribution and the same draws
        (up to the float16 rounding of the stored moments)."""
        if "moments" not in batch:
            return self.model.encode_images(hq, sample=True, generator=gen)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.model.vae
        moments = batch["moments"].to(hq.device, vae.dtype, non_blocking=True)
        return DiagonalGaussianDistribution(moments).sample(gen).float() * vae.config.scaling_factor

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        from model.training.data import images_to_float

        dev = next(self.model.processor.parameters()).device
        # The loader ships uint8 images (4× less to decode, share and pin); convert on the device.
        imgs = images_to_float({k: batch[k].to(dev, non_blocking=True) for k in ("hq", "lq", "lq_up")})
        hq, lq, lq_up = imgs["hq"], imgs["lq"], imgs["lq_up"]
        text = batch["text"].to(dev, non_blocking=True)
        latents = self.latents(batch, hq, gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents)
        n_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, n_train, (latents.shape[0],), generator=gen).to(dev)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred, rgbs = self.model(noisy, t, text, lq, lq_up)
        target = diffusion_target(self.scheduler, latents, noise, t)
        return sspir_loss(pred, target, rgbs, hq, self.cfg.lambda_rgb, self.cfg.lambda_fft)


@dataclasses.dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "validation"


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrainSetupError(f"cannot write to the training output {folder} ({e.strerror}); "
                              "choose another --train-dir") from None


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) says it started."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def check_launch(accelerator: Any) -> None:
    """Refuse a launcher's process that trains alone: N such processes would each run the
    whole training into the same folder (every step logged N times, checkpoints racing)."""
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise TrainSetupError(
            f"this process was started as one of {launched} (WORLD_SIZE={launched}) but accelerate sees "
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}): the processes would train "
            "independently into the same folder. On a host without CUDA run the launcher with ACCELERATE_USE_CPU=1 "
            "(the trainer already asks for CPU DDP over gloo when torch sees no CUDA); on a GPU host check that torch "
            "sees the GPUs (CUDA_VISIBLE_DEVICES), or start one process without a launcher")


def _trimmed_metrics(path: Path, upto: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from (they will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto]
    path.write_text("".join(ln + "\n" for ln in keep))


class Trainer:
    def __init__(self, build: Path, run_dir: Path, cfg: TrainConfig, max_steps: int | None = None,
                 resume: bool = False, show_progress: bool = True, log: Any = None) -> None:
        from accelerate import Accelerator

        self.build, self.cfg, self.log = Path(build), cfg, log or sys.stderr
        self.paths = RunPaths(Path(run_dir))
        self.max_steps = max_steps or cfg.max_steps
        self.show_progress = show_progress
        # cpu=True where there is no CUDA: a launcher's processes then form a gloo DDP group
        # (accelerate ignores LOCAL_RANK on a CPU-only host otherwise).
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available())
        acc = self.accelerator
        check_launch(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.accum = cfg.accumulation(self.world)
        if acc.is_main_process:
            check_writable(self.paths.root)
        self._verify_build()
        self._load_model()
        self.step = 0
        if resume:
            self._resume()
        elif acc.is_main_process and list_checkpoints(self.paths.checkpoints):
            raise TrainSetupError(f"{self.paths.checkpoints} already holds checkpoints; pass --resume to continue "
                                  "or choose a fresh --train-dir")
        self.train_step, self.optimizer = acc.prepare(TrainStep(self.model, self.scheduler, cfg), self.optimizer)

    # ------------------------------------------------------------------ setup
    def _verify_build(self) -> None:
        from model.training.verify import build_fingerprint, verify_build

        from model.training.verify import train_stages

        main = self.accelerator.is_main_process
        stages = train_stages(self.cfg.caption_variant)
        self.text_folder = stages[-1]
        self.shards = verify_build(self.build, stages, check_hash=self.cfg.check_hashes and main,
                                   show_progress=self.show_progress and main)
        self.latents_source, why = resolve_latents(self.build, self.cfg, self.shards, check_hash=main)
        print(f"latents: {self.latents_source} ({why})", file=self.log)
        used = ("pairs", self.text_folder, *(("latents",) if self.latents_source == "cached" else ()))
        self.fingerprint = {**build_fingerprint(self.build, self.shards, used), "latents": self.latents_source}

    def _load_model(self) -> None:
        from diffusers import DDPMScheduler

        from model.networks.sspir import SSPIR

        dev = self.accelerator.device
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision,
                                                                          torch.float32)
        # The new layers are drawn from the global RNG: seed it so two runs (and a resumed
        # one, whose fresh layers are then overwritten) start from the same weights.
        torch.manual_seed(self.cfg.seed)
        try:
            self.model = SSPIR.from_pretrained(self.cfg.pretrained, self.cfg.image_encoder,
                                               attention_layout=self.cfg.attention_layout,
                                               processor_kwargs=self.cfg.processor or None,
                                               switches=self.cfg.switches(), dtype=frozen_dtype)
            # With cached latents the training step never encodes: the VAE encoder stays in host
            # memory, off the training device; only validation (its LRE start encodes the LQ)
            # borrows it for the length of one validation grid.
            self._host_encoder: tuple[Any, Any] | None = None
            if getattr(self, "latents_source", "encode") == "cached":
                self._host_encoder = (self.model.vae.encoder, self.model.vae.quant_conv)
                self.model.vae.encoder = None
                self.model.vae.quant_conv = None
        except (FileNotFoundError, OSError) as e:
            raise TrainSetupError(f"cannot load the model: {e}") from None
        except (TypeError, ValueError) as e:  # e.g. train.processor keys the layout's Processor does not take
            raise TrainSetupError(f"cannot build the {self.cfg.attention_layout} layout's trainable parts from "
                                  f"train.processor and the ablation switches: {e}") from None
        self.model.to(dev)
        if self.cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.scheduler = DDPMScheduler.from_pretrained(self.cfg.pretrained, subfolder="scheduler")
        kind = self.scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise TrainSetupError(f"{self.cfg.pretrained}/scheduler declares prediction_type {kind!r}; SSP-IR trains "
                                  f"{' or '.join(PREDICTION_TYPES)} targets (the LRE start and the samplers assume "
                                  "one of them): use an SD1.5-style scheduler config")
        self.optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=self.cfg.learning_rate,
                                          betas=tuple(self.cfg.adam_betas), eps=self.cfg.adam_eps)

    def _resume(self) -> None:
        clean_partial(self.paths.checkpoints)
        ckpts = list_checkpoints(self.paths.checkpoints)
        if not ckpts:
            print(f"--resume: no checkpoint in {self.paths.checkpoints}; starting at step 0", file=self.log)
            return
        last = ckpts[-1]
        state = load_trainer_state(last)
        if "identity" not in state:
            raise TrainSetupError(f"--resume: {last} records no run identity (written before resume checks existed); "
                                  "it cannot be checked against this run: start a fresh --train-dir")
        changed = changes(state["identity"], self.identity())
        if changed:
            raise TrainSetupError(f"--resume: {last} was written by a different run:\n  - " + "\n  - ".join(changed)
                                  + "\nresume only the run that wrote it (put these settings back), or start a "
                                  "fresh --train-dir")
        if state.get("world_size") != self.world or state.get("batch_size") != self.cfg.batch_size:
            print(f"note: resuming {last.name} with batch {self.cfg.batch_size} on {self.world} processes "
                  f"(saved: {state.get('batch_size')} on {state.get('world_size')}); the data order continues "
                  "by global batch count", file=self.log)
        self.model.load_trainable(last / "trainable")
        self.model.to(self.accelerator.device)
        optimizer_from_files(self.optimizer, last)
        self.step = int(state["step"])
        if self.accelerator.is_main_process:
            _trimmed_metrics(self.paths.metrics, self.step)
        print(f"resumed from {last} at step {self.step}", file=self.log)

    def identity(self) -> dict[str, Any]:
        return run_identity(self.model, self.cfg.pretrained, self.cfg.image_encoder, self.fingerprint)

    # ------------------------------------------------------------------- data
    def _batches(self) -> Iterator[dict[str, Any]]:
        from model.training.data import make_loader

        loader = make_loader(self.build, batch_size=self.cfg.micro_batch_size, seed=self.cfg.seed,
                             rank=self.rank, world_size=self.world, num_workers=self.cfg.num_workers,
                             start_batch=self.step * self.accum, null_text_ratio=self.cfg.text_dropout,
                             shards=self.shards, image_dtype=torch.uint8, text_folder=self.text_folder,
                             latents=self.latents_source == "cached")
        return iter(loader)

    # ------------------------------------------------------------------- loop
    def run(self) -> list[dict[str, Any]]:
        acc, cfg = self.accelerator, self.cfg
        history: list[dict[str, Any]] = []
        if self.step >= self.max_steps:
            print(f"already at step {self.step} >= {self.max_steps}; nothing to do", file=self.log)
            return history
        batches = self._batches()
        writer = self._tensorboard() if acc.is_main_process else None
        from tqdm import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                   disable=not (self.show_progress and acc.is_main_process))
        self.train_step.train()
        samples = cfg.micro_batch_size * self.accum * self.world
        try:
            while self.step < self.max_steps:
                t_step = time.perf_counter()
                wait = 0.0
                sums = {"loss": 0.0, "eps": 0.0, "rgb": 0.0, "fft": 0.0}
                rows: list[int] = []
                for micro in range(self.accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - t0
                    rows += batch["index"].tolist()
                    gen = step_generator(cfg.seed, self.step, micro, self.rank)
                    sync = micro == self.accum - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(self.train_step)
                    with ctx, acc.autocast():
                        losses = self.train_step(batch, gen)
                    acc.backward(losses["loss"] / self.accum)
                    for k in sums:
                        sums[k] += float(losses[k].detach()) / self.accum
                grad_norm = acc.clip_grad_norm_(self.model.trainable_parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                dt = time.perf_counter() - t_step
                # Losses and the gradient norm unrounded (JSON keeps every bit of a float): exact
                # resume is checked on them. "rows": the build rows each rank trained on.
                record = {"step": self.step, **sums, "lr": self.optimizer.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm), "samples_per_s": round(samples / dt, 3),
                          "data_wait": round(wait / dt, 4), "rows": self._gather(rows)}
                history.append(record)
                if acc.is_main_process:
                    self._log(record, writer)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == self.max_steps:
                    self._checkpoint()
                if cfg.validation_pairs and (self.step % cfg.validate_every == 0 or self.step == self.max_steps):
                    self._validate()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return history

    def _gather(self, rows: list[int]) -> list[list[int]]:
        if self.world == 1:
            return [rows]
        from accelerate.utils import gather_object

        return [list(r) for r in gather_object([rows])]

    def _log(self, record: dict[str, Any], writer: Any) -> None:
        with open(self.paths.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None and (record["step"] % self.cfg.log_every == 0 or record["step"] == 1):
            for k, v in record.items():
                if k not in ("step", "rows"):
                    writer.add_scalar(f"train/{k}", v, record["step"])

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # metrics.jsonl has everything; TensorBoard is a convenience
            return None
        return SummaryWriter(str(self.paths.root / "tb"))

    def _checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "seed": self.cfg.seed, "world_size": self.world,
                     "batch_size": self.cfg.batch_size, "micro_batch_size": self.cfg.micro_batch_size,
                     "accumulation": self.accum, "loader": {"start_batch": self.step * self.accum},
                     "rng": "derived from (seed, step, micro-batch, rank); nothing to restore",
                     "config": self.cfg.to_dict(), "build": str(self.build), "identity": self.identity()}
            path = save_checkpoint(self.paths.checkpoints, self.step, self.model, self.optimizer, state,
                                   self.cfg.keep_checkpoints)
            if not self.show_progress:
                print(f"checkpoint {path}", file=self.log)
        acc.wait_for_everyone()

    def _validate(self) -> None:
        """A PNG grid LQ | restoration | HQ for the first few pairs of the build (fixed),
        sampled exactly as model/restore.py samples (model/inference/restorer.py `sample_batch`:
        the same scheduler factory, trailing timesteps from t = 999, the same guidance),
        with `validation_steps` steps and the run's seed."""
        if not self.accelerator.is_main_process:
            return
        from model.inference.restorer import RestoreSettings, sample_batch
        from model.training.data import ShardedPairs, collate, load_empty_prompt
        from model.training.validation import save_grid

        data = ShardedPairs(self.build, self.shards, seed=self.cfg.seed,
                            null_text_ratio=1.0 if self.cfg.text_prior == "none" else 0.0,
                            text_folder=self.text_folder)
        n = min(self.cfg.validation_pairs, len(data))
        empty = load_empty_prompt(self.build, self.text_folder)
        batch = collate([data[i] for i in range(n)], empty)
        dev = self.accelerator.device
        settings = RestoreSettings(steps=self.cfg.validation_steps, seed=self.cfg.seed, tile=0)
        self.model.eval()
        vae = self.model.vae
        if self._host_encoder is not None:
            vae.encoder, vae.quant_conv = (m.to(dev) for m in self._host_encoder)
        try:
            with torch.no_grad(), self.accelerator.autocast():
                out = sample_batch(self.model, batch["lq"].to(dev), batch["lq_up"].to(dev),
                                   batch["text"].to(dev).float(), empty.to(dev).float(), settings)
        finally:
            self.model.train()
            if self._host_encoder is not None:
                self._host_encoder = tuple(m.to("cpu") for m in self._host_encoder)  # type: ignore[assignment]
                vae.encoder = vae.quant_conv = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.paths.validation.mkdir(parents=True, exist_ok=True)
        save_grid(self.paths.validation / f"step-{self.step:08d}.png", batch["lq_up"], out.float().cpu(),
                  batch["hq"])


def resolve_latents(build: Path, cfg: TrainConfig, shards: list[int], check_hash: bool = True) -> tuple[str, str]:
    """("cached" | "encode", why): whether this run reads the latents stage's moments.

    Cached needs a latents shard for every training shard, complete, with pairs' keys in
    pairs' order, made from the current pairs bytes, and by the very VAE the trainer loads
    (the sha256 of its config and weights, pipeline.core.model_files). `auto` falls back to
    encoding, saying why; `cached` refuses to start instead.
    """
    from model.training.verify import BuildError, verify_build
    from pipeline.core.model_files import ComponentNotFoundError, component_identity, identity_tag, resolve_component
    from pipeline.core.shards import read_sidecar, shard_path

    if cfg.latents == "encode":
        return "encode", "train.latents is encode: the VAE encoder runs every step"
    fix = "run `python jobs/latents.py --manifest M --all` (or set train.latents to encode)"
    try:
        verify_build(build, ("pairs", "latents"), check_hash=check_hash, show_progress=False)
        folder = resolve_component(cfg.pretrained, "vae", "train.pretrained")
        if folder is None:
            raise ComponentNotFoundError(f"{cfg.pretrained} is not in the local hub cache yet")
        mine = component_identity(folder)
        for s in shards:
            vae = (read_sidecar(shard_path(build, "latents", s)) or {}).get("vae", {})
            theirs = {k: vae.get(k) for k in mine}
            if theirs != mine:
                raise TrainSetupError(
                    f"latents shard {s} was made by another VAE ({vae.get('ref')!r}, {identity_tag(theirs)}) than "
                    f"train.pretrained's ({cfg.pretrained!r}, {identity_tag(mine)}); rebuild it with "
                    "`python jobs/latents.py --manifest M --all --force` or set train.latents to encode")
    except (BuildError, ComponentNotFoundError, TrainSetupError) as e:
        if cfg.latents == "cached":
            if isinstance(e, TrainSetupError):
                raise
            raise TrainSetupError(f"train.latents is cached but the latents stage cannot be used: {e}; {fix}") \
                from None
        reason = str(e).splitlines()[0] if str(e) else "not built for every training shard"
        return "encode", f"no usable latents stage ({reason}); the VAE encoder runs every step"
    return "cached", f"VAE moments from {build / 'latents'}, made by {cfg.pretrained}; the VAE encoder is not loaded"


def run_training(build: Path, run_dir: Path, cfg: TrainConfig, max_steps: int | None = None,
                 resume: bool = False, show_progress: bool = True) -> list[dict[str, Any]]:
    trainer = Trainer(build, run_dir, cfg, max_steps=max_steps, resume=resume, show_progress=show_progress)
    return trainer.run()
