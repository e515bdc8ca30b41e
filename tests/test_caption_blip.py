"""BLIP-family captioners through the caption stage (Table III's "BLIP captions" row).

A tiny random BLIP checkpoint is built locally and loaded through the same
`BlipForConditionalGeneration.from_pretrained` / `AutoProcessor` path as
Salesforce/blip-image-captioning-large; what it does not prove: caption quality.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_manifest
from demo_fixtures.tiny_blip import build_tiny_blip
from pipeline.caption.config import CaptionConfig
from pipeline.caption.engines import EngineError, make_engine
from pipeline.caption.stage import run_captions
from pipeline.core.manifest import load_manifest
from pipeline.core.shards import read_sidecar, read_table, shard_path
from pipeline.degrade.stage import run_degrade


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "blip")


def test_blip_build_captions_every_row_as_blip_itself_does(tmp_path: Path, photo_dir: Path, tiny_blip: Path) -> None:
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration

    m = write_manifest(tmp_path / "m.json", [{"name": "sk", "root": str(photo_dir)}], tmp_path / "out", sections={
        "caption": {"engine": "transformers", "model": str(tiny_blip), "max_tokens": 6, "batch_size": 3}})
    manifest = load_manifest(m)
    assert run_degrade(manifest, distributor="serial", show_progress=False).exit_code == 0
    result = run_captions(manifest.output, manifest.caption, None, {}, actors=1, show_progress=False)
    assert result.exit_code == 0 and result.rows_ok == 8, result.summary()
    # independently: the checkpoint's own generate, image by image
    processor = AutoProcessor.from_pretrained(str(tiny_blip))
    model = BlipForConditionalGeneration.from_pretrained(str(tiny_blip)).eval()
    gen = {k: v for k, v in model.generation_config.to_diff_dict().items()
           if k in ("min_new_tokens", "suppress_tokens", "no_repeat_ngram_size")}
    seen = set()
    for s in range(3):
        caps = read_table(shard_path(manifest.output, "captions", s)).to_pydict()
        pairs = read_table(shard_path(manifest.output, "pairs", s))
        side = read_sidecar(shard_path(manifest.output, "captions", s))
        assert side["engine"]["family"] == "blip" and side["engine"]["prompt"] is None
        for png, caption, status in zip(pairs.column("lq_png").to_pylist(), caps["caption"], caps["status"]):
            image = Image.open(io.BytesIO(png)).convert("RGB")
            with torch.no_grad():
                out = model.generate(**processor(images=image, return_tensors="pt"), do_sample=False,
                                     max_new_tokens=6, **gen)
            assert status == "ok" and caption == processor.decode(out[0], skip_special_tokens=True)
            seen.add(caption)
    assert len(seen) > 1  # captions depend on the image


def test_a_model_that_is_not_a_captioner_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(EngineError, match=r"'bert' model.*blip"):
        make_engine(CaptionConfig(engine="transformers", model=str(tmp_path / "bert")))
