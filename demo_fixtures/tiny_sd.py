"""Tiny, random Stable Diffusion 1.5-shaped model folders, built locally.

Tests, the demo and benchmarks must never download weights, yet they should load models
through the very code path that real SD1.5 weights take (`from_pretrained(dir,
subfolder=...)`). So this module writes a folder with SD1.5's layout and its *real*
CLIP tokenizer (rebuilt from the BPE vocabulary that ships inside `open_clip_torch`),
next to small random networks. Random weights make the numbers meaningless, but every
shape, id, file name and loading step is the one the real model has.

The folder is built part by part (see `PARTS`): `tokenizer/`, `text_encoder/`, `unet/`,
`vae/`, `scheduler/` (SD1.5's own subfolders, loaded with diffusers/transformers
`from_pretrained(dir, subfolder=...)`), and `image_encoder/`, a tiny CLIP ViT for timm
shaped like `vit_large_patch14_clip_224` (OpenAI CLIP: 224², patch 14 → 256 patch tokens +
CLS, pre-norm, QuickGELU) in timm's local-folder format (`config.json` with architecture,
model_args and pretrained_cfg + `model.safetensors`), which `timm.create_model(
"local-dir:<folder>", pretrained=True)` loads exactly like it loads hub weights.

At the tiny sizes a 128² image gives a 16² latent (the VAE downsamples by 8, as SD1.5's does)
and the UNet has SD1.5's block layout (three cross-attention down blocks and a plain one,
then a plain up block and three cross-attention ones), so every code path that depends on
the layout (ControlNet residual order, which blocks have attention) is the real one.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable

from pipeline.embed.encoder import quiet_transformers

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the bundled file, exactly as CLIP uses them


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table.

    Written here because transformers 5 no longer exports it; the table is a fixed
    convention (printable Latin-1 bytes map to themselves, the rest to U+0100 onwards),
    and the vocabulary's first 256 entries are its values in byte order.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bundled_bpe_path() -> Path:
    """The CLIP BPE merges file inside the installed open_clip_torch package."""
    import open_clip.tokenizer

    path = Path(open_clip.tokenizer.default_bpe())
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch's BPE vocabulary is missing at {path}; reinstall open_clip_torch")
    return path


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """SD1.5's vocabulary (49,408 entries) and merge list, from the bundled file."""
    lines = gzip.open(bpe_path or bundled_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:_NUM_MERGES + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TOKEN] != BOS_ID or vocab[EOS_TOKEN] != EOS_ID:
        raise ValueError(f"unexpected CLIP vocabulary: {len(vocab)} entries (expected {VOCAB_SIZE})")
    return vocab, merges


def build_clip_tokenizer(out_dir: Path) -> Any:
    """Write SD1.5's CLIP tokenizer into `out_dir` and return it (a `CLIPTokenizer`).

    The folder holds vocab.json + merges.txt (the files SD1.5's `tokenizer/` ships,
    which any transformers version can load) plus what `save_pretrained` adds
    (tokenizer.json, tokenizer_config.json).
    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH,
                              bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError("the CLIP tokenizer did not load its vocabulary as expected")
    with quiet_transformers():
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_text_encoder(out_dir: Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                       intermediate: int | None = None, seed: int = 0) -> Any:
    """A random `CLIPTextModel` with SD1.5's vocabulary, ids and sequence length.

    Seeded so that two builds give identical weights (tests compare shards byte for byte
    across builds). Saved as safetensors, like SD1.5's `text_encoder/`.
    """
    import torch
    from transformers import CLIPTextModel

    config = text_encoder_config(hidden, layers, heads, intermediate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval()
    with quiet_transformers():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def text_encoder_config(hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int | None = None) -> Any:
    """SD1.5's text-encoder configuration at any size (768/12/12/3072 is the real one)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=hidden,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )


# Each part writes its subfolder and returns its model_index.json entry [library, class name].
PartBuilder = Callable[[Path, dict[str, Any]], list[str]]

# SD1.5's block layout (diffusers names); the tiny UNet keeps it at small widths.
SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
VAE_SCALING_FACTOR = 0.18215
# SD1.5's training noise schedule (its scheduler/scheduler_config.json), as a DDPMScheduler.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, clip_sample=False, trained_betas=None,
                      variance_type="fixed_small")
# The tiny image encoder: vit_large_patch14_clip_224's architecture (patch 14 at 224², pre-norm,
# LayerNorm eps 1e-5) at toy width; QuickGELU as OpenAI's CLIP (timm's plain name uses GELU).
TINY_IMAGE_ENCODER = dict(architecture="vit_large_patch14_clip_224", tag="openai",
                          model_args=dict(embed_dim=32, depth=2, num_heads=2, act_layer="quick_gelu", num_classes=0))
