"""Model throughput benchmark (fp32, CPU): MFU, mixing vs attention, sparse vs dense inference.

    python -m bench.model [--json FILE] [--threads N] [--reps R] [--batch B] [--dtsi]

All in one run, at one thread count, against a GEMM peak measured in the same run (best of 5 fp32
n x n x n matmuls, n = 2048, plus one more between every timed train step):
1. MFU of a RankMixer-100M train step (configs/rankmixer_100m.toml: D 768, T 16, L 2, k 3; dense
   blocks; batch 512; forward + backward; FLOPs from the analytic counter).
2. One RankMixer block (token mixing + per-token FFN) against one self-attention block (fused QKV +
   F.scaled_dot_product_attention + per-token FFN) of the same T, D, k and batch, forward + backward,
   at k = 4 and k = 2: time ratio (attention / mixing) against the analytic FLOPs ratio; and the
   block with a GEGLU FFN (`model.ffn_activation = "geglu"`, the click-log recipe's) against the GELU
   one, at the 100M shape and at the recipe's (T 8, D 64), k = 4: time ratio against the FLOPs ratio 1.5.
3. Sparse inference (zero-gate experts skipped) against dense inference (all experts computed) of the
   same per-token MoE model (100M shape, 4 experts of k_e = 1 per token), whose randomly initialised
   ReLU routers are tuned (per-expert bias at the 3/4 quantile of a calibration batch) to activation 1/4.
4. With --dtsi: a small MoE RankMixer trained on a planted synthetic task at target activation 1/4 and
   1/8; AUC of the dense-training router against the sparse-inference router (the DTSI check).

Every ratio is printed beside the absolute GFLOP/s of both sides. Timings are the best of `reps`
after one warm-up, the two sides of every ratio interleaved round by round (and the GEMM peak
re-measured between train steps, the best kept): the machine is shared, so the figures are noisy.

Legend: B batch, T tokens, D width, E experts per token.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench import write_json
from bench.gpu_check import tune_routers
from config import load_config
from metrics.mfu import measure_gemm_flops
from model.config import DenseInputSpec, ModelConfig, MoEConfig
from model.ffn import PerTokenFFN
from model.mixing import SelfAttention, TokenMixing
from model.moe import moe_layers
from model.output import task_loss
from model.rankmixer import Block, RankMixer

CONFIG_100M = "configs/rankmixer_100m.toml"


def best_times(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Best wall time of each `fn()` over `reps` rounds after one warm-up; the functions are interleaved
    round by round so that both sides of a ratio see the same load on a shared machine."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _inputs(batch: int, sparse_dim: int, num_dense: int, num_tasks: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, sparse_dim, generator=g),
        torch.randn(batch, num_dense, generator=g),
        (torch.rand(batch, num_tasks, generator=g) > 0.5).float(),
    )


def bench_mfu(batch: int, reps: int, peak: float) -> dict[str, float]:
    """Forward + backward of the RankMixer-100M-shape model; MFU against `peak` FLOP/s."""
    cfg = load_config(["--config", CONFIG_100M])
    sparse_dim, num_dense, num_tasks = sum(f.dim for f in cfg.features.sparse), len(cfg.features.dense), 2
    model = RankMixer(
        cfg.model, MoEConfig(), sparse_dim=sparse_dim, dense=DenseInputSpec(num_dense), num_tasks=num_tasks
    )
    sparse, dense, labels = _inputs(batch, sparse_dim, num_dense, num_tasks)
    a, c = torch.randn(2048, 2048), torch.empty(2048, 2048)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(sparse, dense)
        (task_loss(out.logits_BK, labels)[0] + out.reg_loss).backward()

    # the peak is re-measured between steps (GEMM of 2048^3, best of all): MFU against the best the
    # machine showed during the measurement, not a lucky moment before it
    dt, peak_s = best_times([step, lambda: torch.mm(a, a, out=c)], reps)
    peak = max(peak, 2.0 * 2048**3 / peak_s)
    flops = model.flops_per_sample(training=True) * batch
    return {
        "params_m": model.num_params() / 1e6,
        "step_s": dt,
        "gflops": flops / dt / 1e9,
        "mfu": flops / dt / peak,
        "peak": peak,
    }


def _block_step(block: nn.Module, x_TBD: torch.Tensor, w_TBD: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        block.zero_grad(set_to_none=True)
        y_TBD, _, _ = block(x_TBD)
        (y_TBD * w_TBD).sum().backward()

    return step


def _time_blocks(a: Block, b: Block, T: int, D: int, batch: int, reps: int) -> tuple[float, float, float, float]:
    """Best forward + backward times of two blocks on the same T x batch x D input, interleaved, and
    their model GFLOP/s (training = 3 x forward FLOPs): (t_a, t_b, gflops_a, gflops_b)."""
    gen = torch.Generator().manual_seed(1)
    x_TBD = torch.randn(T, batch, D, generator=gen)
    w_TBD = torch.randn(T, batch, D, generator=gen)
    t_a, t_b = best_times([_block_step(a, x_TBD, w_TBD), _block_step(b, x_TBD, w_TBD)], reps)
    return t_a, t_b, 3 * a.flops_per_sample() * batch / t_a / 1e9, 3 * b.flops_per_sample() * batch / t_b / 1e9


def bench_blocks(k: int, batch: int, reps: int, T: int = 16, D: int = 768) -> dict[str, float]:
    """Mixing block vs self-attention block (forward + backward) at FFN multiplier k."""
    gen = torch.Generator().manual_seed(0)
    mixing = Block(TokenMixing(T, D), PerTokenFFN(T, D, k, gen), D)
    attention = Block(SelfAttention(T, D, 0, gen), PerTokenFFN(T, D, k, gen), D)
    t_mix, t_att, g_mix, g_att = _time_blocks(mixing, attention, T, D, batch, reps)
    return {
        "mixing_s": t_mix,
        "attention_s": t_att,
        "mixing_gflops": g_mix,
        "attention_gflops": g_att,
        "speedup": t_att / t_mix,
        "flops_ratio": attention.flops_per_sample() / mixing.flops_per_sample(),
    }


def bench_geglu(batch: int, reps: int, T: int, D: int, k: int = 4) -> dict[str, float]:
    """A mixing block with the GEGLU per-token FFN (`model.ffn_activation = "geglu"`) against the same
    block with the paper's GELU FFN, forward + backward: time ratio against the analytic FLOPs ratio."""
    gen = torch.Generator().manual_seed(0)
    gelu = Block(TokenMixing(T, D), PerTokenFFN(T, D, k, gen), D)
    geglu = Block(TokenMixing(T, D), PerTokenFFN(T, D, k, gen, activation="geglu"), D)
    t_gelu, t_geglu, g_gelu, g_geglu = _time_blocks(gelu, geglu, T, D, batch, reps)
    return {
        "time_ratio": t_geglu / t_gelu,
        "flops_ratio": geglu.flops_per_sample() / gelu.flops_per_sample(),
        "gelu_gflops": g_gelu,
        "geglu_gflops": g_geglu,
    }


