"""Caption engines on a tiny random LLaVA: the three engines make the same prompt and the
same greedy captions, and the server engine survives faults.

vLLM cannot run on these CPU machines: the ``vllm`` engine runs against the stand-in
package in tests/standins/vllm and the ``server`` engine against tests/standin_server.py.
"""

from __future__ import annotations

import dataclasses
import io
import socket
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.caption.config import CaptionConfig
from pipeline.caption.engines import (
    CaptionResult, EngineError, ServerEngine, TransformersEngine, make_engine, parse_retry_after,
    render_chat_prompt,
)
from demo_fixtures.tiny_llava import build_tiny_llava

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from standin_server import Fault, StandInServer, image_key  # noqa: E402

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg", "motorcycle_left.png", "grass.png", "gravel.png", "brick.png")


def _lq_images() -> list[Image.Image]:
    """20 LQ-sized (128²) RGB images: each photo whole and its centre half, resized."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    out = []
    for name in PHOTOS:
        photo = Image.open(data / name).convert("RGB")
        w, h = photo.size
        centre = photo.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))
        out += [im.resize((128, 128), Image.BICUBIC) for im in (photo, centre)]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def cfg(model_dir: Path) -> CaptionConfig:
    return CaptionConfig(engine="transformers", model=str(model_dir), max_tokens=12, batch_size=4,
                         concurrency=4, timeout_s=5.0, retries=2)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _lq_images()


@pytest.fixture(scope="module")
def tf_engine(cfg: CaptionConfig):
    engine = make_engine(cfg)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def expected(tf_engine, images: list[Image.Image]) -> list[str]:
    """The transformers engine's captions of all 20 images: the reference for the others."""
    results = tf_engine.caption(images)
    assert all(r.ok for r in results), results
    return [r.caption for r in results]


# ------------------------------------------------------------------ tiny model --


