"""Training data: stream (HQ, LQ, text) rows out of a verified build's Arrow shards.

The trainer never sees photos, captions or the MLLM: it reads the offline build
(docs/data-format.md) through three pieces, after model/training/verify.py's
:func:`verify_build` has checked the build.

* :class:`ShardedPairs` is a map-style dataset over every row of every shard. It holds
  only paths and row counts; each worker process memory-maps the Arrow files itself on
  first use (the OS page cache is shared by all workers and ranks of a machine), so
  nothing large is ever pickled into a worker.
* :class:`EpochSampler` shuffles all rows of the build (across shards) per epoch with
  ``np.random.default_rng([seed, epoch])``, trims the epoch to whole global batches and
  gives each rank its part; it can start at any global batch (exact resume).
* :func:`collate` stacks a batch and pads the text of rows with fewer 77-token chunks
  with copies of the empty-prompt chunk.

:func:`make_loader` assembles them into a :class:`TrainLoader` (a ``DataLoader`` that
counts the batches handed to the trainer, for checkpoints).

Item format (``ShardedPairs[i]`` and ``ShardedPairs[(epoch, i)]``)::

    key        str
    hq         float32 (3, H, W) in [-1, 1]   the stored (USM-sharpened) GT, the VAE's input range
    lq         float32 (3, h, w) in [0, 1]    the raw LQ, for the CLIP image encoder (which
                                               resizes to 224 and applies CLIP mean/std itself)
    lq_up      float32 (3, H, W) in [-1, 1]   LQ upsampled to (H, W) = 4·(h, w) by cv2 bicubic
                                               (INTER_CUBIC on uint8: rounded and clamped to
                                               0..255, so it stays in range), the Processor's input
    text       float16 (77·k, D)              the caption's CLIP hidden states, a read-only view
                                               into the memory-mapped shard (do not modify in
                                               place; `collate` copies it), or the empty prompt
                                               (77, D) when null-text dropout fires
    null_text  bool                           whether the dropout fired for this draw
    epoch, index  int                         the draw (epoch 0 for a plain integer index)
    moments    float16 (2C, H/8, W/8)         only with ``latents=True``: the latents stage's
                                               VAE moments of hq (mean ‖ log-variance), a
                                               read-only view into the memory-mapped shard

The HQ is shipped even with cached moments: the Processor's RGB and FFT losses need the GT
at 1/2, 1/4 and 1/8, and decoding the 512² HQ PNG (which those need either way) is the
loader's main cost; shipping a pyramid instead would save only the uint8 hand-over.

With ``image_dtype=torch.uint8`` hq, lq and lq_up are instead uint8 (3, ·, ·) in 0..255
(lq_up: the same cv2 bicubic result before scaling), and the trainer calls
:func:`images_to_float` on the batch *after* moving it to the GPU; the result is
bit-identical to the float32 path. This moves the uint8 → float conversion to the GPU
and cuts the bytes each worker writes and hands over 4× (see "Speed" below).
The default is float32 everywhere; for training, prefer uint8:

    loader = make_loader(..., image_dtype=torch.uint8)
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch = images_to_float(batch)       # hq, lq_up in [-1, 1], lq in [0, 1], float32

A batch (``collate``) holds the same names stacked: ``hq`` (B, 3, H, W), ``lq``,
``lq_up``, ``text`` float16 (B, 77·kmax, D), ``num_chunks`` int64 (B,) (chunks of the
row's own text: 1 for a dropped caption), ``null_text`` bool (B,), ``keys`` list[str],
``epoch`` and ``index`` int64 (B,). Text stays float16 as stored; cast it on the device.

Speed (benchmarks/train_loader.py, 512², one core): decoding the 512² PNG (~5.3 ms,
zlib inflate + PNG filters, fixed by the pairs format) dominates. The DataLoader fetches
whole batches through ``ShardedPairs.__getitems__``, which converts each image straight
into the batch tensor (in shared memory inside a worker), so collate does not copy
images again; the conversion itself is cv2.split + cv2.LUT (exact, several times faster
than torch's permute/float/div chain). float32 batches cost ~10 ms per sample on one
core, uint8 batches ~6.7 ms: most of the difference is writing (page-faulting) 4× more
fresh shared memory per sample.

Distributed training: every rank calls ``make_loader(..., rank, world_size)``; the ranks'
batches are already disjoint, so do not pass the loader through
``accelerator.prepare`` (it would shard the batch sampler a second time); move batches to
the device yourself.

Exact resume: checkpoint ``loader.state_dict()`` (plain ints, with ``start_batch`` = the
number of batches this rank has *received*, not prefetched) and build the loader of the
resumed run with ``start_batch=state["start_batch"]`` (or call ``load_state_dict`` before
iterating). The resumed run gets the very next batch, with the same null-text draws.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from model.training.verify import BuildError, BuildProblem, Fixes, verify_build
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.embed.encoder import CHUNK_LENGTH, empty_prompt_path, hidden_matrix

__all__ = [
    "load_empty_prompt", "ShardedPairs", "EpochSampler",
    "collate", "make_loader", "TrainLoader", "null_text_uniform", "worker_init", "default_num_workers",
    "images_to_float",
]

_PNG_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


def load_empty_prompt(out: Path, text_folder: str = "text_emb") -> torch.Tensor:
    """float16 (77, D): the stored embedding of "" (null text, classifier-free guidance)."""
    from safetensors.numpy import load_file

    path = empty_prompt_path(out, text_folder)
    hidden = load_file(str(path))["hidden"]
    if hidden.dtype != np.float16 or hidden.ndim != 2 or hidden.shape[0] != CHUNK_LENGTH:
        raise ValueError(f"{path}: 'hidden' is {hidden.dtype} {hidden.shape}, expected float16 ({CHUNK_LENGTH}, D)")
    return torch.from_numpy(np.ascontiguousarray(hidden))


# ==================================================================== dataset ===


_U64 = (1 << 64) - 1


def null_text_uniform(seed: int, epoch: int, index: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, epoch, index).

    A keyed hash rather than an RNG stream: the draw of a row does not depend on which
    worker or rank decodes it, nor on what that worker drew before, so a resumed run
    repeats the interrupted run's dropout exactly. 53 bits, like ``random.random``.
    """
    data = struct.pack("<QQQ", seed & _U64, epoch & _U64, index & _U64)
    h = hashlib.blake2b(data, digest_size=8, person=b"ssp-ir nulltext").digest()
    return (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))


