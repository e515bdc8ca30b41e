"""Caption engines on a tiny random LLaVA: the three engines make the same prompt, the same
greedy captions and the same finish reasons; vLLM is used as vLLM 0.33.0 is; the server
engine survives faults.

vLLM cannot run on these CPU machines: the ``vllm`` engine runs against the strict
stand-in package tests/standins/vllm (vLLM 0.33.0's argument names, validation, exception
types, finish reasons and death, read from its wheel). What that does not prove: real
vLLM's own LLaVA implementation, CUDA, throughput and memory. The server engine meets a
real server (``transformers serve``) in tests/test_caption_server.py; here it meets
tests/standin_server.py for the faults a real server cannot be made to produce on demand.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.caption.config import VLLM_OPTIONS, CaptionConfig
from pipeline.caption.engines import (
    CaptionResult, EngineDied, EngineError, ServerEngine, TransformersEngine, error_message,
    is_retryable_status, make_engine, parse_retry_after, render_chat_prompt,
)
from demo_fixtures.tiny_llava import MIN_NEW_TOKENS, build_tiny_llava

TESTS = Path(__file__).resolve().parent
STANDINS = TESTS / "standins"
sys.path.insert(0, str(TESTS))
from standin_server import Fault, StandInServer, image_key  # noqa: E402

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
          "retina.jpg", "motorcycle_left.png", "grass.png", "gravel.png", "brick.png")


def lq_images() -> list[Image.Image]:
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
    return lq_images()


@pytest.fixture(scope="module")
def tf_engine(cfg: CaptionConfig):
    engine = make_engine(cfg)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def expected(tf_engine, images: list[Image.Image]) -> list[CaptionResult]:
    """The transformers engine's results for all 20 images: the reference for the others."""
    results = tf_engine.caption(images)
    assert all(r.ok for r in results), results
    return results


