"""Model FLOPs utilisation: the peak FLOP/s of one device and MFU = achieved / peak.

MFU = flops_per_sample_train * samples_per_s_per_rank / peak, where flops_per_sample_train is the
analytic count of the model (training = 3 x forward: forward + two backward GEMMs; only the
activated share of sparse-MoE experts counted) and peak is one device's dense peak in the compute
dtype:

* `override > 0` (`--metrics.peak_flops`) wins;
* a GPU found in `GPU_PEAKS` (by `torch.cuda.get_device_name`) uses the datasheet dense peak;
* otherwise (CPU, unknown GPU) the best of several square GEMMs (1024^3 .. 2048^3) is measured in
  that dtype at the threads this process uses, and cached in `cache_dir/peak_flops.json` keyed by
  (device model, threads, dtype) so later runs skip the measurement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path

import torch

# Dense (no sparsity) peaks in FLOP/s per device, from the vendor datasheets: "bf16" (fp16 shares it),
# "tf32" (fp32 matmuls on tensor cores: only when torch.backends.cuda.matmul.allow_tf32 is on) and
# "fp32" (plain fp32, what fp32 matmuls run at with TF32 off, torch's default).
# A key matches the device name as whole words ("L4" matches "NVIDIA L4", not "NVIDIA L40S");
# the first match wins, so specific names come first.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("A10G", {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
CACHE_FILE = "peak_flops.json"


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"peak_flops: unknown dtype {dtype!r} (training.dtype); expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def table_peak(device_name: str, dtype: str, tf32: bool | None = None) -> float | None:
    """Datasheet dense peak of a GPU named `device_name` in `dtype`, or None when not in the table.

    fp32 reads the TF32 tensor-core peak only when TF32 matmuls are on (`tf32`; default: torch's
    current `torch.backends.cuda.matmul.allow_tf32`), else the plain fp32 peak."""
    if _dtype(dtype) == torch.float32:
        on = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
        key = "tf32" if on else "fp32"
    else:
        key = "bf16"
    for name, peaks in GPU_PEAKS:
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w])", device_name):
            return peaks[key]
    return None


def measure_gemm_flops(
    device: torch.device, dtype: str, sizes: tuple[int, ...] = (1024, 1536, 2048), repeats: int = 3
) -> float:
    """Best achieved FLOP/s of square GEMMs C = A @ B (2 n^3 FLOPs each) on `device` in `dtype`.

    Each size is warmed up once, then timed `repeats` times; a timing runs enough GEMMs back to back
    to last ~50 ms (fast accelerators), and sizes whose single GEMM would take more than ~1 s at the
    throughput seen so far are skipped (bf16 on a CPU without bf16 units runs at ~1 GFLOP/s).
    Completion is forced with `.item()`, which works on every device.
    """
    torch_dtype = _dtype(dtype)
    gen = torch.Generator().manual_seed(0)  # host generator; the matrices move to `device`
    best = 0.0
    # A 256^3 probe estimates the speed so a slow dtype does not turn start-up into minutes.
    for n in (256, *sizes):
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        flops = 2.0 * n**3
        if best > 0 and flops / best > 1.0:
            continue
        (a @ b)[0, 0].item()  # warm-up (kernel selection, thread pool)
        inner = 1 if best <= 0 else max(1, math.ceil(0.05 / (flops / best)))
        for _ in range(1 if n == 256 else repeats):
            t0 = time.perf_counter()
            for _ in range(inner - 1):
                a @ b
            (a @ b)[0, 0].item()
            best = max(best, inner * flops / max(time.perf_counter() - t0, 1e-9))
    return best


def _device_model(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[key] = entry
    # Several ranks may measure at once: write a private file and rename it atomically.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def peak_flops(
    device: torch.device, dtype: str, override: float = 0.0, cache_dir: Path | None = None
) -> tuple[float, str]:
    """Peak FLOP/s of ONE device (one rank) in `dtype`, and how it was obtained.

    Args:
        device: this rank's device.
        dtype: compute dtype ('fp32', 'bf16', 'fp16').
        override: > 0 wins (metrics.peak_flops).
        cache_dir: folder of the measurement cache (peak_flops.json); None = measure, do not cache.

    Returns:
        (flops, source), source one of "override", "table:<gpu> <dtype>", "cache:<key>",
        "measured:<key>".
    """
    _dtype(dtype)
    if override < 0:
        raise ValueError(f"metrics.peak_flops must be >= 0 (0 = table or measurement), got {override}")
    if override > 0:
        return float(override), "override"
    model = _device_model(device)
    if device.type == "cuda":
        peak = table_peak(model, dtype)
        if peak is not None:
            return peak, f"table:{model} {dtype}"
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = f"{device.type}|{model}|threads={threads}|{dtype}"
    cache = cache_dir / CACHE_FILE if cache_dir is not None else None
    if cache is not None:
        entry = _read_cache(cache).get(key)
        if isinstance(entry, dict) and float(entry.get("flops", 0)) > 0:
            return float(entry["flops"]), f"cache:{key}"
    peak = measure_gemm_flops(device, dtype)
    if cache is not None:
        _write_cache(cache, key, {"flops": peak, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return peak, f"measured:{key}"


def mfu(flops_per_sample_train: float, samples_per_s_per_rank: float, peak: float) -> float:
    """Model FLOPs utilisation of one rank.

    Args:
        flops_per_sample_train: analytic training FLOPs per sample (3 x forward, activated experts only).
        samples_per_s_per_rank: samples one rank trains per second.
        peak: that rank's device peak FLOP/s (`peak_flops`).
    """
    if peak <= 0:
        raise ValueError(f"mfu: peak FLOP/s must be > 0 (metrics.peak_flops / measurement), got {peak}")
    return flops_per_sample_train * samples_per_s_per_rank / peak


def rss_mb() -> float:
    """Resident memory of this process in MiB (the "mem_rss_mb" metric)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # noqa: PLC0415 - fallback where /proc is missing (peak, not current)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
