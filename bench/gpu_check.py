"""One-shot device check: what this project does on one accelerator, in one run, written to one JSON.

    python -m bench.gpu_check [--device auto|cuda|cpu] [--json FILE] [--batches 2048,8192,32768]
                              [--no-compile] [--trainer-steps 50] [--trainer-config FILE]

Made for a bare GPU machine where only PyTorch (any 2.x) is installed and nothing can be downloaded:
parts (a) need `model/` and torch alone; part (b) runs only when torchrec and fbgemm-gpu import.

(a) always, on the chosen device:
    1. GEMM ceilings measured in this run: bf16 (and fp32 with TF32 off and on) square matmuls.
    2. The dense step of the RankMixer-100M shape (configs/rankmixer_100m.toml: T 16, D 768, L 2,
       k 3; dense blocks; model/ only; random inputs standing in for the pooled embeddings): forward +
       backward + Adam under bf16 autocast with fp32 master weights (the trainer's `training.dtype =
       bf16`), at several batch sizes, eager and (unless --no-compile) `torch.compile`d. MFU =
       analytic training FLOPs (3 x forward) x samples/s over the device's datasheet bf16 peak
       (`metrics.mfu.GPU_PEAKS`) and over the bf16 GEMM measured in step 1.
    3. One RankMixer block (parameter-free token mixing + per-token FFN) against one self-attention
       block of the same T, D, k, forward + backward in bf16.
    4. Sparse inference (zero-gate experts skipped) against dense inference of the same per-token MoE
       model (100M shape, 4 experts of width D per token, routers tuned to activation 1/4); the two
       paths' outputs are compared in fp32 first, then both are timed in bf16.
(b) when torchrec, fbgemm_gpu and deepspeed import (`launch.wheelhouse` brings them to a bare host):
    the full trainer (`bench/gpu_trainer.py`: `launch.train` under torchrun, NCCL, fbgemm tables, the
    DeepSpeed MoE engine, bf16, W&B offline) for --trainer-steps steps, then evaluate + export +
    predict of that run, then a short fp32 run on the device against the same run on the CPU.
(c) one JSON (--json) with every figure, the environment, and each part's error if it failed (a part
    that fails does not stop the others; the exit code is 1 when any part failed).

`--device cpu` (the default without a GPU) runs the same code at smoke sizes, so CI keeps it working.

Legend: B batch, T tokens, D width, K tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench import write_json  # noqa: E402
from bench.gpu_report import print_report, summarize  # noqa: E402
from bench.gpu_trainer import trainer_suite  # noqa: E402
from metrics.mfu import measure_gemm_flops  # noqa: E402
from model.config import DenseInputSpec, ModelConfig, MoEConfig  # noqa: E402
from model.ffn import PerTokenFFN  # noqa: E402
from model.mixing import SelfAttention, TokenMixing  # noqa: E402
from model.moe import moe_layers  # noqa: E402
from model.output import task_loss  # noqa: E402
from model.rankmixer import Block, RankMixer  # noqa: E402

CONFIG_100M = REPO / "configs" / "rankmixer_100m.toml"
SMOKE_MODEL = {"num_tokens": 4, "d_model": 32, "num_layers": 1, "ffn_mult": 2, "tower_hidden": [16]}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fns: list[Callable[[], object]], device: torch.device, iters: int, reps: int) -> list[float]:
    """Seconds per call of each `fn`: `iters` calls back to back then a device sync, timed `reps` times,
    the median kept; the functions interleaved round by round (after 2 warm-up calls each)."""
    for fn in fns:
        for _ in range(2):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[i].append((time.perf_counter() - t0) / iters)
    return [sorted(t)[len(t) // 2] for t in times]


@torch.no_grad()
def tune_routers(model: RankMixer, sparse: torch.Tensor, dense: torch.Tensor, activation: float) -> None:
    """Set every inference-router bias so each (position, expert) is active on `activation` of the batch.

    Layer by layer (a layer's input depends on the layers before it): capture the layer's input, then put
    each expert's bias at minus the (1 - activation) quantile of its pre-activation.
    """
    captured: list[torch.Tensor] = []
    for layer in moe_layers(model):
        captured.clear()
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        model(sparse, dense)
        handle.remove()
        logits_TBE = torch.baddbmm(torch.zeros_like(layer.router_infer_b), captured[0], layer.router_infer_w)
        layer.router_infer_b.copy_(-torch.quantile(logits_TBE, 1.0 - activation, dim=1, keepdim=True))


def model_shape(path: Path, smoke: bool) -> tuple[ModelConfig, int, int, int]:
    """(model config, sparse input width, dense features, tasks) of a job TOML, read with tomllib alone
    (no project config loader: it needs packages a bare GPU machine lacks). Smoke: a tiny model."""
    job = tomllib.loads(path.read_text())
    feats = job["features"]
    model = {k: v for k, v in job["model"].items() if k != "name"}
    if smoke:
        model.update(SMOKE_MODEL)
    return ModelConfig(**model), sum(f["dim"] for f in feats["sparse"]), len(feats["dense"]), len(feats["labels"])


def inputs(
    batch: int, sparse_dim: int, num_dense: int, num_tasks: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Random (B x sparse_dim pooled embeddings, B x F dense, B x K 0/1 labels) on `device`."""
    g = torch.Generator().manual_seed(0)
    return tuple(
        t.to(device)
        for t in (
            torch.randn(batch, sparse_dim, generator=g),
            torch.randn(batch, num_dense, generator=g),
            (torch.rand(batch, num_tasks, generator=g) > 0.5).float(),
        )
    )


def env_info(device: torch.device) -> dict[str, Any]:
    """Versions, device name and what the device supports."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "hostname": platform.node(),
        "torchrec": importlib.util.find_spec("torchrec") is not None,
        "fbgemm_gpu": importlib.util.find_spec("fbgemm_gpu") is not None,
        "deepspeed": importlib.util.find_spec("deepspeed") is not None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            device_name=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=p.total_memory / 2**30,
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls on/off inside the block (restored after)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def gemm_ceilings(device: torch.device, smoke: bool) -> dict[str, float]:
    """Best measured FLOP/s of square GEMMs: bf16, fp32 (TF32 off) and, on CUDA, fp32 with TF32 on."""
    sizes = (512,) if smoke else ((4096, 8192) if device.type == "cuda" else (2048,))
    out = {"bf16": measure_gemm_flops(device, "bf16", sizes=sizes, repeats=3)}
    with tf32(False):
        out["fp32"] = measure_gemm_flops(device, "fp32", sizes=sizes, repeats=3)
    if device.type == "cuda":
        with tf32(True):
            out["tf32"] = measure_gemm_flops(device, "fp32", sizes=sizes, repeats=3)
    return out


def top_kernels(step: Callable[[], None], device: torch.device, steps: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """Where a step's device time goes: the `top` operators by self device time over `steps` profiled
    steps (torch.profiler), each with its share of the total device time and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)

    def self_time(e: Any) -> float:
        if device.type != "cuda":
            return float(e.self_cpu_time_total)
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    if device.type == "cuda":  # the kernels themselves (operators would count their kernels' time twice)
        kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
        events = kernels or events
    total = sum(self_time(e) for e in events)
    events.sort(key=self_time, reverse=True)
    return [
        {
            "op": e.key[:120],
            "share": self_time(e) / total,
            "ms_per_step": self_time(e) / 1e3 / steps,
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]


def dense_step(
    device: torch.device, batch: int, compiled: bool, smoke: bool, iters: int, reps: int, profile: bool = False
) -> dict[str, Any]:
    """Forward + backward + Adam of the RankMixer-100M shape under bf16 autocast; seconds per step and
    achieved model TFLOP/s (analytic training FLOPs); with `profile`, the top operators by device time."""
    cfg, sparse_dim, num_dense, num_tasks = model_shape(CONFIG_100M, smoke)
    torch.manual_seed(0)
    model = RankMixer(cfg, MoEConfig(), sparse_dim=sparse_dim, dense=DenseInputSpec(num_dense), num_tasks=num_tasks)
    model = model.to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **fused)
    sparse, dense, labels = inputs(batch, sparse_dim, num_dense, num_tasks, device)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(sparse, dense)
        (task_loss(out.logits_BK.float(), labels)[0] + out.reg_loss).backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # the first call compiles
    sync(device)
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    (dt,) = time_per_call([step], device, iters, reps)
    flops = model.flops_per_sample(training=True) * batch
    res = {
        "batch": float(batch),
        "params_m": model.num_params() / 1e6,
        "first_step_s": first_s,
        "step_s": dt,
        "samples_per_s": batch / dt,
        "model_tflops": flops / dt / 1e12,
    }
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if profile:
        res["profile"] = top_kernels(step, device)
    return res