@pytest.fixture(scope="module")
def stopping_model(model_dir: Path, images: list[Image.Image], tmp_path_factory) -> tuple[Path, list[int]]:
    """The tiny LLaVA with EOS moved to a token its greedy captions of some images produce
    after MIN_NEW_TOKENS and others do not within 12 tokens: some captions end by
    themselves (stop), others are cut by max_tokens (length). Returns the folder and the
    indices of 6 images, 3 of each kind."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    prompt = CaptionConfig().prompt()
    generated = []
    for im in images:
        inputs = processor(text=prompt, images=[im], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
        generated.append([int(t) for t in out[0, inputs["input_ids"].shape[1]:]])
    for i, ids in enumerate(generated):
        eos = ids[MIN_NEW_TOKENS + 1]
        stops = [j for j, g in enumerate(generated) if eos in g[MIN_NEW_TOKENS:]]
        runs = [j for j, g in enumerate(generated) if eos not in g]
        if len(stops) >= 3 and len(runs) >= 3:
            break
    else:
        pytest.fail("no token of the tiny model's captions splits the images into stop and length")
    out_dir = tmp_path_factory.mktemp("stopping") / "llava"
    shutil.copytree(model_dir, out_dir)
    gen_path = out_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = eos
    gen_path.write_text(json.dumps(gen))
    return out_dir, stops[:3] + runs[:3]


@pytest.fixture()
def standin_vllm(monkeypatch):
    """tests/standins/vllm as `vllm`, its fault switches reset around each test."""
    monkeypatch.syspath_prepend(str(STANDINS))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    vllm.CONTROL.reset()
    yield vllm
    vllm.CONTROL.reset()


def _calls(module, monkeypatch) -> list[int]:
    """Sizes of the prompt lists LLM.generate was called with (recorded by wrapping the
    stand-in's method, not ours)."""
    sizes: list[int] = []
    original = module.LLM.generate

    def spy(self, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(module.LLM, "generate", spy)
    return sizes


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
    assert again == expected[:6]
    assert sum(seen) == 6
    captions = [r.caption for r in expected]
    assert all(c and c.strip() == c for c in captions)
    assert len(set(captions)) >= 15, captions  # the random model's output depends on the image
    info = tf_engine.describe()
    assert info["engine"] == "transformers" and info["prompt"] == tf_engine.cfg.prompt()
    assert info["sampling"] == {"temperature": 0.0, "max_tokens": 12}


def test_caption_cut_by_max_tokens_is_ok_and_flagged(cfg, stopping_model, images) -> None:
    """A caption the token limit cut is kept (ok) and flagged (finish_reason length), one
    the model ended is ok and not flagged: on the same batch, so padding cannot blur it."""
    folder, picked = stopping_model
    engine = make_engine(dataclasses.replace(cfg, model=str(folder), batch_size=6))
    try:
        results = engine.caption([images[i] for i in picked])
    finally:
        engine.close()
    assert all(r.ok for r in results), results
    assert [r.finish_reason for r in results] == ["stop"] * 3 + ["length"] * 3
    assert [r.cut for r in results] == [False] * 3 + [True] * 3


def test_transformers_engine_bad_image_is_a_failed_result(tf_engine, images, expected) -> None:
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # lazy: fails on load
    results = tf_engine.caption([images[1], truncated, images[2]])
    assert results[0] == expected[1] and results[2] == expected[2]
    assert not results[1].ok and "bad image" in results[1].error


def test_prompt_template_mismatch_is_engine_error(cfg: CaptionConfig) -> None:
    bad = dataclasses.replace(cfg, prompt_template="USER: <image>\n{instruction}\nASSISTANT:")
    with pytest.raises(EngineError, match="chat template"):
        TransformersEngine(bad)


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_missing_model_dir_is_engine_error(cfg, tmp_path, standin_vllm, engine: str) -> None:
    missing = tmp_path / "no" / "such" / "llava"
    with pytest.raises(EngineError, match=str(missing)):
        make_engine(dataclasses.replace(cfg, model=str(missing)), engine)


def test_caption_result_invariants() -> None:
    assert CaptionResult(caption="x").ok and not CaptionResult(error="e").ok
    with pytest.raises(ValueError):
        CaptionResult()
    with pytest.raises(ValueError):
        CaptionResult(caption="x", error="e")
    assert CaptionResult.from_generation(" a cat ", "stop") == CaptionResult("a cat", None, "stop")
    assert CaptionResult.from_generation("a ca", "length").cut
    for reason in ("abort", "error"):
        failed = CaptionResult.from_generation("partial", reason)
        assert not failed.ok and reason in failed.error and failed.finish_reason == reason
    assert not CaptionResult.from_generation("  ", "stop").ok


# ---------------------------------------------------------------------- vLLM --


def test_vllm_engine_on_standin_matches_transformers(cfg, images, expected, standin_vllm, monkeypatch) -> None:
    """Same captions and finish reasons; the whole list in ONE generate call (vLLM
    schedules it); progress moves per finished request through vLLM's use_tqdm."""
    sizes = _calls(standin_vllm, monkeypatch)
    engine = make_engine(cfg, "vllm")
    try:
        info = engine.describe()
        assert info["vllm"] == "0.33.0+standin"
        assert info["max_model_len"] == 512  # the model's own (max_position_embeddings), not 4096
        assert info["llm"] == {"limit_mm_per_prompt": {"image": 1}}
        seen: list[int] = []
        assert engine.caption(images[:6], progress=seen.append) == expected[:6]
        assert sizes == [6] and seen == [1] * 6
    finally:
        engine.close()
    batched = make_engine(dataclasses.replace(cfg, vllm_batch_size=4), "vllm")
    try:
        sizes.clear()
        assert batched.caption(images[:6]) == expected[:6]
        assert sizes == [4, 2]
    finally:
        batched.close()


def test_vllm_engine_options_reach_vllm(cfg, standin_vllm) -> None:
    options = {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 1, "max_num_seqs": 8,
               "max_model_len": 256, "dtype": "float32", "enforce_eager": True, "max_num_batched_tokens": 512}
    assert set(options) == set(VLLM_OPTIONS)  # every option the manifest may set is tried here
    engine = make_engine(dataclasses.replace(cfg, vllm=options), "vllm")
    try:
        assert engine._llm.kwargs == {"limit_mm_per_prompt": {"image": 1}, **options}
        assert engine.describe()["max_model_len"] == 256
    finally:
        engine.close()


def test_standin_vllm_is_strict(model_dir, standin_vllm) -> None:
    """What real vLLM 0.33.0 refuses, the stand-in refuses with the same exception type."""
    import pydantic

    vllm = standin_vllm
    with pytest.raises(TypeError, match="unexpected keyword argument 'gpu_memory_utilisation'"):
        vllm.LLM(model=str(model_dir), gpu_memory_utilisation=0.5)
    with pytest.raises(pydantic.ValidationError, match=r"max_model_len \(4096\) is greater than the derived"):
        vllm.LLM(model=str(model_dir), max_model_len=4096)
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 1"):
        vllm.LLM(model=str(model_dir), gpu_memory_utilization=1.5)
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        vllm.LLM(model=str(model_dir), dtype="fp7")
    with pytest.raises(TypeError, match="max_new_tokens"):
        vllm.SamplingParams(max_new_tokens=8)
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="max_tokens must be at least 1"):
        vllm.SamplingParams(max_tokens=0)


def test_vllm_misspelt_option_and_long_max_model_len_are_engine_errors(cfg, standin_vllm) -> None:
    with pytest.raises(EngineError, match=r"refused an engine option.*gpu_memory_utilisation"):
        make_engine(cfg, "vllm", gpu_memory_utilisation=0.5)
    with pytest.raises(EngineError, match=r"max_model_len \(4096\).*leave it unset to use the model's own"):
        make_engine(dataclasses.replace(cfg, vllm={"max_model_len": 4096}), "vllm")


def test_manifest_vllm_options_are_checked_at_load() -> None:
    with pytest.raises(ValueError, match=r"unknown vLLM option vllm.gpu_memory_utilisation \(did you mean "
                                         r"gpu_memory_utilization\?\)"):
        CaptionConfig(vllm={"gpu_memory_utilisation": 0.8})
    with pytest.raises(ValueError, match=r"vllm.gpu_memory_utilization must be float in \(0, 1\]"):
        CaptionConfig(vllm={"gpu_memory_utilization": 1.2})
    with pytest.raises(ValueError, match="vllm.max_num_seqs must be int"):
        CaptionConfig(vllm={"max_num_seqs": True})
    with pytest.raises(ValueError, match="vllm.dtype must be str one of"):
        CaptionConfig(vllm={"dtype": "fp8"})
    good = CaptionConfig(vllm={"max_model_len": 2048, "dtype": "float16"})
    assert CaptionConfig.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    assert hash(good) == hash(CaptionConfig(vllm={"dtype": "float16", "max_model_len": 2048}))
    assert good.hash() == CaptionConfig().hash()  # engine options do not change captions' identity


def test_vllm_start_out_of_gpu_memory_names_the_cause(cfg, standin_vllm, capfd) -> None:
    standin_vllm.CONTROL.free_memory_fraction = 0.5
    with pytest.raises(EngineError, match=r"Engine core initialization failed.*GPU memory.*"
                                          r"gpu_memory_utilization"):
        make_engine(cfg, "vllm")
    assert "less than desired GPU memory utilization" in capfd.readouterr().err  # vLLM's own log line
    engine = make_engine(dataclasses.replace(cfg, vllm={"gpu_memory_utilization": 0.45}), "vllm")
    engine.close()


def test_vllm_abort_and_error_are_failed_and_retried(cfg, images, expected, standin_vllm) -> None:
    standin_vllm.CONTROL.finish = {1: "abort", 3: "error"}
    engine = make_engine(cfg, "vllm")
    try:
        results = engine.caption(images[:5])
        assert [r.ok for r in results] == [True, False, True, False, True]
        assert "finish_reason 'abort'" in results[1].error and results[1].finish_reason == "abort"
        assert "finish_reason 'error'" in results[3].error
        again = engine.caption([images[1], images[3]])  # what a rerun asks for: they succeed now
        assert again == [expected[1], expected[3]]
    finally:
        engine.close()


def test_vllm_engine_death_stops_the_call(cfg, images, standin_vllm) -> None:
    """EngineDeadError mid-batch: one EngineDied, no per-row failures, and every later call
    fails the same way (the engine must be rebuilt)."""
    standin_vllm.CONTROL.die_after = 3
    engine = make_engine(cfg, "vllm")
    try:
        with pytest.raises(EngineDied, match=r"engine died while captioning 6 images \(EngineDeadError"):
            engine.caption(images[:6])
        assert standin_vllm.CONTROL.finished == 3  # it died mid-batch, after three requests
        with pytest.raises(EngineDied, match="died during an earlier call"):
            engine.caption(images[:1])
    finally:
        engine.close()


def test_vllm_not_installed_says_what_to_do(cfg, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(EngineError, match=r"vLLM is not installed.*--engine server/transformers"):
        make_engine(cfg, "vllm")


def test_finish_reasons_agree_across_engines(cfg, stopping_model, images, standin_vllm) -> None:
    folder, picked = stopping_model
    conf = dataclasses.replace(cfg, model=str(folder))
    batch = [images[i] for i in picked]
    reference = make_engine(conf).caption(batch)
    assert make_engine(conf, "vllm").caption(batch) == reference
    with StandInServer(folder) as server:
        with ServerEngine(dataclasses.replace(conf, server=server.url)) as engine:
            assert engine.caption(batch) == reference


# -------------------------------------------------------------------- server --


def test_server_engine_matches_transformers(cfg, model_dir, images, expected) -> None:
    from transformers import AutoProcessor

    with StandInServer(model_dir) as server:
        seen: list[int] = []
        with ServerEngine(dataclasses.replace(cfg, server=server.url)) as engine:
            results = engine.caption(images[:6], progress=seen.append)
            assert engine.describe()["reported_models"] == [str(model_dir)]
            assert engine.describe()["model_warning"] is None
        assert results == expected[:6]
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
    3: (Fault("stall", times=1), True, 2),
    4: (Fault("malformed", times=1), True, 2),
    5: (Fault("drop", times=1), True, 2),
    6: (Fault("500"), False, 3),
    7: (Fault("503"), False, 3),
    8: (Fault("stall"), False, 3),
    9: (Fault("malformed"), False, 3),
    10: (Fault("drop"), False, 3),
    11: (Fault("400"), False, 1),
    12: (Fault("501"), False, 1),
    13: (Fault("abort"), False, 1),
    14: (Fault("length"), True, 1),
}
REASONS = {"500": "HTTP 500: The server had an error", "503": "HTTP 503: The engine is currently busy",
           "400": "HTTP 400: The decoder prompt", "501": "HTTP 501", "stall": "timed out",
           "malformed": "malformed JSON", "drop": "connection error", "abort": "finish_reason 'abort'"}


def test_server_engine_retries_and_reports_faults(cfg, model_dir, images, expected) -> None:
    """vLLM's status codes: 500/503 and transport faults are retried, 400 and 501 are final;
    a 200 with finish_reason abort is a failed row, one with length a flagged caption."""
    keys = [image_key(im) for im in images]
    faults = {keys[i]: f for i, (f, _, _) in FAULTS.items()}
    # 6 s: a stalled reply times out, an ordinary one does not even on a loaded 2-core machine
    fast = dataclasses.replace(cfg, timeout_s=6.0, retries=2, concurrency=4)
    with StandInServer(model_dir, faults=faults) as server:
        with ServerEngine(dataclasses.replace(fast, server=server.url), backoff_s=0.02) as engine:
            results = engine.caption(images)
            assert len(results) == len(images)
            for i, (res, key) in enumerate(zip(results, keys)):
                records = server.records_for(key)
                if i not in FAULTS:
                    assert res == expected[i] and [r.outcome for r in records] == ["ok"]
                    continue
                fault, ends_ok, attempts = FAULTS[i]
                assert len(records) == attempts, (i, [r.outcome for r in records])
                if fault.kind == "length":
                    assert res.ok and res.cut and expected[i].caption.startswith(res.caption), res
                elif ends_ok:  # answered once, and with its own image's caption
                    assert sum(r.outcome == "ok" for r in records) == 1
                    assert res == expected[i], (i, res)
                else:
                    assert res.error and REASONS[fault.kind] in res.error, (i, res.error)
                    if fault.kind != "abort":
                        assert f"{attempts} attempts" in res.error or "not retried" in res.error
            assert server.max_in_flight <= 4 + 2  # + stalled replies the client gave up on

            failed = [i for i, r in enumerate(results) if not r.ok]
            assert failed == [i for i, (_, ok, _) in FAULTS.items() if not ok]
            server.set_faults()  # faults off: a second pass fills the failed rows
            refill = engine.caption([images[i] for i in failed])
            assert refill == [expected[i] for i in failed]


def test_retry_policy_follows_vllm_status_codes() -> None:
    assert [s for s in (400, 401, 404, 408, 413, 422, 429, 500, 501, 502, 503, 504)
            if is_retryable_status(s)] == [408, 429, 500, 502, 503, 504]
    vllm_body = json.dumps({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                      "param": "model", "code": 404}}).encode()
    assert error_message(vllm_body) == "The model `x` does not exist."
    assert error_message(b'{"detail": "Unexpected fields in the request"}') == "Unexpected fields in the request"
    assert error_message(b"<html>Bad gateway</html>") == "<html>Bad gateway</html>"


