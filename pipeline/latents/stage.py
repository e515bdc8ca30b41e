"""The latents stage: pairs shard N → latents shard N (SD1.5 VAE moments of every HQ crop).

The HQ crops are fixed offline (crop, flip and sharpening are in the pairs shard), so
their latent distributions are too. Encoding them once here instead of at every training
step takes the VAE encoder — 1.12 TFLOPs per 512² image, more than the UNet's forward —
out of the training loop. What is stored is the distribution, not a sample
(diffusers' `latent_dist.parameters`: mean ‖ log-variance), so the trainer still draws a
fresh z = mean + σ·ε per step from its own keyed generator, exactly as when it encodes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core.image_io import SIGNED_LEVELS, decode_png
from pipeline.core.model_files import component_identity, identity_tag, resolve_component
from pipeline.core.shards import ShardWriter, read_table, shard_path
from pipeline.core.stage import Progress, ShardOutcome, ShardWork, Stage, StageResult, run_stage
from pipeline.latents.config import LatentsConfig

MOMENTS = "moments"


def latents_schema(numel: int) -> pa.Schema:
    """`moments`: the flattened (2C, H/8, W/8) float16 array; its shape is in the sidecar."""
    return pa.schema([("key", pa.string()), (MOMENTS, pa.list_(pa.float16(), numel))])


def moments_array(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """A latents shard's `moments` column as a float16 (rows, 2C, h, w) view, zero-copy per chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.values.to_numpy(zero_copy_only=True).reshape(len(c), *shape) for c in chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def hq_to_signed(rgbs: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) RGB images → float32 (B, 3, H, W) in [-1, 1], as the trainer feeds the VAE."""
    batch = np.stack([SIGNED_LEVELS[rgb] for rgb in rgbs])  # (B, H, W, 3)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


