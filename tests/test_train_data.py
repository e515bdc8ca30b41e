"""The trainer's data path (model/training/data.py) on a real small build.

The build is made once for the module through the real stages: serial degrade (4
photos × 3 crops at 128², 4 rows per shard → 3 shards), captions from the tiny random
LLaVA (transformers engine) with two person-written long captions per shard so rows have
1, 2 and 3 text chunks, and embeddings from the tiny SD1.5 text encoder. Tests that
damage the build work on a copy.
"""

from __future__ import annotations

import itertools
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import write_manifest
from model.training.data import EpochSampler, ShardedPairs, collate, default_num_workers, make_loader
from model.training.verify import BuildError, verify_build
from pipeline.caption.stage import run_captions
from pipeline.degrade.stage import run_degrade
from pipeline.embed.stage import run_embed
from pipeline.core.image_io import decode_png
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import ShardWriter, atomic_write_json, read_sidecar, read_table, shard_path, sidecar_path, \
    verify_shard

WORDS = ("a weathered stone bridge crosses a slow green river under a pale morning sky while two "
         "children in red coats lean on the rail and watch ducks drift past reeds and old willow trees").split()


def _long_caption(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(WORDS), words))


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, tiny_models: dict[str, Path]) -> Path:
    d = tmp_path_factory.mktemp("train_build")
    out = d / "out"
    m = write_manifest(d / "m.json", [{"name": "sk", "root": str(photo_dir)}], out, sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": 8,
                    "batch_size": 4, "max_failed_fraction": 0.0},
        "text_embed": {"model": str(tiny_models["sd15"]), "max_chunks": 3},
    }, crops_per_image=3, rows_per_shard=4)
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    for s in range(3):
        keys = read_table(shard_path(out, "pairs", s)).column("key").to_pylist()
        overrides = {keys[s % len(keys)]: _long_caption(110), keys[(s + 1) % len(keys)]: _long_caption(190)}
        run_captions(out, manifest.caption, s, overrides, show_progress=False)
    result = run_embed(out, manifest.text_embed, show_progress=False)
    assert result.exit_code == 0 and result.rows_ok == 12, result.summary()
    return out


@pytest.fixture()
def copy(build: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(build, tmp_path / "out"))


def _problems(excinfo: pytest.ExceptionInfo) -> list[tuple[str, int | None, str, str]]:
    return [(p.stage, p.shard, p.what, p.fix) for p in excinfo.value.problems]


# ------------------------------------------------------------------ verify_build ---


def test_verify_build_passes_on_a_real_build(build: Path) -> None:
    assert verify_build(build, show_progress=False) == [0, 1, 2]
    assert verify_build(build, check_hash=False, show_progress=False) == [0, 1, 2]
    assert verify_build(build, stages=("pairs", "text_emb"), show_progress=False) == [0, 1, 2]


def test_refuses_text_emb_rows_in_another_order(copy: Path) -> None:
    arrow = shard_path(copy, "text_emb", 1)
    table = read_table(arrow)
    swapped = table.take([1, 0] + list(range(2, table.num_rows)))
    del table
    writer = ShardWriter(arrow, swapped.schema)
    for batch in swapped.to_batches():
        writer.write_batch(batch)
    size, digest = writer.commit()
    side = read_sidecar(arrow)
    atomic_write_json(sidecar_path(arrow), {**side, "bytes": size, "sha256": digest})
    assert verify_shard(arrow) is None  # the sidecar is right about the new bytes: only keys can tell
    with pytest.raises(BuildError) as e:
        verify_build(copy, show_progress=False)
    (stage, shard, what, fix), = _problems(e)
    assert (stage, shard) == ("text_emb", 1)
    assert "keys differ" in what and "another order" in what
    assert "jobs/embed.py" in fix and "--shard 1" in fix
    assert "text_emb shard 1" in str(e.value)