def test_server_engine_sends_both_token_limits_and_optional_bos(cfg) -> None:
    with StandInServer(mode="fixed", served_model=cfg.model, delay_s=0) as server:
        with ServerEngine(dataclasses.replace(cfg, server=server.url)) as engine:
            payload = engine._payload(Image.new("RGB", (8, 8)))
        assert payload["max_completion_tokens"] == payload["max_tokens"] == 12
        assert payload["add_special_tokens"] is True
        with ServerEngine(dataclasses.replace(cfg, server=server.url, add_special_tokens=False)) as engine:
            assert "add_special_tokens" not in engine._payload(Image.new("RGB", (8, 8)))


def test_server_engine_bounded_concurrency_and_bad_image(cfg) -> None:
    """The server holds every reply until 3 requests are in flight at once, so the client
    is seen keeping exactly `concurrency` in flight however fast this machine is."""
    with StandInServer(mode="fixed", served_model=cfg.model, delay_s=0, text=" a cat ",
                       hold_until_in_flight=3) as server:
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


def _free_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()  # nothing listens there now
    return url


def test_unreachable_server_names_the_url_and_how_to_start_one(cfg) -> None:
    url = _free_url()
    with pytest.raises(EngineError, match=rf"{url} is unreachable.*vllm serve .*transformers serve"):
        ServerEngine(dataclasses.replace(cfg, server=url))


