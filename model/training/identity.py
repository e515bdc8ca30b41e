"""What a training run is, for refusing a `--resume` that would silently train something else.

A checkpoint records three things besides its weights, and a resumed run must match all of
them (model/training/trainer.py refuses with exit status 2 and this module's list otherwise):

* the ablation switches (model/networks/switches.py: text_prior, image_prior, refine,
  image_attention, structure_attention), each named when it differs: another value is
  another row of the paper's tables, not a continuation (a checkpoint written before the
  switches were recorded is the full model);

* the trainable layout: the attention layout and, per trainable part, its configuration and
  the names and shapes of its tensors. A resume after changing `train.processor` widths
  would otherwise load nothing into the new Processor and keep stepping Adam state that
  belongs to parameters no longer in the model;
* the model references: `train.pretrained` (SD1.5) and `train.image_encoder`, as written;
* the build: shard ids, rows per shard and a sha256 over the shards' recorded sha256
  (model/training/verify.py `build_fingerprint`): the data order of a resumed run is a
  function of the rows, so another build is another run.

World size and batch settings may change (the data order continues by global batch);
learning rate and loss weights may change too (a deliberate schedule change).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from model.networks.switches import PriorSwitches


def _public_config(module: nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None) or {}
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not str(k).startswith("_")},
                                 sort_keys=True, default=str))


def _tensor_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()


def trainable_layout(model: Any) -> dict[str, Any]:
    """The attention layout and each trainable part's configuration and tensor layout."""
    return {"attention_layout": model.attention_layout, "switches": model.switches.to_dict(),
            "parts": {name: {"config": _public_config(module), "tensors": _tensor_hash(module),
                             "parameters": sum(p.numel() for p in module.parameters())}
                      for name, module in model.trainable_modules().items()}}


def run_identity(model: Any, pretrained: str, image_encoder: str, build: dict[str, Any]) -> dict[str, Any]:
    return {"trainable": trainable_layout(model), "models": {"pretrained": pretrained, "image_encoder": image_encoder},
            "build": build}


def _config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:limit]]
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _short(v: Any, width: int = 60) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and the run's, one line per difference."""
    st, ct = saved.get("trainable", {}), current["trainable"]
    # A checkpoint written before the switches were recorded is the full model's.
    old_sw, new_sw = PriorSwitches.from_dict(st.get("switches")), PriorSwitches.from_dict(ct.get("switches"))
    out = [f"train.{k}: checkpoint {a}, this run {b}" for k, a, b in old_sw.differences(new_sw)]
    if st.get("attention_layout") != ct["attention_layout"]:
        out.append(f"train.attention_layout: checkpoint {st.get('attention_layout')!r}, this run "
                   f"{ct['attention_layout']!r}")
    elif not out:  # parts that differ because a switch does would only restate it
        sp, cp = st.get("parts", {}), ct["parts"]
        for name in sorted(set(sp) | set(cp)):
            a, b = sp.get(name), cp.get(name)
            if a is None or b is None:
                out.append(f"trainable part {name!r} only in the {'run' if a is None else 'checkpoint'}")
            elif a["config"] != b["config"]:
                out.append(f"trainable part {name!r}: configuration changed ({_config_diff(a['config'], b['config'])})")
            elif a["tensors"] != b["tensors"]:
                out.append(f"trainable part {name!r}: same configuration but other tensor shapes "
                           f"({a['parameters']:,} -> {b['parameters']:,} parameters; another UNet or image encoder?)")
    for key in ("pretrained", "image_encoder"):
        a, b = saved.get("models", {}).get(key), current["models"][key]
        if a != b:
            out.append(f"train.{key}: checkpoint {a!r}, this run {b!r}")
    sb, cb = saved.get("build", {}), current["build"]
    if sb.get("shards") != cb["shards"]:
        out.append(f"build: shards {_ids(sb.get('shards'))} in the checkpoint, {_ids(cb['shards'])} now")
    elif sb.get("rows") != cb["rows"]:
        diff = [s for s, a, b in zip(cb["shards"], sb.get("rows") or [], cb["rows"]) if a != b]
        out.append(f"build: rows per shard changed (shards {_ids(diff)}; {sb.get('total_rows')} -> "
                   f"{cb['total_rows']} rows)")
    elif sb.get("sha256") != cb["sha256"]:
        out.append("build: same shards and rows but other bytes (a stage was rebuilt since the checkpoint)")
    return out


def _ids(ids: list[int] | None) -> str:
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 3:
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))