def bench_sparse_inference(batch: int, reps: int, activation: float = 0.25) -> dict[str, float]:
    """Sparse vs dense inference of the same per-token MoE model at the given activation."""
    cfg = load_config(["--config", CONFIG_100M])
    sparse_dim, num_dense = sum(f.dim for f in cfg.features.sparse), len(cfg.features.dense)
    moe = MoEConfig(enabled=True, num_experts=4, expert_mult=1, target_activation=activation)
    model = RankMixer(cfg.model, moe, sparse_dim=sparse_dim, dense=DenseInputSpec(num_dense), num_tasks=2).eval()
    sparse, dense, _ = _inputs(batch, sparse_dim, num_dense, 2)
    tune_routers(model, sparse, dense, activation)
    layers = moe_layers(model)

    def run(sparse_path: bool) -> Callable[[], torch.Tensor]:
        def fwd() -> torch.Tensor:
            for layer in layers:
                layer.sparse_inference = sparse_path
            with torch.no_grad():
                return model(sparse, dense).logits_BK

        return fwd

    torch.testing.assert_close(run(True)(), run(False)(), rtol=1e-4, atol=1e-4)
    measured = float(torch.stack([m.last_active for m in layers]).mean())
    t_dense, t_sparse = best_times([run(False), run(True)], reps)
    f_dense = model.flops_per_sample(activation=1.0) * batch
    f_sparse = model.flops_per_sample(activation=measured) * batch
    return {
        "activation": measured,
        "dense_s": t_dense,
        "sparse_s": t_sparse,
        "dense_gflops": f_dense / t_dense / 1e9,
        "sparse_gflops": f_sparse / t_sparse / 1e9,
        "speedup": t_dense / t_sparse,
    }


