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


def build_sd15_random(sd: Path) -> Path:
    """SD1.5's layout and sizes, random weights (seeded), plus image_encoder/ (timm ViT-L/14)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from model.summary import SD15_TEXT_ENCODER, SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from pipeline.tiny_sd import SD15_SCHEDULER, build_clip_tokenizer, build_image_encoder, build_text_encoder

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
