"""The real entry point (`launch.train.main`) run inside the 2-rank gloo pool: exact resume after a
crash, ep_size 2 == ep_size 1, and the run directory contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.toml")


def base_args(data: str, out: str, *extra: str) -> list[str]:
    return [
        "--config",
        CONFIG,
        "--data.train",
        f"{data}/train",
        "--data.eval",
        f"{data}/eval",
        "--training.output_dir",
        out,
        "--training.log_every",
        "1",
        *extra,
    ]


def losses(run_dir: str) -> dict[int, float]:
    """step -> loss, the last row written for each step (a resumed run rewrites the steps after its checkpoint)."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[int(row["step"])] = row["loss"]
    return out


def _crash_and_resume(data: str, out_a: str, out_b: str, *extra: str) -> tuple[dict, dict, dict]:
    from launch.train import main
    from train.step import TrainStep

    args = ("--training.steps", "8", "--training.checkpoint_every", "4", "--training.eval_batches", "2", *extra)
    main(base_args(data, out_a, *args))
    original = TrainStep.__call__

    def crashing(self, batch, step, **kw):  # a crash two steps after the checkpoint at step 4
        if step == 6:
            raise RuntimeError("simulated crash")
        return original(self, batch, step, **kw)

    TrainStep.__call__ = crashing
    try:
        main(base_args(data, out_b, *args))
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    finally:
        TrainStep.__call__ = original
    summary = main(base_args(data, out_b, *args))
    return losses(out_a), losses(out_b), summary


