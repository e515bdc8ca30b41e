"""The text-embedding stage: SD1.5's tokenizer rebuilt from open_clip's vocabulary, the
75-token chunk layout, stored embeddings against direct encoding, reruns, errors.

A tiny SD1.5-shaped folder (real tokenizer, random 2-layer text encoder) is built once
per session and loaded through the same `from_pretrained(subfolder=...)` path real
weights take.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import ROOT
from pipeline.embed.config import EmbedConfig
from pipeline.core.stage import StageInputError, run_stage
from pipeline.embed.encoder import empty_prompt_path
from pipeline.embed.stage import EmbedStage, ensure_empty_prompt, text_emb_schema
from pipeline.core.shards import ShardWriter, atomic_write_json, read_sidecar, read_table, shard_path, sidecar_path
from pipeline.embed.encoder import (
    CHUNK_LENGTH, ModelNotFoundError, chunk_ids, empty_prompt_embedding, encode_captions, load_text_encoder,
    model_identity, tokenize,
)
from demo_fixtures.tiny_sd import BOS_ID, EOS_ID, VOCAB_SIZE, build_clip_tokenizer, build_tiny_sd

sys.path.insert(0, str(ROOT / "jobs"))
import embed as embed_cli  # noqa: E402  (jobs/embed.py, called in-process)

D = 32  # the tiny encoder's hidden size
CAPTIONS_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                             ("error", pa.string())])

LLAVA_LIKE = [
    "The image features a large, fluffy orange cat lying on a wooden windowsill, basking in the warm "
    "sunlight streaming through the glass. The cat's eyes are half-closed, and its tail is curled around "
    "its body. Behind it, a potted plant with green leaves sits on the left side of the sill, while a pair "
    "of white curtains frames the window. Outside, a blurry view of trees and a red-roofed house can be "
    "seen. The overall scene conveys a sense of calm and comfort, with soft shadows falling across the "
    "wooden surface and the cat's fur appearing detailed and textured.",
    "In this photograph, an astronaut in a white spacesuit (with an American flag patch on the left "
    "shoulder) poses in front of a dark background. She holds a helmet under her right arm; her short, "
    "curly hair is neatly styled, and she smiles at the camera. Several mission patches — including one "
    "reading \"STS-61\" — are visible. The lighting is even, 3/4 from the front, typical of an official "
    "NASA portrait taken around 1993.",
    "A busy street market at dusk: vendors sell fresh fruit (apples, mangoes, bananas), vegetables and "
    "spices from colorful stalls. Strings of warm lights hang overhead, and people in jackets walk between "
    "the stalls, some carrying bags. It's a lively, crowded scene; a sign reads 'OPEN 24/7' and prices "
    "like $3.50 and €2,99 are chalked on small boards.",
]
# The HF and open_clip tokenizers agree on all of these. They differ only where open_clip
# cleans the text first (ftfy.fix_text + html.unescape): HTML entities ("&amp;"), mojibake,
# ligatures, curly quotes and ellipses (ftfy straightens them), full-width forms (some CJK
# text), and the special-token strings typed inside a caption. Those inputs are left out
# here and covered by test_tokenizer_differences_are_only_open_clips_text_cleaning.
VARIED = LLAVA_LIKE + [
    "A CAT sitting on a Windowsill... It's looking OUTSIDE!!! Isn't it cute? We've seen 3 birds; they'd "
    "fly away, you'll see. I'm sure he'll come back.",
    "Numbers: 1234567890, 3.14159, 1/2, 50%, $100, #42, 2026-11-27, 10:30am, 4K UHD 3840x2160, -7°C",
    "Café crème at the naïve façade of Zürich; señor Muñoz's piñata, déjà vu, Ångström, Øresund, Łódź",
    "emoji 🐱🐶🚀 👍🏽 👨‍👩‍👧 ❤️ ★ ☺ ✓ ✨",
    "tabs\tand\nnewlines  and   multiple    spaces",
    "hyphen-ated words, snake_case, camelCase, URL https://example.com/a?b=c, email a.b@c.org",
    "quotes 'single' \"double\" (parens) [brackets] {braces} <angle> a|b \\ back / slash ~tilde `tick` ^",
    "Ελληνικά κείμενο, Русский текст, العربية, עברית, हिन्दी, ไทย, 日本語のテキスト 中文文本 한국어",
    "", " ", "a", "ABC abc AbC aBc", "don't won't I'm you're they've he'll she'd it's ITS IT'S",
    "photo, 8k, highly detailed, sharp focus, trending on artstation", "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    chars = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      .,!?'-:()/\"%$#@+=*_"
             "éèàüößçñøåÉÀ🐱🚀👍✓★日本中文한")
    return ["".join(rng.choice(chars) for _ in range(rng.randint(0, 120))) for _ in range(n)]


def _words(n: int, seed: int) -> str:
    """A caption of about `n` words drawn from LLaVA-like text (varied token counts)."""
    pool = " ".join(LLAVA_LIKE).split()
    rng = random.Random(seed)
    return " ".join(rng.choice(pool) for _ in range(n))


def write_captions(out: Path, shard: int, rows: list[tuple[str, str | None, str]]) -> Path:
    """A captions shard + sidecar as the caption stage commits them."""
    arrow = shard_path(out, "captions", shard)
    w = ShardWriter(arrow, CAPTIONS_SCHEMA)
    for key, caption, status in rows:
        w.add({"key": key, "caption": caption, "status": status,
               "error": "engine timeout" if status == "failed" else None})
    size, digest = w.commit()
    atomic_write_json(sidecar_path(arrow), {"stage": "captions", "shard": shard, "rows": len(rows), "failed": [],
                                            "bytes": size, "sha256": digest, "config_hash": "test"})
    return arrow


def caption_rows(n: int = 70) -> list[tuple[str, str | None, str]]:
    """Mixed lengths (empty to past 4 chunks), one failed and one overridden caption."""
    rows = []
    for i in range(n):
        if i == 3:
            rows.append((f"src/img{i}.png#0", None, "failed"))
        elif i == 5:
            rows.append((f"src/img{i}.png#0", "cat " * 320, "ok"))  # 320 tokens: truncated to 300
        elif i == 7:
            rows.append((f"src/img{i}.png#0", "", "ok"))
        elif i == 9:
            rows.append((f"src/img{i}.png#0", "a sharp photo of a red bicycle", "override"))
        else:
            rows.append((f"src/img{i}.png#{i % 3}", _words(5 + (i * 37) % 180, i), "ok"))
    return rows


def write_manifest(path: Path, out: Path, model: Path | str, **text_embed: object) -> Path:
    path.write_text(json.dumps({
        "name": "embed-test", "seed": 1, "output": str(out),
        "sources": [{"name": "src", "root": str(path.parent)}],
        "text_embed": {"model": str(model), "batch_size": 5, **text_embed},
    }))
    return path


# ------------------------------------------------------------------ fixtures --


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "sd15", hidden=D, layers=2, seed=0)


@pytest.fixture(scope="session")
def te(tiny_sd: Path) -> tuple:
    return load_text_encoder(str(tiny_sd), "cpu")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> dict:
    """One shard embedded through the command line (jobs/embed.py main)."""
    root = tmp_path_factory.mktemp("embedded")
    out = root / "out"
    rows = caption_rows()
    write_captions(out, 0, rows)
    manifest = write_manifest(root / "m.json", out, tiny_sd)
    assert embed_cli.main(["--manifest", str(manifest), "--shard", "0", "--no-progress"]) == 0
    return {"out": out, "rows": rows, "manifest": manifest, "arrow": shard_path(out, "text_emb", 0)}


def embed_one(out: Path, shard: int, cfg: EmbedConfig, tokenizer, encoder):
    """One shard through the stage framework, with an encoder already loaded."""
    return run_stage(EmbedStage(out, cfg, tokenizer=tokenizer, encoder=encoder), [shard], show_progress=False)


def _direct(encoder, chunks: np.ndarray) -> np.ndarray:
    """A row's chunks encoded on their own, as SD1.5 would encode each prompt."""
    with torch.inference_mode():
        h = encoder(input_ids=torch.from_numpy(chunks).long()).last_hidden_state
    return h.reshape(-1, h.shape[-1]).to(torch.float16).numpy()


