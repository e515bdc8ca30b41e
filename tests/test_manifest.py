"""Manifest validation: every problem names the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.manifest import ManifestError, load_manifest
from pipeline.core.plan import plan_shards

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, body: dict) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(body))
    return p


def _base(photo_dir: Path, tmp_path: Path) -> dict:
    return {"name": "t", "seed": 1, "output": str(tmp_path / "o"),
            "sources": [{"name": "sk", "root": str(photo_dir)}]}


def test_shipped_manifests_parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    demo = json.loads((ROOT / "manifests/demo.json").read_text())
    assert demo["degrade"]["gt_size"] == 512
    # full.json: point DATA_ROOT at a folder laid out as the README says.
    for sub in ("DIV2K/DIV2K_train_HR", "Flickr2K/Flickr2K_HR", "OST", "FFHQ/images1024x1024",
                "LSDIR/HR/train"):
        (tmp_path / sub).mkdir(parents=True)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    m = load_manifest(ROOT / "manifests/full.json")
    assert [s.name for s in m.sources] == ["DIV2K", "Flickr2K", "OST", "FFHQ", "LSDIR"]
    assert m.sources[3].limit == 9000 and m.sources[4].limit == 20000
    assert m.output == tmp_path / "ssp-ir/full"
    assert m.degrade.gt_size == 512 and m.degrade.scale == 4
    train = m.section("train")
    assert (train["batch_size"], train["learning_rate"], train["max_steps"]) == (32, 5e-5, 100000)
    assert (train["lambda_rgb"], train["lambda_fft"]) == (0.1, 0.01)


def test_out_flag_wins_and_relative_output(photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _base(photo_dir, tmp_path)
    body["output"] = "rel/out"
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, body)
    assert load_manifest(p).output == tmp_path / "rel/out"
    assert load_manifest(p, out=tmp_path / "x").output == tmp_path / "x"


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b.update(colour="red"), ["unknown key 'colour'"]),
    (lambda b: b.update(seed="7"), ["seed", "int"]),
    (lambda b: b.pop("sources"), ["sources"]),
    (lambda b: b.update(output="${SSP_IR_SURELY_UNSET}/x"), ["output", "SSP_IR_SURELY_UNSET", "not set"]),
    (lambda b: b["sources"][0].update(root="/nonexistent/photos"), ["sources[0].root", "not a folder"]),
    (lambda b: b["sources"][0].update(glob="*.nothing"), ["matches no images", "sk"]),
    (lambda b: b["sources"][0].update(extra=1), ["sources[0].extra"]),
    (lambda b: b["sources"].append({"name": "sk", "root": b["sources"][0]["root"]}), ["unique"]),
    (lambda b: b.update(degrade={"gt_sise": 512}), ["degrade.gt_sise", "gt_size"]),
    (lambda b: b.update(degrade={"gt_size": "512"}), ["degrade.gt_size", "int"]),
    (lambda b: b.update(degrade={"blur_sigma": [0.2]}), ["degrade.blur_sigma", "2 entries"]),
    (lambda b: b.update(degrade={"resize_prob": [0.5, 0.5, 0.5]}), ["resize_prob", "sum to 1"]),
    (lambda b: b.update(degrade={"gt_size": 510}), ["gt_size", "multiple of scale"]),
    (lambda b: b.update(degrade={"usm_gt": 1}), ["degrade.usm_gt", "bool"]),
])
def test_bad_manifests_name_file_and_key(photo_dir: Path, tmp_path: Path, mutate, words) -> None:
    body = _base(photo_dir, tmp_path)
    mutate(body)
    p = _write(tmp_path, body)
    with pytest.raises(ManifestError) as e:
        plan_shards(load_manifest(p))
    msg = str(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, msg


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text('{"name": "x",\n "seed": }')
    with pytest.raises(ManifestError, match=r"not valid JSON.*line 2"):
        load_manifest(p)


def test_env_expansion(photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHOTOS", str(photo_dir))
    body = _base(photo_dir, tmp_path)
    body["sources"][0]["root"] = "${PHOTOS}"
    m = load_manifest(_write(tmp_path, body))
    assert m.sources[0].root == photo_dir


def test_planning_is_sorted_and_deterministic(photo_dir: Path, tmp_path: Path) -> None:
    body = _base(photo_dir, tmp_path)
    body["degrade"] = {"crops_per_image": 3, "rows_per_shard": 5}
    m = load_manifest(_write(tmp_path, body))
    plans = plan_shards(m)
    keys = [r.key for p in plans for r in p.rows]
    assert [len(p.rows) for p in plans] == [5, 5, 2]
    assert keys[:3] == ["sk/astronaut.png#0", "sk/astronaut.png#1", "sk/astronaut.png#2"]
    files = [k.split("#")[0] for k in keys[::3]]
    assert files == sorted(files)
    assert [p.inputs_hash for p in plans] == [p.inputs_hash for p in plan_shards(m)]
    body["sources"][0]["limit"] = 2
    assert len([r for p in plan_shards(load_manifest(_write(tmp_path, body))) for r in p.rows]) == 6


# ---------------------------------------------------------------- extends ---


def test_extends_overrides_only_what_it_names(photo_dir: Path, tmp_path: Path) -> None:
    parent = _base(photo_dir, tmp_path)
    parent["degrade"] = {"crops_per_image": 3, "rows_per_shard": 5, "usm_gt": True}
    parent["train"] = {"batch_size": 32, "lambda_rgb": 0.1}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "full.json").write_text(json.dumps(parent))
    child = tmp_path / "paper" / "no_rgb.json"
    child.parent.mkdir()
    child.write_text(json.dumps({"extends": "../base/full.json", "name": "no-rgb",
                                 "train": {"lambda_rgb": 0.0}, "degrade": {"usm_gt": False}}))
    m = load_manifest(child)
    assert m.name == "no-rgb" and m.seed == parent["seed"] and m.sources[0].root == photo_dir
    assert m.raw["train"] == {"batch_size": 32, "lambda_rgb": 0.0}  # objects merge key by key
    assert (m.degrade.crops_per_image, m.degrade.rows_per_shard, m.degrade.usm_gt) == (3, 5, False)
    assert m.chain == (child.resolve(), (tmp_path / "base" / "full.json").resolve())
    grandchild = tmp_path / "paper" / "g.json"
    grandchild.write_text(json.dumps({"extends": "no_rgb.json", "sources": [
        {"name": "other", "root": str(photo_dir), "limit": 1}]}))
    g = load_manifest(grandchild)
    assert [s.name for s in g.sources] == ["other"] and g.raw["train"]["lambda_rgb"] == 0.0  # lists replace


def test_extends_cycle_missing_parent_and_bad_value(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"extends": "b.json", "name": "a"}))
    b.write_text(json.dumps({"extends": "a.json", "name": "b"}))
    with pytest.raises(ManifestError, match=r"cycle: .*a\.json -> .*b\.json -> .*a\.json"):
        load_manifest(a)
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"extends": "nope.json", "name": "c"}))
    with pytest.raises(ManifestError, match=r"nope\.json: cannot read manifest \(extended by .*c\.json\)"):
        load_manifest(c)
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"extends": 3, "name": "d"}))
    with pytest.raises(ManifestError, match="extends should be a path"):
        load_manifest(d)


def test_print_manifest_shows_the_resolved_manifest(photo_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import run_script

    parent = _base(photo_dir, tmp_path)
    parent["sources"][0]["root"] = "${PHOTOS}"
    (tmp_path / "p.json").write_text(json.dumps(parent))
    child = tmp_path / "c.json"
    child.write_text(json.dumps({"extends": "p.json", "name": "child", "train": {"lambda_fft": 0.0}}))
    monkeypatch.setenv("PHOTOS", str(photo_dir))
    for job in ("jobs/degrade.py", "jobs/caption.py", "jobs/embed.py", "jobs/latents.py"):
        r = run_script(job, "--manifest", str(child), "--print-manifest")
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)  # pure JSON on stdout
        assert shown["name"] == "child" and shown["train"] == {"lambda_fft": 0.0}
        assert shown["sources"][0]["root"] == str(photo_dir) and shown["seed"] == parent["seed"]
        assert str(child.resolve()) in r.stderr and str((tmp_path / "p.json").resolve()) in r.stderr
    monkeypatch.delenv("PHOTOS")
    r = run_script("jobs/degrade.py", "--manifest", str(child), "--print-manifest")
    assert r.returncode == 2 and "PHOTOS" in r.stderr
