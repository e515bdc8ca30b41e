"""SD1.5 CLIP text embeddings of captions, in 75-token chunks (the library of jobs/embed.py).

LLaVA's detailed descriptions run past CLIP's 77-token window, and SD1.5 would silently
drop everything after token 75. So a caption's tokens are split into chunks of 75, each
chunk is framed as SD1.5 frames a prompt (BOS + tokens + EOS, EOS-padded to 77) and
encoded on its own, and the last hidden states are concatenated: (77·k, D), k ≤
`max_chunks`. The trainer feeds that sequence to the UNet's cross-attention as is.

Models load with `from_pretrained(model, subfolder=...)`, the path real SD1.5 weights
take, whether `model` is a local folder (tests: demo_fixtures.tiny_sd) or a hub id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

CHUNK_TOKENS = 75
CHUNK_LENGTH = CHUNK_TOKENS + 2  # BOS + 75 + EOS: SD1.5's tokenizer.model_max_length
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "model.fp16.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


class EmbedInputError(ValueError):
    """Something the user must fix (model reference, captions shard, device); exit code 2."""


class ModelNotFoundError(EmbedInputError):
    """The text_embed model is not where the manifest says, or lacks SD1.5's layout."""


_LAYOUT = ("an SD1.5-layout folder: tokenizer/ (vocab.json + merges.txt, or tokenizer.json) and "
           "text_encoder/ (config.json + model.safetensors); build a tiny one with "
           "jobs/build_tiny_models.py, or give a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards")
    for a block: the job draws its own bar, and tests and logs stay readable."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ model ---


def _looks_like_path(model: str) -> bool:
    return (model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
            or not _HUB_ID.match(model))