def _row_hidden(table: pa.Table, i: int) -> np.ndarray:
    """Row i's (77·k, D) float16 matrix as a zero-copy view of the Arrow buffers."""
    for chunk in table.column("hidden").chunks:  # one chunk per record batch written
        if i < len(chunk):
            start, end = chunk.offsets[i].as_py(), chunk.offsets[i + 1].as_py()
            return chunk.values.values.to_numpy(zero_copy_only=True).reshape(-1, D)[start:end]
        i -= len(chunk)
    raise IndexError(i)


# ------------------------------------------------------------- (a) tokenizer --


def test_tokenizer_matches_open_clip(tmp_path: Path, tiny_sd: Path, te: tuple) -> None:
    import open_clip
    from transformers import CLIPTokenizer

    tokenizer, _ = te
    ref = open_clip.tokenizer.SimpleTokenizer()
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.model_max_length == CHUNK_LENGTH
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    vocab = tokenizer.get_vocab()
    assert all(vocab[t] == i for t, i in ref.encoder.items() if i < BOS_ID)  # same ids, same order
    # SD1.5 ships vocab.json + merges.txt only (no tokenizer.json): that folder must load the same.
    slow = tmp_path / "tokenizer"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_sd / "tokenizer" / name, slow / name)
    from_files = CLIPTokenizer.from_pretrained(str(slow))
    corpus = VARIED + _fuzz(300)
    ours = tokenize(tokenizer, corpus)
    assert ours == tokenize(from_files, corpus)
    mismatches = [(text, got, ref.encode(text)) for text, got in zip(corpus, ours) if got != ref.encode(text)]
    assert not mismatches, mismatches[:3]
    assert sum(len(t) for t in ours[:3]) > 200  # the LLaVA-like texts do need several chunks


