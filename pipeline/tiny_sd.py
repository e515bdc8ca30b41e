"""Tiny, random Stable Diffusion 1.5-shaped model folders, built locally.

Tests, the demo and benchmarks must never download weights, yet they should load models
through the very code path that real SD1.5 weights take (`from_pretrained(dir,
subfolder=...)`). So this module writes a folder with SD1.5's layout and its *real*
CLIP tokenizer (rebuilt from the BPE vocabulary that ships inside `open_clip_torch`),
next to small random networks. Random weights make the numbers meaningless, but every
shape, id, file name and loading step is the one the real model has.

The folder is built part by part (see `PARTS`); a later milestone adds `unet/`, `vae/`
and `scheduler/` by adding builders there.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable

from pipeline.text_embed import quiet_transformers

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


# Each part writes its subfolder and returns its model_index.json entry
# [library, class name]. Later parts (unet, vae, scheduler) are added here.
PartBuilder = Callable[[Path, dict[str, Any]], list[str]]


def _tokenizer_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    build_clip_tokenizer(folder)
    return ["transformers", "CLIPTokenizer"]


def _text_encoder_part(folder: Path, opts: dict[str, Any]) -> list[str]:
    build_text_encoder(folder, hidden=opts["hidden"], layers=opts["layers"], heads=opts["heads"],
                       intermediate=opts.get("intermediate"), seed=opts["seed"])
    return ["transformers", "CLIPTextModel"]


PARTS: dict[str, PartBuilder] = {
    "tokenizer": _tokenizer_part,
    "text_encoder": _text_encoder_part,
}


def build_tiny_sd(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                  parts: tuple[str, ...] | None = None) -> Path:
    """Write an SD1.5-shaped folder (`tokenizer/`, `text_encoder/`, `model_index.json`).

    Deterministic: the same arguments give the same weights. `parts` limits which
    subfolders are (re)built; by default all known parts.
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
        index[name] = PARTS[name](out_dir / name, opts)
    index_file.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return out_dir
