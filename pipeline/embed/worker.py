"""The text-embedding stage: captions shard N → text_emb shard N (and the empty prompt).

Every pairs row needs an embedding, so a row whose caption failed is embedded as the
empty prompt (what null-text dropout trains on anyway) and marked `caption_status =
failed`; the sidecar counts them. Each row carries `caption_sha`, the sha256 of the text
actually encoded, so a rerun after caption overrides re-encodes only the rows whose
text changed and copies the rest from the previous shard; when nothing changed the
shard is not touched at all.

`run_embed` is the job behind jobs/embed.py; it loads the encoder once and embeds
shards serially (the text encoder is small next to the captioner).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

import pipeline
from pipeline.embed.config import EmbedConfig
from pipeline.core.shards import (
    SHARD_GLOB, DiskFullError, ShardWriter, atomic_file, atomic_write_json, build_lock, clean_tmp, read_sidecar,
    read_table, shard_path, sidecar_path, verify_shard,
)
from pipeline.embed.encoder import (
    CHUNK_LENGTH, EmbeddedRow, EmbedInputError, empty_prompt_embedding, encode_captions, encoder_identity,
    hidden_matrix, hidden_type, load_text_encoder, local_model_dir, matrices_to_arrow, model_identity,
    vectors_to_arrow,
)

STAGE = "text_emb"
CAPTIONS = "captions"
CAPTION_STATUSES = ("ok", "failed", "override")
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


class MissingCaptionsError(EmbedInputError):
    """The captions shard to embed does not exist or is not complete."""


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


def config_hash(cfg: EmbedConfig, identity: str) -> str:
    """The settings and the encoder's identity: either changing invalidates every shard."""
    return f"{cfg.hash()}-{identity}"


def stage_expectations(shard: int, chash: str) -> dict[str, Any]:
    return {"stage": STAGE, "shard": shard, "config_hash": chash}


def software_versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"ssp_ir": pipeline.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pyarrow": pa.__version__}


def caption_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------- captions ---


@dataclasses.dataclass
class CaptionRows:
    """A verified captions shard, as the texts to encode (failed rows → "")."""

    shard: int
    keys: list[str]
    texts: list[str]
    statuses: list[str]
    shas: list[str]
    sha256: str

    def __len__(self) -> int:
        return len(self.keys)


def read_captions(shard: int, out: Path) -> CaptionRows:
    arrow = shard_path(out, CAPTIONS, shard)
    hint = f"run `python jobs/caption.py --manifest M --shard {shard}` first"
    if not arrow.exists() and read_sidecar(arrow) is None:
        raise MissingCaptionsError(f"captions shard {shard} does not exist ({arrow}); {hint}")
    why = verify_shard(arrow, {"stage": CAPTIONS, "shard": shard})
    if why is not None:
        raise MissingCaptionsError(f"captions shard {arrow} is not complete: {why}; {hint}")
    side = read_sidecar(arrow) or {}
    table = read_table(arrow)
    missing = {"key", "caption", "status"} - set(table.column_names)
    if missing:
        raise EmbedInputError(f"{arrow}: no column(s) {sorted(missing)}; expected key, caption, status, error")
    keys = table.column("key").to_pylist()
    captions = table.column("caption").to_pylist()
    statuses = table.column("status").to_pylist()
    if any(k is None for k in keys) or len(set(keys)) != len(keys):
        raise EmbedInputError(f"{arrow}: keys must be unique and non-null")
    bad = sorted({s for s in statuses if s not in CAPTION_STATUSES}, key=str)
    if bad:
        raise EmbedInputError(f"{arrow}: unknown caption status {bad}; expected one of {CAPTION_STATUSES}")
    # A failed row has no caption to trust: it becomes the empty prompt.
    texts = ["" if st == "failed" or c is None else c for c, st in zip(captions, statuses)]
    return CaptionRows(shard, keys, texts, statuses, [caption_sha(t) for t in texts], side.get("sha256", ""))


# -------------------------------------------------------- previous shard ---