def test_server_serving_another_model_warns_and_records(cfg, caplog) -> None:
    with StandInServer(mode="fixed", served_model="other/model", delay_s=0) as server:
        with caplog.at_level(logging.WARNING, logger="pipeline.caption.engines"):
            engine = ServerEngine(dataclasses.replace(cfg, server=server.url), backoff_s=0.01)
        with engine:
            assert any("lists ['other/model']" in r.getMessage() for r in caplog.records)
            info = engine.describe()
            assert info["served_models"] == ["other/model"] and "other/model" in info["model_warning"]
            (res,) = engine.caption([Image.new("RGB", (8, 8))])  # this vLLM answers 404: final
        assert "HTTP 404: The model" in res.error and "not retried" in res.error
        assert server.outcomes() == {"unknown_model": 1}


def test_server_gone_mid_call_fails_the_rest_fast(cfg, model_dir, images) -> None:
    """Once one request found nothing listening on every attempt, the rows not yet sent fail
    at once, each saying so; none is lost (one result per image)."""
    server = StandInServer(mode="fixed", served_model=cfg.model, delay_s=0).start()
    engine = ServerEngine(dataclasses.replace(cfg, server=server.url, concurrency=1, retries=1),
                          backoff_s=0.01)
    stopped = threading.Event()

    def stop_after_two(n: int) -> None:
        if len(server.records) >= 2 and not stopped.is_set():
            server.stop()
            stopped.set()

    try:
        results = engine.caption(images[:8], progress=stop_after_two)
    finally:
        engine.close()
        server.stop()
    assert [r.ok for r in results[:2]] == [True, True]
    gave_up = [r for r in results[2:] if "gave up after 2 attempts" in (r.error or "")]
    not_sent = [r for r in results[2:] if (r.error or "").startswith("not sent: caption server at")]
    assert len(gave_up) == 1 and len(not_sent) == 5, [r.error for r in results]