# model_index.json keys: pipelines read every public key as a component, and
# StableDiffusionPipeline's optional `image_encoder` component means a transformers
# CLIPVisionModelWithProjection, so the timm encoder is listed under a private key.
INDEX_KEYS = {"image_encoder": "_image_encoder"}


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """SD1.5's UNet layout at toy widths (about 2 M parameters); latents of 16²."""
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
                layers_per_block=1, cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                norm_num_groups=8, down_block_types=SD15_DOWN_BLOCKS, up_block_types=SD15_UP_BLOCKS)


def tiny_vae_config() -> dict[str, Any]:
    """A 4-level AutoencoderKL (three downsamplings: 128² images → 16² latents, 4 channels)."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=128, scaling_factor=VAE_SCALING_FACTOR)


def build_image_encoder(out_dir: Path, seed: int = 0, model_args: dict[str, Any] | None = None) -> Any:
    """A random timm CLIP ViT in timm's local-folder format (config.json + model.safetensors).

    `timm.create_model(f"local-dir:{out_dir}", pretrained=True)` rebuilds the architecture
    from config.json (`architecture` + `model_args`) and loads the weights, the path a hub
    checkpoint takes after download. pretrained_cfg carries the `.openai` tag's
    preprocessing (OpenAI CLIP mean/std, bicubic, 224²).
    """
    import timm
    from timm.models import save_for_hf

    spec = TINY_IMAGE_ENCODER
    args = dict(spec["model_args"], **(model_args or {}))
    name = f"{spec['architecture']}.{spec['tag']}"
    model = _seeded(seed, lambda: timm.create_model(name, pretrained=False, **args).eval())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out_dir), safe_serialization=True)
    return model


def _tokenizer_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    build_clip_tokenizer(folder)
    return ["transformers", "CLIPTokenizer"]


def _text_encoder_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    build_text_encoder(folder, hidden=opts["hidden"], layers=opts["layers"], heads=opts["heads"],
                       intermediate=opts.get("intermediate"), seed=opts["seed"])
    return ["transformers", "CLIPTextModel"]


def _unet_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    from diffusers import UNet2DConditionModel

    unet = _seeded(opts["seed"], lambda: UNet2DConditionModel(**tiny_unet_config(opts["hidden"])))
    unet.save_pretrained(str(folder), safe_serialization=True)
    return ["diffusers", "UNet2DConditionModel"]


def _vae_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    from diffusers import AutoencoderKL

    vae = _seeded(opts["seed"], lambda: AutoencoderKL(**tiny_vae_config()))
    vae.save_pretrained(str(folder), safe_serialization=True)
    return ["diffusers", "AutoencoderKL"]


def _scheduler_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    from diffusers import DDPMScheduler

    DDPMScheduler(**SD15_SCHEDULER).save_pretrained(str(folder))
    return ["diffusers", "DDPMScheduler"]


def _image_encoder_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    build_image_encoder(folder, seed=opts["seed"])
    return ["timm", TINY_IMAGE_ENCODER["architecture"]]


PARTS: dict[str, PartBuilder] = {
    "tokenizer": _tokenizer_part,
    "text_encoder": _text_encoder_part,
    "unet": _unet_part,
    "vae": _vae_part,
    "scheduler": _scheduler_part,
    "image_encoder": _image_encoder_part,
}


def build_tiny_sd(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                  parts: tuple[str, ...] | None = None) -> Path:
    """Write an SD1.5-shaped folder (`tokenizer/`, `text_encoder/`, `unet/`, `vae/`,
    `scheduler/`, `image_encoder/`, `model_index.json`).

    Deterministic: the same arguments give the same bytes. `parts` limits which
    subfolders are (re)built; by default all known parts. `hidden` is the text encoder's
    width and so the UNet's cross_attention_dim.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {"hidden": hidden, "layers": layers, "heads": 2, "seed": seed}
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_tiny": opts}
    index_file = out_dir / "model_index.json"
    if index_file.is_file():  # keep entries of parts built earlier (e.g. unet by another call)
        index = {**json.loads(index_file.read_text()), **index}
    for name in parts or tuple(PARTS):
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; known: {sorted(PARTS)}")
        index[INDEX_KEYS.get(name, name)] = PARTS[name](out_dir / name, opts)
    index_file.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return out_dir
