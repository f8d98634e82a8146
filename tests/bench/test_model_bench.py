"""bench/model.py's GEGLU-vs-GELU block comparison at a tiny shape: both blocks run forward and backward,
and the FLOPs ratio is the analytic 1.5 (6k vs 4k T D^2 in the FFN; mixing has no FLOPs)."""

from __future__ import annotations

import pytest

from bench.model import bench_geglu


def test_geglu_block_comparison_reports_the_analytic_flops_ratio() -> None:
    r = bench_geglu(batch=4, reps=1, T=4, D=8, k=2)
    assert r["flops_ratio"] == pytest.approx(1.5)
    assert r["time_ratio"] > 0 and r["gelu_gflops"] > 0 and r["geglu_gflops"] > 0
