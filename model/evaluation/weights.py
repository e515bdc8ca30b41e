"""Where every learned metric's weight files live, and where each comes from.

Nothing here downloads. Before a metric is built (iqa.py), every file it loads is looked
up in the cache folder its library reads, and a missing one stops that metric with the
exact path to put it in and the address it comes from. The library is then never asked
to fetch anything, so a machine without internet gets the answer at once, and a machine
with internet downloads only when `--download` says so.

The cache folders are the libraries' own, resolved the libraries' way, so the paths named
in an error are the paths the libraries will read:

  <hub>   torch.hub.get_dir(): $TORCH_HOME/hub (default ~/.cache/torch/hub)
          <hub>/checkpoints  torchvision backbones (alexnet, vgg16)
          <hub>/pyiqa        pyiqa's own files (fixed when pyiqa is first imported)
          <hub>/clip         OpenAI CLIP checkpoints for CLIPIQA
  <hf>    huggingface_hub's HF_HUB_CACHE ($HF_HUB_CACHE, else $HF_HOME/hub, default
          ~/.cache/huggingface/hub), fixed when huggingface_hub is first imported: timm towers

Files whose published name carries a hash (torchvision's `-7be5be79` suffixes are sha256
prefixes; OpenAI's CLIP URL holds the whole sha256) are hashed before use: a truncated
copy is reported instead of being handed to a loader, which for CLIP would otherwise
delete and re-download it. The list is pyiqa 0.1.16's (read from its archs/*_arch.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PYIQA_VERSION = "0.1.16"
PYIQA_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
TORCHVISION_URL = "https://download.pytorch.org/models/"
HF_WEIGHTS_FILE = "model.safetensors"  # what timm loads first from a hub repo


@dataclasses.dataclass(frozen=True)
class Caches:
    """The cache folders the metric libraries read (see the module docstring)."""

    torch_hub: Path
    pyiqa: Path
    hf_hub: Path

    @classmethod
    def of_libraries(cls) -> "Caches":
        """Resolved as torch, pyiqa and huggingface_hub themselves resolve them, now."""
        import torch.hub

        hub = Path(torch.hub.get_dir())
        util = sys.modules.get("pyiqa.utils.download_util")
        pyiqa = Path(util.DEFAULT_CACHE_DIR) if util is not None and getattr(util, "DEFAULT_CACHE_DIR", None) \
            else hub / "pyiqa"
        from huggingface_hub import constants

        return cls(hub, pyiqa, Path(constants.HF_HUB_CACHE))


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One file a metric loads. `cache`: "torchvision" | "pyiqa" | "clip" | "hf" (then
    `name` is a hub repo id and `filename` the file in it)."""

    cache: str
    name: str
    url: str
    sha256: str | None = None  # the whole digest, or a prefix of it
    filename: str = ""

    def path(self, caches: Caches) -> Path:
        """Where the library looks for it (for "hf": the file of the cached snapshot when
        present, else the repo's cache folder)."""
        if self.cache == "hf":
            found = hf_cached_file(self.name, self.filename or HF_WEIGHTS_FILE, caches.hf_hub)
            return found or caches.hf_hub / ("models--" + self.name.replace("/", "--"))
        if self.cache == "pyiqa":
            return caches.pyiqa / self.name
        return caches.torch_hub / {"torchvision": "checkpoints", "clip": "clip"}[self.cache] / self.name

    def problem(self, caches: Caches) -> str | None:
        """None when the file is in place and intact; else what is wrong with it."""
        if self.cache == "hf":
            if hf_cached_file(self.name, self.filename or HF_WEIGHTS_FILE, caches.hf_hub) is None:
                return "missing"
            return None
        p = self.path(caches)
        if not p.is_file():
            return "missing"
        if self.sha256 and not file_sha256(p).startswith(self.sha256):
            return f"its sha256 does not start with {self.sha256} (truncated or another file); replace it"
        return None