def test_refuses_damaged_bytes(copy: Path) -> None:
    arrow = shard_path(copy, "pairs", 2)
    png = read_table(arrow).column("hq_png")[0].as_py()
    data = bytearray(arrow.read_bytes())
    at = data.find(png[len(png) // 2: len(png) // 2 + 64]) + 10  # inside an image, not Arrow metadata
    assert at > 10
    data[at] ^= 0xFF
    arrow.write_bytes(bytes(data))  # same size: only the hash can tell
    assert verify_build(copy, check_hash=False, show_progress=False) == [0, 1, 2]  # the quick check reads no bytes
    with pytest.raises(BuildError) as e:
        verify_build(copy, show_progress=False)
    (stage, shard, what, fix), = _problems(e)
    assert (stage, shard) == ("pairs", 2) and "sha256" in what and "jobs/degrade.py" in fix


def test_refuses_missing_and_unfinished_shards(copy: Path) -> None:
    shard_path(copy, "captions", 1).unlink()
    sidecar_path(shard_path(copy, "captions", 1)).unlink()
    sidecar_path(shard_path(copy, "text_emb", 0)).unlink()  # a shard whose job was killed before its sidecar
    with pytest.raises(BuildError) as e:
        verify_build(copy, check_hash=False, show_progress=False)
    found = {(stage, shard): (what, fix) for stage, shard, what, fix in _problems(e)}
    assert set(found) == {("captions", 1), ("text_emb", 0)}
    assert "missing" in found["captions", 1][0]
    assert "jobs/caption.py" in found["captions", 1][1] and "--shard 1" in found["captions", 1][1]
    assert "sidecar" in found["text_emb", 0][0] and "jobs/embed.py" in found["text_emb", 0][1]
    # A stage left out of the check is not required.
    assert verify_build(copy, stages=("pairs",), show_progress=False) == [0, 1, 2]


def test_refuses_stale_downstream_shard(copy: Path) -> None:
    side = read_sidecar(shard_path(copy, "captions", 0))
    atomic_write_json(sidecar_path(shard_path(copy, "captions", 0)), {**side, "pairs_sha256": "0" * 64})
    with pytest.raises(BuildError) as e:
        verify_build(copy, check_hash=False, show_progress=False)
    (stage, shard, what, fix), = _problems(e)
    assert (stage, shard) == ("captions", 0) and "older pairs" in what and "jobs/caption.py" in fix


def test_refuses_missing_empty_prompt(copy: Path) -> None:
    (copy / "text_emb" / "empty_prompt.safetensors").unlink()
    with pytest.raises(BuildError) as e:
        verify_build(copy, check_hash=False, show_progress=False)
    (stage, shard, what, fix), = _problems(e)
    assert stage == "text_emb" and shard is None and "empty_prompt" in what and "jobs/embed.py" in fix


# ------------------------------------------------------------------------- items ---


def _stored(build: Path) -> list[dict]:
    """Every row as stored, read independently of model.training.data (Python lists, pipeline's PNG decoder)."""
    rows = []
    for s in range(3):
        pairs = read_table(shard_path(build, "pairs", s)).to_pydict()
        emb = read_table(shard_path(build, "text_emb", s))
        for r, key in enumerate(pairs["key"]):
            rows.append({"key": key, "hq": decode_png(pairs["hq_png"][r]), "lq": decode_png(pairs["lq_png"][r]),
                         "hidden": np.array(emb.column("hidden")[r].as_py(), dtype=np.float16),
                         "num_chunks": emb.column("num_chunks")[r].as_py()})
    return rows


def _empty_prompt(build: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(build / "text_emb" / "empty_prompt.safetensors"))["hidden"]


def test_items_are_the_stored_rows(build: Path) -> None:
    ds = ShardedPairs(build, null_text_ratio=0.0)
    stored = _stored(build)
    assert len(ds) == len(stored) == 12
    for i, want in enumerate(stored):
        item = ds[i]
        assert item["key"] == want["key"] and item["null_text"] is False
        hq, lq, lq_up, text = item["hq"], item["lq"], item["lq_up"], item["text"]
        assert hq.shape == (3, 128, 128) and lq.shape == (3, 32, 32) and lq_up.shape == (3, 128, 128)
        assert hq.dtype == lq.dtype == lq_up.dtype == torch.float32 and text.dtype == torch.float16
        assert hq.is_contiguous() and lq_up.is_contiguous()
        assert -1 <= hq.min() and hq.max() <= 1 and 0 <= lq.min() and lq.max() <= 1
        assert -1 <= lq_up.min() and lq_up.max() <= 1
        torch.testing.assert_close(hq, torch.from_numpy(want["hq"]).permute(2, 0, 1).float() / 127.5 - 1,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(lq, torch.from_numpy(want["lq"]).permute(2, 0, 1).float() / 255, atol=1e-6, rtol=0)
        up = cv2.resize(want["lq"], (128, 128), interpolation=cv2.INTER_CUBIC)
        torch.testing.assert_close(lq_up, torch.from_numpy(up).permute(2, 0, 1).float() / 127.5 - 1,
                                   atol=1e-6, rtol=0)
        assert text.shape == (77 * want["num_chunks"], 32)
        np.testing.assert_array_equal(text.numpy(), want["hidden"])
    assert {r["num_chunks"] for r in stored} == {1, 2, 3}  # the fixture's long captions took effect
    assert ds[(7, 5)]["key"] == stored[5]["key"]


def test_null_text_coin_is_deterministic_and_has_the_ratio(build: Path) -> None:
    ds = ShardedPairs(build, seed=3, null_text_ratio=0.5)
    draws = np.array([[ds.null_text(e, i) for i in range(4000)] for e in range(5)])
    assert abs(draws.mean() - 0.5) < 0.02
    assert (draws[0] != draws[1]).any()  # a new epoch draws anew
    again = ShardedPairs(build, seed=3, null_text_ratio=0.5)
    assert all(again.null_text(e, i) == draws[e, i] for e in range(5) for i in range(0, 4000, 7))
    other = ShardedPairs(build, seed=4, null_text_ratio=0.5)
    assert any(other.null_text(0, i) != draws[0, i] for i in range(100))
    low = ShardedPairs(build, seed=3, null_text_ratio=0.3)
    assert abs(np.mean([low.null_text(0, i) for i in range(20000)]) - 0.3) < 0.02
    empty = _empty_prompt(build)
    stored = _stored(build)
    fired = kept = 0
    for e, i in itertools.product(range(4), range(12)):
        item = ds[(e, i)]
        assert item["null_text"] == draws[e, i]
        if item["null_text"]:
            fired += 1
            np.testing.assert_array_equal(item["text"].numpy(), empty)
        else:
            kept += 1
            np.testing.assert_array_equal(item["text"].numpy(), stored[i]["hidden"])
    assert fired and kept
    always = ShardedPairs(build, null_text_ratio=1.0)
    assert all(always[(0, i)]["null_text"] for i in range(12))


def test_dataset_pickles_without_open_tables(build: Path) -> None:
    ds = ShardedPairs(build, null_text_ratio=0.0)
    first = ds[3]
    blob = pickle.dumps(ds)
    assert len(blob) < 50_000  # paths, row counts and the 77×32 empty prompt; no mapped shard
    clone = pickle.loads(blob)
    assert clone._open == {}
    item = clone[3]
    assert item["key"] == first["key"] and torch.equal(item["hq"], first["hq"])


# ----------------------------------------------------------------------- sampler ---


def _take(sampler: EpochSampler, batches: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [list(itertools.islice(it, sampler.batch_size)) for _ in range(batches)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_ranks_are_disjoint_and_cover_the_epoch(world: int) -> None:
    n, b = 103, 4
    samplers = [EpochSampler(n, b, seed=11, rank=r, world_size=world) for r in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == n // (world * b)
    dropped = []
    for epoch in (0, 1):
        order = samplers[0].epoch_order(epoch)
        assert len(order) == per_epoch * world * b and n - len(order) < world * b
        # our epoch order: distinct rows of this build, the rest of the rows dropped this epoch only
        assert len(set(order.tolist())) == len(order) and set(order.tolist()) <= set(range(n))
        dropped.append(set(range(n)) - set(order.tolist()))
        assert order.tolist() != sorted(order.tolist())  # shuffled, not the shard order
        drawn = [_take(s, 2 * per_epoch) for s in samplers]
        sets = []
        for rank_batches in drawn:
            this_epoch = [x for batch in rank_batches for x in batch if x[0] == epoch]
            assert len(this_epoch) == per_epoch * b  # the same number of full batches on every rank
            sets.append({i for _, i in this_epoch})
        for a, c in itertools.combinations(sets, 2):
            assert not a & c
        assert set().union(*sets) == set(order.tolist())
    if dropped[0]:
        assert dropped[0] != dropped[1]  # the trimmed tail moves: no row is left out every epoch


def test_sampler_orders_per_epoch_and_seed() -> None:
    a = EpochSampler(50, 5, seed=1)
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()
    assert a.epoch_order(3).tolist() == EpochSampler(50, 5, seed=1).epoch_order(3).tolist()
    assert a.epoch_order(0).tolist() != EpochSampler(50, 5, seed=2).epoch_order(0).tolist()
    batches = _take(a, 25)  # 10 batches per epoch: epochs 0, 1 and half of 2, in order
    assert [b[0][0] for b in batches] == [0] * 10 + [1] * 10 + [2] * 5
    assert [i for b in batches[10:20] for _, i in b] == a.epoch_order(1).tolist()


def test_global_batches_do_not_depend_on_world_size_at_equal_global_batch() -> None:
    def global_batches(world: int, b: int) -> list[set[int]]:
        per_rank = [_take(EpochSampler(60, b, seed=5, rank=r, world_size=world), 15) for r in range(world)]
        return [{i for r in range(world) for _, i in per_rank[r][g]} for g in range(15)]

    assert global_batches(1, 6) == global_batches(2, 3) == global_batches(3, 2)


@pytest.mark.parametrize("world", [1, 3])
def test_sampler_resume_continues_with_the_next_batch(world: int) -> None:
    n, b = 40, 3
    per_epoch = n // (world * b)
    for rank in range(world):
        full = _take(EpochSampler(n, b, seed=9, rank=rank, world_size=world), 3 * per_epoch)
        for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
            resumed = EpochSampler(n, b, seed=9, rank=rank, world_size=world, start_batch=k)
            assert _take(resumed, 4) == full[k:k + 4], (rank, k)


def test_sampler_state_and_length() -> None:
    s = EpochSampler(40, 4, seed=2, rank=1, world_size=2, start_batch=3, max_batches=12)
    assert len(s) == 9 * 4 and len(list(s)) == 9 * 4
    state = s.state_dict()
    assert all(type(v) is int for v in state.values())
    t = EpochSampler(40, 2, seed=2, rank=0, world_size=4)  # same global batch: may resume
    t.load_state_dict({**state, "start_batch": 7})
    assert t.start_batch == 7 and t.max_batches == 12
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(40, 4, seed=3, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        EpochSampler(40, 3, seed=2, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill"):
        EpochSampler(5, 3, seed=0, world_size=2)
    with pytest.raises(TypeError):
        len(EpochSampler(40, 4, seed=2))


# ------------------------------------------------------------------------ loader ---


def _batches(loader, limit: int) -> list[dict]:
    return list(itertools.islice(loader, limit))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_loader_workers_give_the_same_batches_as_in_process(build: Path, dtype: torch.dtype) -> None:
    inproc = _batches(make_loader(build, 3, seed=5, num_workers=0, max_batches=8, image_dtype=dtype), 100)
    loader = make_loader(build, 3, seed=5, num_workers=2, max_batches=8, image_dtype=dtype)
    assert loader.num_workers == 2 and loader.persistent_workers
    workers = _batches(loader, 100)
    assert len(inproc) == len(workers) == 8  # 12 rows, batch 3: two epochs of 4 batches
    assert loader.state_dict()["start_batch"] == 8
    for a, b in zip(inproc, workers):
        assert a["keys"] == b["keys"]
        for name in ("hq", "lq", "lq_up", "text", "num_chunks", "null_text", "epoch", "index"):
            assert torch.equal(a[name], b[name]), name
    assert any(b["null_text"].any() for b in workers) and not all(b["null_text"].all() for b in workers)
    assert {k for b in inproc[:4] for k in b["keys"]} == {k for b in inproc[4:] for k in b["keys"]}  # all 12 rows
    assert [b["keys"] for b in inproc[:4]] != [b["keys"] for b in inproc[4:]]  # reshuffled per epoch
    # A run resumed after 5 batches continues with batch 6, null-text draws included.
    assert all(b["hq"].dtype == dtype for b in workers)
    resumed = make_loader(build, 3, seed=5, num_workers=2, max_batches=8, start_batch=5, image_dtype=dtype)
    tail = _batches(resumed, 100)
    assert [b["keys"] for b in tail] == [b["keys"] for b in inproc[5:]]
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(tail, inproc[5:]))


def test_loader_state_counts_consumed_batches_not_prefetched(build: Path) -> None:
    loader = make_loader(build, 2, seed=1, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["start_batch"] == 3  # although the workers have prefetched further
    nxt = next(it)
    again = make_loader(build, 2, seed=1, num_workers=0)
    again.load_state_dict(state)
    assert next(iter(again))["keys"] == nxt["keys"]


def test_make_loader_defaults(build: Path) -> None:
    loader = make_loader(build, 2, seed=0)
    assert loader.num_workers == default_num_workers() >= 1  # never 0 by default
    assert isinstance(loader.sampler, EpochSampler) and loader.persistent_workers
    assert loader.drop_last and loader.pin_memory == torch.cuda.is_available()
    assert loader.dataset.image_dtype == torch.float32  # the item format; uint8 is opt-in


def test_collate_pads_with_empty_prompt_chunks(build: Path) -> None:
    ds = ShardedPairs(build, null_text_ratio=0.0)
    items = [ds[i] for i in range(len(ds))]
    ks = [it["text"].shape[0] // 77 for it in items]
    pick = [ks.index(1), ks.index(3), ks.index(2)]
    batch = collate([items[i] for i in pick], ds.empty_prompt)
    empty = torch.from_numpy(_empty_prompt(build))
    text = batch["text"]
    assert text.shape == (3, 3 * 77, 32) and text.dtype == torch.float16
    assert batch["num_chunks"].tolist() == [1, 3, 2]
    assert batch["keys"] == [items[i]["key"] for i in pick]
    assert batch["hq"].shape == (3, 3, 128, 128) and batch["lq"].shape == (3, 3, 32, 32)
    for row, i in enumerate(pick):
        k = ks[i]
        assert torch.equal(text[row, : 77 * k], items[i]["text"])
        for c in range(k, 3):
            assert torch.equal(text[row, 77 * c: 77 * (c + 1)], empty)
        assert torch.equal(batch["hq"][row], items[i]["hq"]) and torch.equal(batch["lq_up"][row], items[i]["lq_up"])
    # Only short rows: no padding at all.
    short = collate([items[ks.index(1)]] * 2, ds.empty_prompt)
    assert short["text"].shape == (2, 77, 32)


def test_batch_fetch_equals_items_and_is_not_copied_again(build: Path) -> None:
    ds = ShardedPairs(build, seed=2, null_text_ratio=0.5)
    draws = [(1, 7), (0, 2), (3, 11), (2, 0)]
    fetched = ds.__getitems__(draws)  # what the DataLoader's fetcher calls
    single = [ds[d] for d in draws]
    for a, b in zip(fetched, single):
        assert a["key"] == b["key"] and a["null_text"] == b["null_text"]
        for name in ("hq", "lq", "lq_up", "text"):
            assert torch.equal(a[name], b[name]), name
    batch = collate(fetched, ds.empty_prompt)
    assert batch["hq"].data_ptr() == fetched[0]["hq"].data_ptr()  # the batch tensor was filled in place
    stacked = collate(single, ds.empty_prompt)
    for name in ("hq", "lq", "lq_up", "text", "num_chunks", "null_text", "index", "epoch"):
        assert torch.equal(batch[name], stacked[name]), name


def test_uint8_images_convert_to_exactly_the_float_batch(build: Path) -> None:
    from model.training.data import images_to_float

    floats = _batches(make_loader(build, 4, seed=8, num_workers=0, max_batches=3), 10)  # float32 by default
    raw = _batches(make_loader(build, 4, seed=8, num_workers=2, max_batches=3, image_dtype=torch.uint8), 10)
    assert len(floats) == len(raw) == 3
    for f, r in zip(floats, raw):
        assert r["hq"].dtype == r["lq"].dtype == r["lq_up"].dtype == torch.uint8
        assert r["hq"].shape == f["hq"].shape and r["lq"].shape == f["lq"].shape
        assert r["keys"] == f["keys"] and torch.equal(r["text"], f["text"])
        converted = images_to_float(dict(r))
        for name in ("hq", "lq", "lq_up"):
            assert converted[name].dtype == torch.float32 and torch.equal(converted[name], f[name]), name
    assert images_to_float(dict(floats[0]))["hq"] is floats[0]["hq"]  # float batches pass through


def test_refuses_a_stage_never_run_with_one_line(copy: Path) -> None:
    shutil.rmtree(copy / "captions")
    with pytest.raises(BuildError) as e:
        verify_build(copy, check_hash=False, show_progress=False)
    (stage, shard, what, fix), = _problems(e)
    assert (stage, shard) == ("captions", None) and "not built" in what and "jobs/caption.py" in fix and "--all" in fix