class LatentsStage(Stage):
    name: ClassVar[str] = "latents"
    input_stage: ClassVar[str] = "pairs"
    input_command: ClassVar[str] = "`python jobs/degrade.py --manifest M`"
    batch_rows: ClassVar[int] = 64
    packages: ClassVar[tuple[str, ...]] = ("torch", "diffusers", "numpy", "opencv-python-headless", "pyarrow")

    def __init__(self, out: Path, cfg: LatentsConfig, vae_ref: str, image_size: int, *, device: str | None = None,
                 batch_size: int | None = None, force: bool = False,
                 index_extra: dict[str, Any] | None = None) -> None:
        """`image_size`: the HQ crops' side (degrade.gt_size); it fixes the moments' shape."""
        super().__init__(out, index_extra)
        self.cfg = cfg
        self.image_size = image_size
        self.vae_ref = vae_ref
        self.device = device or cfg.device
        self.batch_size = batch_size or cfg.batch_size
        self.force = force
        self.max_failed_fraction = cfg.max_failed_fraction
        self.folder = resolve_component(vae_ref, "vae", "latents.vae")  # a wrong path fails before any work
        self.identity: dict[str, Any] | None = None
        self.vae: Any = None

    def __getstate__(self) -> dict[str, Any]:  # every actor loads its own VAE on its own device
        return {**self.__dict__, "vae": None}

    # ---------------------------------------------------------- declared ---

    def _identity(self) -> dict[str, Any]:
        if self.identity is None:
            if self.folder is None:  # a hub id not cached yet: from_pretrained fetches it
                self.open()
                self.folder = resolve_component(self.vae_ref, "vae", "latents.vae")
            self.identity = component_identity(self.folder)  # type: ignore[arg-type]
        return self.identity

    def vae_config(self) -> dict[str, Any]:
        import json

        self._identity()
        return json.loads((Path(self.folder) / "config.json").read_text())  # type: ignore[arg-type]

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        c = self.vae_config()
        down = 2 ** (len(c.get("block_out_channels", (0,) * 4)) - 1)
        return (2 * int(c.get("latent_channels", 4)), image_size // down, image_size // down)

    def config(self) -> dict[str, Any]:
        return {"latents": self.cfg.output_affecting(), "vae": {"ref": self.vae_ref, **self._identity()}}

    def config_hash(self) -> str:
        return f"{self.cfg.hash()}-{identity_tag(self._identity())}"

    def schema(self) -> pa.Schema:
        return latents_schema(int(np.prod(self.latent_shape(self.image_size))))

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        self._identity()
        return super().plan(shards)

    def stale_reason(self, work: ShardWork) -> str | None:
        return "--force" if self.force else super().stale_reason(work)

    def actor_resources(self, cluster_gpus: int) -> tuple[int, dict[str, float]]:
        if cluster_gpus and self.device != "cpu":
            return cluster_gpus, {"num_gpus": 1}
        return 1, {"num_cpus": 1}

    # -------------------------------------------------------------- build ---

    def open(self) -> None:
        if self.vae is not None:
            return
        import torch
        from diffusers import AutoencoderKL

        dev = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                           else ("cpu" if self.device == "auto" else self.device))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is visible; use --device cpu")
        local = self.folder is not None
        source = str(Path(self.folder).parent) if local else self.vae_ref  # type: ignore[arg-type]
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=getattr(torch, self.cfg.dtype),
                                                 local_files_only=local).to(dev).eval().requires_grad_(False)

    def build(self, work: ShardWork, writer: ShardWriter, progress: Progress) -> ShardOutcome:
        import torch

        self.open()
        t0 = time.perf_counter()
        table = read_table(shard_path(self.out, "pairs", work.shard)).select(["key", "hq_png"])
        keys = table.column("key").to_pylist()
        hq = table.column("hq_png")
        timing = {"decode_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
        dev, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        shape = self.latent_shape(self.image_size)
        for start in range(0, len(keys), self.batch_size):
            t1 = time.perf_counter()
            rgbs = [decode_png(hq[i].as_py()) for i in range(start, min(start + self.batch_size, len(keys)))]
            x = torch.from_numpy(hq_to_signed(rgbs)).to(dev, dtype)
            t2 = time.perf_counter()
            with torch.inference_mode():
                moments = self.vae.encode(x).latent_dist.parameters
            m = moments.to("cpu", torch.float16).numpy()
            t3 = time.perf_counter()
            if tuple(m.shape[1:]) != shape:
                raise ValueError(f"pairs shard {work.shard}: moments of shape {m.shape[1:]}, expected {shape} "
                                 f"for {self.image_size}² HQ crops (degrade.gt_size)")
            flat = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), int(np.prod(shape)))
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(keys[start:start + len(rgbs)], pa.string()), flat], schema=writer.schema))
            timing["decode_s"] += t2 - t1
            timing["encode_s"] += t3 - t2
            timing["write_s"] += time.perf_counter() - t3
            if progress is not None:
                progress(len(rgbs))
        vc = self.vae_config()
        return ShardOutcome(sidecar={
            "moments": {"shape": list(shape), "dtype": "float16", "layout": "mean ‖ logvar along channels"},
            "vae": {"ref": self.vae_ref, **self._identity(), "class": type(self.vae).__name__,
                    "scaling_factor": vc.get("scaling_factor"), "shift_factor": vc.get("shift_factor"),
                    "latent_channels": vc.get("latent_channels")},
            "compute": {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "batch_size": self.batch_size},
            "timing": {**{k: round(v, 3) for k, v in timing.items()},
                       "read_s": round(time.perf_counter() - t0 - sum(timing.values()), 3)},
        }, counts={"encoded": len(keys)})


def vae_ref_of(manifest: Any, cfg: LatentsConfig) -> str:
    """The VAE the trainer will use: latents.vae, else train.pretrained, else text_embed.model."""
    return cfg.vae or manifest.section("train").get("pretrained") or manifest.text_embed.model


def run_latents(manifest: Any, shards: list[int] | None = None, *, actors: int | None = None,
                device: str | None = None, batch_size: int | None = None, force: bool = False,
                show_progress: bool = True, log: Any = None) -> StageResult:
    """The job behind jobs/latents.py: one shard in this process, or every shard on actors
    (one per GPU), or every shard here when `actors` is None on a machine without a cluster."""
    cfg = manifest.settings(LatentsConfig, "latents")
    stage = LatentsStage(manifest.output, cfg, vae_ref_of(manifest, cfg), manifest.degrade.gt_size,
                         device=device, batch_size=batch_size,
                         force=force, index_extra={"manifest": str(manifest.path), "name": manifest.name})
    distributor = "actors" if actors and shards is None else "serial"
    return run_stage(stage, shards, distributor=distributor, actors=actors, show_progress=show_progress, log=log)
