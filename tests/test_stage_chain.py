"""degrade → caption → embed through the real commands, each stage fanned out on Ray actors.

Captions come from the tiny random LLaVA (transformers engine), embeddings from the tiny
SD1.5-shaped text encoder with the real CLIP tokenizer; the test checks that the three
stages agree row for row, which is what the trainer relies on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import run_script, write_manifest
from pipeline.core.shards import read_table, shard_path, verify_shard


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_script(f"jobs/{script}", "--no-progress", *args)


def test_three_stages_agree_row_for_row(tmp_path: Path, photo_dir: Path, tiny_models: dict[str, Path]) -> None:
    out = tmp_path / "out"
    m = str(write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], out, sections={
        "caption": {"engine": "transformers", "model": str(tiny_models["llava"]), "max_tokens": 12},
        "text_embed": {"model": str(tiny_models["sd15"]), "max_chunks": 2},
    }))
    for script, args in (("degrade.py", ["--workers", "2"]), ("caption.py", ["--all", "--actors", "2"]),
                         ("embed.py", ["--all", "--actors", "2"])):
        r = _run(script, "--manifest", m, *args)
        assert r.returncode == 0, f"{script}: {r.stdout}{r.stderr}"
    index = json.loads((out / "index.json").read_text())
    assert {k: v["rows"] for k, v in index["stages"].items()} == {"pairs": 8, "captions": 8, "text_emb": 8}
    for s in range(3):
        keys = [read_table(shard_path(out, stage, s)).column("key").to_pylist()
                for stage in ("pairs", "captions", "text_emb")]
        assert keys[0] == keys[1] == keys[2] and len(keys[0]) in (2, 3)
        for stage in ("pairs", "captions", "text_emb"):
            assert verify_shard(shard_path(out, stage, s)) is None
        emb = read_table(shard_path(out, "text_emb", s))
        for k, hidden in zip(emb.column("num_chunks").to_pylist(), emb.column("hidden").to_pylist()):
            assert len(hidden) == 77 * k and len(hidden[0]) == 32
    assert (out / "text_emb" / "empty_prompt.safetensors").is_file()
    # Every stage is a no-op when rerun.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.arrow")}
    for script, args in (("degrade.py", ["--serial"]), ("caption.py", ["--shard", "0"]), ("embed.py", ["--shard", "0"])):
        assert _run(script, "--manifest", m, *args).returncode == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.arrow")}
