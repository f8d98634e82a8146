"""bench.gpu_check at smoke sizes on CPU (what CI can run), so the one-shot device script cannot rot: every
part runs and is checked, part (b) launches the real trainer through torchrun, the script runs where only
PyTorch is installed, and a failing part is reported in the JSON and the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench.gpu_check as gc

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--device", "cpu", "--trainer-steps", "3", "--profile", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["failed"] == [] and res["smoke"] is True and res["env"]["device"] == "cpu"
    assert res["gemm_tflops"]["bf16"] > 0 and res["gemm_tflops"]["fp32"] > 0
    (step,) = res["dense_step"]
    assert step["compiled"] is False and step["batch"] == 64 and step["step_s"] > 0 and step["model_tflops"] > 0
    shares = [k["share"] for k in step["profile"]]  # the top operators by time, largest first
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9 and len(shares) <= 15
    assert res["headline"]["mfu_vs_measured_bf16_gemm"] > 0
    mix = res["mixing_vs_attention"]
    assert mix["flops_ratio"] > 1 and mix["mixing_s"] > 0 and mix["attention_s"] > 0
    sp = res["sparse_inference"]
    assert sp["max_abs_diff_fp32"] < 1e-5  # the sparse path computes what the dense path does
    assert 0.15 < sp["activation"] < 0.35  # routers tuned to 1/4
    assert sp["max_abs_diff_fp32_cut"] < 1e-5 and sp["speedup_cut"] > 0
    tr = res["trainer"]  # (b): launch.train under torchrun, 1 process, gloo; then serving; then device vs CPU
    assert tr["steps"] == 3 and tr["samples_per_s"] > 0 and tr["mfu"] > 0 and tr["table_kernels"] == ["fused"]
    assert set(tr["eval"]) == {"click", "finish"} and tr["wandb_offline_files"] == 1
    # evaluate scores with unsharded tables: the same scores to fp32 rounding, so the two histogram AUCs
    # agree within their stated bounds (a score on a bin edge may land in the neighbouring bin)
    bound = tr["eval"]["click"]["auc_bound"] + tr["evaluate"]["auc_bound"]["click"]
    assert abs(tr["evaluate"]["auc"]["click"] - tr["eval"]["click"]["auc"]) <= bound + 1e-9
    assert tr["export_wall_s"] > 0 and tr["predict_wall_s"] > 0
    cmp = tr["fp32_vs_cpu"]  # on a CPU host both runs are CPU runs: identical
    assert cmp["agree"] and cmp["max_loss_diff"] == 0 and max(cmp["auc_diff"].values()) == 0


def test_runs_where_only_torch_is_installed(tmp_path: Path) -> None:
    """A bare GPU machine has torch but not torchrec, fbgemm-gpu, deepspeed, pyarrow, wandb or tomli_w:
    part (a) still runs and part (b) says why it was skipped."""
    out = tmp_path / "bare.json"
    blocked = ("torchrec", "fbgemm_gpu", "deepspeed", "pyarrow", "wandb", "tomli_w", "config", "pipeline")
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import importlib.util\n"
        "importlib.util.find_spec = lambda name, *a, _f=importlib.util.find_spec: "
        f"None if name in {blocked!r} else _f(name, *a)\n"
        "from bench.gpu_check import main\n"
        f"sys.exit(main(['--device', 'cpu', '--json', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == [] and res["dense_step"][0]["step_s"] > 0
    assert res["trainer"]["skipped"].startswith("not importable: torchrec, fbgemm_gpu, deepspeed")


def test_a_failing_part_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gc, "blocks", broken)
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--device", "cpu", "--trainer-steps", "0", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["failed"] == ["mixing_vs_attention"]
    assert res["mixing_vs_attention"]["error"] == "RuntimeError: planted failure"
    assert res["sparse_inference"]["speedup"] > 0  # the parts after it still ran
    assert res["trainer"]["skipped"] == "--trainer-steps 0"


def test_cuda_requested_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    if gc.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gc.main(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
