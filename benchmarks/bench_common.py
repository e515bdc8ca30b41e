"""Small helpers shared by the degradation benchmark: stage timers, output statistics,
process memory and table rendering.

Kept free of torch, Ray and the pipeline so that the memory-probe subprocess of
``degrade.py`` imports nothing that would inflate the peak RSS it is there to measure.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

# Stage names shared by our pipeline's breakdown and BasicSR's, so the two can be put
# side by side row for row. Descriptions end up in the report.
STAGES: tuple[tuple[str, str], ...] = (
    ("decode", "read + decode the source photo (one decode per pair)"),
    ("crop", "pad / crop / flip to the 512² GT"),
    ("sample", "random draws (ours: sample_seed + sample_recipe; BasicSR: kernels + draws)"),
    ("usm", "USM sharpening of the GT (radius 50)"),
    ("blur1", "stage-1 blur (BasicSR: 21×21 filter2D)"),
    ("resize1", "stage-1 random resize"),
    ("noise1", "stage-1 Gaussian / Poisson noise"),
    ("jpeg1", "stage-1 JPEG"),
    ("blur2", "stage-2 blur (p 0.8)"),
    ("resize2", "stage-2 resize"),
    ("noise2", "stage-2 noise"),
    ("resize3", "final resize to 128²"),
    ("sinc", "final sinc filter (identity kernel when not drawn)"),
    ("jpeg2", "final JPEG"),
    ("convert", "dtype conversions, round / clamp to uint8"),
    ("encode", "two lossless PNGs (HQ + LQ)"),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)


def cpu_model() -> str:
    """The CPU's marketing name: the figures in docs/ name the machine that gave them, and
    these shared VMs are Intel one session and AMD the next."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class StageTimer:
    """Wall-clock seconds accumulated per named stage.

    ``perf_counter`` rather than process time: the benchmark runs one thread per process,
    and wall time is what a user of the job waits for.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def merge(self, other: "StageTimer") -> None:
        for k, v in other.seconds.items():
            self.seconds[k] += v

    def ms_per(self, n: int) -> dict[str, float]:
        """Milliseconds per item for every stage seen (0 for stages never entered)."""
        return {k: 1000.0 * v / max(n, 1) for k, v in self.seconds.items()}


# ----------------------------------------------------------------- statistics --


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (data range 255), over all pixels and channels."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def bicubic_up(lq: np.ndarray, size: int) -> np.ndarray:
    """The usual 'how much did the degradation destroy' baseline: bicubic back to GT size."""
    return cv2.resize(lq, (size, size), interpolation=cv2.INTER_CUBIC)


def bicubic_roundtrip(hq: np.ndarray, scale: int) -> np.ndarray:
    """Plain bicubic ×scale down then up: the PSNR of an undegraded, merely downscaled LQ."""
    h, w = hq.shape[:2]
    down = cv2.resize(hq, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(down, (w, h), interpolation=cv2.INTER_CUBIC)


def lq_psnr(hq: np.ndarray, lq: np.ndarray) -> float:
    """PSNR of the bicubic-upsampled LQ against the stored (sharpened) HQ."""
    return psnr(bicubic_up(lq, hq.shape[0]), hq)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation and standard error (for comparing two means)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "se": math.nan}
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    return {"n": n, "mean": float(x.mean()), "std": std, "se": std / math.sqrt(n)}


def mean_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """a − b with the standard error of an unpaired difference of means."""
    return {"diff": a["mean"] - b["mean"], "se": math.hypot(a["se"], b["se"])}


# ---------------------------------------------------------------- process memory --


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS).

    Read from /proc rather than psutil: psutil is not a dependency of the project and
    VmHWM gives the lifetime peak without sampling.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """All processes below ``root`` (Ray's raylet and its workers are below the driver)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children[parent].append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def busy_cores(interval_s: float = 1.0) -> float:
    """CPU cores busy machine-wide over ``interval_s`` (from /proc/stat).

    Sampled while the benchmark itself is idle, it tells whether something else on the
    machine (a test run, another job) would distort the timings.
    """

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    ticks = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / ticks)


def wait_until_quiet(threshold_cores: float = 0.25, timeout_s: float = 10.0) -> float:
    """Wait (at most ``timeout_s``) until the machine is nearly idle; returns the seconds
    waited. Used after starting Ray, whose agents keep a core busy for a few seconds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s and busy_cores(0.5) > threshold_cores:
        pass
    return time.perf_counter() - t0


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


class ForeignCpuMonitor:
    """CPU seconds used by processes outside this benchmark's process tree.

    Timings on a shared 2-core machine are only as good as the machine was quiet; this
    records, per section, how much CPU other processes (a test run, another job) took and
    which commands took it, so a contaminated result can be recognised instead of trusted.
    It samples /proc every ``interval_s``; CPU of processes that start and die between two
    samples is missed. Every process is tracked, ours included, so one that leaves our
    tree (a Ray worker re-parented while Ray shuts down) is charged only from then on.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.tick = os.sysconf("SC_CLK_TCK")
        self.by_command: dict[str, float] = defaultdict(float)
        self._last: dict[int, int] = {}
        self._marks: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with self._lock:
            ours = {os.getpid(), *descendants(os.getpid())}
            now: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                pid = int(entry) if entry.isdigit() else None
                ticks = _cpu_ticks(pid) if pid is not None else None
                if ticks is None:
                    continue
                now[pid] = ticks
                if self._last and pid not in ours:  # a process new since the last sample counts from 0
                    used = (ticks - self._last.get(pid, 0)) / self.tick
                    if used > 0:
                        self.by_command[cmdline(pid)[:80] or f"pid {pid}"] += used
            self._last = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "ForeignCpuMonitor":
        self._sample()
        self._thread.start()
        return self

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self._sample()
        before = dict(self.by_command)
        try:
            yield
        finally:
            self._sample()
            used = {k: v - before.get(k, 0.0) for k, v in self.by_command.items()}
            used = {k: v for k, v in used.items() if v > 0.05}
            top = sorted(used.items(), key=lambda kv: -kv[1])[:5]
            self._marks[name] = {"cpu_s": sum(used.values()), "top": [[k, round(v, 2)] for k, v in top]}

    def stop(self) -> dict[str, dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return dict(self._marks)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------ rendering --


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain-text table (first column left-aligned, others right) or a Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def fmt(r: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def fmt_num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}"