def hf_cached_file(repo: str, filename: str, cache_dir: Path) -> Path | None:
    """The cached snapshot file of a hub repo, looked up without any network access."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir))
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pyiqa(name: str) -> WeightFile:
    return WeightFile("pyiqa", name, PYIQA_HF + name)


def _torchvision(name: str) -> WeightFile:
    return WeightFile("torchvision", name, TORCHVISION_URL + name, sha256=name.rsplit("-", 1)[1].split(".")[0])


def hf_repo(repo: str, filename: str = HF_WEIGHTS_FILE) -> WeightFile:
    return WeightFile("hf", repo, f"https://huggingface.co/{repo}/resolve/main/{filename}", filename=filename)


_RN50_SHA = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
_CLIP_RN50 = WeightFile("clip", "RN50.pt", f"https://openaipublic.azureedge.net/clip/models/{_RN50_SHA}/RN50.pt",
                        sha256=_RN50_SHA)
_MANIQA_BACKBONE = hf_repo("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k")

# pyiqa 0.1.16 metric name -> every file it loads.
PYIQA_FILES: dict[str, tuple[WeightFile, ...]] = {
    "lpips": (_torchvision("alexnet-owt-7be5be79.pth"), _pyiqa("LPIPS_v0.1_alex-df73285e.pth")),
    "lpips-vgg": (_torchvision("vgg16-397923af.pth"), _pyiqa("LPIPS_v0.1_vgg-a78928a0.pth")),
    "dists": (_torchvision("vgg16-397923af.pth"), _pyiqa("DISTS_weights-f5e65c96.pth")),
    "niqe": (_pyiqa("niqe_modelparameters.mat"),),
    "maniqa": (_MANIQA_BACKBONE, _pyiqa("ckpt_koniq10k.pt")),
    "maniqa-kadid": (_MANIQA_BACKBONE, _pyiqa("ckpt_kadid10k.pt")),
    "maniqa-pipal": (_MANIQA_BACKBONE, _pyiqa("MANIQA_PIPAL-ae6d356b.pth")),
    "musiq": (_pyiqa("musiq_koniq_ckpt-e95806b9.pth"),),
    "musiq-ava": (_pyiqa("musiq_ava_ckpt-e8d3f067.pth"),),
    "musiq-spaq": (_pyiqa("musiq_spaq_ckpt-358bb6af.pth"),),
    "musiq-paq2piq": (_pyiqa("musiq_paq2piq_ckpt-364c0c84.pth"),),
    "clipiqa": (_CLIP_RN50,),
    "fid": (_pyiqa("pt_inception-2015-12-05-6726825d.pth"),),
}


class MissingWeights(Exception):
    """Files a metric needs are missing or damaged; the message says where each goes."""

    def __init__(self, problems: Sequence[tuple[Path, str, str]], caches: Caches) -> None:
        self.problems = list(problems)
        lines = [f"weight files not in place (nothing was downloaded): {self.problems[0][0]}",
                 "  needs (path   <- source):"]
        lines += [f"    {path}   <- {url}" + ("" if why == "missing" else f"   [{why}]")
                  for path, url, why in self.problems]
        lines.append(provide_hint(caches))
        super().__init__("\n".join(lines))


def provide_hint(caches: Caches) -> str:
    return (f"  provide: download each source to its path (a Hugging Face repo: `hf download <repo> "
            f"{HF_WEIGHTS_FILE} --cache-dir {caches.hf_hub}`), or run once with --download on a machine with "
            f"internet and copy the caches over; the folders follow TORCH_HOME (torch hub: {caches.torch_hub}) and "
            f"HF_HUB_CACHE / HF_HOME (Hugging Face: {caches.hf_hub}); docs/evaluation.md lists every file.")


def check_files(files: Sequence[WeightFile], caches: Caches) -> None:
    """Raise MissingWeights naming every file that is not in place, all at once."""
    problems = []
    for f in files:
        why = f.problem(caches)
        if why is not None:
            problems.append((f.path(caches), f.url, why))
    if problems:
        raise MissingWeights(problems, caches)
