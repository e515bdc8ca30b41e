"""Build verification: refuse a build that cannot be trained on *before* a GPU hour is spent.

:func:`verify_build` checks every shard of every stage present and committed (sidecar,
size, sha256), the same shard ids in every stage, each stage made from the current bytes of
the stage before it, keys identical row for row, the empty-prompt embedding present and
made by the shards' text encoder. Each :class:`BuildProblem` names the shard, the stage,
what is wrong and the command that fixes it; :class:`BuildError` carries them all.
:func:`build_fingerprint` identifies a verified build (shard ids, rows, bytes) so that a
resumed training run can refuse a build that changed under it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from pipeline.core.shards import (
    SHARD_GLOB, STAGES, read_sidecar, read_table, shard_id, shard_path, stage_folder, stage_kind, verify_shard,
)
from pipeline.embed.encoder import CHUNK_LENGTH, EMPTY_PROMPT_FILE

__all__ = ["BuildError", "BuildProblem", "verify_build", "build_fingerprint", "Fixes", "train_stages"]

TRAIN_STAGES = ("pairs", "captions", "text_emb")


def train_stages(variant: str = "") -> tuple[str, ...]:
    """The stage folders a training run reads: pairs, and the captions and embeddings of the
    manifest's caption variant ("" → captions/, text_emb/; "blip" → captions-blip/, text_emb-blip/)."""
    return ("pairs", stage_folder("captions", variant), stage_folder("text_emb", variant))




@dataclasses.dataclass(frozen=True)
class BuildProblem:
    """One reason the build cannot be trained on."""

    stage: str
    shard: int | None  # None: the build as a whole (e.g. the empty-prompt file)
    what: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.stage} shard {self.shard} ({self.stage}/shard-{self.shard:05d}.arrow)" \
            if self.shard is not None else self.stage
        return f"{where}: {self.what}; fix: {self.fix}"


