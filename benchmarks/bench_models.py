"""Random SD1.5-size model folders shared by the full-size benchmarks.

`benchmarks/restore_fullsize.py` (restoration) and `benchmarks/train_fullsize.py`
(training step) both measure speed and memory at SD1.5's real sizes without the real
weights (none can be downloaded where they run, and speed and memory do not depend on the
values). They load the same random folder, built once under the cache, so it lives here
rather than in either script; importing this module loads no torch until it is called.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from typing import Any


def build_sd15_random(sd: Path) -> Path:
    """SD1.5's layout and sizes, random weights (seeded), plus image_encoder/ (timm ViT-L/14)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from model.networks.counting import SD15_TEXT_ENCODER, SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from demo_fixtures.tiny_sd import SD15_SCHEDULER, build_clip_tokenizer, build_image_encoder, build_text_encoder

    if (sd / "model_index.json").is_file():
        return sd
    torch.manual_seed(0)
    print("building random SD1.5-size models (once) ...", file=sys.stderr)
    UNet2DConditionModel(**SD15_UNET_CONFIG).save_pretrained(str(sd / "unet"), safe_serialization=True)
    AutoencoderKL(**SD15_VAE_CONFIG).save_pretrained(str(sd / "vae"), safe_serialization=True)
    DDPMScheduler(**SD15_SCHEDULER).save_pretrained(str(sd / "scheduler"))
    build_clip_tokenizer(sd / "tokenizer")
    t = SD15_TEXT_ENCODER
    build_text_encoder(sd / "text_encoder", hidden=t["hidden"], layers=t["layers"], heads=t["heads"],
                       intermediate=t["intermediate"])
    build_image_encoder(sd / "image_encoder", model_args={"embed_dim": 1024, "depth": 24, "num_heads": 16})
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                     "_random_sd15_size": True}) + "\n")
    return sd


def ensure_random_run(run: Path, sd: Path, processor: dict[str, Any] | None = None, scale: float = 0.05,
                      attention_layout: str = "paper") -> Path:
    """A run folder holding one checkpoint (trainable/ + trainer_state.json, what
    model/restore.py reads) of SSP-IR in `attention_layout` on the SD1.5-layout folder `sd`,
    built once.

    The zero-initialised layers get random values (× `scale`), as training would give them,
    so the priors really take part in the computation being measured."""
    import torch

    from model.networks.sspir import SSPIR
    from model.training.config import TrainConfig

    ckpt = run / "checkpoints" / "step-00000001"
    if (ckpt / "trainer_state.json").is_file():
        return run
    torch.manual_seed(0)
    model = SSPIR.from_pretrained(str(sd), str(sd / "image_encoder"), attention_layout=attention_layout,
                                  processor_kwargs=processor)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_trainable(ckpt / "trainable")
    cfg = TrainConfig(pretrained=str(sd), image_encoder=str(sd / "image_encoder"), attention_layout=attention_layout,
                      processor=processor or {})
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    return run


def astronaut_lq(side: int) -> Any:
    """A real photograph (scikit-image's astronaut) area-resized to side², uint8 RGB."""
    import cv2
    import numpy as np
    import skimage
    from PIL import Image

    rgb = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB"))
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)


if __name__ == "__main__":  # python benchmarks/bench_models.py SD_DIR: build it in a process of its own
    sys.path.insert(0, str(ROOT))
    build_sd15_random(Path(sys.argv[1]))