def _decode(buf: pa.Buffer, what: str) -> np.ndarray:
    """PNG bytes (zero-copy from the mapped file) → uint8 (H, W, 3) RGB, decoded as RGB directly."""
    rgb = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), _PNG_FLAGS)
    if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{what}: PNG could not be decoded to RGB")
    return rgb


def _lut(scale: float, offset: float) -> np.ndarray:
    """float32 value of every uint8 level, computed in float64 and rounded once."""
    return (np.arange(256, dtype=np.float64) * scale + offset).astype(np.float32).reshape(1, 256)


_LUT_SIGNED = _lut(1 / 127.5, -1.0)  # 0..255 → [-1, 1], both ends exact
_LUT_UNIT = _lut(1 / 255, 0.0)  # 0..255 → [0, 1]


def _to_chw(rgb: np.ndarray, lut: np.ndarray | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) → (3, H, W): float32 through a 256-entry table, or uint8 planes (lut None).

    cv2.split de-interleaves, cv2.LUT converts straight into the output planes (`out`, e.g.
    a slot of the batch tensor, or a new tensor): several times faster than torch's
    permute-float-div-sub chain (see benchmarks/train_loader.py), and the values are
    exactly x/127.5 − 1 (or x/255) rounded once, so the range ends are exactly ±1
    (a float32 multiply-add gives 1.0000001).
    """
    h, w = rgb.shape[:2]
    if out is None:
        out = torch.empty((3, h, w), dtype=torch.uint8 if lut is None else torch.float32)
    planes = out.numpy()
    if lut is None:
        cv2.split(rgb, [planes[0], planes[1], planes[2]])
    else:
        for c, plane in enumerate(cv2.split(rgb)):
            cv2.LUT(plane, lut, dst=planes[c])
    return out


_IMAGE_LUTS = {"hq": _LUT_SIGNED, "lq": _LUT_UNIT, "lq_up": _LUT_SIGNED}


def images_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn a uint8 batch (``image_dtype=torch.uint8``) into the float32 item ranges, in place,
    on whatever device its tensors are: hq and lq_up to [-1, 1], lq to [0, 1].

    The values are bit-identical to the float32 path (the same 256-entry tables, applied
    by indexing). Float batches pass through unchanged. Call it after moving the batch
    to the GPU: 4× fewer bytes cross the worker → trainer → GPU path.
    """
    for name, lut in _IMAGE_LUTS.items():
        x = batch.get(name)
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            batch[name] = torch.from_numpy(lut.reshape(-1)).to(x.device)[x.int()]
    return batch


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only (memory-mapped) array without copying it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class _Chunked:
    """Row access into an Arrow column split into record batches (no concatenation: zero-copy)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.chunks = column.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def locate(self, row: int) -> tuple[pa.Array, int]:
        j = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.chunks[j], row - int(self.starts[j])


class _OpenShard:
    """One shard's pairs, text_emb (and latents) files, memory-mapped (only in the process that reads)."""

    def __init__(self, out: Path, shard: int, text_folder: str = "text_emb", latents: bool = False) -> None:
        pairs = read_table(shard_path(out, "pairs", shard))
        emb = read_table(shard_path(out, text_folder, shard))
        self.pkey = _Chunked(pairs.column("key"))
        self.hq = _Chunked(pairs.column("hq_png"))
        self.lq = _Chunked(pairs.column("lq_png"))
        self.others = [(text_folder, _Chunked(emb.column("key")))]
        self.hidden = _Chunked(emb.column("hidden"))
        self.moments: _Chunked | None = None
        if latents:
            lat = read_table(shard_path(out, "latents", shard))
            self.others.append(("latents", _Chunked(lat.column("key"))))
            self.moments = _Chunked(lat.column("moments"))
            self.moments_shape = tuple((read_sidecar(shard_path(out, "latents", shard)) or {})["moments"]["shape"])

    def row(self, row: int) -> tuple[str, pa.Buffer, pa.Buffer, np.ndarray, np.ndarray | None]:
        c, r = self.pkey.locate(row)
        key = c[r].as_py()
        for stage, keys in self.others:
            c, r = keys.locate(row)
            other = c[r].as_py()
            if other != key:  # verify_build checked this; a shard swapped under a running trainer is caught here
                raise RuntimeError(f"row {row}: {stage} key {other!r} differs from pairs key {key!r}; "
                                   "the build changed under the trainer, rerun verify_build")
        c, r = self.hq.locate(row)
        hq = c[r].as_buffer()
        c, r = self.lq.locate(row)
        lq = c[r].as_buffer()
        moments = None
        if self.moments is not None:
            c, r = self.moments.locate(row)
            n = c.type.list_size
            moments = c.values.to_numpy(zero_copy_only=True)[r * n:(r + 1) * n].reshape(self.moments_shape)
        c, r = self.hidden.locate(row)
        return key, hq, lq, hidden_matrix(c, r), moments