def test_resume_after_crash_reproduces_losses_exactly(dist_pool, tiny_data, tmp_path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    (la, lb, summary), _ = dist_pool.run(_crash_and_resume, tiny_data, a, b)
    assert sorted(la) == list(range(1, 9))
    for step in range(5, 9):
        assert lb[step] == la[step], f"step {step}: resumed {lb[step]} != uninterrupted {la[step]}"
    assert summary["resumed_from"].endswith("step_00000004")
    assert summary["steps"] == 8
    # 8 steps x 64 rows x 2 ranks, each counted once across the crash
    assert summary["rows_consumed"] == 8 * 64 * 2
    kept = sorted(p.name for p in (Path(b) / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000008"]


def _ema_runs(data: str, plain: str, a: str, b: str) -> tuple[dict, dict, dict, dict, dict]:
    """A run without the weight average, then `_crash_and_resume` with it, then launch.evaluate on the EMA run."""
    from launch.evaluate import main as evaluate
    from launch.train import main

    full_eval = ("--training.eval_batches", "0")  # evaluate scores every eval row
    main(base_args(data, plain, "--training.steps", "8", "--training.checkpoint_every", "4", *full_eval))
    la, lb, summary = _crash_and_resume(data, a, b, *full_eval, "--training.ema_decay", "0.5")
    evaluated = evaluate(["--run-dir", a])["eval"]
    return losses(plain), la, lb, summary, evaluated


def test_weight_ema_trains_like_none_checkpoints_the_average_and_resumes_exactly(
    dist_pool, tiny_data, tmp_path
) -> None:
    from safetensors.torch import load_file

    plain, a, b = (str(tmp_path / n) for n in ("plain", "ema_a", "ema_b"))
    (lp, la, lb, summary, evaluated), _ = dist_pool.run(_ema_runs, tiny_data, plain, a, b)
    assert la == lp, "the average must not change training"
    for step in range(5, 9):
        assert lb[step] == la[step], f"step {step}: resumed {lb[step]} != uninterrupted {la[step]}"
    ck = "checkpoints/step_00000008"
    averaged, trained = load_file(f"{a}/{ck}/dense.safetensors"), load_file(f"{plain}/{ck}/dense.safetensors")
    resumed = load_file(f"{b}/{ck}/dense.safetensors")
    params = [k for k in trained if k.endswith(("weight", "bias")) and "norm" not in k.split(".")[-2]]
    assert params and any(not torch.equal(averaged[k], trained[k]) for k in params), "files hold the average"
    for k in averaged:  # the resumed run's average is the uninterrupted one's
        torch.testing.assert_close(resumed[k], averaged[k], rtol=0, atol=0, msg=k)
    state = torch.load(f"{a}/{ck}/rank0.pt", weights_only=True)["ema"]
    assert state["updates"] == 8
    for name, t in state["weights"].items():  # the training weights beside them are the plain run's
        if name in trained:
            assert torch.equal(t, trained[name]), name
    for name in ("auc", "logloss"):  # the final evaluation scored the averaged weights of the checkpoint
        assert evaluated["click"][name] == pytest.approx(summary["eval"]["click"][name], abs=1e-6)


def _ep_run(data: str, out: str, ep: int) -> dict:
    from launch.train import main

    return main(
        base_args(data, out, "--training.steps", "4", "--parallelism.ep_size", str(ep), "--training.eval_batches", "2")
    )


def _dense_state(run: str) -> dict:
    import torch
    from safetensors.torch import load_file

    ck = Path(run) / "checkpoints" / "step_00000004"
    state = {k: v for k, v in load_file(str(ck / "dense.safetensors")).items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(ck.glob("experts_ep*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            positions = json.loads(h.metadata()["positions"])
            for key in h.keys():
                layer = int(key.split(".")[0][5:])
                for j, pos in enumerate(positions[layer]):
                    experts.setdefault(key, {})[pos] = h.get_tensor(key)[j]
    for key, by_pos in experts.items():
        state["experts/" + key] = torch.stack([by_pos[p] for p in sorted(by_pos)])
    return state


def test_ep2_equals_ep1(dist_pool, tiny_data, tmp_path) -> None:
    r1, r2 = str(tmp_path / "ep1"), str(tmp_path / "ep2")
    s1 = dist_pool.run(_ep_run, tiny_data, r1, 1)[0]
    s2 = dist_pool.run(_ep_run, tiny_data, r2, 2)[0]
    assert s2["expert_params_per_rank"] * 2 == s1["expert_params_per_rank"]
    l1, l2 = losses(r1), losses(r2)
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6)
    d1, d2 = _dense_state(r1), _dense_state(r2)
    assert d1.keys() == d2.keys() and any(k.startswith("experts/") for k in d1)
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], atol=1e-5, rtol=0, msg=k)  # inf clip bounds compare equal
    assert sorted(p.name for p in (Path(r2) / "checkpoints" / "step_00000004").glob("experts_ep*")) == [
        "experts_ep0.safetensors",
        "experts_ep1.safetensors",
    ]
    for task in ("click", "finish"):
        assert s2["eval"][task]["auc"] == pytest.approx(s1["eval"][task]["auc"], abs=1e-4)


def test_run_directory_contract(dist_pool, tiny_data, tmp_path) -> None:
    run = str(tmp_path / "contract")
    summary = dist_pool.run(_ep_run, tiny_data, run, 2)[0]
    on_disk = json.loads((Path(run) / "summary.json").read_text())
    fixed = {
        "eval",
        "params",
        "flops_per_sample",
        "mfu",
        "samples_per_s",
        "steps",
        "wall_s",
        "rows_consumed",
        "restarts",
    }
    assert fixed <= on_disk.keys()
    assert set(on_disk["eval"]) == {"click", "finish"}
    for m in on_disk["eval"].values():
        assert {"auc", "uauc", "logloss"} <= m.keys() and 0.0 < m["auc"] < 1.0
    assert isinstance(on_disk["params"], int) and on_disk["params"] == summary["params"]
    assert on_disk["steps"] == 4 and on_disk["restarts"] == 0 and on_disk["mfu"] > 0
    for name in ("config.toml", "metrics.jsonl", "ds_config.json", "sharding_plan.txt"):
        assert (Path(run) / name).is_file(), name
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "epoch", "loss", "samples_per_s", "mfu", "lr"):
        assert all(key in r for r in rows if "loss" in r), key
    assert any("eval/click/auc" in r for r in rows)


def _pipeline_on_and_off(data: str, out_on: str, out_off: str) -> tuple[dict, dict, dict, dict]:
    from launch.train import main

    args = ("--training.steps", "10", "--training.checkpoint_every", "4", "--training.eval_every", "5")
    args += ("--training.eval_batches", "2", "--training.log_every", "1", "--training.keep_last", "5")
    on = main(base_args(data, out_on, *args, "--training.pipeline", "true"))
    off = main(base_args(data, out_off, *args, "--training.pipeline", "false"))
    return losses(out_on), losses(out_off), on, off


def test_pipelined_loop_trains_exactly_like_the_plain_one(dist_pool, tiny_data, tmp_path) -> None:
    """Batch i+1's input dist started during step i (and an evaluation and checkpoints in between):
    the same loss at every step, the same eval, the same rows, and the checkpoints resume at the same batch."""
    on_dir, off_dir = tmp_path / "on", tmp_path / "off"
    (l_on, l_off, s_on, s_off), _ = dist_pool.run(_pipeline_on_and_off, tiny_data, str(on_dir), str(off_dir))
    assert s_on["input_pipeline"] == "lookup ahead" and s_off["input_pipeline"] == "off"
    assert sorted(l_on) == list(range(1, 11)) and l_on == l_off
    assert s_on["eval"] == s_off["eval"]
    assert s_on["rows_consumed"] == s_off["rows_consumed"] == 10 * 64 * 2
    assert s_on["audit"] == s_off["audit"] and s_on["data_health"] == s_off["data_health"]
    import torch

    for run in (on_dir, off_dir):  # the loader state in the step-4 checkpoint: 4 batches trained, not 5
        state = torch.load(run / "checkpoints" / "step_00000004" / "rank0.pt", weights_only=True)
        assert state["trainer"]["loader"]["batches_done"] == 4