def test_tiny_llava_builds_loads_and_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.vision_config.image_size == 28 and model.config.text_config.head_dim == 16
    assert processor.tokenizer.padding_side == "left"
    again = build_tiny_llava(tmp_path / "again", seed=0)
    other = build_tiny_llava(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_chat_template_renders_the_llava_prompt(model_dir: Path, cfg: CaptionConfig) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    assert render_chat_prompt(processor, cfg.instruction) == cfg.prompt()
    assert cfg.prompt() == f"USER: <image>\n{cfg.instruction} ASSISTANT:"
    assert render_chat_prompt(processor, "Hi.") == "USER: <image>\nHi. ASSISTANT:"


# -------------------------------------------------------------- transformers --


def test_transformers_engine_deterministic_nonempty_varied(tf_engine, images, expected) -> None:
    seen: list[int] = []
    again = tf_engine.caption(images[:6], progress=seen.append)
    assert [r.caption for r in again] == expected[:6]
    assert sum(seen) == 6
    assert all(c and c.strip() == c for c in expected)
    assert len(set(expected)) >= 15, expected  # the random model's output depends on the image
    info = tf_engine.describe()
    assert info["engine"] == "transformers" and info["prompt"] == tf_engine.cfg.prompt()
    assert info["sampling"] == {"temperature": 0.0, "max_tokens": 12}


def test_transformers_engine_bad_image_is_a_failed_result(tf_engine, images, expected) -> None:
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # lazy: fails on load
    results = tf_engine.caption([images[1], truncated, images[2]])
    assert results[0].caption == expected[1] and results[2].caption == expected[2]
    assert not results[1].ok and "bad image" in results[1].error


def test_prompt_template_mismatch_is_engine_error(cfg: CaptionConfig) -> None:
    bad = dataclasses.replace(cfg, prompt_template="USER: <image>\n{instruction}\nASSISTANT:")
    with pytest.raises(EngineError, match="chat template"):
        TransformersEngine(bad)


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_missing_model_dir_is_engine_error(cfg, tmp_path, monkeypatch, engine: str) -> None:
    monkeypatch.syspath_prepend(str(TESTS / "standins"))
    missing = tmp_path / "no" / "such" / "llava"
    with pytest.raises(EngineError, match=str(missing)):
        make_engine(dataclasses.replace(cfg, model=str(missing)), engine)


def test_caption_result_has_exactly_one_field() -> None:
    assert CaptionResult(caption="x").ok and not CaptionResult(error="e").ok
    with pytest.raises(ValueError):
        CaptionResult()
    with pytest.raises(ValueError):
        CaptionResult(caption="x", error="e")


# ---------------------------------------------------------------------- vLLM --


def test_vllm_engine_on_standin_matches_transformers(cfg, images, expected, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS / "standins"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    engine = make_engine(cfg, "vllm")
    try:
        assert engine.describe()["vllm"].endswith("+standin")
        assert [r.caption for r in engine.caption(images[:6])] == expected[:6]
    finally:
        engine.close()


def test_vllm_not_installed_says_what_to_do(cfg, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(EngineError, match=r"vLLM is not installed.*--engine server/transformers"):
        make_engine(cfg, "vllm")


# -------------------------------------------------------------------- server --


def test_server_engine_matches_transformers(cfg, model_dir, images, expected) -> None:
    from transformers import AutoProcessor

    with StandInServer(model_dir) as server:
        seen: list[int] = []
        with ServerEngine(dataclasses.replace(cfg, server=server.url)) as engine:
            results = engine.caption(images[:6], progress=seen.append)
        assert [r.caption for r in results] == expected[:6]
        assert seen == [1] * 6
        assert server.outcomes() == {"ok": 6}
        # the server rendered the same prompt from [image, instruction], with BOS, to the
        # same token ids the offline engines feed the model
        processor = AutoProcessor.from_pretrained(model_dir)
        offline_ids = processor(text=cfg.prompt(), images=[images[0]])["input_ids"][0]
        record = server.records_for(image_key(images[0]))[0]
        assert record.prompt == cfg.prompt()
        assert list(record.prompt_ids) == list(offline_ids)


FAULTS = {  # image index → (fault, final outcome ok?, expected attempts with retries=2)
    0: (Fault("500", times=1), True, 2),
    1: (Fault("503", times=2), True, 3),
    2: (Fault("429", times=1, retry_after=1.0), True, 2),
    3: (Fault("stall", times=1), True, 2),
    4: (Fault("malformed", times=1), True, 2),
    5: (Fault("drop", times=1), True, 2),
    6: (Fault("500"), False, 3),
    7: (Fault("503"), False, 3),
    8: (Fault("stall"), False, 3),
    9: (Fault("malformed"), False, 3),
    10: (Fault("drop"), False, 3),
    11: (Fault("400"), False, 1),
    12: (Fault("429", retry_after=0.1), False, 3),
}
REASONS = {"500": "HTTP 500", "503": "HTTP 503", "400": "HTTP 400", "429": "HTTP 429",
           "stall": "timed out", "malformed": "malformed JSON", "drop": "connection error"}


def test_server_engine_retries_and_reports_faults(cfg, model_dir, images, expected) -> None:
    keys = [image_key(im) for im in images]
    faults = {keys[i]: f for i, (f, _, _) in FAULTS.items()}
    fast = dataclasses.replace(cfg, timeout_s=1.0, retries=2, concurrency=4)
    with StandInServer(model_dir, faults=faults) as server:
        with ServerEngine(dataclasses.replace(fast, server=server.url), backoff_s=0.02) as engine:
            t0 = time.monotonic()
            results = engine.caption(images)
            elapsed = time.monotonic() - t0
            assert len(results) == len(images)
            for i, (res, key) in enumerate(zip(results, keys)):
                records = server.records_for(key)
                if i not in FAULTS:
                    assert res.caption == expected[i] and [r.outcome for r in records] == ["ok"]
                    continue
                fault, ends_ok, attempts = FAULTS[i]
                assert len(records) == attempts, (i, [r.outcome for r in records])
                assert sum(r.outcome == "ok" for r in records) == (1 if ends_ok else 0)
                if ends_ok:  # answered once, and with its own image's caption
                    assert res.caption == expected[i], (i, res)
                else:
                    assert res.error and REASONS[fault.kind] in res.error, (i, res.error)
                    assert f"{attempts} attempts" in res.error or "not retried" in res.error
            # Retry-After: 1 s was honoured (the client's own backoff is 20 ms)
            r429 = server.records_for(keys[2])
            assert r429[1].t_start - r429[0].t_end >= 1.0
            assert server.max_in_flight <= 4 + 2  # + stalled replies the client gave up on
            assert elapsed < 15

            failed = [i for i, r in enumerate(results) if not r.ok]
            assert failed == [i for i, (_, ok, _) in FAULTS.items() if not ok]
            server.set_faults()  # faults off: a second pass fills the failed rows
            refill = engine.caption([images[i] for i in failed])
            assert [r.caption for r in refill] == [expected[i] for i in failed]


def test_server_engine_bounded_concurrency_and_bad_image(cfg) -> None:
    with StandInServer(mode="fixed", served_model=cfg.model, delay_s=0.05, text=" a cat ") as server:
        conf = dataclasses.replace(cfg, server=server.url, concurrency=3)
        with ServerEngine(conf) as engine:
            imgs = [Image.new("RGB", (128, 128), (i, 0, 0)) for i in range(12)]
            results = engine.caption(imgs[:6] + ["not an image"] + imgs[6:])  # type: ignore[list-item]
        assert [r.caption for r in results if r.ok] == ["a cat"] * 12
        assert "bad image" in results[6].error
        assert server.max_in_flight == 3 and server.outcomes() == {"ok": 12}


def test_server_api_key(cfg) -> None:
    with StandInServer(mode="fixed", served_model=cfg.model, delay_s=0, api_key="s3cret") as server:
        conf = dataclasses.replace(cfg, server=server.url)
        with pytest.raises(EngineError, match="API key"):
            ServerEngine(conf)
        with ServerEngine(dataclasses.replace(conf, api_key="s3cret")) as engine:
            assert engine.caption([Image.new("RGB", (8, 8))])[0].caption == "a photo of something"
            assert "s3cret" not in str(engine.describe())


def test_unreachable_server_is_engine_error(cfg) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()  # nothing listens there now
    with pytest.raises(EngineError, match=rf"{url}.*unreachable.*vllm serve"):
        ServerEngine(dataclasses.replace(cfg, server=url))


def test_server_serving_another_model_is_engine_error(cfg) -> None:
    with StandInServer(mode="fixed", served_model="other/model") as server:
        with pytest.raises(EngineError, match=r"serves \['other/model'\], not"):
            ServerEngine(dataclasses.replace(cfg, server=server.url))


def test_parse_retry_after() -> None:
    import email.utils

    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after(later) <= 31