def test_parse_retry_after_and_backoff(cfg) -> None:
    import email.utils

    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after(later) <= 31
    with StandInServer(mode="fixed", served_model=cfg.model, delay_s=0) as server:
        with ServerEngine(dataclasses.replace(cfg, server=server.url), backoff_s=1.0,
                          backoff_max_s=8.0, retry_after_max_s=5.0) as engine:
            assert all(0.5 * min(8, 2 ** (a - 1)) <= engine._delay(a, None) <= min(8, 2 ** (a - 1))
                       for a in range(1, 7))
            assert 5.0 <= engine._delay(1, 120.0) <= 6.0  # a hint is honoured, capped, jittered


@pytest.mark.parametrize("exc, cause", [
    # messages as vLLM 0.33.0 raises them (vllm/transformers_utils/config.py, vllm/v1/worker/utils.py,
    # vllm/v1/core/kv_cache_planning.py, vllm/v1/engine/utils.py) and torch's CUDA OOM
    (ValueError("Invalid repository ID or local directory specified: '/models/llava'.\nPlease verify the "
                "following requirements:"), "is not a model vLLM can load"),
    (ValueError("Free memory on device cuda:0 (10.00/80.00 GiB) on startup is less than desired GPU memory "
                "utilization (0.92, 73.60 GiB)."), "not enough GPU memory"),
    (ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"),
     "not enough GPU memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "not enough GPU memory"),
    (RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}"),
     "the engine core died while starting"),
    (OSError("config.json not found"), "is not a model vLLM can load"),
])
def test_vllm_start_failure_explanations(cfg, exc, cause) -> None:
    from pipeline.caption.engines import explain_vllm_start_failure

    text = explain_vllm_start_failure(exc, cfg)
    assert cause in text and cfg.model in text and type(exc).__name__ in text
