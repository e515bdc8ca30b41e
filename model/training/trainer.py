"""The SSP-IR training loop (the library behind model/train.py).

Exact resume without saving RNG streams: every random draw of a step (VAE sample,
noise, timesteps) comes from a generator seeded by (seed, step, micro-batch, rank), and
the loader's order and null-text coins are functions of (seed, epoch, index). So a run
resumed at step k draws exactly what an uninterrupted run draws at step k, and only the
model, optimizer, scheduler and step counter need saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from model.training.checkpoint import (clean_partial, list_checkpoints, load_trainer_state, optimizer_from_files,
                              save_checkpoint)
from model.training.losses import sspir_loss
from model.training.config import TrainConfig


class TrainSetupError(RuntimeError):
    """The run cannot start; the message names the input and the fix."""


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(mixed[0] >> np.uint64(1)))


class TrainStep(torch.nn.Module):
    """One micro-batch's losses; a module so DDP can wrap it (its trainable
    parameters are the model's)."""

    def __init__(self, model: Any, scheduler: Any, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.scheduler, self.cfg = model, scheduler, cfg

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        from model.training.data import images_to_float

        dev = next(self.model.processor.parameters()).device
        # The loader ships uint8 images (4× less to decode, share and pin); convert on the device.
        imgs = images_to_float({k: batch[k].to(dev, non_blocking=True) for k in ("hq", "lq", "lq_up")})
        hq, lq, lq_up = imgs["hq"], imgs["lq"], imgs["lq_up"]
        text = batch["text"].to(dev, non_blocking=True)
        latents = self.model.encode_images(hq, sample=True, generator=gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents)
        n_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, n_train, (latents.shape[0],), generator=gen).to(dev)
        noisy = self.scheduler.add_noise(latents, noise, t)
        noise_pred, rgbs = self.model(noisy, t, text, lq, lq_up)
        return sspir_loss(noise_pred, noise, rgbs, hq, self.cfg.lambda_rgb, self.cfg.lambda_fft)


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
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(cfg))
        acc = self.accelerator
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
        from model.training.data import verify_build

        main = self.accelerator.is_main_process
        self.shards = verify_build(self.build, check_hash=self.cfg.check_hashes and main,
                                   show_progress=self.show_progress and main)

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
                                               processor_kwargs=self.cfg.processor or None,
                                               refine_kwargs=self.cfg.refine or None, dtype=frozen_dtype)
        except (FileNotFoundError, OSError) as e:
            raise TrainSetupError(f"cannot load the model: {e}") from None
        self.model.to(dev)
        if self.cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.scheduler = DDPMScheduler.from_pretrained(self.cfg.pretrained, subfolder="scheduler")
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

    # ------------------------------------------------------------------- data
    def _batches(self) -> Iterator[dict[str, Any]]:
        from model.training.data import make_loader

        loader = make_loader(self.build, batch_size=self.cfg.micro_batch_size, seed=self.cfg.seed,
                             rank=self.rank, world_size=self.world, num_workers=self.cfg.num_workers,
                             start_batch=self.step * self.accum, null_text_ratio=self.cfg.null_text_ratio,
                             shards=self.shards, image_dtype=torch.uint8)
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
                for micro in range(self.accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - t0
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
                record = {"step": self.step, **{k: round(v, 6) for k, v in sums.items()},
                          "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": round(float(grad_norm), 6),
                          "samples_per_s": round(samples / dt, 3), "data_wait": round(wait / dt, 4)}
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

    def _log(self, record: dict[str, Any], writer: Any) -> None:
        with open(self.paths.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None and (record["step"] % self.cfg.log_every == 0 or record["step"] == 1):
            for k, v in record.items():
                if k != "step":
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
                     "config": self.cfg.to_dict(), "build": str(self.build)}
            path = save_checkpoint(self.paths.checkpoints, self.step, self.model, self.optimizer, state,
                                   self.cfg.keep_checkpoints)
            if not self.show_progress:
                print(f"checkpoint {path}", file=self.log)
        acc.wait_for_everyone()

    def _validate(self) -> None:
        """A PNG grid LQ | restoration | HQ for the first few pairs of the build (fixed)."""
        if not self.accelerator.is_main_process:
            return
        from model.training.data import ShardedPairs, collate, load_empty_prompt
        from model.inference.sampling import restore
        from model.training.validation import save_grid

        data = ShardedPairs(self.build, self.shards, seed=self.cfg.seed, null_text_ratio=0.0)
        n = min(self.cfg.validation_pairs, len(data))
        empty = load_empty_prompt(self.build)
        batch = collate([data[i] for i in range(n)], empty)
        dev = self.accelerator.device
        self.model.eval()
        try:
            from diffusers import DDPMScheduler

            sched = DDPMScheduler.from_config(self.scheduler.config)
            with self.accelerator.autocast():
                out = restore(self.model, sched, batch["lq"].to(dev), batch["lq_up"].to(dev),
                              batch["text"].to(dev).float(), empty.to(dev).float(),
                              steps=self.cfg.validation_steps, guidance=1.0, seed=self.cfg.seed)
        finally:
            self.model.train()
        self.paths.validation.mkdir(parents=True, exist_ok=True)
        save_grid(self.paths.validation / f"step-{self.step:08d}.png", batch["lq_up"], out.float().cpu(),
                  batch["hq"])


def run_training(build: Path, run_dir: Path, cfg: TrainConfig, max_steps: int | None = None,
                 resume: bool = False, show_progress: bool = True) -> list[dict[str, Any]]:
    trainer = Trainer(build, run_dir, cfg, max_steps=max_steps, resume=resume, show_progress=show_progress)
    return trainer.run()
