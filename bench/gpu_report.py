"""The report of `bench.gpu_check`: headline figures derived from its parts, and the printed table."""

from __future__ import annotations

import math
from typing import Any

from metrics.mfu import table_peak


def summarize(res: dict[str, Any]) -> None:
    """Headline figures derived from the parts (MFU of the best dense step, against both peaks)."""
    steps = [r for r in res.get("dense_step", []) if isinstance(r, dict) and "model_tflops" in r]
    gemm = res.get("gemm_tflops", {})
    if not steps:
        return
    best = max(steps, key=lambda r: r["model_tflops"])
    head: dict[str, Any] = {"best_dense_step": best, "dense_step_tflops": best["model_tflops"]}
    if isinstance(gemm, dict) and gemm.get("bf16"):
        head["mfu_vs_measured_bf16_gemm"] = best["model_tflops"] / gemm["bf16"]
    peak = table_peak(res["env"].get("device_name", ""), "bf16") if res["env"]["device"].startswith("cuda") else None
    if peak:
        head["datasheet_bf16_tflops"] = peak / 1e12
        head["mfu_vs_datasheet_bf16"] = best["model_tflops"] * 1e12 / peak
    res["headline"] = head


def print_report(res: dict[str, Any]) -> None:
    """The figures, one line each."""
    env = res["env"]
    print(f"gpu_check  {env['device_name']}  torch {env['torch']}  {'smoke sizes' if res['smoke'] else ''}")
    g = res.get("gemm_tflops", {})
    if "error" not in g:
        print("  GEMM ceilings (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in g.items()))
    for r in res["dense_step"]:
        if "error" in r:
            print(f"  dense step b={int(r['batch'])} compiled={r['compiled']}: FAILED {r['error']}")
            continue
        mfu = r["model_tflops"] / g["bf16"] if g.get("bf16") else math.nan
        print(
            f"  dense step b={int(r['batch']):6d} {'compiled' if r['compiled'] else 'eager   '}  "
            f"{r['step_s'] * 1e3:8.2f} ms  "
            f"{r['samples_per_s']:12,.0f} samples/s  {r['model_tflops']:7.2f} TFLOP/s  MFU vs bf16 GEMM {mfu:.3f}"
        )
    for r in res["dense_step"]:
        for k in r.get("profile", [])[:10]:
            print(
                f"    {k['share']:6.1%}  {k['ms_per_step']:7.2f} ms/step  x{k['calls_per_step']:<5.0f} {k['op'][:80]}"
            )
    h = res.get("headline", {})
    if "mfu_vs_datasheet_bf16" in h:
        print(
            f"  best dense step: MFU {h['mfu_vs_datasheet_bf16']:.3f} of the datasheet bf16 peak "
            f"({h['datasheet_bf16_tflops']:.0f} TFLOP/s)"
        )
    for name, key in (
        ("mixing vs attention", "mixing_vs_attention"),
        ("sparse vs dense inference", "sparse_inference"),
    ):
        r = res.get(key, {})
        if "error" in r:
            print(f"  {name}: FAILED {r['error']}")
        elif key == "mixing_vs_attention":
            print(
                f"  {name}: time ratio {r['speedup']:.2f} (FLOPs ratio {r['flops_ratio']:.2f}), "
                f"{r['mixing_tflops']:.1f} / {r['attention_tflops']:.1f} TFLOP/s"
            )
        else:
            print(
                f"  {name}: {r['speedup']:.2f}x sync-free, {r['speedup_cut']:.2f}x cut to the active rows, at "
                f"activation {r['activation']:.3f} (fp32 max |diff| {r['max_abs_diff_fp32']:.1e}, "
                f"grouped GEMM {'yes' if r['grouped_mm'] else 'no: padded bmm'})"
            )
    t = res.get("trainer", {})
    if "samples_per_s" in t:
        print(
            f"  trainer ({t['config']}, MoE, {t['dtype']}, {t['steps']} steps, tables {'/'.join(t['table_kernels'])}): "
            f"{t['samples_per_s']:,.0f} samples/s, MFU {t['mfu']:.3f}; evaluate {t['evaluate']['wall_s']:.0f} s, "
            f"export {t['export_wall_s']:.0f} s, predict {t['predict_wall_s']:.0f} s"
        )
        c = t["fp32_vs_cpu"]
        print(
            f"  fp32 on the device vs CPU, {c['steps']} steps: max |loss diff| {c['max_loss_diff']:.2e} "
            f"(tol {c['loss_tol']:.0e}), max |AUC diff| {max(c['auc_diff'].values()):.2e} (tol {c['auc_tol']:.0e}): "
            + ("agree" if c["agree"] else "DISAGREE")
        )
    else:
        print(f"  trainer: {t.get('skipped') or 'FAILED ' + str(t.get('error'))}")
    print(f"  total {res['total_s']:.0f} s")
