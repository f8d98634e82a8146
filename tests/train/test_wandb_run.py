"""A real training run logged to W&B offline, read back from W&B's own files: eval curves with several
points, MFU, the per-token MoE activations as scalars, the end-of-run plots under plots/ (the summary's
`loss` stays a number), and a resumed run that continues the same W&B run on the same step axis."""

from __future__ import annotations

from pathlib import Path

from tests.metrics.wandb_file import history, run_info, summary
from tests.train.test_trainer import base_args


def _run_twice(data: str, out: str) -> None:
    from launch.train import main

    common = ["--metrics.wandb", "true", "--metrics.wandb_mode", "offline", "--metrics.plots", "true"]
    common += ["--metrics.wandb_group", "g", "--metrics.wandb_tags", "t1,t2", "--metrics.wandb_notes", "n"]
    common += ["--training.eval_every", "3", "--training.log_every", "2", "--training.eval_batches", "2"]
    main(base_args(data, out, *common, "--training.steps", "10", "--training.checkpoint_every", "5"))
    main(base_args(data, out, *common, "--training.steps", "14", "--training.checkpoint_every", "5"))  # resumes at 10


def test_offline_wandb_run_reads_back(dist_pool, tiny_data, tmp_path) -> None:
    run = tmp_path / "run"
    dist_pool.run(_run_twice, tiny_data, str(run))
    run_id = (run / "wandb_run_id").read_text().strip()
    pieces = sorted(Path(run, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(pieces) == 2, pieces  # the resume continued the same run id (one offline piece per process)
    first, second = history(pieces[0]), history(pieces[1])
    evals = [r["eval/click/auc"] for r in first if "eval/click/auc" in r]
    assert len(evals) >= 3 and all(0.0 <= v <= 1.0 for v in evals)
    assert any("mfu" in r for r in first)
    assert any("moe/active_LT/l0_t0" in r for r in first) and any("moe/active_LT/heatmap/_type" in r for r in first)
    plots = {k.split("/")[1] for r in first + second for k in r if k.startswith("plots/")}
    assert {"loss", "auc", "throughput"} <= plots
    assert isinstance(summary(pieces[1])["loss"], float)  # a number, not an image
    steps_1 = [r["step"] for r in first if "step" in r]
    steps_2 = [r["step"] for r in second if "step" in r]
    assert max(steps_1) == 10 and min(steps_2) > 10 and max(steps_2) == 14  # the step axis continues
    info = run_info(pieces[0])
    assert info.run_id == run_id and info.run_group == "g" and list(info.tags) == ["t1", "t2"]
    assert info.notes == "n" and info.job_type == "train"
