"""Shard files and their sidecars: the commit protocol every stage shares.

A shard is an Arrow IPC stream; its sidecar JSON is written last and its presence
means the shard is complete. Both go through ``*.tmp`` + fsync + ``os.replace`` so a
kill at any instant leaves either the old complete state or the new one, never a torn
file, and a rerun can decide per shard whether to redo it by comparing the sidecar
with the file and the current configuration.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

STAGES = ("pairs", "captions", "text_emb", "latents")
SHARD_GLOB = "shard-[0-9][0-9][0-9][0-9][0-9].arrow"
_SHARD_NAME = re.compile(r"^shard-(\d{5})\.arrow$")


class DiskFullError(OSError):
    """Raised instead of a bare ENOSPC so the message says where and what to do."""


class LockHeldError(RuntimeError):
    """Another job is writing the same stage (or shard) into the same output root."""


def shard_path(out: Path, stage: str, shard: int) -> Path:
    return Path(out) / stage / f"shard-{shard:05d}.arrow"


def sidecar_path(arrow: Path) -> Path:
    return arrow.with_name(arrow.name + ".json")


def stage_folder(stage: str, variant: str = "") -> str:
    """A stage's folder in the output root: `captions`, or `captions-blip` for a variant
    built beside it from the same pairs (another captioner, its own embeddings)."""
    return f"{stage}-{variant}" if variant else stage


def stage_kind(folder: str) -> str:
    """The stage a folder holds: `captions-blip` → `captions`."""
    return folder.split("-", 1)[0]


def shard_id(path: Path | str) -> int:
    """The number in ``shard-00042.arrow``; the one place that parses shard file names."""
    m = _SHARD_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a shard file name (shard-NNNNN.arrow)")
    return int(m.group(1))


def shard_files(out: Path, stage: str) -> list[tuple[int, Path]]:
    """(id, path) of every shard file of a stage, complete or not, sorted by id."""
    return sorted((shard_id(p), p) for p in (Path(out) / stage).glob(SHARD_GLOB))


def complete_shards(out: Path, stage: str) -> list[int]:
    """Ids of a stage's shards whose sidecar exists (written last: the shard finished)."""
    return [s for s, p in shard_files(out, stage) if read_sidecar(p) is not None]


def _tmp_name(path: Path) -> Path:
    # Unique per writer: a straggling worker of a killed run can never write into the
    # temporary file of the run that replaced it.
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reraise_disk_full(e: OSError, path: Path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(e.errno, f"disk full while writing {path}; free space or choose another --out") from e
    raise e


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Any]:
    """Open a temporary file that becomes `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _reraise_disk_full(e, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    with atomic_file(path) as f:
        f.write(data)


class ShardWriter:
    """Streams record batches into a temporary Arrow file; `commit` publishes it.

    Rows are flushed in small batches so a worker's memory does not grow with the
    shard size. The file's sha256 is computed while writing, saving a second read.
    """

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int = 16) -> None:
        self.path = Path(path)
        self.schema = schema
        self.batch_rows = batch_rows
        self._rows: list[dict[str, Any]] = []
        self.rows_written = 0
        self._ctx = atomic_file(self.path)
        self._file = self._ctx.__enter__()
        self._hash = hashlib.sha256()
        self._sink = _HashingSink(self._file, self._hash)
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        batch = pa.RecordBatch.from_pylist(self._rows, schema=self.schema)
        try:
            self._writer.write_batch(batch)
        except OSError as e:
            self.abort()
            _reraise_disk_full(e, self.path)
        self.rows_written += len(self._rows)
        self._rows = []

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Write a whole record batch (built column-wise, e.g. from numpy) as is.

        Stages whose columns are large numeric arrays build them without Python lists;
        rows queued with `add` are flushed first so the file keeps the caller's order.
        """
        if not batch.schema.equals(self.schema):
            raise ValueError(f"record batch schema differs from the shard's:\n{batch.schema}\nvs\n{self.schema}")
        self._flush()
        try:
            self._writer.write_batch(batch)
        except OSError as e:
            self.abort()
            _reraise_disk_full(e, self.path)
        self.rows_written += batch.num_rows

    def commit(self) -> tuple[int, str]:
        """Finish the stream and publish it; returns (bytes, sha256)."""
        self._flush()
        self._writer.close()
        size = self._sink.size
        self._ctx.__exit__(None, None, None)
        return size, self._hash.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class _HashingSink:
    """A file-like object pyarrow writes through; hashes and counts on the way."""

    def __init__(self, f: Any, h: Any) -> None:
        self._f, self._h, self.size, self.closed = f, h, 0, False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self._h.update(mv)
        self._f.write(mv)
        self.size += mv.nbytes
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_sidecar(arrow: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar_path(arrow).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verify_shard(arrow: Path, expect: dict[str, Any] | None = None, check_hash: bool = True,
                 legacy: dict[str, Any] | None = None) -> str | None:
    """Why the shard cannot be trusted, or None when it is complete and current.

    `expect` holds sidecar fields that must match the current run (config hash,
    inputs hash); the file must exist with the recorded size and sha256. `legacy` gives
    the value a field had before sidecars recorded it, so older complete builds stay valid.
    """
    side = read_sidecar(arrow)
    if side is None:
        return "no sidecar (never finished)"
    for k, v in (expect or {}).items():
        found = side.get(k, (legacy or {}).get(k))
        if found != v:
            return f"{k} changed ({found} -> {v})"
    try:
        size = arrow.stat().st_size
    except OSError:
        return "arrow file missing"
    if size != side.get("bytes"):
        return f"size {size} differs from sidecar {side.get('bytes')}"
    if check_hash and sha256_file(arrow) != side.get("sha256"):
        return "sha256 differs from sidecar"
    return None


def read_table(arrow: Path) -> pa.Table:
    """Memory-mapped read; the table's buffers point into the page cache."""
    with pa.memory_map(str(arrow)) as source:
        return pa.ipc.open_stream(source).read_all()


def clean_tmp(out: Path, stage: str, shard: int | None = None) -> list[Path]:
    """Remove temporary files of killed runs of one stage (or one shard of it).

    Call only while holding the matching lock: a live writer's temporary file looks
    exactly like a dead one's.
    """
    folder = Path(out) / stage
    pattern = "*.tmp" if shard is None else f"shard-{shard:05d}.arrow*.tmp"
    removed = []
    for p in folder.glob(pattern):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def build_lock(out: Path, stage: str, shard: int | None = None) -> Iterator[None]:
    """One writer per stage (or per shard of a stage) and output root; a second fails fast.

    Per-shard locks let many `--shard N` jobs of one stage run side by side (one per
    GPU), while a whole-stage job excludes them all.
    """
    import fcntl

    Path(out).mkdir(parents=True, exist_ok=True)
    names = [f".{stage}.lock"] if shard is None else [f".{stage}.lock", f".{stage}-{shard:05d}.lock"]
    fds = []
    try:
        for i, name in enumerate(names):
            fd = os.open(Path(out) / name, os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            # A shard job shares the stage lock with other shard jobs and excludes a
            # whole-stage job; the shard lock is exclusive.
            mode = fcntl.LOCK_SH if (shard is not None and i == 0) else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                what = f"shard {shard} of {stage}" if shard is not None else stage
                raise LockHeldError(f"another job is writing {what} in {out} (lock {Path(out) / name}); "
                                    "wait for it or use another --out") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)