def blocks(device: torch.device, batch: int, smoke: bool, iters: int, reps: int) -> dict[str, float]:
    """One mixing block vs one self-attention block (T, D, k of the 100M shape), fwd + bwd in bf16."""
    cfg, *_ = model_shape(CONFIG_100M, smoke)
    T, D, k = cfg.num_tokens, cfg.d_model, cfg.ffn_mult
    gen = torch.Generator().manual_seed(0)
    mixing = Block(TokenMixing(T, D), PerTokenFFN(T, D, k, gen), D).to(device)
    attention = Block(SelfAttention(T, D, 0, gen), PerTokenFFN(T, D, k, gen), D).to(device)
    x_TBD = torch.randn(T, batch, D, generator=gen).to(device)
    w_TBD = torch.randn(T, batch, D, generator=gen).to(device)

    def step(block: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            block.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y_TBD, _, _ = block(x_TBD)
            (y_TBD.float() * w_TBD).sum().backward()

        return run

    t_mix, t_att = time_per_call([step(mixing), step(attention)], device, iters, reps)
    f_mix, f_att = 3 * mixing.flops_per_sample() * batch, 3 * attention.flops_per_sample() * batch
    return {
        "batch": float(batch),
        "mixing_s": t_mix,
        "attention_s": t_att,
        "speedup": t_att / t_mix,
        "flops_ratio": f_att / f_mix,
        "mixing_tflops": f_mix / t_mix / 1e12,
        "attention_tflops": f_att / t_att / 1e12,
    }


def sparse_inference(device: torch.device, batch: int, smoke: bool, iters: int, reps: int) -> dict[str, float]:
    """Sparse vs dense inference of one per-token MoE model at activation 1/4 (bf16 autocast)."""
    cfg, sparse_dim, num_dense, num_tasks = model_shape(CONFIG_100M, smoke)
    torch.manual_seed(0)
    moe = MoEConfig(enabled=True, num_experts=4, expert_mult=1, target_activation=0.25)
    model = RankMixer(cfg, moe, sparse_dim=sparse_dim, dense=DenseInputSpec(num_dense), num_tasks=num_tasks)
    model = model.to(device).eval()
    sparse, dense, _ = inputs(batch, sparse_dim, num_dense, num_tasks, device)
    with torch.no_grad():
        tune_routers(model, sparse, dense, 0.25)
    layers = moe_layers(model)

    def run(sparse_path: bool, bf16: bool, sync_free: bool | None = None) -> Callable[[], torch.Tensor]:
        def fwd() -> torch.Tensor:
            for layer in layers:
                layer.sparse_inference, layer.sparse_sync_free = sparse_path, sync_free
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(sparse, dense).logits_BK

        return fwd

    ref = run(False, False)()
    diff = float((run(True, False, True)() - ref).abs().max())
    diff_cut = float((run(True, False, False)() - ref).abs().max())
    activation = float(torch.stack([m.last_active for m in layers]).mean())
    # sparse: static shapes, no host sync (the default on CUDA); sparse_cut: buffers cut to the active
    # rows after reading their count (one sync per layer; the default on CPU)
    t_dense, t_sparse, t_cut = time_per_call(
        [run(False, True), run(True, True, True), run(True, True, False)], device, iters, reps
    )
    for layer in layers:
        layer.sparse_sync_free = None
    return {
        "batch": float(batch),
        "activation": activation,
        "grouped_mm": float(hasattr(torch, "_grouped_mm")),
        "max_abs_diff_fp32": diff,
        "max_abs_diff_fp32_cut": diff_cut,
        "dense_s": t_dense,
        "sparse_s": t_sparse,
        "sparse_cut_s": t_cut,
        "speedup": t_dense / t_sparse,
        "speedup_cut": t_dense / t_cut,
        "dense_tflops": model.flops_per_sample(activation=1.0) * batch / t_dense / 1e12,
        "sparse_tflops": model.flops_per_sample(activation=activation) * batch / t_sparse / 1e12,
    }


def _part(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one part; its result, or its error with the traceback's tail, goes to results[name]."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - one part failing must not stop the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        print(f"[gpu_check] {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run every part, print the figures, write the JSON; exit code 1 when a part failed."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda when available")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "gpu_check.json", help="output file")
    p.add_argument("--batches", default="", help="dense-step batch sizes (default 2048,8192,32768 on CUDA; 64 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of the dense step")
    p.add_argument("--profile", action="store_true", help="top operators by device time of the last dense step")
    p.add_argument("--trainer-steps", type=int, default=50, help="steps of part (b); 0 skips it")
    p.add_argument(
        "--trainer-config", type=Path, default=None, help="job of part (b) (default: tiny on CPU, default on CUDA)"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    smoke = not on_cuda  # CPU: smoke sizes (the point is that the code runs)
    batches = [int(b) for b in args.batches.split(",") if b] or ([2048, 8192, 32768] if on_cuda else [64])
    iters, reps = (20, 5) if on_cuda else (2, 2)
    probe_batch = 8192 if on_cuda else 64
    t_start = time.perf_counter()
    res: dict[str, Any] = {"env": env_info(device), "smoke": smoke}
    print(f"[gpu_check] {res['env']}", file=sys.stderr)
    _part(res, "gemm_tflops", lambda: {k: v / 1e12 for k, v in gemm_ceilings(device, smoke).items()})
    variants = [False] + ([] if args.no_compile or not on_cuda else [True])
    last = (variants[-1], batches[-1])  # the variant --profile looks inside
    res["dense_step"] = []
    for compiled in variants:
        for b in batches:
            box: dict[str, Any] = {}
            _part(
                box,
                f"dense_step b={b} compiled={compiled}",
                lambda b=b, compiled=compiled: dense_step(
                    device, b, compiled, smoke, iters, reps, profile=args.profile and (compiled, b) == last
                ),
            )
            (r,) = box.values()
            res["dense_step"].append(
                {"compiled": compiled, **r} if "error" not in r else {"compiled": compiled, "batch": b, **r}
            )
            if on_cuda:
                torch.cuda.empty_cache()
    _part(res, "mixing_vs_attention", lambda: blocks(device, probe_batch, smoke, iters, reps))
    _part(res, "sparse_inference", lambda: sparse_inference(device, probe_batch, smoke, iters, reps))
    trainer_ok = res["env"]["torchrec"] and res["env"]["fbgemm_gpu"] and res["env"]["deepspeed"]
    if args.trainer_steps > 0 and trainer_ok:
        config = args.trainer_config or REPO / "configs" / ("default.toml" if on_cuda else "tiny.toml")
        rows = 400_000 if on_cuda else 4000
        compare = 20 if on_cuda else 3
        _part(res, "trainer", lambda: trainer_suite(device, args.trainer_steps, config, rows, compare))
    else:
        missing = [m for m in ("torchrec", "fbgemm_gpu", "deepspeed") if not res["env"][m]]
        res["trainer"] = {
            "skipped": "--trainer-steps 0" if args.trainer_steps <= 0 else f"not importable: {', '.join(missing)}"
        }
    summarize(res)
    res["total_s"] = time.perf_counter() - t_start
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    failed += [f"dense_step b={int(r['batch'])}" for r in res["dense_step"] if "error" in r]
    res["failed"] = failed
    write_json(args.json, res, default=str)
    print_report(res)
    print(f"[gpu_check] wrote {args.json}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