def _auc(score_B: torch.Tensor, label_B: torch.Tensor) -> float:
    """Rank-sum AUC (no ties in continuous scores)."""
    rank_B = torch.empty_like(score_B)
    rank_B[score_B.argsort()] = torch.arange(1, len(score_B) + 1, dtype=score_B.dtype)
    pos = label_B.sum()
    return float((rank_B[label_B == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(label_B) - pos)))


def bench_dtsi(target: float, steps: int = 1500, batch: int = 256) -> dict[str, float]:
    """Train a small MoE RankMixer on a planted synthetic task; AUC of the dense-training router
    (h_train, all experts) against the sparse-inference router (h_infer, zero-gate experts skipped)."""
    g = torch.Generator().manual_seed(0)
    E, N = 64, 4
    w_FH, v_H = torch.randn(E + N, 32, generator=g), torch.randn(32, generator=g)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s_BI, d_BF = torch.randn(n, E, generator=g), torch.randn(n, N, generator=g)
        z_B = torch.tanh(torch.cat([s_BI, d_BF], 1) @ w_FH / 8) @ v_H + 0.5 * s_BI[:, 0] * s_BI[:, 1]
        click_B = (torch.rand(n, generator=g) < torch.sigmoid(z_B)).float()
        return s_BI, d_BF, torch.stack([click_B, (z_B > 0).float()], 1)

    cfg = ModelConfig(num_tokens=4, d_model=32, num_layers=2, ffn_mult=2, dense_proj_dim=8, tower_hidden=[16])
    moe = MoEConfig(enabled=True, num_experts=8, target_activation=target, l1_init=1e-3, l1_step=1.1)
    model = RankMixer(cfg, moe, sparse_dim=E, dense=DenseInputSpec(N), num_tasks=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        s_BI, d_BF, y_BK = data(batch)
        out = model(s_BI, d_BF)
        opt.zero_grad()
        (task_loss(out.logits_BK, y_BK)[0] + out.reg_loss).backward()
        opt.step()
        for layer in moe_layers(model):
            layer.update_l1()
    s_BI, d_BF, y_BK = data(8192)
    res: dict[str, float] = {"target": target}
    model.eval()
    for router in ("train", "infer"):
        for layer in moe_layers(model):
            layer.eval_router = router
        with torch.no_grad():
            logits_BK = model(s_BI, d_BF).logits_BK
        res[f"{router}_activation"] = float(torch.stack([m.last_active for m in moe_layers(model)]).mean())
        for k in range(2):
            res[f"{router}_auc_{k}"] = _auc(logits_BK[:, k], y_BK[:, k])
    res["max_auc_drop"] = max(res[f"train_auc_{k}"] - res[f"infer_auc_{k}"] for k in range(2))
    return res


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print a table, optionally write JSON; returns the JSON dict."""
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch's default)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (best is kept)")
    parser.add_argument("--batch", type=int, default=512, help="batch size")
    parser.add_argument("--dtsi", action="store_true", help="also run the DTSI accuracy check (~30 s, 1 thread)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    mfu = bench_mfu(args.batch, args.reps, measure_gemm_flops(torch.device("cpu"), "fp32", sizes=(2048,), repeats=5))
    peak = mfu["peak"]
    k4 = bench_blocks(4, args.batch, args.reps)
    k2 = bench_blocks(2, args.batch, args.reps)
    sp = bench_sparse_inference(args.batch, args.reps)
    glu = {
        "100m": bench_geglu(args.batch, args.reps, T=16, D=768),
        "recsys": bench_geglu(args.batch, args.reps, T=8, D=64),
    }
    res = {
        "threads": float(torch.get_num_threads()),
        "batch": float(args.batch),
        "peak_gflops": peak / 1e9,
        "mfu_rankmixer_100m": mfu["mfu"],
        "rankmixer_100m_train_gflops": mfu["gflops"],
        "rankmixer_100m_params_m": mfu["params_m"],
        "rankmixer_100m_step_s": mfu["step_s"],
        "mixing_vs_attention_speedup": k4["speedup"],
        "mixing_vs_attention_flops_ratio": k4["flops_ratio"],
        "mixing_gflops_k4": k4["mixing_gflops"],
        "attention_gflops_k4": k4["attention_gflops"],
        "mixing_vs_attention_speedup_k2": k2["speedup"],
        "mixing_vs_attention_flops_ratio_k2": k2["flops_ratio"],
        "mixing_gflops_k2": k2["mixing_gflops"],
        "attention_gflops_k2": k2["attention_gflops"],
        "sparse_vs_dense_inference_speedup": sp["speedup"],
        "sparse_activation": sp["activation"],
        "sparse_gflops": sp["sparse_gflops"],
        "dense_inference_gflops": sp["dense_gflops"],
    }
    for shape, g in glu.items():
        res[f"geglu_vs_gelu_time_ratio_{shape}"] = g["time_ratio"]
        res[f"geglu_vs_gelu_flops_ratio_{shape}"] = g["flops_ratio"]
        res[f"geglu_gflops_{shape}"] = g["geglu_gflops"]
        res[f"gelu_gflops_{shape}"] = g["gelu_gflops"]
    res["total_s"] = time.perf_counter() - t_start
    print(f"bench.model  fp32 CPU  threads={int(res['threads'])}  batch={args.batch}  best of {args.reps}")
    print(f"  GEMM peak (2048^3, best of all)    {res['peak_gflops']:8.1f} GFLOP/s")
    print(
        f"  RankMixer-100M train step          {res['rankmixer_100m_train_gflops']:8.1f} GFLOP/s  "
        f"MFU {res['mfu_rankmixer_100m']:.3f}  ({res['rankmixer_100m_params_m']:.1f}M params, "
        f"{res['rankmixer_100m_step_s']:.2f} s/step)"
    )
    for k, r in ((4, k4), (2, k2)):
        print(
            f"  mixing vs attention block, k={k}    time ratio {r['speedup']:.2f}  FLOPs ratio {r['flops_ratio']:.2f}  "
            f"(= {r['speedup'] / r['flops_ratio']:.2f} of it)  mixing {r['mixing_gflops']:.1f} / attention "
            f"{r['attention_gflops']:.1f} GFLOP/s"
        )
    print(
        f"  sparse vs dense inference          speedup {res['sparse_vs_dense_inference_speedup']:.2f}x at "
        f"activation {res['sparse_activation']:.3f}  sparse {res['sparse_gflops']:.1f} / dense "
        f"{res['dense_inference_gflops']:.1f} GFLOP/s (model FLOPs)"
    )
    for shape, label in (("100m", "T=16 D=768"), ("recsys", "T=8 D=64  ")):
        print(
            f"  GEGLU vs GELU block, {label}    time ratio {res[f'geglu_vs_gelu_time_ratio_{shape}']:.2f}  FLOPs "
            f"ratio {res[f'geglu_vs_gelu_flops_ratio_{shape}']:.2f}  GEGLU {res[f'geglu_gflops_{shape}']:.1f} / "
            f"GELU {res[f'gelu_gflops_{shape}']:.1f} GFLOP/s"
        )
    if args.dtsi:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny shapes
        for target in (0.25, 0.125):
            d = bench_dtsi(target)
            tag = f"dtsi_{int(round(1 / target))}"
            res[f"{tag}_infer_activation"] = d["infer_activation"]
            res[f"{tag}_max_auc_drop"] = d["max_auc_drop"]
            print(
                f"  DTSI target {target:.3f}: inference activation {d['infer_activation']:.3f} "
                f"(training router {d['train_activation']:.3f}); AUC dense-train / sparse-infer "
                + ", ".join(f"{d[f'train_auc_{k}']:.4f} / {d[f'infer_auc_{k}']:.4f}" for k in range(2))
            )
        torch.set_num_threads(threads)
        res["total_s"] = time.perf_counter() - t_start
    print(f"  total {res['total_s']:.0f} s")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