def local_model_dir(model: str) -> Path | None:
    """The SD1.5 folder `model` names, checked; None when `model` is a hub id.

    A path that does not exist, or a folder without `tokenizer/` and `text_encoder/`,
    raises ModelNotFoundError naming the path and what is expected there.
    """
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_path(model):
            raise ModelNotFoundError(f"text_embed.model: {path} does not exist; expected {_LAYOUT}")
        return None
    if not path.is_dir():
        raise ModelNotFoundError(f"text_embed.model: {path} is a file; expected {_LAYOUT}")
    missing = []
    tok = path / "tokenizer"
    if not tok.is_dir():
        missing.append(f"{tok}/ (the CLIP tokenizer)")
    elif not ((tok / "tokenizer.json").is_file()
              or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        missing.append(f"{tok}/vocab.json + merges.txt (or tokenizer.json)")
    enc = path / "text_encoder"
    if not enc.is_dir():
        missing.append(f"{enc}/ (the CLIP text encoder)")
    else:
        if not (enc / "config.json").is_file():
            missing.append(f"{enc}/config.json")
        if not any((enc / w).is_file() for w in WEIGHT_FILES):
            missing.append(f"{enc}/model.safetensors (weights)")
    if missing:
        raise ModelNotFoundError(f"text_embed.model: {path} lacks " + ", ".join(missing) + f"; expected {_LAYOUT}")
    return path.resolve()


def hub_snapshot_dir(model: str) -> Path | None:
    """Where a hub model's files lie in the local cache (after from_pretrained fetched them)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model, "text_encoder/config.json")
    return Path(found).parents[1] if isinstance(found, str) else None


def _sampled_digest(path: Path, blocks: int = 16, block: int = 1 << 16) -> bytes:
    """sha256 of a file's size, head, tail and `blocks` evenly spaced blocks (~1 MB read).

    Two encoders of the same architecture have weight files of the same size; sampling
    their bytes tells them apart (a fine-tune or another seed changes almost every
    block) without reading 500 MB on every rerun.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks + 1):
            f.seek(min(size - min(size, block), (size * i) // blocks))
            h.update(f.read(block))
    return h.digest()


def model_identity(root: Path) -> str:
    """A short hash of what decides the embeddings: tokenizer files, encoder config, weights.

    Tokenizer files are hashed whole (a few MB); the config without fields that change
    on a mere re-save (transformers version, dtype); the weights by size and sampled
    content (`_sampled_digest`), so a rerun over a 500 MB encoder stays cheap.
    """
    h = hashlib.sha256()
    tok = Path(root) / "tokenizer"
    for p in sorted(tok.iterdir()) if tok.is_dir() else []:
        if p.is_file():
            h.update(f"tokenizer/{p.name}:".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    enc = Path(root) / "text_encoder"
    config = json.loads((enc / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in WEIGHT_FILES:
        if (enc / name).is_file():
            h.update(f"text_encoder/{name}:".encode())
            h.update(_sampled_digest(enc / name))
    return h.hexdigest()[:16]


def encoder_identity(model: str, encoder: Any = None) -> str:
    """`model_identity` of a local folder or a cached hub model; else from the loaded config."""
    root = local_model_dir(model) or hub_snapshot_dir(model)
    if root is not None:
        return model_identity(root)
    if encoder is None:
        raise ModelNotFoundError(f"text_embed.model {model!r} is neither a local folder nor in the hub cache")
    blob = json.dumps({k: v for k, v in encoder.config.to_dict().items()
                       if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")},
                      sort_keys=True, default=str)
    return "cfg-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedInputError("device cuda requested but no CUDA device is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise EmbedInputError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def load_text_encoder(model: str, device: Any = "auto") -> tuple[Any, Any]:
    """(CLIPTokenizer, CLIPTextModel) from `model`'s `tokenizer/` and `text_encoder/`.

    Computes in float16 on CUDA and float32 on the CPU (CPUs have no fast float16
    matmul); the stored embeddings are float16 either way.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    root = local_model_dir(model)
    source = str(root) if root is not None else model
    kwargs: dict[str, Any] = {"local_files_only": True} if root is not None else {}
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        with quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
            encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
    except OSError as e:
        where = f"{root}" if root is not None else f"{model!r} (no such local folder; tried it as a hub id)"
        raise ModelNotFoundError(f"cannot load the text encoder from {where}: {e}; expected {_LAYOUT}") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ModelNotFoundError(f"{source}: the tokenizer has no BOS/EOS tokens; is it SD1.5's CLIP tokenizer?")
    if encoder.config.max_position_embeddings < CHUNK_LENGTH:
        raise ModelNotFoundError(f"{source}: the text encoder takes {encoder.config.max_position_embeddings} "
                                 f"positions, fewer than {CHUNK_LENGTH}")
    encoder.to(dev).eval().requires_grad_(False)
    return tokenizer, encoder


# --------------------------------------------------------------- chunking ---


def chunk_ids(token_ids: Sequence[int], max_chunks: int, bos: int, eos: int) -> tuple[np.ndarray, int]:
    """Lay a caption's tokens (no special tokens) out as SD1.5 prompts of 77.

    Returns (chunks int32 (k, 77), truncated_tokens): chunk i holds BOS, tokens
    [75i, 75i+75), EOS, then EOS padding; k = max(1, ceil(n/75)) capped at max_chunks,
    tokens beyond 75·max_chunks are dropped and counted. The empty caption gives one
    chunk [BOS, EOS, EOS, ...], exactly the tokenization of "" SD pipelines use.
    """
    if max_chunks < 1:
        raise ValueError("max_chunks must be at least 1")
    n = len(token_ids)
    k = min(max(1, math.ceil(n / CHUNK_TOKENS)), max_chunks)
    kept = min(n, k * CHUNK_TOKENS)
    chunks = np.full((k, CHUNK_LENGTH), eos, dtype=np.int32)
    chunks[:, 0] = bos
    ids = np.asarray(token_ids[:kept], dtype=np.int32)
    for i in range(k):
        part = ids[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS]
        chunks[i, 1:1 + len(part)] = part
    return chunks, n - kept


def tokenize(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Token ids of each caption without BOS/EOS and without truncation."""
    if not captions:
        return []
    enc = tokenizer(list(captions), add_special_tokens=False, truncation=False, padding=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


@dataclasses.dataclass
class EmbeddedRow:
    token_ids: np.ndarray  # int32 (77·k,): the ids actually encoded
    num_chunks: int
    hidden: np.ndarray  # float16 (77·k, D)
    truncated_tokens: int
    num_tokens: int  # caption tokens before truncation

    @property
    def padding_positions(self) -> int:
        """EOS padding after each chunk's terminating EOS (positions encoded for nothing)."""
        kept = self.num_tokens - self.truncated_tokens
        return self.num_chunks * (CHUNK_LENGTH - 2) - kept


def encode_captions(tokenizer: Any, encoder: Any, captions: Sequence[str], max_chunks: int,
                    batch_size: int) -> list[EmbeddedRow]:
    """Embed captions; results in input order.

    Rows are sorted by length so a batch holds rows of similar chunk counts, and all
    chunks of a batch's rows go through the encoder as one (Σk, 77) tensor: every
    chunk is exactly 77 long, so there is no padding between rows. The encoder's
    `last_hidden_state` is SD1.5's conditioning (final layer norm applied).
    """
    import torch

    ids = tokenize(tokenizer, captions)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunked = [chunk_ids(t, max_chunks, bos, eos) for t in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(encoder.parameters()).device
    results: list[EmbeddedRow | None] = [None] * len(ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            flat = np.concatenate([chunked[i][0] for i in rows])
            out = encoder(input_ids=torch.from_numpy(flat).to(device=device, dtype=torch.long)).last_hidden_state
            hidden = out.to(torch.float16).cpu().numpy()  # (Σk, 77, D)
            pos = 0
            for i in rows:
                chunks, truncated = chunked[i]
                k = chunks.shape[0]
                results[i] = EmbeddedRow(token_ids=chunks.reshape(-1), num_chunks=k,
                                         hidden=hidden[pos:pos + k].reshape(k * CHUNK_LENGTH, -1),
                                         truncated_tokens=truncated, num_tokens=len(ids[i]))
                pos += k
    return results  # type: ignore[return-value]


def empty_prompt_embedding(tokenizer: Any, encoder: Any) -> np.ndarray:
    """float16 (77, D): the embedding of "" as SD pipelines compute it (null text / CFG).

    SD pipelines tokenize "" with padding="max_length", max_length=77, which is
    [BOS, EOS × 76] — the same chunk `chunk_ids([])` gives, so a failed caption stored
    as the empty prompt and this tensor are the same thing. Checked here, not assumed.
    """
    import torch

    ids = tokenizer("", padding="max_length", max_length=CHUNK_LENGTH, truncation=True)["input_ids"]
    chunk, _ = chunk_ids([], 1, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if list(ids) != chunk[0].tolist():
        raise RuntimeError(f"the tokenizer's empty prompt {list(ids)[:4]}… differs from the chunk layout "
                           f"{chunk[0].tolist()[:4]}…; is it SD1.5's CLIP tokenizer?")
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        out = encoder(input_ids=torch.tensor([ids], dtype=torch.long, device=device)).last_hidden_state
    return out[0].to(torch.float16).cpu().numpy()


# ------------------------------------------------------------------ arrow ---


def hidden_type(width: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float16(), width))


def _offsets(lengths: Sequence[int]) -> pa.Array:
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    if ends.size and ends[-1] > np.iinfo(np.int32).max:
        raise ValueError("a record batch this large needs 64-bit offsets; write smaller batches")
    return pa.array(np.concatenate([[0], ends]).astype(np.int32))


def matrices_to_arrow(mats: Sequence[np.ndarray], width: int) -> pa.ListArray:
    """list<fixed_size_list<float16, width>> from float16 (n_i, width) arrays, without
    going through Python floats: one concatenation, then buffers wrapped as they are."""
    flat = np.concatenate(mats) if mats else np.zeros((0, width), np.float16)
    if flat.dtype != np.float16 or flat.ndim != 2 or flat.shape[1] != width:
        raise ValueError(f"expected float16 (n, {width}) arrays, got {flat.dtype} {flat.shape}")
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
    return pa.ListArray.from_arrays(_offsets([m.shape[0] for m in mats]), values)


def vectors_to_arrow(vecs: Sequence[np.ndarray], dtype: np.dtype = np.dtype(np.int32)) -> pa.ListArray:
    """list<int32> (or another primitive) from 1-D numpy arrays."""
    flat = np.concatenate(vecs).astype(dtype, copy=False) if vecs else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(_offsets([len(v) for v in vecs]), pa.array(flat))


def hidden_matrix(column: pa.ListArray, row: int) -> np.ndarray:
    """Zero-copy (77·k, D) view of one row of a `hidden` array read from a shard."""
    fsl = column.values
    width = fsl.type.list_size
    start, end = column.offsets[row].as_py(), column.offsets[row + 1].as_py()
    flat = fsl.values.to_numpy(zero_copy_only=True)
    base = fsl.offset + start
    return flat[base * width:(base + end - start) * width].reshape(end - start, width)


# ----------------------------------------------------------- empty prompt ---

EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


def empty_prompt_path(out: Path, folder: str = "text_emb") -> Path:
    """`<build>/text_emb/empty_prompt.safetensors`: float16 (77, D) `hidden`, written once per
    build (and embeddings folder) by the embed stage, read by the trainer (null-text
    dropout) and by sampling (CFG)."""
    return Path(out) / folder / EMPTY_PROMPT_FILE