class _Previous:
    """A verified text_emb shard of the same configuration, to copy unchanged rows from.

    The table is memory-mapped: copied rows are read straight from the page cache.
    """

    def __init__(self, arrow: Path) -> None:
        self.table = read_table(arrow)
        self.keys = self.table.column("key").to_pylist()
        self.shas = self.table.column("caption_sha").to_pylist()
        self.statuses = self.table.column("caption_status").to_pylist()
        self.width = self.table.schema.field("hidden").type.value_type.list_size
        self._where = {}  # row → (chunk index, row in chunk)
        r = 0
        for c, chunk in enumerate(self.table.column("hidden").chunks):
            for i in range(len(chunk)):
                self._where[r] = (c, i)
                r += 1

    def unchanged(self, cap: CaptionRows) -> bool:
        return self.keys == cap.keys and self.shas == cap.shas and self.statuses == cap.statuses

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


def _previous(arrow: Path, shard: int, chash: str) -> _Previous | None:
    if verify_shard(arrow, stage_expectations(shard, chash)) is not None:
        return None
    try:
        return _Previous(arrow)
    except (KeyError, pa.ArrowInvalid, OSError):  # an older schema: re-encode everything
        return None


def stale_reason(shard: int, out: Path, chash: str, captions: CaptionRows | None = None) -> str | None:
    """None when text_emb shard N is complete, of this configuration, and matches its
    captions shard row for row (keys, texts, statuses); otherwise why it is not."""
    arrow = shard_path(out, STAGE, shard)
    why = verify_shard(arrow, stage_expectations(shard, chash))
    if why is not None:
        return why
    captions = captions or read_captions(shard, out)
    try:
        prev = _Previous(arrow)
    except (KeyError, pa.ArrowInvalid, OSError) as e:
        return f"unreadable ({e})"
    if prev.unchanged(captions):
        return None
    changed = len(captions) - len(prev.reusable(captions))
    return f"{changed} of {len(captions)} captions changed" if changed else "caption statuses changed"


# ------------------------------------------------------------------ shard ---