def test_tokenizer_differences_are_only_open_clips_text_cleaning(te: tuple) -> None:
    """Inputs the two tokenizers split differently agree once open_clip's own cleaning
    (ftfy + html.unescape) is applied first: SD1.5's HF tokenizer does not clean."""
    import open_clip
    from open_clip.tokenizer import basic_clean

    tokenizer, _ = te
    ref = open_clip.tokenizer.SimpleTokenizer()
    differing = ["&amp; &lt;b&gt; &quot;x&quot; &#39;", "“curly quotes” and ‘single’ … ellipsis",
                 "mojibake: Ã©tÃ©", "ﬁ ligature, ½ fraction"]
    for text in differing:
        assert tokenize(tokenizer, [text])[0] != ref.encode(text)
        assert tokenize(tokenizer, [basic_clean(text)])[0] == ref.encode(text)


def test_tiny_sd_is_deterministic(tmp_path: Path, tiny_sd: Path) -> None:
    again = build_tiny_sd(tmp_path / "again", hidden=D, layers=2, seed=0)
    for rel in ("text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer.json"):
        assert (again / rel).read_bytes() == (tiny_sd / rel).read_bytes(), rel
    assert model_identity(again) == model_identity(tiny_sd)
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    # another seed: same architecture and file sizes, other weights -> another identity
    other = build_tiny_sd(tmp_path / "other", hidden=D, layers=2, seed=1, parts=("text_encoder",))
    weights = "text_encoder/model.safetensors"
    assert (other / weights).stat().st_size == (tiny_sd / weights).stat().st_size
    shutil.copytree(tiny_sd / "tokenizer", other / "tokenizer")
    assert model_identity(other) != model_identity(tiny_sd)


