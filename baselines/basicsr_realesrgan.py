"""BasicSR 1.4.2's Real-ESRGAN second-order degradation on CPU torch: the baseline.

Why it exists: SSP-IR's authors built their pairs with SeeSR's
``utils_data/make_paired_data.py``, which draws kernels in BasicSR's
``RealESRGANDataset.__getitem__`` and degrades with the body of
``RealESRGANModel.feed_data``. To check our degradation against it (tests/test_basicsr_parity.py)
and to compare speed and output statistics (benchmarks/degrade.py), this module strings
together BasicSR's *own* functions in the same order with the options of Real-ESRGAN's
``train_realesrgan_x4plus.yml`` (batch 1, CPU, float32). It reimplements no image
operation; it only adds the glue: the crop geometry (taken from our recipe so both
pipelines see the same 512² crops), optional per-stage timers and PNG encoding.

Two ways to run it:

* :meth:`BasicSRPipeline.make_pair` — the faithful pipeline with BasicSR's own random
  draws (Python ``random``, ``np.random`` and torch's generator, seeded once).
* :meth:`BasicSRPipeline.degrade_recipe` — BasicSR's operations driven by the draws of
  one of *our* recipes, starting from our stored HQ. The pair-by-pair PSNR difference
  to our LQ then isolates implementation differences (cv2 vs torch resize, libjpeg vs
  DiffJPEG, …) from sampling noise.

BasicSR 1.4.2 imports ``torchvision.transforms.functional_tensor``, removed from
torchvision; :func:`import_basicsr` registers a stand-in module re-exporting
``rgb_to_grayscale`` (the only name BasicSR takes from it) before importing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import random
import sys
import types
from collections.abc import Iterator
from typing import Any, Callable, ContextManager

import cv2
import numpy as np

Timer = Callable[[str], ContextManager[None]]  # e.g. benchmarks' StageTimer: one context per stage name


@contextlib.contextmanager
def _untimed(stage: str) -> Iterator[None]:
    yield

BASICSR_VERSION = "1.4.2"
INSTALL_HINT = (
    f"BasicSR is not installed, so the BasicSR comparison is skipped. Install it with\n"
    f"    .venv/bin/python -m pip install --no-deps basicsr=={BASICSR_VERSION}\n"
    "(or run `make bench`, which does that first). --no-deps because its declared "
    "dependencies pull a second OpenCV build; see docs/benchmarks.md."
)

# Real-ESRGAN options/train_realesrgan_x4plus.yml (identical in SeeSR's make_paired_data.py,
# except SeeSR's unused blur_kernel_size2 = 11: RealESRGANDataset draws both kernels'
# sizes from the hard-coded 7..21 and pads them to 21).
DATASET_OPTS: dict[str, Any] = {
    "blur_kernel_size": 21,
    "kernel_list": ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"],
    "kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob": 0.1,
    "blur_sigma": [0.2, 3],
    "betag_range": [0.5, 4],
    "betap_range": [1, 2],
    "kernel_list2": ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"],
    "kernel_prob2": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob2": 0.1,
    "blur_sigma2": [0.2, 1.5],
    "betag_range2": [0.5, 4],
    "betap_range2": [1, 2],
    "final_sinc_prob": 0.8,
}
KERNEL_RANGE = [2 * v + 1 for v in range(3, 11)]  # RealESRGANDataset: hard-coded 7..21
MODEL_OPTS: dict[str, Any] = {
    "scale": 4,
    "resize_prob": [0.2, 0.7, 0.1],
    "resize_range": [0.15, 1.5],
    "gaussian_noise_prob": 0.5,
    "noise_range": [1, 30],
    "poisson_scale_range": [0.05, 3],
    "gray_noise_prob": 0.4,
    "jpeg_range": [30, 95],
    "second_blur_prob": 0.8,
    "resize_prob2": [0.3, 0.4, 0.3],
    "resize_range2": [0.3, 1.2],
    "gaussian_noise_prob2": 0.5,
    "noise_range2": [1, 25],
    "poisson_scale_range2": [0.05, 2.5],
    "gray_noise_prob2": 0.4,
    "jpeg_range2": [30, 95],
}


class BasicSRMissing(ImportError):
    """BasicSR (or torch) cannot be imported; the message says how to install it."""


def _register_functional_tensor_shim() -> None:
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional as tvf

    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = tvf.rgb_to_grayscale  # type: ignore[attr-defined]
    sys.modules[name] = shim


def import_basicsr() -> types.SimpleNamespace:
    """The BasicSR functions this baseline uses, or :class:`BasicSRMissing` with a hint."""
    try:
        import torch
        import torch.nn.functional as F

        _register_functional_tensor_shim()
        import basicsr
        from basicsr.data import degradations as deg
        from basicsr.utils import DiffJPEG, USMSharp, img2tensor
        from basicsr.utils.img_process_util import filter2D
    except ImportError as e:
        raise BasicSRMissing(f"{INSTALL_HINT}\n(import error: {e})") from e
    return types.SimpleNamespace(
        torch=torch, F=F, version=getattr(basicsr, "__version__", "?"), deg=deg, DiffJPEG=DiffJPEG,
        USMSharp=USMSharp, img2tensor=img2tensor, filter2D=filter2D,
    )


@dataclasses.dataclass
class Geometry:
    """Where the 512² GT comes from: our recipe's pad / crop box / flip, so that BasicSR
    and our pipeline degrade the same pixels."""

    pad: tuple[int, int]  # bottom, right (reflect-101, as RealESRGANDataset pads)
    crop: tuple[int, int, int, int]  # x, y, w, h in the padded image
    hflip: bool

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> "Geometry":
        return cls(tuple(recipe["pad"]), tuple(recipe["crop"]), bool(recipe["hflip"]))  # type: ignore[arg-type]

    def apply(self, img: np.ndarray) -> np.ndarray:
        pad_h, pad_w = self.pad
        if pad_h or pad_w:
            img = cv2.copyMakeBorder(img, 0, int(pad_h), 0, int(pad_w), cv2.BORDER_REFLECT_101)
        x, y, w, h = self.crop
        img = img[y : y + h, x : x + w]
        return np.ascontiguousarray(img[:, ::-1] if self.hflip else img)


@dataclasses.dataclass
class Plan:
    """Every draw of one degradation, in the form BasicSR's operations consume.

    Noise is a callable because the faithful pipeline lets ``random_add_*_pt`` draw
    σ / scale / grey inside, while the recipe-driven one passes fixed values.
    """

    kernel1: Any  # torch (1, 21, 21)
    kernel2: Any
    sinc: Any
    resize1: Callable[[Any], Any]
    noise1: Callable[[Any], Any]
    jpeg1: float
    blur2: bool
    resize2_scale: float
    resize2_mode: str
    noise2: Callable[[Any], Any]
    resize_first: bool  # final order: [resize + sinc] → JPEG, else JPEG → [resize + sinc]
    final_mode: str
    jpeg2: float


@dataclasses.dataclass
class BasicSRPair:
    hq: np.ndarray  # RGB uint8 (the USM-sharpened GT, as SeeSR stores it)
    lq: np.ndarray  # RGB uint8
    png_bytes: int


class BasicSRPipeline:
    """BasicSR's degradation for batch-1 CPU tensors, one instance per benchmark run."""

    def __init__(self, seed: int = 0) -> None:
        self.b = import_basicsr()
        torch = self.b.torch
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.jpeger = self.b.DiffJPEG(differentiable=False)  # as RealESRGANModel.__init__, minus .cuda()
        self.usm_sharpener = self.b.USMSharp()
        self.pulse = torch.zeros(1, 21, 21)
        self.pulse[0, 10, 10] = 1

    # ------------------------------------------------------------ draws --

    def _kernel(self, n: str) -> np.ndarray:
        """One blur kernel as RealESRGANDataset.__getitem__ draws it (``n`` = '' or '2')."""
        deg = self.b.deg
        kernel_size = random.choice(KERNEL_RANGE)
        if np.random.uniform() < DATASET_OPTS["sinc_prob" + n]:
            lo = np.pi / 3 if kernel_size < 13 else np.pi / 5  # "for kernels ranging from [7, 21]"
            kernel = deg.circular_lowpass_kernel(np.random.uniform(lo, np.pi), kernel_size, pad_to=False)
        else:
            sigma = DATASET_OPTS["blur_sigma" + n]
            kernel = deg.random_mixed_kernels(
                DATASET_OPTS["kernel_list" + n], DATASET_OPTS["kernel_prob" + n], kernel_size, sigma, sigma,
                [-math.pi, math.pi], DATASET_OPTS["betag_range" + n], DATASET_OPTS["betap_range" + n],
                noise_range=None)
        pad = (21 - kernel_size) // 2
        return np.pad(kernel, ((pad, pad), (pad, pad)))

    def _final_sinc(self) -> Any:
        torch = self.b.torch
        if np.random.uniform() < DATASET_OPTS["final_sinc_prob"]:
            kernel_size = random.choice(KERNEL_RANGE)
            omega_c = np.random.uniform(np.pi / 3, np.pi)
            return torch.FloatTensor(self.b.deg.circular_lowpass_kernel(omega_c, kernel_size, pad_to=21))[None]
        return self.pulse

    def _updown(self, prob_key: str, range_key: str) -> float:
        updown = random.choices(["up", "down", "keep"], MODEL_OPTS[prob_key])[0]
        if updown == "up":
            return np.random.uniform(1, MODEL_OPTS[range_key][1])
        if updown == "down":
            return np.random.uniform(MODEL_OPTS[range_key][0], 1)
        return 1

    def _random_noise(self, n: str) -> Callable[[Any], Any]:
        deg, o = self.b.deg, MODEL_OPTS
        gray = o["gray_noise_prob" + n]
        if np.random.uniform() < o["gaussian_noise_prob" + n]:
            return lambda x: deg.random_add_gaussian_noise_pt(
                x, sigma_range=o["noise_range" + n], clip=True, rounds=False, gray_prob=gray)
        return lambda x: deg.random_add_poisson_noise_pt(
            x, scale_range=o["poisson_scale_range" + n], gray_prob=gray, clip=True, rounds=False)

    def _jpeg_quality(self, key: str) -> float:
        return float(self.b.torch.zeros(1).uniform_(*MODEL_OPTS[key]))

    def draw_plan(self) -> Plan:
        """BasicSR's own draws: the dataset's three kernels, then feed_data's choices."""
        torch, F = self.b.torch, self.b.F
        kernel1 = torch.FloatTensor(self._kernel(""))[None]
        kernel2 = torch.FloatTensor(self._kernel("2"))[None]
        sinc = self._final_sinc()
        scale1 = self._updown("resize_prob", "resize_range")
        mode1 = random.choice(["area", "bilinear", "bicubic"])
        noise1 = self._random_noise("")
        jpeg1 = self._jpeg_quality("jpeg_range")
        blur2 = np.random.uniform() < MODEL_OPTS["second_blur_prob"]
        scale2 = self._updown("resize_prob2", "resize_range2")
        mode2 = random.choice(["area", "bilinear", "bicubic"])
        noise2 = self._random_noise("2")
        resize_first = np.random.uniform() < 0.5
        final_mode = random.choice(["area", "bilinear", "bicubic"])
        jpeg2 = self._jpeg_quality("jpeg_range2")
        return Plan(kernel1, kernel2, sinc, lambda x: F.interpolate(x, scale_factor=scale1, mode=mode1),
                    noise1, jpeg1, blur2, scale2, mode2, noise2, resize_first, final_mode, jpeg2)

    def plan_from_recipe(self, recipe: dict[str, Any]) -> Plan:
        """The same operations with our recipe's draws; kernels built by BasicSR's functions."""
        torch, F = self.b.torch, self.b.F
        r1 = recipe["resize1"]
        final = recipe["final"]
        return Plan(
            kernel1=torch.FloatTensor(basicsr_kernel(self.b.deg, recipe["blur1"]))[None],
            kernel2=(torch.FloatTensor(basicsr_kernel(self.b.deg, recipe["blur2"]))[None]
                     if recipe["blur2"] is not None else self.pulse),
            sinc=(torch.FloatTensor(basicsr_kernel(self.b.deg, final["sinc"]))[None]
                  if final["sinc"] is not None else self.pulse),
            resize1=lambda x: F.interpolate(x, scale_factor=float(r1["scale"]), mode=r1["mode"]),
            noise1=self._fixed_noise(recipe["noise1"]),
            jpeg1=float(recipe["jpeg1"]),
            blur2=recipe["blur2"] is not None,
            resize2_scale=float(recipe["resize2"]["scale"]),
            resize2_mode=recipe["resize2"]["mode"],
            noise2=self._fixed_noise(recipe["noise2"]),
            resize_first=final["order"] == "resize_sinc_jpeg",
            final_mode=final["resize_mode"],
            jpeg2=float(recipe["jpeg2"]),
        )

    def _fixed_noise(self, p: dict[str, Any]) -> Callable[[Any], Any]:
        deg = self.b.deg
        gray = 1.0 if p["gray"] else 0.0
        if p["type"] == "gaussian":
            return lambda x: deg.add_gaussian_noise_pt(x, sigma=float(p["sigma"]), gray_noise=gray,
                                                       clip=True, rounds=False)
        return lambda x: deg.add_poisson_noise_pt(x, scale=float(p["scale"]), gray_noise=gray,
                                                  clip=True, rounds=False)

    # ------------------------------------------------------------ apply --

    def _jpeg(self, x: Any, quality: float) -> Any:
        q = x.new_full((x.size(0),), quality)  # a fresh tensor: DiffJPEG edits it in place
        return self.jpeger(self.b.torch.clamp(x, 0, 1), quality=q)

    def degrade(self, gt_usm: Any, plan: Plan, t: Timer = _untimed) -> Any:
        """The body of RealESRGANModel.feed_data after USM, one timer per stage."""
        F, filter2D, torch = self.b.F, self.b.filter2D, self.b.torch
        ori_h, ori_w = gt_usm.size()[2:4]
        scale = MODEL_OPTS["scale"]
        with t("blur1"):
            out = filter2D(gt_usm, plan.kernel1)
        with t("resize1"):
            out = plan.resize1(out)
        with t("noise1"):
            out = plan.noise1(out)
        with t("jpeg1"):
            out = self._jpeg(out, plan.jpeg1)
        if plan.blur2:
            with t("blur2"):
                out = filter2D(out, plan.kernel2)
        with t("resize2"):
            size = (int(ori_h / scale * plan.resize2_scale), int(ori_w / scale * plan.resize2_scale))
            out = F.interpolate(out, size=size, mode=plan.resize2_mode)
        with t("noise2"):
            out = plan.noise2(out)

        def resize_sinc(x: Any) -> Any:
            with t("resize3"):
                x = F.interpolate(x, size=(ori_h // scale, ori_w // scale), mode=plan.final_mode)
            with t("sinc"):
                return filter2D(x, plan.sinc)

        def jpeg2(x: Any) -> Any:
            with t("jpeg2"):
                return self._jpeg(x, plan.jpeg2)

        out = jpeg2(resize_sinc(out)) if plan.resize_first else resize_sinc(jpeg2(out))
        with t("convert"):
            return torch.clamp((out * 255.0).round(), 0, 255) / 255.0

    def make_pair(self, path: str, geometry: Geometry, t: Timer = _untimed) -> BasicSRPair:
        """Read → crop → USM → BasicSR draws → second-order degradation → PNGs."""
        with self.b.torch.no_grad():  # feed_data is @torch.no_grad(); DiffJPEG holds Parameters
            return self._make_pair(path, geometry, t)

    def _make_pair(self, path: str, geometry: Geometry, t: Timer) -> BasicSRPair:
        with t("decode"):
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # imfrombytes(float32=True) decodes alike
            if bgr is None:
                raise OSError(f"cv2 cannot read {path}")
            img = bgr.astype(np.float32) / 255.0
        with t("crop"):
            gt = self.b.img2tensor([geometry.apply(img)], bgr2rgb=True, float32=True)[0][None]
        with t("sample"):
            plan = self.draw_plan()
        with t("usm"):
            gt_usm = self.usm_sharpener(gt)
        lq = self.degrade(gt_usm, plan, t)
        with t("convert"):
            hq_u8, lq_u8 = to_uint8_rgb(gt_usm), to_uint8_rgb(lq)
        with t("encode"):
            size = png_size(hq_u8) + png_size(lq_u8)
        return BasicSRPair(hq_u8, lq_u8, size)

    def degrade_recipe(self, hq: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
        """BasicSR's operations on our stored HQ with our recipe's draws → LQ uint8 RGB."""
        torch = self.b.torch
        x = torch.from_numpy(np.ascontiguousarray(hq.transpose(2, 0, 1))).float()[None] / 255.0
        with torch.no_grad():
            return to_uint8_rgb(self.degrade(x, self.plan_from_recipe(recipe)))

    def usm(self, gt: np.ndarray) -> np.ndarray:
        """BasicSR's USMSharp (radius 50, weight 0.5, threshold 10) of an RGB uint8 crop, as
        make_pair applies it (float32 in [0, 1], rounded back to uint8)."""
        torch = self.b.torch
        x = self.b.img2tensor([gt.astype(np.float32) / 255.0], bgr2rgb=False, float32=True)[0][None]
        with torch.no_grad():
            return to_uint8_rgb(self.usm_sharpener(x))


def to_uint8_rgb(t: Any) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] → H×W×3 uint8, rounded as cv2.imwrite(255·x) would."""
    arr = t[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def png_size(rgb: np.ndarray) -> int:
    """Encode as SeeSR does (cv2 PNG, default settings), return the byte count."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return int(buf.size)


def basicsr_kernel(deg: Any, params: dict[str, Any]) -> np.ndarray:
    """Our recipe's kernel parameters rendered by BasicSR's kernel functions (padded to
    ``pad_to``), to drive BasicSR with our draws and to cross-check our kernels."""
    size = int(params["size"])
    kind = params["type"]
    if kind == "sinc":
        k = deg.circular_lowpass_kernel(float(params["omega_c"]), size, pad_to=0)
    else:
        iso = kind in ("iso", "generalized_iso", "plateau_iso")
        sx, sy, th = float(params["sigma_x"]), float(params["sigma_y"]), float(params["theta"])
        if kind in ("iso", "aniso"):
            k = deg.bivariate_Gaussian(size, sx, sy, th, isotropic=iso)
        elif kind.startswith("generalized"):
            k = deg.bivariate_generalized_Gaussian(size, sx, sy, th, float(params["beta"]), isotropic=iso)
        else:
            k = deg.bivariate_plateau(size, sx, sy, th, float(params["beta"]), isotropic=iso)
    pad_to = int(params.get("pad_to") or size)
    pad = max(0, (pad_to - size) // 2)
    return np.pad(k, ((pad, pad), (pad, pad)))