def _record_batch(schema: pa.Schema, width: int, keys: list[str], rows: list[EmbeddedRow],
                  shas: list[str], statuses: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([
        pa.array(keys, pa.string()),
        pa.array(np.array([r.num_chunks for r in rows], dtype=np.int8)),
        vectors_to_arrow([r.token_ids for r in rows], np.dtype(np.int32)),
        matrices_to_arrow([r.hidden for r in rows], width),
        pa.array(shas, pa.string()),
        pa.array(statuses, pa.string()),
        pa.array(np.array([r.truncated_tokens for r in rows], dtype=np.int32)),
        pa.array(np.array([r.num_tokens for r in rows], dtype=np.int32)),
    ], schema=schema)


def build_embed_shard(shard: int, out: Path, cfg: EmbedConfig, tokenizer: Any, encoder: Any,
                      progress: Callable[[int], None] | None = None, *, identity: str | None = None,
                      force: bool = False) -> dict[str, Any]:
    """Embed captions shard `shard` into text_emb shard `shard`; returns a summary.

    Reuses the rows of a previous shard of the same configuration whose text is
    unchanged; skips the shard (no write at all) when every row is unchanged.
    `identity` names the encoder (default: computed from `cfg.model`'s files; pass
    one for an encoder built in memory). `force` re-encodes every row.
    """
    started = time.time()
    t0 = time.perf_counter()
    out = Path(out)
    captions = read_captions(shard, out)
    identity = identity or encoder_identity(cfg.model, encoder)
    chash = config_hash(cfg, identity)
    width = int(encoder.config.hidden_size)
    arrow = shard_path(out, STAGE, shard)
    prev = None if force else _previous(arrow, shard, chash)
    summary = {"shard": shard, "rows": len(captions), "skipped": False, "encoded": 0, "reused": 0}
    if prev is not None and prev.unchanged(captions):
        if progress is not None:
            progress(len(captions))
        return {**summary, "skipped": True, "reused": len(captions), "seconds": round(time.time() - started, 3)}
    reuse = prev.reusable(captions) if prev is not None and prev.width == width else {}
    ensure_empty_prompt(out, cfg, tokenizer, encoder, identity)
    timing = {"read_s": time.perf_counter() - t0, "encode_s": 0.0, "write_s": 0.0}
    schema = text_emb_schema(width)
    window = max(4 * cfg.batch_size, 64)  # rows per record batch: bounded memory, full encoder batches
    stats = {"chunks": {}, "truncated_rows": 0, "truncated_tokens": 0, "positions": 0, "padding": 0}
    writer = ShardWriter(arrow, schema)
    try:
        for start in range(0, len(captions), window):
            idx = range(start, min(start + window, len(captions)))
            todo = [i for i in idx if i not in reuse]
            t1 = time.perf_counter()
            fresh = dict(zip(todo, encode_captions(tokenizer, encoder, [captions.texts[i] for i in todo],
                                                   cfg.max_chunks, cfg.batch_size)))
            t2 = time.perf_counter()
            rows = [fresh[i] if i in fresh else prev.row(reuse[i]) for i in idx]  # type: ignore[union-attr]
            writer.write_batch(_record_batch(schema, width, captions.keys[start:idx.stop], rows,
                                             captions.shas[start:idx.stop], captions.statuses[start:idx.stop]))
            timing["encode_s"] += t2 - t1
            timing["write_s"] += time.perf_counter() - t2
            summary["encoded"] += len(todo)
            summary["reused"] += len(idx) - len(todo)
            for r in rows:
                stats["chunks"][r.num_chunks] = stats["chunks"].get(r.num_chunks, 0) + 1
                stats["truncated_rows"] += r.truncated_tokens > 0
                stats["truncated_tokens"] += r.truncated_tokens
                stats["positions"] += r.num_chunks * CHUNK_LENGTH
                stats["padding"] += r.padding_positions
            if progress is not None:
                progress(len(idx))
        t3 = time.perf_counter()
        size, digest = writer.commit()
        timing["write_s"] += time.perf_counter() - t3
    except BaseException:
        writer.abort()
        raise
    del prev  # release the old file's mapping
    failed_keys = [k for k, s in zip(captions.keys, captions.statuses) if s == "failed"]
    total_s = time.time() - started
    rate = round(summary["encoded"] / timing["encode_s"], 2) if timing["encode_s"] else None
    sidecar = {
        **stage_expectations(shard, chash),
        "rows": len(captions),
        "failed": [],  # no row is dropped: failed captions are embedded as the empty prompt
        "bytes": size,
        "sha256": digest,
        "config": {"text_embed": cfg.output_affecting()},
        "model": {"ref": cfg.model, "identity": identity, "class": type(encoder).__name__,
                  "hidden_size": width, "compute_device": str(next(encoder.parameters()).device),
                  "compute_dtype": str(next(encoder.parameters()).dtype).replace("torch.", "")},
        "hidden_size": width,
        "inputs": {"captions_sha256": captions.sha256, "captions_rows": len(captions)},
        "counts": {
            "encoded": summary["encoded"],
            "reused": summary["reused"],
            "truncated_rows": stats["truncated_rows"],
            "truncated_tokens": stats["truncated_tokens"],
            "failed_captions": len(failed_keys),
            "override_captions": sum(s == "override" for s in captions.statuses),
            "rows_by_chunks": {str(k): v for k, v in sorted(stats["chunks"].items())},
        },
        "failed_caption_keys": failed_keys,
        "padding_waste": round(stats["padding"] / stats["positions"], 6) if stats["positions"] else 0.0,
        "empty_prompt": f"{STAGE}/{EMPTY_PROMPT_FILE}",
        "software": software_versions(),
        "timing": {**{k: round(v, 3) for k, v in timing.items()}, "total_s": round(total_s, 3),
                   "encoded_rows_per_s": rate,
                   "host": platform.node()},
    }
    atomic_write_json(sidecar_path(arrow), sidecar)
    return {**summary, "bytes": size, "seconds": round(total_s, 3)}


# ----------------------------------------------------------- empty prompt ---


def empty_prompt_path(out: Path) -> Path:
    return Path(out) / STAGE / EMPTY_PROMPT_FILE


def empty_prompt_current(out: Path, chash: str) -> bool:
    from safetensors import safe_open

    path = empty_prompt_path(out)
    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("config_hash") == chash and "hidden" in f.keys()
    except Exception:  # missing, truncated or foreign file: rewrite it
        return False


def ensure_empty_prompt(out: Path, cfg: EmbedConfig, tokenizer: Any, encoder: Any, identity: str) -> Path:
    """Write `<out>/text_emb/empty_prompt.safetensors` (float16 (77, D) `hidden`) once per
    build: the trainer's null text for caption dropout and classifier-free guidance."""
    from safetensors.numpy import save

    path = empty_prompt_path(out)
    chash = config_hash(cfg, identity)
    if empty_prompt_current(out, chash):
        return path
    hidden = np.ascontiguousarray(empty_prompt_embedding(tokenizer, encoder))
    meta = {"model": cfg.model, "config_hash": chash, "model_identity": identity,
            "hidden_size": str(hidden.shape[1]), "prompt": ""}
    with atomic_file(path) as f:
        f.write(save({"hidden": hidden}, metadata=meta))
    return path


# -------------------------------------------------------------------- job ---


@dataclasses.dataclass
class EmbedJobResult:
    shards: int = 0
    built: int = 0
    skipped: int = 0
    rows: int = 0
    encoded: int = 0
    reused: int = 0
    failed_captions: int = 0
    truncated_rows: int = 0
    truncated_tokens: int = 0
    not_ready: list[int] = dataclasses.field(default_factory=list)  # captions shards not complete
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.errors else 0

    def summary(self) -> str:
        lines = [f"text_emb: {self.shards} shards ({self.built} built, {self.skipped} already current), "
                 f"{self.rows} rows ({self.encoded} encoded now, {self.reused} copied unchanged "
                 "from the previous shards); "
                 f"{self.failed_captions} failed captions embedded as the empty prompt; "
                 f"{self.truncated_rows} rows truncated ({self.truncated_tokens} tokens dropped)"]
        if self.not_ready:
            lines.append(f"  {len(self.not_ready)} captions shards not complete, not embedded: {self.not_ready[:20]}"
                         " (finish them with jobs/caption.py, then rerun)")
        lines += [f"  ERROR {e}" for e in self.errors]
        return "\n".join(lines)


def _captions_shards(out: Path, log: Any) -> list[int]:
    """Every complete captions shard (one still being written is left for a later run)."""
    found = []
    for arrow in sorted((Path(out) / CAPTIONS).glob(SHARD_GLOB)):
        if read_sidecar(arrow) is None:
            print(f"skipping {CAPTIONS}/{arrow.name}: not finished (no sidecar)", file=log)
            continue
        found.append(int(arrow.name[6:11]))
    return found


class EmbedShardRunner:
    """What one Ray actor holds for `--all --actors N`: an encoder loaded once."""

    def __init__(self, cfg: EmbedConfig, out: str, identity: str, force: bool) -> None:
        self.cfg, self.out, self.identity, self.force = cfg, Path(out), identity, force
        self.tokenizer, self.encoder = load_text_encoder(cfg.model, cfg.device)

    def run(self, shard: int, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        return build_embed_shard(shard, self.out, self.cfg, self.tokenizer, self.encoder, progress,
                                 identity=self.identity, force=self.force)


def _on_actors(todo: list[int], cfg: EmbedConfig, out: Path, identity: str, force: bool, actors: int,
               rows: int, show_progress: bool, result: "EmbedJobResult") -> None:
    """Fan shards out to actors (one per GPU on a GPU cluster), as the caption stage does."""
    import ray

    from pipeline.core import distribute

    distribute.init_ray(None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1} if gpus and cfg.device != "cpu" else {"num_cpus": 1}
    n = actors or gpus or 1
    for r in distribute.run_actor_pool(todo, EmbedShardRunner,
                                       {"cfg": cfg, "out": str(out), "identity": identity, "force": force},
                                       n, resources, desc="embed", unit="row", total_rows=rows,
                                       show_progress=show_progress):
        if "error" in r:
            result.errors.append(str(r["error"]))
        else:
            result.built += 1


def run_embed(out: Path, cfg: EmbedConfig, shards: list[int] | None = None, show_progress: bool = True,
              log: Any = None, index_extra: dict[str, Any] | None = None,
              force: bool = False, actors: int | None = None) -> EmbedJobResult:
    """Embed the given captions shards (None: all of them) that are missing or stale.

    The model reference is checked and the work planned before the encoder loads, so
    a rerun with nothing to do takes seconds; the encoder loads once for all shards.
    With `actors` (and all shards), shards go to that many Ray actors instead.
    """
    from pipeline.core.index import rebuild_index

    out = Path(out)
    log = log if log is not None else sys.stderr  # looked up now: tests and callers may redirect it
    explicit = shards is not None
    single = explicit and len(shards) == 1  # type: ignore[arg-type]
    lock = build_lock(out, STAGE, shard=shards[0] if single else None)  # type: ignore[index]
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock)
        except RuntimeError as e:  # another job holds the lock
            raise EmbedInputError(str(e)) from None
        clean_tmp(out, STAGE, shard=shards[0] if single else None)  # type: ignore[index]
        root = local_model_dir(cfg.model)  # a wrong model path fails before any work
        not_ready: list[int] = []
        if shards is None:
            shards = _captions_shards(out, log)
            if not shards:
                raise MissingCaptionsError(f"no complete captions shards in {out / CAPTIONS}; "
                                           "run jobs/caption.py first")
        if explicit:  # asked for by number: a missing or torn captions shard is an error
            captions = {s: read_captions(s, out) for s in shards}
        else:  # --all: a captions shard being rewritten right now is left for a later run
            captions = {}
            for s in shards:
                try:
                    captions[s] = read_captions(s, out)
                except MissingCaptionsError as e:
                    print(f"skipping: {e}", file=log)
                    not_ready.append(s)
            shards = [s for s in shards if s in captions]
        tokenizer = encoder = None
        if root is None:  # a hub id: its files are known once loaded
            tokenizer, encoder = load_text_encoder(cfg.model, cfg.device)
        identity = model_identity(root) if root is not None else encoder_identity(cfg.model, encoder)
        chash = config_hash(cfg, identity)
        todo = []
        for s in shards:
            why = "--force" if force else stale_reason(s, out, chash, captions[s])
            if why is not None:
                if shard_path(out, STAGE, s).exists():
                    print(f"redoing {STAGE}/shard-{s:05d}.arrow: {why}", file=log)
                todo.append(s)
        rows = sum(len(captions[s]) for s in todo)
        print(f"text_emb: {len(shards)} captions shards, {len(todo)} to embed ({rows} rows) with "
              f"{cfg.model} [{chash}] -> {out / STAGE}", file=log)
        result = EmbedJobResult(shards=len(shards), skipped=len(shards) - len(todo), not_ready=not_ready)
        if todo or not empty_prompt_current(out, chash):
            if encoder is None:
                tokenizer, encoder = load_text_encoder(cfg.model, cfg.device)
            ensure_empty_prompt(out, cfg, tokenizer, encoder, identity)
        if actors and not explicit and todo:
            _on_actors(todo, cfg, out, identity, force, actors, rows, show_progress, result)
            todo_local: list[int] = []
        else:
            todo_local = todo
        bar = _bar(rows) if show_progress and todo_local else None
        try:
            for s in todo_local:
                try:
                    build_embed_shard(s, out, cfg, tokenizer, encoder, progress=bar.update if bar else None,
                                      identity=identity, force=force)
                    result.built += 1
                except (EmbedInputError, DiskFullError):
                    raise
                except Exception as e:  # one bad shard does not stop the others; exit 3 at the end
                    result.errors.append(f"shard {s}: {type(e).__name__}: {e}")
        finally:
            if bar:
                bar.close()
        for s in shards:
            side = read_sidecar(shard_path(out, STAGE, s))
            if side is None or side.get("config_hash") != chash:
                continue
            counts = side.get("counts", {})
            result.rows += side["rows"]
            result.failed_captions += counts.get("failed_captions", 0)
            result.truncated_rows += counts.get("truncated_rows", 0)
            result.truncated_tokens += counts.get("truncated_tokens", 0)
            if s in todo:
                result.encoded += counts.get("encoded", 0)
                result.reused += counts.get("reused", 0)
        rebuild_index(out, extra=index_extra)
    return result


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="embed", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.1)
