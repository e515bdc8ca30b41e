"""The ablation switches of the paper's Tables III and V: which priors a model gets.

Each is a key of the manifest's `train` section (model/training/config.py), recorded with the
trainable parts (`layout.json` of every trainable folder) and in the run's identity, so a
checkpoint says which variant it is, restoration honours it and a resume that would change
it is refused (model/training/identity.py).

* ``text_prior``: ``"caption"`` (the build's caption embeddings, with null-text dropout) or
  ``"none"``: every sample, in training and restoration, gets the empty prompt's embedding
  (the "null text embedding" row of Table III).
* ``image_prior``: ``"refined"`` (CLIP patch tokens of the LQ, then the Refine Layer) or
  ``"none"``: the null image embedding, zeros in place of the CLIP patch tokens (B, 256,
  width), as IP-Adapter's unconditional image embedding is zeros at the encoder's output;
  the Refine Layer still maps them, so the image blocks keep their parameters and attend to
  a learned context that carries nothing about the image (the CLIP tower is not run).
* ``refine``: ``"mlp"`` (the paper's three-layer Refine Layer) or ``"linear"`` (one linear
  layer, CLIP width → token width).
* ``image_attention``, ``structure_attention``: ``False`` removes the image-attention or
  structure-attention transformers (paper layout). Without image attention nothing reads
  the image tokens, so the Refine Layer is removed too and the CLIP tower is not run.

The adapter layout takes the first three; its prior attention lives inside SD's own `attn2`
layers, and switching its image or structure branch off is refused (not a variant of the
paper's network).
"""

from __future__ import annotations

import dataclasses
from typing import Any

TEXT_PRIORS = ("caption", "none")
IMAGE_PRIORS = ("refined", "none")
REFINE_KINDS = ("mlp", "linear")
PAPER_ONLY = ("image_attention", "structure_attention")


@dataclasses.dataclass(frozen=True)
class PriorSwitches:
    text_prior: str = "caption"
    image_prior: str = "refined"
    refine: str = "mlp"
    image_attention: bool = True
    structure_attention: bool = True

    def problems(self, attention_layout: str = "paper") -> list[str]:
        """What is wrong, each naming the `train` key."""
        out = []
        for key, allowed in (("text_prior", TEXT_PRIORS), ("image_prior", IMAGE_PRIORS), ("refine", REFINE_KINDS)):
            if getattr(self, key) not in allowed:
                out.append(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in PAPER_ONLY:
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key} must be true or false, got {getattr(self, key)!r}")
            elif attention_layout != "paper" and not getattr(self, key):
                out.append(f"{key}: false removes the paper layout's {key.split('_')[0]}-attention transformers; the "
                           f"{attention_layout} layout's prior attention is inside SD's attn2 layers and cannot be "
                           "switched off (use attention_layout paper for Table V)")
        if not self.image_attention and self.image_prior != "refined":
            out.append("image_prior none needs image_attention: without image attention nothing reads the image "
                       "embedding (set image_prior back to refined)")
        if not self.image_attention and self.refine != "mlp":
            out.append("refine linear needs image_attention: without image attention there is no Refine Layer")
        return out

    def check(self, attention_layout: str = "paper") -> "PriorSwitches":
        problems = self.problems(attention_layout)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- what the switches imply ------------------------------------------------
    @property
    def has_refine(self) -> bool:
        """Whether the model has a Refine Layer (something reads the image tokens)."""
        return self.image_attention

    @property
    def runs_image_encoder(self) -> bool:
        return self.image_attention and self.image_prior == "refined"

    @property
    def is_default(self) -> bool:
        return self == PriorSwitches()

    def label(self) -> str:
        """The switches that differ from the full model, e.g. "image_attention false"; "full" if none."""
        diff = [f"{k} {_json(v)}" for k, v in self.to_dict().items() if v != getattr(PriorSwitches(), k)]
        return ", ".join(diff) or "full"

    # --- JSON -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PriorSwitches":
        """From a mapping that may hold other keys (a `train` section) or lack some (a folder
        written before the switches existed: the full model's values)."""
        d = d or {}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def differences(self, other: "PriorSwitches") -> list[tuple[str, str, str]]:
        """(key, this value, the other's), as the manifest writes them, for each switch that differs."""
        return [(k, _json(v), _json(getattr(other, k))) for k, v in self.to_dict().items() if v != getattr(other, k)]


def _json(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)