class BuildError(RuntimeError):
    """The build at `out` is incomplete or inconsistent; `problems` lists every finding."""

    def __init__(self, out: Path, problems: Sequence[BuildProblem], note: str = "") -> None:
        self.out = Path(out)
        self.problems = list(problems)
        lines = [f"the build at {out} is not ready for training ({len(self.problems)} problem"
                 f"{'s' if len(self.problems) != 1 else ''}{note}):"]
        lines += [f"  - {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        super().__init__("\n".join(lines))


class Fixes:
    """The commands that repair each stage (DESIGN.md section 1), with the build's manifest."""

    def __init__(self, out: Path) -> None:
        manifest = None
        try:
            manifest = json.loads((Path(out) / "index.json").read_text()).get("manifest")
        except (OSError, ValueError, AttributeError):
            pass
        self.m = f"--manifest {manifest}" if manifest else f"--manifest MANIFEST.json --out {out}"

    def pairs(self, shard: int | None = None) -> str:
        then = f", then {self.captions(shard)}" if shard is not None else ""
        return f"python jobs/degrade.py {self.m} (rebuilds missing or damaged pairs shards){then}"

    def captions(self, shard: int | None, force: bool = False) -> str:
        s = f"--shard {shard}" if shard is not None else "--all"
        return (f"python jobs/caption.py {self.m} {s}{' --force' if force else ''}, "
                f"then {self.text_emb(shard)}")

    def text_emb(self, shard: int | None, force: bool = False) -> str:
        s = f"--shard {shard}" if shard is not None else "--all"
        return f"python jobs/embed.py {self.m} {s}{' --force' if force else ''}"

    def latents(self, shard: int | None, force: bool = False) -> str:
        s = f"--shard {shard}" if shard is not None else "--all"
        return f"python jobs/latents.py {self.m} {s}{' --force' if force else ''}"

    def of(self, stage: str, shard: int | None, force: bool = False) -> str:
        kind = stage_kind(stage)
        if kind == "pairs":
            return self.pairs(shard)
        if kind == "captions":
            return self.captions(shard, force)
        if kind == "latents":
            return self.latents(shard, force)
        return self.text_emb(shard, force)


def _stage_ids(out: Path, stage: str) -> set[int]:
    """Shard ids that have an Arrow file or a sidecar in `stage` (either alone is a problem)."""
    folder = Path(out) / stage
    ids = {shard_id(p) for p in folder.glob(SHARD_GLOB)}
    ids |= {shard_id(p.with_suffix("")) for p in folder.glob(SHARD_GLOB + ".json")}
    return ids


def _check_empty_prompt(out: Path, sides: dict[int, dict[str, Any]], fixes: Fixes,
                        folder: str = "text_emb") -> list[BuildProblem]:
    from safetensors import safe_open

    name = Path(folder) / EMPTY_PROMPT_FILE
    path = Path(out) / name
    any_shard = min(sides) if sides else 0
    fix = f"{fixes.text_emb(any_shard)} (any shard: the embed job rewrites the empty prompt when it is missing)"
    if not path.is_file():
        return [BuildProblem(folder, None, f"{name} is missing (needed for null-text dropout)", fix)]
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            shape = tuple(f.get_slice("hidden").get_shape())
    except Exception as e:  # truncated or foreign file
        return [BuildProblem(folder, None, f"{name} is unreadable ({type(e).__name__}: {e})", fix)]
    widths = {s.get("hidden_size") for s in sides.values()} - {None}
    if len(shape) != 2 or shape[0] != CHUNK_LENGTH or (widths and shape[1] not in widths):
        return [BuildProblem(folder, None, f"{name} has shape {shape}, expected "
                             f"({CHUNK_LENGTH}, {sorted(widths)[0] if widths else 'D'})", fix)]
    hashes = {s.get("config_hash") for s in sides.values()} - {None}
    if meta.get("config_hash") and hashes and meta["config_hash"] not in hashes:
        return [BuildProblem(folder, None, f"{name} was made by another text encoder or "
                             f"configuration ({meta['config_hash']}) than the shards ({sorted(hashes)[0]})", fix)]
    return []


def _structure(out: Path, stages: Sequence[str], fixes: Fixes
               ) -> tuple[list[int], dict[str, dict[int, dict[str, Any]]], list[BuildProblem]]:
    """Everything that can be checked from sidecars and file sizes (fast)."""
    problems: list[BuildProblem] = []
    present = {st: _stage_ids(out, st) for st in stages}
    ids = sorted(set().union(*present.values()))
    if not ids:
        first = stages[0]
        return [], {}, [BuildProblem(first, None, f"no shards in {Path(out) / first}", fixes.of(first, None))]
    for gap in sorted(set(range(ids[-1] + 1)) - set(ids)):
        problems.append(BuildProblem(stages[0], gap, "missing in every stage (shard ids must run 0..N-1)",
                                     fixes.of(stages[0], gap)))
    sides: dict[str, dict[int, dict[str, Any]]] = {st: {} for st in stages}
    for st in stages:
        if not present[st]:  # a whole stage not run yet: one line, not one per shard
            problems.append(BuildProblem(st, None, f"stage not built: no shards in {Path(out) / st}",
                                         fixes.of(st, None)))
            continue
        for s in ids:
            arrow = shard_path(out, st, s)
            if s not in present[st]:
                problems.append(BuildProblem(st, s, "missing (no shard file, no sidecar)", fixes.of(st, s)))
                continue
            why = verify_shard(arrow, {"stage": st, "shard": s}, check_hash=False)
            if why is not None:
                problems.append(BuildProblem(st, s, why, fixes.of(st, s)))
                continue
            sides[st][s] = read_sidecar(arrow)  # type: ignore[assignment]
    for st in stages:  # one configuration per stage: a mixed build would mix GT sizes or caption models
        by_hash: dict[Any, list[int]] = {}
        for s, side in sides[st].items():
            by_hash.setdefault(side.get("config_hash"), []).append(s)
        if len(by_hash) > 1:
            common = max(by_hash, key=lambda h: len(by_hash[h]))
            for h, shards in by_hash.items():
                if h != common:
                    for s in shards:
                        problems.append(BuildProblem(st, s, f"built with another configuration ({h}) than "
                                                     f"the other shards ({common})", fixes.of(st, s, force=True)))
    for s in ids:
        rows = {st: sides[st][s].get("rows") for st in stages if s in sides[st]}
        first = next(iter(rows), None)
        for st, n in rows.items():
            if n != rows[first]:
                problems.append(BuildProblem(st, s, f"{n} rows, {first} has {rows[first]}", fixes.of(st, s)))
        # Each stage must have been made from the current bytes of the stage before it.
        captions = next((st for st in stages if stage_kind(st) == "captions"), "captions")
        chain = [(st, "pairs", lambda d: d.get("pairs_sha256")) for st in stages
                 if stage_kind(st) in ("captions", "latents")]
        chain += [(st, captions, lambda d: d.get("captions_sha256") or (d.get("inputs") or {}).get("captions_sha256"))
                  for st in stages if stage_kind(st) == "text_emb"]
        for st, before, made_from in chain:
            if s in sides.get(st, {}) and s in sides.get(before, {}):
                src = made_from(sides[st][s])
                if src is not None and src != sides[before][s].get("sha256"):
                    problems.append(BuildProblem(st, s, f"made from an older {before} shard ({before} was rebuilt "
                                                 "since)", fixes.of(st, s)))
    for st in stages:
        if stage_kind(st) == "text_emb" and present[st]:
            problems += _check_empty_prompt(out, sides[st], fixes, st)
    return ids, sides, problems


def _hash_all(out: Path, stages: Sequence[str], ids: Sequence[int], sides: dict[str, dict[int, dict[str, Any]]],
              fixes: Fixes, progress: bool, workers: int | None) -> list[BuildProblem]:
    """sha256 of every shard file in one pass over the bytes, with one progress bar.

    A few files are hashed at once (hashlib releases the GIL on large blocks), which keeps
    a fast disk or a network filesystem busy; each byte is read exactly once.
    """
    from tqdm import tqdm

    jobs = [(st, s) for s in ids for st in stages]
    total = sum(sides[st][s]["bytes"] for st, s in jobs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify sha256",
               disable=not progress, dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    lock = threading.Lock()

    def one(job: tuple[str, int]) -> BuildProblem | None:
        st, s = job
        h = hashlib.sha256()
        try:
            with open(shard_path(out, st, s), "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    with lock:
                        bar.update(len(block))
        except OSError as e:
            return BuildProblem(st, s, f"unreadable ({e.strerror or e})", fixes.of(st, s))
        if h.hexdigest() != sides[st][s].get("sha256"):
            return BuildProblem(st, s, "sha256 differs from its sidecar (damaged or overwritten bytes)",
                                fixes.of(st, s))
        return None

    n = workers or min(4, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return [p for p in pool.map(one, jobs) if p is not None]
    finally:
        bar.close()


def _keys(out: Path, stage: str, shard: int) -> list[str]:
    """The key column only: the file is memory-mapped, so other columns are never read."""
    return read_table(shard_path(out, stage, shard)).column("key").to_pylist()


def _check_keys(out: Path, stages: Sequence[str], ids: Sequence[int], fixes: Fixes) -> list[BuildProblem]:
    problems = []
    for s in ids:
        keys: dict[str, list[str]] = {}
        for st in stages:
            try:
                keys[st] = _keys(out, st, s)
            except (pa.ArrowException, OSError, KeyError) as e:
                problems.append(BuildProblem(st, s, f"unreadable Arrow stream ({type(e).__name__}: {e})",
                                             fixes.of(st, s)))
        if not keys:
            continue
        ref_stage = stages[0] if stages[0] in keys else next(iter(keys))
        ref = keys[ref_stage]
        if len(set(ref)) != len(ref):
            problems.append(BuildProblem(ref_stage, s, "duplicate keys", fixes.of(ref_stage, s)))
        for st, k in keys.items():
            if st == ref_stage or k == ref:
                continue
            if len(k) != len(ref):
                what = f"{len(k)} keys, {ref_stage} has {len(ref)}"
            else:
                i = next(j for j, (a, b) in enumerate(zip(k, ref)) if a != b)
                what = (f"keys differ from {ref_stage} from row {i} on ({k[i]!r} vs {ref[i]!r}); "
                        + ("same keys in another order" if sorted(k) == sorted(ref) else "different keys"))
            problems.append(BuildProblem(st, s, what, fixes.of(st, s, force=True)))
    return problems


def verify_build(out: Path, stages: Sequence[str] = TRAIN_STAGES, *,
                 check_hash: bool = True, show_progress: bool = True, hash_workers: int | None = None) -> list[int]:
    """The shard ids of a complete, consistent build; raises :class:`BuildError` otherwise.

    Checks, cheapest first (a build that fails a cheap check is not hashed):

    1. every shard id 0..N-1 present in every stage, each with a sidecar, the recorded
       size, its own stage and id in the sidecar (``pipeline.core.shards.verify_shard``);
       one configuration per stage; equal row counts across stages; captions made from
       the current pairs bytes, text_emb from the current captions bytes (the sha256 each
       sidecar recorded of its input); the empty-prompt embedding present, (77, D) with
       the shards' D and their encoder;
    2. with ``check_hash`` (the trainer's default), the sha256 of every file, in one
       pass over the bytes with a progress bar (tens of GB take minutes; ``False`` for
       a quick check);
    3. keys of every stage identical to pairs' and in the same order (key columns only).

    Every problem found at a level is reported at once, each naming the stage, the
    shard, what is wrong and the command that fixes it.
    """
    out = Path(out)
    stages = tuple(stages)
    unknown = [s for s in stages if stage_kind(s) not in STAGES]
    if not stages or unknown:
        raise ValueError(f"stages must be stage folders of {STAGES} (or their variants), got {stages}")
    stages = tuple(sorted(stages, key=lambda s: (STAGES.index(stage_kind(s)), s)))  # pipeline order: pairs first
    if not out.is_dir():
        raise BuildError(out, [BuildProblem(stages[0], None, f"output root {out} does not exist",
                                            Fixes(out).of(stages[0], None))])
    fixes = Fixes(out)
    ids, sides, problems = _structure(out, stages, fixes)
    if problems:
        raise BuildError(out, problems, note="; sha256 and keys not checked yet" if check_hash else "")
    if check_hash:
        problems = _hash_all(out, stages, ids, sides, fixes, show_progress, hash_workers)
        if problems:
            raise BuildError(out, problems)
    problems = _check_keys(out, stages, ids, fixes)
    if problems:
        raise BuildError(out, problems)
    return ids


def build_fingerprint(out: Path, shards: Sequence[int], stages: Sequence[str] = ("pairs", "text_emb")
                      ) -> dict[str, Any]:
    """What a training run trains on, from the sidecars of a verified build: the shard ids, the
    rows of each, and a sha256 over every (stage, shard, file sha256). Two builds with the same
    fingerprint hold the same bytes in the same order."""
    h = hashlib.sha256()
    rows = []
    for s in shards:
        for st in stages:
            side = read_sidecar(shard_path(out, st, s)) or {}
            h.update(f"{st}/{s}/{side.get('sha256')}\n".encode())
            if st == stages[0]:
                rows.append(int(side.get("rows", 0)))
    return {"shards": [int(s) for s in shards], "rows": rows, "total_rows": sum(rows), "sha256": h.hexdigest()}
