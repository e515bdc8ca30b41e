"""The two attention layouts (`train.attention_layout`) and how their trainable parts are made,
checked, hooked in, grouped for counting, saved and read.

* ``"paper"`` (the default): the authors' release. Processor = the ControlNet's RGB
  conditioning embedding (16, 32, 96, 256) + three RGB heads (model/networks/conditioning.py);
  ControlNet conditioned on the LQ↑ image; Refine Layer 1024 → 1024 → 1024 → 512; image and
  structure attention as full `Transformer2DModel` blocks in the UNet and the ControlNet
  (model/networks/blocks.py). 997,804,953 trainable parameters at SD1.5 size.
* ``"adapter"``: this project's lighter design. Processor = a small conv net of its own
  (model/networks/processor.py) whose H/8 features condition a feature ControlNet
  (model/networks/controlnet.py); Refine Layer → the UNet's cross_attention_dim; image and
  structure attention as key/value/output projections inside SD's own `attn2` layers
  (model/networks/attention.py). 416,498,761 trainable parameters at SD1.5 size.

Both share the frozen SD1.5 and CLIP parts, the forward of `SSPIR`, the losses and the
trainer; a layout only says what its four trainable parts are. The ablation switches
(model/networks/switches.py) change which of them exist and what they hold: the Refine
Layer's kind, and for the paper layout which transformers `PriorBlocks` has (without image
attention there is no Refine Layer). A trainable folder records its layout, its parts and
its switches in `layout.json`; loading one layout's folder into the other, or a folder of
other switches, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from model.networks.attention import PriorAttentionSet
from model.networks.blocks import IMAGE, STRUCTURE, PriorBlocks
from model.networks.conditioning import (RELEASE_CHANNELS, RGBHeads, check_rgb_controlnet,
                                         install_precomputed_embedding, rgb_controlnet_from_unet)
from model.networks.controlnet import controlnet_from_unet, load_controlnet
from model.networks.prior_inputs import PriorInputs
from model.networks.processor import Processor
from model.networks.refine import RefineLayer
from model.networks.switches import PriorSwitches

LAYOUT_FILE = "layout.json"
LAYOUT_FORMAT = "ssp-ir.trainable"
LAYOUT_VERSION = 1
PAPER_IMAGE_DIM = 512  # the release's TPBNet(last_dim=512): the width of the refined image tokens


class LayoutMismatchError(ValueError):
    """Trainable parts of one attention layout offered to a model of the other."""


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


class AttentionLayout:
    """What differs between the layouts; `SSPIR` does the rest."""

    name = ""
    prior_part = ""
    processor_cls: type[nn.Module] = nn.Module

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part the layout can have (the full model's)."""
        return ("processor", "controlnet", "refine", self.prior_part)

    def part_names(self, switches: PriorSwitches) -> tuple[str, ...]:
        """The parts a model with `switches` has: no Refine Layer without image attention."""
        return tuple(p for p in self.parts if p != "refine" or switches.has_refine)

    # building --------------------------------------------------------------
    def new_controlnet(self, unet: UNet2DConditionModel, processor_kwargs: dict[str, Any] | None) -> ControlNetModel:
        raise NotImplementedError

    def fresh(self, unet: UNet2DConditionModel, image_width: int, processor_kwargs: dict[str, Any] | None = None,
              refine_kwargs: dict[str, Any] | None = None, controlnet: ControlNetModel | None = None,
              switches: PriorSwitches = PriorSwitches()) -> dict[str, nn.Module]:
        raise NotImplementedError

    def check(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel, image_width: int,
              switches: PriorSwitches = PriorSwitches()) -> None:
        names = self.part_names(switches)
        if set(parts) != set(names):
            raise ValueError(f"the {self.name} layout's trainable parts with {switches.label()} are {names}, "
                             f"got {sorted(parts)}")
        if tuple(parts["controlnet"].config.block_out_channels) != tuple(unet.config.block_out_channels):
            raise ValueError("the ControlNet was made for another UNet (block_out_channels differ)")
        if "refine" in parts:
            if parts["refine"].config.in_dim != image_width:
                raise ValueError(f"the Refine Layer takes width {parts['refine'].config.in_dim}, "
                                 f"the image encoder gives {image_width}")
            kind = parts["refine"].config.get("kind", "mlp")
            if kind != switches.refine:
                raise ValueError(f"the Refine Layer is of kind {kind!r}, the switches say refine {switches.refine!r}")

    def install(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel) -> None:
        raise NotImplementedError

    # forward pieces ----------------------------------------------------------
    def conditioning(self, parts: dict[str, nn.Module], lq_up: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the ControlNet's condition, [rgb H/2, H/4, H/8]) from the LQ↑ in [-1, 1]."""
        raise NotImplementedError

    def controlnet_kwargs(self, image_tokens: torch.Tensor) -> dict[str, Any] | None:
        return None

    def enable_gradient_checkpointing(self, parts: dict[str, nn.Module], enable: bool) -> None:
        """Checkpointing of the layout's own blocks (the UNet's and ControlNet's are SSPIR's)."""

    # counting ----------------------------------------------------------------
    def groups(self, parts: dict[str, nn.Module]) -> dict[str, int]:
        """Trainable parameters per part, in the order docs/model.md tabulates them."""
        raise NotImplementedError

    # saving --------------------------------------------------------------------
    def read_part(self, name: str, folder: Path) -> nn.Module:
        if name == "controlnet":
            return ControlNetModel.from_pretrained(str(folder / name), torch_dtype=torch.float32)
        if name == "refine":
            return RefineLayer.from_pretrained(str(folder / name), torch_dtype=torch.float32)
        if name == "processor":
            return self.processor_cls.from_pretrained(str(folder / name), torch_dtype=torch.float32)
        return _read_tensor_part(folder, name, {"prior_attention": PriorAttentionSet, "prior_blocks": PriorBlocks}[name])


class AdapterLayout(AttentionLayout):
    name = "adapter"
    prior_part = "prior_attention"
    processor_cls = Processor

    def new_controlnet(self, unet: UNet2DConditionModel, processor_kwargs: dict[str, Any] | None) -> ControlNetModel:
        return controlnet_from_unet(unet, (processor_kwargs or {}).get("feature_channels",
                                                                       unet.config.block_out_channels[0]))

    def fresh(self, unet: UNet2DConditionModel, image_width: int, processor_kwargs: dict[str, Any] | None = None,
              refine_kwargs: dict[str, Any] | None = None, controlnet: ControlNetModel | None = None,
              switches: PriorSwitches = PriorSwitches()) -> dict[str, nn.Module]:
        switches.check(self.name)
        processor = Processor(**{"feature_channels": unet.config.block_out_channels[0], **(processor_kwargs or {})})
        if controlnet is None:
            controlnet = controlnet_from_unet(unet, processor.config.feature_channels)
        refine = RefineLayer(**{"in_dim": image_width, "hidden_dim": image_width,
                                "out_dim": unet.config.cross_attention_dim, "kind": switches.refine,
                                **(refine_kwargs or {})})
        prior = PriorAttentionSet.from_unet(unet, image_dim=refine.config.out_dim)
        return {"processor": processor, "controlnet": controlnet, "refine": refine, "prior_attention": prior}

    def check(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel, image_width: int,
              switches: PriorSwitches = PriorSwitches()) -> None:
        switches.check(self.name)
        super().check(parts, unet, image_width, switches)
        if not isinstance(parts["processor"], Processor):
            raise LayoutMismatchError("the adapter layout's Processor is model.networks.processor.Processor")
        parts["prior_attention"].check_matches(unet)
        if parts["controlnet"].config.conditioning_channels != parts["processor"].config.feature_channels:
            raise ValueError("the ControlNet's conditioning_channels differ from the Processor's feature_channels")

    def install(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel) -> None:
        parts["prior_attention"].install(unet)

    def conditioning(self, parts: dict[str, nn.Module], lq_up: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return parts["processor"](lq_up)

    def groups(self, parts: dict[str, nn.Module]) -> dict[str, int]:
        prior = parts["prior_attention"]
        return {"controlnet": _count(parts["controlnet"].parameters()),
                "processor": _count(parts["processor"].parameters()),
                "refine": _count(parts["refine"].parameters()) if "refine" in parts else 0,
                "prior_attention_image": _count(prior.image_parameters()),
                "prior_attention_structure": _count(prior.structure_parameters())}

    def read_part(self, name: str, folder: Path) -> nn.Module:
        if name == "controlnet":
            return load_controlnet(folder / name, torch_dtype=torch.float32)
        return super().read_part(name, folder)


class PaperLayout(AttentionLayout):
    name = "paper"
    prior_part = "prior_blocks"
    processor_cls = RGBHeads

    def new_controlnet(self, unet: UNet2DConditionModel, processor_kwargs: dict[str, Any] | None) -> ControlNetModel:
        return rgb_controlnet_from_unet(unet, tuple((processor_kwargs or {}).get("channels", RELEASE_CHANNELS)))

    def fresh(self, unet: UNet2DConditionModel, image_width: int, processor_kwargs: dict[str, Any] | None = None,
              refine_kwargs: dict[str, Any] | None = None, controlnet: ControlNetModel | None = None,
              switches: PriorSwitches = PriorSwitches()) -> dict[str, nn.Module]:
        switches.check(self.name)
        heads = RGBHeads(**(processor_kwargs or {}))
        if controlnet is None:
            controlnet = rgb_controlnet_from_unet(unet, tuple(heads.config.channels))
        parts: dict[str, nn.Module] = {"processor": heads, "controlnet": controlnet}
        image_dim = PAPER_IMAGE_DIM
        if switches.has_refine:
            parts["refine"] = RefineLayer(**{"in_dim": image_width, "hidden_dim": image_width, "out_dim": image_dim,
                                             "kind": switches.refine, **(refine_kwargs or {})})
            image_dim = parts["refine"].config.out_dim
        parts["prior_blocks"] = PriorBlocks.for_unet(unet, image_dim=image_dim, image=switches.image_attention,
                                                     structure=switches.structure_attention)
        return parts

    def check(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel, image_width: int,
              switches: PriorSwitches = PriorSwitches()) -> None:
        switches.check(self.name)
        super().check(parts, unet, image_width, switches)
        if not isinstance(parts["processor"], RGBHeads):
            raise LayoutMismatchError("the paper layout's Processor is model.networks.conditioning.RGBHeads")
        blocks = parts["prior_blocks"]
        kinds = blocks.kinds()
        for kind, on in ((IMAGE, switches.image_attention), (STRUCTURE, switches.structure_attention)):
            if on != (kind in kinds):
                raise ValueError(f"the prior blocks {'lack' if on else 'have'} {kind}-attention transformers, the "
                                 f"switches say {kind}_attention {'true' if on else 'false'}")
        blocks.check_matches(unet)
        check_rgb_controlnet(parts["controlnet"], parts["processor"])
        dim = blocks.image_dim
        if dim is not None and "refine" in parts and dim != parts["refine"].config.out_dim:
            raise ValueError(f"the image-attention blocks take tokens of width {dim}, the Refine Layer gives "
                             f"{parts['refine'].config.out_dim}")

    def install(self, parts: dict[str, nn.Module], unet: UNet2DConditionModel) -> None:
        parts["prior_blocks"].install(unet, parts["controlnet"])
        install_precomputed_embedding(parts["controlnet"])

    def conditioning(self, parts: dict[str, nn.Module], lq_up: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return parts["processor"](parts["controlnet"].controlnet_cond_embedding, lq_up)

    def controlnet_kwargs(self, image_tokens: torch.Tensor) -> dict[str, Any] | None:
        return PriorInputs(image_tokens=image_tokens).kwargs()

    def enable_gradient_checkpointing(self, parts: dict[str, nn.Module], enable: bool) -> None:
        parts["prior_blocks"].enable_gradient_checkpointing(enable)

    def groups(self, parts: dict[str, nn.Module]) -> dict[str, int]:
        blocks = {k: _count(v) for k, v in parts["prior_blocks"].group_parameters().items()}
        return {"controlnet": _count(parts["controlnet"].parameters()),
                "image_attention_controlnet": blocks.get("image_attention_controlnet", 0),
                "image_attention_unet": blocks.get("image_attention_unet", 0),
                "structure_attention": blocks.get("structure_attention", 0),
                "refine": _count(parts["refine"].parameters()) if "refine" in parts else 0,
                "processor": _count(parts["processor"].parameters())}


LAYOUTS: dict[str, AttentionLayout] = {layout.name: layout for layout in (PaperLayout(), AdapterLayout())}
DEFAULT_LAYOUT = "paper"


def get_layout(name: str) -> AttentionLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown attention_layout {name!r}; choose one of {sorted(LAYOUTS)}") from None


# ------------------------------------------------------------------ files ---


def _read_tensor_part(folder: Path, name: str, cls: type) -> nn.Module:
    from safetensors.torch import load_file

    module = cls.from_config(json.loads((folder / f"{name}.json").read_text()))
    module.load_state_dict(load_file(str(folder / f"{name}.safetensors")), strict=True)
    return module


def part_files(layout: AttentionLayout, switches: PriorSwitches = PriorSwitches()) -> list[str]:
    """What a trainable folder of `layout` with `switches` holds (folders end with /)."""
    names = layout.part_names(switches)
    return ([f"{n}/" for n in ("processor", "controlnet", "refine") if n in names]
            + [f"{layout.prior_part}.safetensors", f"{layout.prior_part}.json"])


def save_parts(layout: AttentionLayout, parts: dict[str, nn.Module], directory: str | Path,
               switches: PriorSwitches = PriorSwitches()) -> Path:
    """Write `parts` (safetensors + JSON only): diffusers `save_pretrained` for processor,
    controlnet and refine, one safetensors file + its JSON config for the prior part, and
    layout.json naming the layout, the parts and the switches."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = layout.part_names(switches)
    for name in ("processor", "controlnet", "refine"):
        if name in names:
            parts[name].save_pretrained(str(out / name), safe_serialization=True)
    prior = parts[layout.prior_part]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prior.state_dict().items()}
    save_file(tensors, str(out / f"{layout.prior_part}.safetensors"), metadata={"format": "pt"})
    (out / f"{layout.prior_part}.json").write_text(json.dumps(prior.config, indent=1) + "\n")
    (out / LAYOUT_FILE).write_text(json.dumps({"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
                                               "attention_layout": layout.name, "parts": list(names),
                                               "switches": switches.to_dict()}, indent=1) + "\n")
    return out


def _layout_meta(src: Path) -> dict[str, Any] | None:
    if not (src / LAYOUT_FILE).is_file():
        return None
    meta = json.loads((src / LAYOUT_FILE).read_text())
    if meta.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"{src / LAYOUT_FILE} is not an SSP-IR trainable-parts file")
    return meta


def folder_layout(directory: str | Path) -> str:
    """The attention layout a trainable folder holds (folders written before layout.json
    existed hold the adapter layout's files)."""
    src = Path(directory)
    meta = _layout_meta(src)
    if meta is not None:
        return get_layout(meta["attention_layout"]).name
    if (src / "prior_attention.json").is_file():
        return "adapter"
    raise FileNotFoundError(f"{src} lacks {LAYOUT_FILE}; expected a folder written by SSPIR.save_trainable")


def folder_switches(directory: str | Path) -> PriorSwitches:
    """The ablation switches a trainable folder was trained with (the full model's for a
    folder written before layout.json recorded them)."""
    meta = _layout_meta(Path(directory)) or {}
    return PriorSwitches.from_dict(meta.get("switches"))


def read_parts(directory: str | Path) -> tuple[AttentionLayout, dict[str, nn.Module]]:
    """(layout, its trainable parts on the CPU in fp32) from a folder written by `save_parts`."""
    src = Path(directory)
    layout = get_layout(folder_layout(src))
    switches = folder_switches(src)
    expected = part_files(layout, switches)
    missing = [e for e in expected if not (src / e.rstrip("/")).exists()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}; expected a folder written by "
                                f"SSPIR.save_trainable ({', '.join(expected)})")
    return layout, {name: layout.read_part(name, src) for name in layout.part_names(switches)}