class ShardedPairs(Dataset):
    """Every row of every shard of a verified build, as training items (see the module doc).

    Global index i runs over shards in id order, then rows in file order. The object
    holds paths, row counts and the small empty-prompt tensor only; Arrow files are
    memory-mapped on first use in the process that reads them (each DataLoader worker),
    and dropped when the object is pickled (spawn/forkserver workers) or forked.

    `seed` and `null_text_ratio` decide the null-text coin of each draw (epoch, index);
    `image_dtype` torch.float32 (default: the item format) or torch.uint8 (0..255, for
    :func:`images_to_float` on the GPU). `shards` None: a quick ``verify_build`` of
    pairs and text_emb picks them.
    """

    def __init__(self, out: Path, shards: Sequence[int] | None = None, *, seed: int = 0,
                 null_text_ratio: float = 0.5, check_hash: bool = False,
                 image_dtype: torch.dtype = torch.float32, text_folder: str = "text_emb",
                 latents: bool = False) -> None:
        if not 0.0 <= null_text_ratio <= 1.0:
            raise ValueError(f"null_text_ratio must be in [0, 1], got {null_text_ratio}")
        if image_dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"image_dtype must be torch.float32 or torch.uint8, got {image_dtype}")
        self.image_dtype = image_dtype
        self._luts = _IMAGE_LUTS if image_dtype == torch.float32 else dict.fromkeys(_IMAGE_LUTS)
        self.out = Path(out)
        self.text_folder, self.latents = text_folder, bool(latents)
        if shards is None:
            stages = ("pairs", text_folder, *(("latents",) if latents else ()))
            shards = verify_build(self.out, stages, check_hash=check_hash, show_progress=False)
        self.shards = tuple(int(s) for s in shards)
        rows = []
        for s in self.shards:
            side = read_sidecar(shard_path(self.out, "pairs", s))
            if side is None:
                raise BuildError(self.out, [BuildProblem("pairs", s, "no sidecar", Fixes(self.out).pairs(s))])
            rows.append(int(side["rows"]))
        self.rows = tuple(rows)
        self.starts = tuple(int(x) for x in np.cumsum([0] + rows))
        self.seed = int(seed)
        self.null_text_ratio = float(null_text_ratio)
        self.empty_prompt = load_empty_prompt(self.out, text_folder)
        self._open: dict[int, _OpenShard] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # never ship mapped tables to another process
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """Global index → (shard id, row in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        j = bisect.bisect_right(self.starts, index) - 1
        return self.shards[j], index - self.starts[j]

    def _shard(self, shard: int) -> _OpenShard:
        if self._pid != os.getpid():  # forked after use: map the files afresh in this process
            self._open, self._pid = {}, os.getpid()
        sh = self._open.get(shard)
        if sh is None:
            sh = self._open[shard] = _OpenShard(self.out, shard, self.text_folder, self.latents)
        return sh

    def null_text(self, epoch: int, index: int) -> bool:
        """Whether null-text dropout fires for draw (epoch, index); depends on nothing else."""
        return null_text_uniform(self.seed, epoch, index) < self.null_text_ratio

    @staticmethod
    def _draw(item: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(item, tuple):
            return int(item[0]), int(item[1])
        return 0, int(item)

    def _load(self, epoch: int, index: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        """(item without images, HQ, LQ, LQ↑) with the images as uint8 (H, W, 3) RGB."""
        shard, row = self.locate(index)
        key, hq_png, lq_png, hidden, moments = self._shard(shard).row(row)
        hq = _decode(hq_png, f"{key} hq")
        lq = _decode(lq_png, f"{key} lq")
        h, w = hq.shape[:2]
        lq_up = cv2.resize(lq, (w, h), interpolation=cv2.INTER_CUBIC)
        null = self.null_text(epoch, index)
        item = {"key": key, "text": self.empty_prompt if null else _readonly_tensor(hidden),
                "null_text": null, "epoch": epoch, "index": index}
        if moments is not None:
            item["moments"] = _readonly_tensor(moments)
        return item, hq, lq, lq_up

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        meta, hq, lq, lq_up = self._load(*self._draw(item))
        return {**meta, **{name: _to_chw(img, self._luts[name])
                           for name, img in (("hq", hq), ("lq", lq), ("lq_up", lq_up))}}

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> "_Batch":
        """A whole batch (the DataLoader's fetcher calls this instead of __getitem__).

        The same items as ``[self[i] for i in items]``, but the images are converted
        straight into batch tensors (in shared memory inside a worker) and the items'
        hq / lq / lq_up are views of them, so :func:`collate` needs no stacking copy:
        at 512² that saves ~6 MB of copying per sample.
        """
        out: _Batch = _Batch()
        for b, it in enumerate(items):
            meta, hq, lq, lq_up = self._load(*self._draw(it))
            if b == 0:
                out.images = {name: _empty((len(items), 3, *img.shape[:2]), self.image_dtype)
                              for name, img in (("hq", hq), ("lq", lq), ("lq_up", lq_up))}
            elif hq.shape != (*out.images["hq"].shape[2:], 3) or lq.shape != (*out.images["lq"].shape[2:], 3):
                raise ValueError(f"{meta['key']}: images of {hq.shape[:2]} / {lq.shape[:2]} in a batch of "
                                 f"{tuple(out.images['hq'].shape[2:])} / {tuple(out.images['lq'].shape[2:])}; "
                                 "a build holds one GT size (verify_build checks one configuration per stage)")
            out.append({**meta, **{name: _to_chw(img, self._luts[name], out.images[name][b])
                                   for name, img in (("hq", hq), ("lq", lq), ("lq_up", lq_up))}})
        return out


class _Batch(list):
    """Items of one batch whose images are views of the batch tensors in `images`."""

    images: dict[str, torch.Tensor]


# ==================================================================== sampler ===


class EpochSampler(Sampler):
    """(epoch, index) draws for one rank: all rows shuffled per epoch, whole global batches.

    Epoch e is ``np.random.default_rng([seed, e]).permutation(num_samples)``, a shuffle of
    every row of the build across shards, trimmed to a multiple of the global batch
    ``world_size × batch_size`` (the dropped tail differs every epoch, so no row is
    left out for long). Global batch g of the epoch is the contiguous slice
    ``[g·W·B, (g+1)·W·B)`` of that order, and rank r takes its r-th sub-slice of B. So:

    * ranks are disjoint and together cover the trimmed epoch, every rank has the same
      number of full batches (no rank waits on a short last batch in DDP);
    * the *global* batches depend only on (seed, W·B): a run resumed on another number
      of GPUs with the same global batch sees the same data in the same steps.

    Samples, not shards, are split across ranks: shards differ in size (failed rows,
    the last shard), and a shard-per-rank split would give ranks unequal work and
    correlated batches (crops of the same photos sit in the same shard). Random access
    is cheap here, since every rank memory-maps the files and decoding dominates.

    ``start_batch`` counts batches (per rank; equal for all ranks, = the global step
    with no gradient accumulation) already consumed: iteration starts at exactly the next
    one. ``max_batches`` (optional) stops after that many batches in all (counting the
    skipped ones); otherwise the sampler runs forever over epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, max_batches: int | None = None) -> None:
        for name, v, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1),
                             ("world_size", world_size, 1), ("seed", seed, 0), ("rank", rank, 0),
                             ("start_batch", start_batch, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} must be below world_size {world_size}")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = int(start_batch)
        self.max_batches = None if max_batches is None else int(max_batches)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} rows cannot fill one global batch of {self.global_batch} "
                             f"({world_size} ranks × {batch_size})")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch (= global steps per epoch)."""
        return self.num_samples // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The trimmed global order of epoch `epoch` (all ranks)."""
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)
        return perm[: self.batches_per_epoch * self.global_batch]

    def rank_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size): this rank's batches of epoch `epoch`, in order."""
        order = self.epoch_order(epoch).reshape(self.batches_per_epoch, self.world_size, self.batch_size)
        return order[:, self.rank, :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.start_batch
        while self.max_batches is None or b < self.max_batches:
            epoch, first = divmod(b, self.batches_per_epoch)
            mine = self.rank_batches(epoch).tolist()
            for batch in mine[first:]:
                if self.max_batches is not None and b >= self.max_batches:
                    return
                for i in batch:
                    yield (epoch, i)
                b += 1

    def __len__(self) -> int:
        if self.max_batches is None:
            raise TypeError("EpochSampler without max_batches is infinite and has no length")
        return max(0, self.max_batches - self.start_batch) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Plain ints; ``start_batch`` is where the next iteration starts (see TrainLoader for
        the count of batches actually consumed)."""
        sd = {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
              "world_size": self.world_size, "rank": self.rank, "start_batch": self.start_batch}
        if self.max_batches is not None:
            sd["max_batches"] = self.max_batches
        return sd

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`'s ``start_batch``. The data order must be the same: the seed,
        the number of rows and the global batch must match (rank and world size may
        change as long as the global batch does not)."""
        gb = int(state["batch_size"]) * int(state["world_size"])
        mismatch = [f"{n} {a} != {b}" for n, a, b in (("seed", state["seed"], self.seed),
                                                      ("num_samples", state["num_samples"], self.num_samples),
                                                      ("global batch", gb, self.global_batch)) if a != b]
        if mismatch:
            raise ValueError("cannot resume this data order: " + ", ".join(mismatch))
        self.start_batch = int(state["start_batch"])
        if "max_batches" in state:
            self.max_batches = int(state["max_batches"])


# ==================================================================== collate ===


def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when called inside a DataLoader worker.

    As torch's default_collate does: the batch is written once into shared memory and
    handed to the main process by handle, instead of being built in private memory and
    then copied into shared memory when it is sent.
    """
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = _empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
    return torch.stack(list(tensors), 0, out=out)


def _images(batch: Sequence[dict[str, Any]], name: str) -> torch.Tensor:
    """The batch tensor of one image kind: the one `__getitems__` filled when the items are
    still its views (the usual path), else a stack of the items' tensors."""
    whole = getattr(batch, "images", {}).get(name)
    if whole is not None and len(whole) == len(batch) and all(
            b[name].data_ptr() == whole[i].data_ptr() for i, b in enumerate(batch)):
        return whole
    return _stack([b[name] for b in batch])


def collate(batch: Sequence[dict[str, Any]], empty_prompt: torch.Tensor) -> dict[str, Any]:
    """Stack items; pad text to the batch's largest chunk count with empty-prompt chunks.

    Why copies of the empty-prompt chunk and no attention mask: SD's long-prompt
    practice (A1111/compel, diffusers' long-prompt pipelines) encodes each 77-token chunk
    separately and concatenates them; a chunk of "" is what the text encoder says about
    nothing, the same conditioning null-text dropout and classifier-free guidance train
    and sample with. Padding with it changes the cross-attention softmax only by adding
    keys that carry "no content" rather than zeros (which would be out of distribution:
    a zero key still takes attention weight and a zero value pulls the output to 0), so
    the UNet's cross-attention needs no mask and stays SD1.5's.
    """
    if not batch:
        raise ValueError("empty batch")
    texts = [b["text"] for b in batch]
    width = empty_prompt.shape[1]
    ks = []
    for b, t in zip(batch, texts):
        if t.ndim != 2 or t.shape[1] != width or t.shape[0] % CHUNK_LENGTH or t.shape[0] == 0:
            raise ValueError(f"{b['key']}: text has shape {tuple(t.shape)}, expected (77·k, {width})")
        ks.append(t.shape[0] // CHUNK_LENGTH)
    kmax = max(ks)
    text = _empty((len(batch), kmax * CHUNK_LENGTH, width), empty_prompt.dtype)
    for i, (t, k) in enumerate(zip(texts, ks)):
        text[i, : k * CHUNK_LENGTH].copy_(t)
        if k < kmax:
            text[i, k * CHUNK_LENGTH:].view(kmax - k, CHUNK_LENGTH, width).copy_(empty_prompt)
    extra = {"moments": _stack([b["moments"] for b in batch])} if "moments" in batch[0] else {}
    return {
        "keys": [b["key"] for b in batch],
        **{name: _images(batch, name) for name in ("hq", "lq", "lq_up")},
        **extra,
        "text": text,
        "num_chunks": torch.tensor(ks, dtype=torch.int64),
        "null_text": torch.tensor([bool(b["null_text"]) for b in batch], dtype=torch.bool),
        "epoch": torch.tensor([int(b["epoch"]) for b in batch], dtype=torch.int64),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.int64),
    }


# ===================================================================== loader ===


def worker_init(worker_id: int) -> None:
    """Per worker process: one OpenCV thread (the workers are the parallelism; OpenCV's
    own thread pool would only contend with them), no OpenCL."""
    cv2.setNumThreads(1)
    cv2.ocl.setUseOpenCL(False)
    torch.set_num_threads(1)


def default_num_workers() -> int:
    """min(8, CPUs available to this process / local ranks), at least 1 — never 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cpus // local))


class TrainLoader(DataLoader):
    """A DataLoader that counts the batches it has handed out, for exact resume.

    The sampler runs ahead of the trainer by the prefetched batches, so only the loader
    knows how many batches were *consumed*; ``state_dict()`` reports that as
    ``start_batch``. Iterating again (e.g. after ``load_state_dict``) restarts from the
    sampler's ``start_batch``.
    """

    batches_consumed: int = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.batches_consumed = self.sampler.start_batch
        for batch in super().__iter__():
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {**self.sampler.state_dict(), "start_batch": self.batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self.batches_consumed = self.sampler.start_batch


def make_loader(out: Path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None, start_batch: int = 0, null_text_ratio: float = 0.5,
                pin_memory: bool | None = None, *, max_batches: int | None = None, prefetch_factor: int = 4,
                shards: Sequence[int] | None = None, check_hash: bool = False,
                image_dtype: torch.dtype = torch.float32, text_folder: str = "text_emb",
                latents: bool = False) -> TrainLoader:
    """The training loader of one rank (see the module doc for the batch format).

    ``image_dtype=torch.uint8`` is the fast path (recommended for training): batches carry
    hq, lq, lq_up as uint8 (B, 3, ·, ·) in 0..255; move the batch to the GPU, then call
    :func:`images_to_float` to get exactly the float32 [-1, 1] / [0, 1] tensors of the
    item format. That keeps a worker above 100 samples/s per core at 512²
    (benchmarks/train_loader.py: ~118 vs ~92 with float32 batches, whose 4× larger shared
    memory costs ~2 ms per sample in page faults alone) and makes the pinned-memory copy
    in the main process 4× smaller. The default, float32, gives the item format directly.

    `shards`: the ids ``verify_build`` returned (the trainer verifies with hashes first);
    when None, a quick ``verify_build(check_hash=check_hash)`` runs here. `num_workers`
    defaults to :func:`default_num_workers` (never 0; pass 0 explicitly to debug in
    process). Shuffling is always on: the order is the :class:`EpochSampler`'s.
    `pin_memory` defaults to whether CUDA is available.
    """
    out = Path(out)
    if shards is None:
        stages = ("pairs", text_folder, *(("latents",) if latents else ()))
        shards = verify_build(out, stages, check_hash=check_hash, show_progress=rank == 0)
    dataset = ShardedPairs(out, shards, seed=seed, null_text_ratio=null_text_ratio, image_dtype=image_dtype,
                           text_folder=text_folder, latents=latents)
    sampler = EpochSampler(len(dataset), batch_size, seed, rank=rank, world_size=world_size,
                           start_batch=start_batch, max_batches=max_batches)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "worker_init_fn": worker_init}
    return TrainLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       collate_fn=functools.partial(collate, empty_prompt=dataset.empty_prompt),
                       pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
                       drop_last=True, **extra)