def test_build_clip_tokenizer_alone(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(tmp_path / "tok")
    assert tok("a photo of a cat")["input_ids"] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "tok").iterdir()}


# ---------------------------------------------------------- (b) chunk layout --


@pytest.mark.parametrize("n, max_chunks, k, truncated", [
    (0, 4, 1, 0), (1, 4, 1, 0), (74, 4, 1, 0), (75, 4, 1, 0), (76, 4, 2, 0), (150, 4, 2, 0),
    (151, 4, 3, 0), (300, 4, 4, 0), (301, 4, 4, 1), (377, 4, 4, 77), (76, 1, 1, 1), (151, 2, 2, 1),
])
def test_chunk_layout(n: int, max_chunks: int, k: int, truncated: int) -> None:
    ids = list(range(1000, 1000 + n))  # every position distinguishable
    chunks, cut = chunk_ids(ids, max_chunks, BOS_ID, EOS_ID)
    assert chunks.dtype == np.int32 and chunks.shape == (k, CHUNK_LENGTH) and cut == truncated
    for i in range(k):
        body = ids[75 * i:75 * (i + 1)]
        assert chunks[i].tolist() == [BOS_ID] + body + [EOS_ID] * (CHUNK_LENGTH - 1 - len(body))


def test_captions_with_known_token_counts(te: tuple) -> None:
    tokenizer, encoder = te
    counts = [0, 74, 75, 76, 150, 151, 300, 301, 333]
    captions = [" ".join(["cat"] * n) for n in counts]  # "cat" is one token (2368)
    assert [len(t) for t in tokenize(tokenizer, captions)] == counts
    rows = encode_captions(tokenizer, encoder, captions, max_chunks=4, batch_size=3)
    assert [r.num_chunks for r in rows] == [1, 1, 1, 2, 2, 3, 4, 4, 4]
    assert [r.truncated_tokens for r in rows] == [0, 0, 0, 0, 0, 0, 0, 1, 33]
    assert [r.num_tokens for r in rows] == counts
    for n, r in zip(counts, rows):
        expected, _ = chunk_ids([2368] * n, 4, BOS_ID, EOS_ID)
        assert r.token_ids.dtype == np.int32 and r.token_ids.tolist() == expected.reshape(-1).tolist()
        assert r.hidden.dtype == np.float16 and r.hidden.shape == (CHUNK_LENGTH * r.num_chunks, D)
    # the empty caption is SD pipelines' empty prompt, token for token and vector for vector
    sd_empty = tokenizer("", padding="max_length", max_length=CHUNK_LENGTH)["input_ids"]
    assert rows[0].token_ids.tolist() == sd_empty == [BOS_ID] + [EOS_ID] * 76
    np.testing.assert_allclose(rows[0].hidden.astype(np.float32),
                               empty_prompt_embedding(tokenizer, encoder).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_batching_does_not_mix_rows(te: tuple) -> None:
    """Rows are sorted by length and batched; each result must still be its own caption's."""
    tokenizer, encoder = te
    captions = [_words(n, n) for n in (120, 3, 60, 250, 0, 90, 7)]
    together = encode_captions(tokenizer, encoder, captions, max_chunks=4, batch_size=4)
    for cap, row in zip(captions, together):
        alone = encode_captions(tokenizer, encoder, [cap], max_chunks=4, batch_size=1)[0]
        assert row.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_allclose(row.hidden.astype(np.float32), alone.hidden.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


# ------------------------------------------- (c) stored = direct, read back --


def test_stored_embeddings_equal_direct_encoding(embedded: dict, te: tuple) -> None:
    import datasets

    tokenizer, encoder = te
    arrow, rows = embedded["arrow"], embedded["rows"]
    table = read_table(arrow)
    ds = datasets.Dataset.from_file(str(arrow)).with_format("numpy")
    assert len(ds) == len(rows)
    for i, (_, caption, status) in enumerate(rows):
        text = "" if status == "failed" else caption
        chunks, truncated = chunk_ids(tokenize(tokenizer, [text])[0], 4, BOS_ID, EOS_ID)
        direct = _direct(encoder, chunks)
        stored = _row_hidden(table, i)  # zero-copy pyarrow view
        assert stored.dtype == np.float16 and stored.shape == direct.shape == (CHUNK_LENGTH * len(chunks), D)
        np.testing.assert_allclose(stored.astype(np.float32), direct.astype(np.float32), rtol=2e-3, atol=2e-3)
        via_datasets = np.asarray(ds[i]["hidden"], dtype=np.float32)
        np.testing.assert_array_equal(via_datasets, stored.astype(np.float32))
        assert np.asarray(ds[i]["token_ids"]).tolist() == chunks.reshape(-1).tolist()
        assert int(ds[i]["num_chunks"]) == len(chunks) and int(ds[i]["truncated_tokens"]) == truncated


# ------------------------------------------------------------ (d) end to end --


def test_shard_schema_keys_and_sidecar(embedded: dict, tiny_sd: Path) -> None:
    out, rows = embedded["out"], embedded["rows"]
    table = read_table(embedded["arrow"])
    schema = table.schema
    assert schema.field("key").type == pa.string()
    assert schema.field("num_chunks").type == pa.int8()
    assert schema.field("token_ids").type == pa.list_(pa.int32())
    assert schema.field("hidden").type == pa.list_(pa.list_(pa.float16(), D))
    assert schema.field("caption_sha").type == pa.string()
    assert schema.field("truncated_tokens").type == pa.int32()
    assert schema.equals(text_emb_schema(D))
    assert table.column("key").to_pylist() == [r[0] for r in rows]  # same keys, same order
    k = np.asarray(table.column("num_chunks").to_pylist())
    assert [len(x) for x in table.column("hidden").to_pylist()[:3]] == list(CHUNK_LENGTH * k[:3])
    lengths = np.diff(table.column("hidden").combine_chunks().offsets.to_numpy())
    assert (lengths == CHUNK_LENGTH * k).all() and set(k.tolist()) >= {1, 2, 3, 4}
    assert (np.diff(table.column("token_ids").combine_chunks().offsets.to_numpy()) == CHUNK_LENGTH * k).all()
    assert table.column("caption_status").to_pylist() == [r[2] for r in rows]
    side = read_sidecar(embedded["arrow"])
    assert side["stage"] == "text_emb" and side["rows"] == len(rows) and side["hidden_size"] == D
    c = side["counts"]
    assert (c["encoded"], c["reused"], c["failed_captions"], c["override_captions"]) == (len(rows), 0, 1, 1)
    assert (c["truncated_rows"], c["truncated_tokens"]) == (1, 20)
    assert side["failed_caption_keys"] == [rows[3][0]] and side["failed"] == []
    assert 0.0 < side["padding_waste"] < 1.0
    ident = model_identity(tiny_sd)
    assert side["model"]["identity"] == ident and side["config_hash"].endswith(ident)
    index = json.loads((out / "index.json").read_text())
    assert index["stages"]["text_emb"]["rows"] == len(rows)


def test_empty_prompt_file(embedded: dict, te: tuple) -> None:
    from safetensors import safe_open

    tokenizer, encoder = te
    path = empty_prompt_path(embedded["out"])
    assert path.is_file()
    with safe_open(str(path), framework="np") as f:
        hidden = f.get_tensor("hidden")
        meta = f.metadata()
    assert hidden.dtype == np.float16 and hidden.shape == (CHUNK_LENGTH, D)
    assert meta["config_hash"] == read_sidecar(embedded["arrow"])["config_hash"]
    ids = tokenizer("", padding="max_length", max_length=CHUNK_LENGTH, return_tensors="np")["input_ids"]
    np.testing.assert_allclose(hidden.astype(np.float32), _direct(encoder, ids).astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    # the failed caption's row is that same empty prompt
    failed = _row_hidden(read_table(embedded["arrow"]), 3)
    np.testing.assert_allclose(failed.astype(np.float32), hidden.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_rerun_is_noop_and_changed_captions_reencode_only_them(tmp_path: Path, tiny_sd: Path, te: tuple,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer, encoder = te
    out = tmp_path / "out"
    rows = caption_rows(40)
    write_captions(out, 0, rows)
    write_captions(out, 1, rows[:6])
    manifest = write_manifest(tmp_path / "m.json", out, tiny_sd)
    assert embed_cli.main(["--manifest", str(manifest), "--all", "--no-progress"]) == 0
    files = sorted((out / "text_emb").iterdir())
    assert [p.name for p in files] == ["empty_prompt.safetensors", "shard-00000.arrow", "shard-00000.arrow.json",
                                       "shard-00001.arrow", "shard-00001.arrow.json"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    old = read_table(shard_path(out, "text_emb", 0))
    capsys.readouterr()

    assert embed_cli.main(["--manifest", str(manifest), "--all", "--no-progress"]) == 0
    assert "0 built, 2 already complete" in capsys.readouterr().out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((out / "text_emb").iterdir())} == before

    changed = {4: "a grey stone bridge over a river at night", 30: _words(130, 99)}
    rows2 = [(k, changed.get(i, c), "override" if i in changed else s) for i, (k, c, s) in enumerate(rows)]
    write_captions(out, 0, rows2)
    assert embed_cli.main(["--manifest", str(manifest), "--shard", "0", "--no-progress"]) == 0
    assert "1 built, 0 already complete" in capsys.readouterr().out
    side = read_sidecar(shard_path(out, "text_emb", 0))
    assert (side["counts"]["encoded"], side["counts"]["reused"], side["counts"]["override_captions"]) == (2, 38, 3)
    new = read_table(shard_path(out, "text_emb", 0))
    assert new.column("key").to_pylist() == [r[0] for r in rows]
    for i in range(len(rows)):
        if i in changed:
            chunks, _ = chunk_ids(tokenize(tokenizer, [changed[i]])[0], 4, BOS_ID, EOS_ID)
            np.testing.assert_allclose(_row_hidden(new, i).astype(np.float32),
                                       _direct(encoder, chunks).astype(np.float32), rtol=2e-3, atol=2e-3)
            assert new.column("caption_sha")[i] != old.column("caption_sha")[i]
        else:
            assert _row_hidden(new, i).tobytes() == _row_hidden(old, i).tobytes()
            assert new.column("token_ids")[i] == old.column("token_ids")[i]
    assert new.column("caption_status").to_pylist() == [r[2] for r in rows2]
    # shard 1 and the empty prompt were not touched by the single-shard run
    for p in (shard_path(out, "text_emb", 1), empty_prompt_path(out)):
        assert (p.read_bytes(), p.stat().st_mtime_ns) == before[p]


def test_config_change_rebuilds_everything(tmp_path: Path, tiny_sd: Path, te: tuple) -> None:
    tokenizer, encoder = te
    out = tmp_path / "out"
    write_captions(out, 0, [("a", "cat " * 200, "ok"), ("b", "dog", "ok")])
    r4 = embed_one(out, 0, EmbedConfig(model=str(tiny_sd), max_chunks=4), tokenizer, encoder)
    arrow = shard_path(out, "text_emb", 0)
    stamp = (arrow.stat().st_mtime_ns, sidecar_path(arrow).stat().st_mtime_ns)
    again = embed_one(out, 0, EmbedConfig(model=str(tiny_sd), max_chunks=4, batch_size=7), tokenizer, encoder)
    assert again.shards_skipped == 1 and "encoded" not in again.counts  # batch size does not change the output
    assert (arrow.stat().st_mtime_ns, sidecar_path(arrow).stat().st_mtime_ns) == stamp
    r2 = embed_one(out, 0, EmbedConfig(model=str(tiny_sd), max_chunks=2), tokenizer, encoder)
    assert (r4.counts["encoded"], r2.counts["encoded"], r2.counts["reused"]) == (2, 2, 0)
    table = read_table(shard_path(out, "text_emb", 0))
    assert table.column("num_chunks").to_pylist() == [2, 1]
    assert table.column("truncated_tokens").to_pylist() == [50, 0]


# ---------------------------------------------------------------- (e) errors --


def test_missing_model_is_a_clear_error(tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_text_encoder(str(missing), "cpu")
    half = tmp_path / "half"
    shutil.copytree(tiny_sd / "tokenizer", half / "tokenizer")
    with pytest.raises(ModelNotFoundError, match=r"text_encoder"):
        load_text_encoder(str(half), "cpu")
    out = tmp_path / "out"
    write_captions(out, 0, [("a", "cat", "ok")])
    manifest = write_manifest(tmp_path / "m.json", out, missing)
    assert embed_cli.main(["--manifest", str(manifest), "--shard", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "tokenizer/" in err and "text_encoder/" in err


def test_missing_or_incomplete_captions_shard(tmp_path: Path, tiny_sd: Path, te: tuple) -> None:
    tokenizer, encoder = te
    out = tmp_path / "out"
    cfg = EmbedConfig(model=str(tiny_sd))
    with pytest.raises(StageInputError, match=r"captions shard 2 does not exist"):
        embed_one(out, 2, cfg, tokenizer, encoder)
    arrow = write_captions(out, 2, [("a", "cat", "ok"), ("b", "dog", "ok")])
    arrow.write_bytes(arrow.read_bytes()[:-9])  # torn file: sidecar no longer matches
    with pytest.raises(StageInputError, match=r"not complete"):
        embed_one(out, 2, cfg, tokenizer, encoder)
    assert not shard_path(out, "text_emb", 2).exists()
    # the real entry point, in a fresh interpreter: exit status 2 and a message
    manifest = write_manifest(tmp_path / "m.json", out, tiny_sd)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "embed.py"), "--manifest", str(manifest),
                        "--shard", "7", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "captions shard 7 does not exist" in r.stderr


def test_empty_prompt_written_once(tmp_path: Path, tiny_sd: Path, te: tuple) -> None:
    tokenizer, encoder = te
    cfg = EmbedConfig(model=str(tiny_sd))
    ident = model_identity(tiny_sd)
    path = ensure_empty_prompt(tmp_path, cfg, tokenizer, encoder, ident)
    stamp = path.stat().st_mtime_ns
    assert ensure_empty_prompt(tmp_path, cfg, tokenizer, encoder, ident) == path
    assert path.stat().st_mtime_ns == stamp


def test_all_skips_unfinished_captions_shard_and_lock_is_exclusive(tmp_path: Path, tiny_sd: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.core.shards import build_lock

    out = tmp_path / "out"
    write_captions(out, 0, [("a", "cat", "ok"), ("b", "a dog on a sofa", "ok")])
    unfinished = write_captions(out, 1, [("c", "bird", "ok")])
    sidecar_path(unfinished).unlink()  # a caption job still writing it, or killed
    manifest = write_manifest(tmp_path / "m.json", out, tiny_sd)
    assert embed_cli.main(["--manifest", str(manifest), "--all", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "shard-00001.arrow: not finished" in captured.err
    assert "1 built" in captured.out
    assert shard_path(out, "text_emb", 0).is_file() and not shard_path(out, "text_emb", 1).exists()
    # asked for by number, the same shard is an error
    assert embed_cli.main(["--manifest", str(manifest), "--shard", "1", "--no-progress"]) == 2
    assert "captions shard" in capsys.readouterr().err
    with build_lock(out, "text_emb"):
        assert embed_cli.main(["--manifest", str(manifest), "--shard", "0", "--no-progress"]) == 2
        assert "another job" in capsys.readouterr().err
