"""The text-embedding stage: captions shard N → text_emb shard N (and the empty prompt).

Every pairs row needs an embedding, so a row whose caption failed is embedded as the
empty prompt (what null-text dropout trains on anyway) and marked `caption_status =
failed`; the sidecar counts them. Each row carries `caption_sha`, the sha256 of the text
actually encoded, so a rebuild after caption overrides re-encodes only the rows whose text
changed and copies the rest from the previous shard. The chunked CLIP encoding itself is
pipeline.embed.encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core.shards import ShardWriter, atomic_file, read_table, shard_path, stage_folder, verify_shard
from pipeline.core.stage import Progress, ShardOutcome, ShardWork, Stage, StageInputError, StageResult, run_stage
from pipeline.core.tensorfile import save_canonical
from pipeline.embed.config import EmbedConfig
from pipeline.embed.encoder import (
    CHUNK_LENGTH, EmbeddedRow, empty_prompt_embedding, empty_prompt_path, encode_captions, encoder_identity,
    hidden_matrix, hidden_type, load_text_encoder, local_model_dir, matrices_to_arrow, model_identity,
    vectors_to_arrow,
)

CAPTION_STATUSES = ("ok", "failed", "override")


def text_emb_schema(width: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("num_chunks", pa.int8()),
        ("token_ids", pa.list_(pa.int32())),
        ("hidden", hidden_type(width)),
        ("caption_sha", pa.string()),
        ("caption_status", pa.string()),
        ("truncated_tokens", pa.int32()),
        ("num_tokens", pa.int32()),
    ])


def caption_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------- captions ---


@dataclasses.dataclass
class CaptionRows:
    """A verified captions shard, as the texts to encode (failed rows → "")."""

    keys: list[str]
    texts: list[str]
    statuses: list[str]
    shas: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def read_captions(arrow: Path) -> CaptionRows:
    table = read_table(arrow)
    missing = {"key", "caption", "status"} - set(table.column_names)
    if missing:
        raise StageInputError(f"{arrow}: no column(s) {sorted(missing)}; expected key, caption, status, error")
    keys = table.column("key").to_pylist()
    captions = table.column("caption").to_pylist()
    statuses = table.column("status").to_pylist()
    if any(k is None for k in keys) or len(set(keys)) != len(keys):
        raise StageInputError(f"{arrow}: keys must be unique and non-null")
    bad = sorted({s for s in statuses if s not in CAPTION_STATUSES}, key=str)
    if bad:
        raise StageInputError(f"{arrow}: unknown caption status {bad}; expected one of {CAPTION_STATUSES}")
    # A failed row has no caption to trust: it becomes the empty prompt.
    texts = ["" if st == "failed" or c is None else c for c, st in zip(captions, statuses)]
    return CaptionRows(keys, texts, statuses, [caption_sha(t) for t in texts])


class _Previous:
    """A verified text_emb shard of the same configuration, to copy unchanged rows from.

    The table is memory-mapped: copied rows are read straight from the page cache.
    """

    def __init__(self, arrow: Path) -> None:
        self.table = read_table(arrow)
        self.keys = self.table.column("key").to_pylist()
        self.shas = self.table.column("caption_sha").to_pylist()
        self.width = self.table.schema.field("hidden").type.value_type.list_size
        self._where = {}  # row → (chunk index, row in chunk)
        r = 0
        for c, chunk in enumerate(self.table.column("hidden").chunks):
            for i in range(len(chunk)):
                self._where[r] = (c, i)
                r += 1

    def reusable(self, cap: CaptionRows) -> dict[int, int]:
        """current row → previous row, for rows whose key and encoded text are unchanged."""
        by_key = {k: j for j, k in enumerate(self.keys)}
        return {i: by_key[k] for i, (k, s) in enumerate(zip(cap.keys, cap.shas))
                if k in by_key and self.shas[by_key[k]] == s}

    def row(self, j: int) -> EmbeddedRow:
        c, i = self._where[j]
        col = lambda name: self.table.column(name).chunk(c)  # noqa: E731
        ids = col("token_ids")
        start, end = ids.offsets[i].as_py(), ids.offsets[i + 1].as_py()
        token_ids = ids.values.to_numpy(zero_copy_only=True)[start:end]
        return EmbeddedRow(token_ids=token_ids, num_chunks=int(col("num_chunks")[i].as_py()),
                           hidden=hidden_matrix(col("hidden"), i),
                           truncated_tokens=int(col("truncated_tokens")[i].as_py()),
                           num_tokens=int(col("num_tokens")[i].as_py()))


def _record_batch(schema: pa.Schema, width: int, cap: CaptionRows, idx: range,
                  rows: list[EmbeddedRow]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([
        pa.array(cap.keys[idx.start:idx.stop], pa.string()),
        pa.array(np.array([r.num_chunks for r in rows], dtype=np.int8)),
        vectors_to_arrow([r.token_ids for r in rows], np.dtype(np.int32)),
        matrices_to_arrow([r.hidden for r in rows], width),
        pa.array(cap.shas[idx.start:idx.stop], pa.string()),
        pa.array(cap.statuses[idx.start:idx.stop], pa.string()),
        pa.array(np.array([r.truncated_tokens for r in rows], dtype=np.int32)),
        pa.array(np.array([r.num_tokens for r in rows], dtype=np.int32)),
    ], schema=schema)


# ------------------------------------------------------------------ stage ---


class EmbedStage(Stage):
    name: ClassVar[str] = "text_emb"
    input_stage: ClassVar[str] = "captions"
    input_command: ClassVar[str] = "`python jobs/caption.py --manifest M --shard {shard}`"
    packages: ClassVar[tuple[str, ...]] = ("numpy", "torch", "transformers", "tokenizers", "pyarrow")

    def __init__(self, out: Path, cfg: EmbedConfig, *, force: bool = False, tokenizer: Any = None,
                 encoder: Any = None, identity: str | None = None, variant: str = "",
                 index_extra: dict[str, Any] | None = None) -> None:
        """`tokenizer`/`encoder`: already loaded (tests, benchmarks); `identity` names an
        encoder built in memory (default: computed from `cfg.model`'s files); `variant`:
        embed captions-<variant>/ into text_emb-<variant>/ (the manifest's caption.variant)."""
        super().__init__(out, index_extra)
        self.input_stage = stage_folder("captions", variant)  # type: ignore[misc]
        self.name = stage_folder("text_emb", variant)  # type: ignore[misc]
        self.cfg, self.force = cfg, force
        self.tokenizer, self.encoder = tokenizer, encoder
        self.identity = identity

    def __getstate__(self) -> dict[str, Any]:  # actors load their own encoder
        return {**self.__dict__, "tokenizer": None, "encoder": None}

    def _ident(self) -> str:
        if self.identity is None:
            root = local_model_dir(self.cfg.model)  # a wrong model path fails before any work
            if root is not None:
                self.identity = model_identity(root)
            else:  # a hub id: its files are known once loaded
                self.open()
                self.identity = encoder_identity(self.cfg.model, self.encoder)
        return self.identity

    def schema(self) -> pa.Schema:
        self.open()
        return text_emb_schema(self.width)

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    def config(self) -> dict[str, Any]:
        return {"text_embed": self.cfg.output_affecting()}

    def config_hash(self) -> str:
        """The settings and the encoder's identity: either changing invalidates every shard."""
        return f"{self.cfg.hash()}-{self._ident()}"

    def plan(self, shards: Sequence[int] | None) -> list[ShardWork]:
        self._ident()
        return super().plan(shards)

    def stale_reason(self, work: ShardWork) -> str | None:
        return "--force" if self.force else super().stale_reason(work)

    def open(self) -> None:
        if self.encoder is None:
            self.tokenizer, self.encoder = load_text_encoder(self.cfg.model, self.cfg.device)

    def close(self) -> None:
        pass  # the encoder is small; a driver that loaded it keeps it for the empty prompt

    def actor_resources(self, cluster_gpus: int) -> tuple[int, dict[str, float]]:
        if cluster_gpus and self.cfg.device != "cpu":
            return cluster_gpus, {"num_gpus": 1}
        return 1, {"num_cpus": 1}

    def prepare(self, todo: Sequence[ShardWork]) -> None:
        if todo or not empty_prompt_current(self.out, self.config_hash(), self.name):
            self.open()
            ensure_empty_prompt(self.out, self.cfg, self.tokenizer, self.encoder, self._ident(), self.name)

    def _previous(self, shard: int) -> _Previous | None:
        if self.force:
            return None
        arrow = shard_path(self.out, self.name, shard)
        if verify_shard(arrow, {"stage": self.name, "shard": shard, "config_hash": self.config_hash()}) is not None:
            return None
        try:
            return _Previous(arrow)
        except (KeyError, pa.ArrowInvalid, OSError):  # an older schema: re-encode everything
            return None

    def build(self, work: ShardWork, writer: ShardWriter, progress: Progress) -> ShardOutcome:
        t0 = time.perf_counter()
        self.open()
        captions = read_captions(shard_path(self.out, self.input_stage, work.shard))
        width = self.width
        prev = self._previous(work.shard)
        reuse = prev.reusable(captions) if prev is not None and prev.width == width else {}
        timing = {"read_s": time.perf_counter() - t0, "encode_s": 0.0, "write_s": 0.0}
        schema = text_emb_schema(width)
        window = max(4 * self.cfg.batch_size, 64)  # rows per record batch: bounded memory, full encoder batches
        stats: dict[str, Any] = {"chunks": {}, "truncated_rows": 0, "truncated_tokens": 0, "positions": 0,
                                 "padding": 0, "encoded": 0, "reused": 0}
        for start in range(0, len(captions), window):
            idx = range(start, min(start + window, len(captions)))
            todo = [i for i in idx if i not in reuse]
            t1 = time.perf_counter()
            fresh = dict(zip(todo, encode_captions(self.tokenizer, self.encoder, [captions.texts[i] for i in todo],
                                                   self.cfg.max_chunks, self.cfg.batch_size)))
            t2 = time.perf_counter()
            rows = [fresh[i] if i in fresh else prev.row(reuse[i]) for i in idx]  # type: ignore[union-attr]
            writer.write_batch(_record_batch(schema, width, captions, idx, rows))
            timing["encode_s"] += t2 - t1
            timing["write_s"] += time.perf_counter() - t2
            stats["encoded"] += len(todo)
            stats["reused"] += len(idx) - len(todo)
            for r in rows:
                stats["chunks"][r.num_chunks] = stats["chunks"].get(r.num_chunks, 0) + 1
                stats["truncated_rows"] += r.truncated_tokens > 0
                stats["truncated_tokens"] += r.truncated_tokens
                stats["positions"] += r.num_chunks * CHUNK_LENGTH
                stats["padding"] += r.padding_positions
            if progress is not None:
                progress(len(idx))
        failed_keys = [k for k, s in zip(captions.keys, captions.statuses) if s == "failed"]
        param = next(self.encoder.parameters())
        rate = round(stats["encoded"] / timing["encode_s"], 2) if timing["encode_s"] else None
        return ShardOutcome(
            failed=[],  # no row is dropped: failed captions are embedded as the empty prompt
            sidecar={
                "model": {"ref": self.cfg.model, "identity": self._ident(), "class": type(self.encoder).__name__,
                          "hidden_size": width, "compute_device": str(param.device),
                          "compute_dtype": str(param.dtype).replace("torch.", "")},
                "hidden_size": width,
                "counts": {
                    "encoded": stats["encoded"], "reused": stats["reused"],
                    "truncated_rows": stats["truncated_rows"], "truncated_tokens": stats["truncated_tokens"],
                    "failed_captions": len(failed_keys),
                    "override_captions": sum(s == "override" for s in captions.statuses),
                    "rows_by_chunks": {str(k): v for k, v in sorted(stats["chunks"].items())},
                },
                "failed_caption_keys": failed_keys,
                "padding_waste": round(stats["padding"] / stats["positions"], 6) if stats["positions"] else 0.0,
                "empty_prompt": f"{self.name}/{empty_prompt_path(self.out, self.name).name}",
                "timing": {**{k: round(v, 3) for k, v in timing.items()}, "encoded_rows_per_s": rate},
            },
            counts={"encoded": stats["encoded"], "reused": stats["reused"]})

    def summary_lines(self, sidecars: Sequence[dict[str, Any]]) -> list[str]:
        current = [s for s in sidecars if s.get("config_hash") == self.config_hash()]
        counts = [s.get("counts", {}) for s in current]
        failed = sum(c.get("failed_captions", 0) for c in counts)
        rows = sum(c.get("truncated_rows", 0) for c in counts)
        tokens = sum(c.get("truncated_tokens", 0) for c in counts)
        return [f"  {failed} failed captions embedded as the empty prompt; {rows} rows truncated "
                f"({tokens} tokens past text_embed.max_chunks dropped)"]


# ----------------------------------------------------------- empty prompt ---


def empty_prompt_current(out: Path, chash: str, folder: str = "text_emb") -> bool:
    from safetensors import safe_open

    path = empty_prompt_path(out, folder)
    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("config_hash") == chash and "hidden" in f.keys()
    except Exception:  # missing, truncated or foreign file: rewrite it
        return False


def ensure_empty_prompt(out: Path, cfg: EmbedConfig, tokenizer: Any, encoder: Any, identity: str,
                        folder: str = "text_emb") -> Path:
    """Write the empty prompt's float16 (77, D) `hidden` once per build: the trainer's null
    text for caption dropout and classifier-free guidance."""
    path = empty_prompt_path(out, folder)
    chash = f"{cfg.hash()}-{identity}"
    if empty_prompt_current(out, chash, folder):
        return path
    hidden = np.ascontiguousarray(empty_prompt_embedding(tokenizer, encoder))
    meta = {"model": cfg.model, "config_hash": chash, "model_identity": identity,
            "hidden_size": str(hidden.shape[1]), "prompt": ""}
    with atomic_file(path) as f:
        f.write(save_canonical({"hidden": hidden}, metadata=meta))
    return path


def run_embed(out: Path, cfg: EmbedConfig, shards: list[int] | None = None, show_progress: bool = True,
              log: Any = None, index_extra: dict[str, Any] | None = None, force: bool = False,
              actors: int | None = None, variant: str = "") -> StageResult:
    """The job behind jobs/embed.py: the given captions shards (None: all) that are missing or
    stale, in this process (the text encoder is small) or on `actors` Ray actors."""
    stage = EmbedStage(out, cfg, force=force, variant=variant, index_extra=index_extra)
    distributor = "actors" if actors and shards is None else "serial"
    return run_stage(stage, shards, distributor=distributor, actors=actors, show_progress=show_progress, log=log)
