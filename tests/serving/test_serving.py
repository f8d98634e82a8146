"""Evaluation and serving on a tiny run trained once per module (in-process, world size 1, 8 steps):
export round trip in a fresh process (fp32 exact, int8 within a stated tolerance), no pickle in the
artifact, the torch.export program, evaluate == summary.json, one-line errors naming the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.toml")
INT8_PROB_TOL = 1e-3
"""Largest |p_int8 - p_fp32| accepted: rowwise int8 tables err by <= half a step (range / 510) per element."""
INT8_AUC_TOL = 2e-3


def train_args(data: str, out: str, *extra: str) -> list[str]:
    return [
        "--config", CONFIG, "--data.train", f"{data}/train", "--data.eval", f"{data}/eval",
        "--training.output_dir", out, "--training.steps", "8", "--training.checkpoint_every", "4",
        "--training.log_every", "4", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """A tiny run (8 steps, checkpoints at 4 and 8) with both artifacts exported."""
    from launch.train import main as train_main
    from serving.export import export

    out = tmp_path_factory.mktemp("serving") / "run"
    train_main(train_args(tiny_data, str(out)))
    export(out)
    export(out, quantize="int8")
    return out


def _fresh_predict(run: Path, data: str, tmp: Path) -> dict[str, dict]:
    """`launch.predict.main` on both artifacts in ONE fresh interpreter (saves a second start-up)."""
    argv = {
        name: ["--artifact", str(run / art), "--data", data, "--out", str(tmp / f"{name}.parquet")]
        for name, art in (("fp32", "artifact"), ("int8", "artifact_int8"))
    }
    code = (
        "import json\nfrom launch.predict import main\n"
        f"argv = json.loads({json.dumps(argv)!r})\n"
        "print('RESULT' + json.dumps({k: main(v) for k, v in argv.items()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANKMIXER_FORCE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_export_round_trip_in_a_fresh_process(run, tiny_data, tmp_path) -> None:
    from checkpoint.format import latest_checkpoint
    from serving.model import from_checkpoint, load_run_config
    from serving.predict import predict_dataset

    data = f"{tiny_data}/eval"
    results = _fresh_predict(run, data, tmp_path)
    fp32 = pq.read_table(str(tmp_path / "fp32.parquet")).to_pydict()
    int8 = pq.read_table(str(tmp_path / "int8.parquet")).to_pydict()
    # Reference: the checkpoint's model in this process (same sparse-inference router).
    ref = predict_dataset(from_checkpoint(load_run_config(run), latest_checkpoint(run)), data)
    n = len(ref["row_id"])
    assert results["fp32"]["rows"] == n and len(set(fp32["row_id"])) == n  # every eval row once, padding skipped
    assert set(fp32) == {"row_id", "user_id", "p_click", "p_finish", "click", "finish"}
    assert np.array_equal(np.asarray(fp32["row_id"]), ref["row_id"])
    for task in ("click", "finish"):
        assert np.array_equal(np.asarray(fp32[f"p_{task}"], dtype=np.float32), ref[f"p_{task}"]), task  # exact
        diff = np.abs(np.asarray(int8[f"p_{task}"], dtype=np.float32) - ref[f"p_{task}"])
        assert 0 < diff.max() <= INT8_PROB_TOL, (task, diff.max())  # really quantized, and close
        auc32, auc8 = results["fp32"]["metrics"][task]["auc"], results["int8"]["metrics"][task]["auc"]
        assert abs(auc8 - auc32) <= INT8_AUC_TOL


def test_artifact_has_no_pickle_and_a_complete_manifest(run) -> None:
    for name in ("artifact", "artifact_int8"):
        art = run / name
        files = sorted(p.name for p in art.iterdir())
        assert not [f for f in files if f.endswith((".pt", ".pkl", ".pt2", ".bin"))], files
        for f in art.iterdir():
            head = f.read_bytes()[:4]
            assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{f} looks like a pickle / zip archive"
        m = json.loads((art / "manifest.json").read_text())
        assert m["model"] == "rankmixer" and m["step"] == 8 and m["tasks"] == ["click", "finish"]
        assert m["feature_order"][0] == "u0" and m["tables"]["item"]["features"] == ["i0", "s_item"]
        assert m["router"]["sparse_inference"] is True
        assert m["dense_program"]["status"] == "exported" and m["dense_program"]["sparse_inference_exported"] is False
    q = json.loads((run / "artifact_int8" / "manifest.json").read_text())
    assert q["quantization"]["tables"] == "int8" and q["quantization"]["dense"] == "none"
    assert q["sizes"]["tables_bytes"] == sum(r["rows"] * (r["dim"] + 4) for r in q["tables"].values())
    assert q["sizes"]["tables_saved_pct"] == pytest.approx(62.5)  # dim 8: 8 + 4 bytes instead of 32
    assert set(q["eval"]["auc_change_int8"]) == {"click", "finish"}


def test_dense_program_matches_the_dense_weighted_model(run) -> None:
    import torch

    from serving.model import load_artifact, load_program, set_sparse_inference

    model, _ = load_artifact(run / "artifact")
    prog = load_program(run / "artifact").module()
    gen = torch.Generator().manual_seed(1)
    for b in (1, 5, 300):  # dynamic batch size
        x_BI, d_BF = torch.randn(b, 200, generator=gen) * 0.1, torch.randn(b, 8, generator=gen)
        sparse = model.score_dense(x_BI, d_BF)
        set_sparse_inference(model.dense, False)
        dense = model.score_dense(x_BI, d_BF)
        set_sparse_inference(model.dense, True)
        out = prog(x_BI, d_BF)
        assert out.shape == (b, 2)
        # the program is the dense-weighted path: bit-equal where export keeps eager's CPU kernels, within fp32
        # rounding where it picks others (3e-8 apart on an AMD EPYC host)
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-7)
        assert (out - sparse).abs().max() < 1e-5  # which is the sparse path up to rounding


def test_evaluate_writes_eval_json_matching_the_training_summary(run) -> None:
    from launch.evaluate import main

    result = main(["--run", str(run)])
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["step"] == 8 and on_disk["checkpoint"].endswith("step_00000008")
    summary = json.loads((run / "summary.json").read_text())["eval"]
    for task in ("click", "finish"):
        m = on_disk["eval"][task]
        assert {"auc", "uauc", "logloss", "ne", "count"} <= m.keys()
        # Training evaluated the same rows with the same inference router (experts computed densely there).
        assert m["auc"] == pytest.approx(summary[task]["auc"], abs=1e-6)
        assert m["uauc"] == pytest.approx(summary[task]["uauc"], abs=1e-6)
        assert m["logloss"] == pytest.approx(summary[task]["logloss"], rel=1e-5)
    assert result["eval"] == on_disk["eval"]
    older = main(
        ["--run", str(run), "--checkpoint", str(run / "checkpoints" / "step_00000004"), "--out", str(run / "e4.json")]
    )
    assert older["step"] == 4 and older["eval"]["click"]["auc"] != on_disk["eval"]["click"]["auc"]


def _one_line_exit(fn, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    msg = str(e.value.code)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line_and_name_the_path(run, tmp_path) -> None:
    from launch.evaluate import main as evaluate
    from launch.export import main as export
    from launch.predict import main as predict

    missing = tmp_path / "nope"
    assert str(missing) in _one_line_exit(evaluate, ["--run", str(missing)])
    assert str(missing) in _one_line_exit(export, ["--run", str(missing)])
    assert str(missing) in _one_line_exit(predict, ["--artifact", str(missing), "--data", "x"])
    bare = tmp_path / "bare"  # a config but no checkpoint
    bare.mkdir()
    (bare / "config.toml").write_text((run / "config.toml").read_text())
    assert str(bare / "checkpoints") in _one_line_exit(evaluate, ["--run", str(bare)])
    assert str(bare / "checkpoints") in _one_line_exit(export, ["--run", str(bare)])
    ck = run / "checkpoints" / "step_00000099"
    assert str(ck) in _one_line_exit(evaluate, ["--run", str(run), "--checkpoint", str(ck)])
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    assert str(no_cfg / "config.toml") in _one_line_exit(evaluate, ["--run", str(no_cfg)])


# ------------------------------------------------------------------ 2 ranks, ep_size 2: expert shards merge


def _train_ep2(data: str, out: str) -> dict:
    from launch.train import main

    return main(train_args(data, out, "--parallelism.ep_size", "2", "--training.steps", "4"))


def _evaluate_2ranks(run: str) -> dict:
    from launch.evaluate import main

    return main(["--run", run, "--out", f"{run}/eval_2ranks.json"])


def test_ep2_shards_merge_and_two_rank_evaluate_equals_one(dist_pool, tiny_data, tmp_path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from launch.evaluate import main as evaluate
    from serving.export import export

    run = tmp_path / "ep2"
    dist_pool.run(_train_ep2, tiny_data, str(run))
    ck = run / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in ck.glob("experts_ep*")) == ["experts_ep0.safetensors", "experts_ep1.safetensors"]
    export(run, eval_data="")
    dense = load_file(str(run / "artifact" / "dense.safetensors"))
    for p in (0, 1):
        with safe_open(str(ck / f"experts_ep{p}.safetensors"), framework="pt") as h:
            positions = json.loads(h.metadata()["positions"])[0]
            assert positions == [2 * p, 2 * p + 1]
            for name in ("w1", "b1", "w2", "b2"):
                assert torch.equal(dense[f"blocks.0.ffn.experts.{name}"][positions], h.get_tensor(f"layer0.{name}"))
    two = dist_pool.run(_evaluate_2ranks, str(run))
    one = evaluate(["--run", str(run)])
    # Training sharded the tables over 2 ranks (table_row_wise: pooled sums of partial sums), so its eval
    # differs from the unsharded reads in rounding only.
    summary = json.loads((run / "summary.json").read_text())["eval"]
    for task in ("click", "finish"):
        assert one["eval"][task]["auc"] == pytest.approx(summary[task]["auc"], abs=1e-4)
        assert one["eval"][task]["logloss"] == pytest.approx(summary[task]["logloss"], rel=1e-5)
    assert two[0]["world_size"] == 2 and two[0]["eval"] == two[1]["eval"]
    for task in ("click", "finish"):
        for key in ("auc", "count"):  # histogram counts: sums of whole weights, exact in any order
            assert two[0]["eval"][task][key] == one["eval"][task][key], (task, key)
        for key in ("uauc", "logloss"):  # float sums over ranks in another order
            assert two[0]["eval"][task][key] == pytest.approx(one["eval"][task][key], rel=1e-12), (task, key)


def test_bf16_runtime_option_is_close_to_fp32(run, tiny_data) -> None:
    from serving.model import load_artifact
    from serving.predict import predict_dataset

    data = f"{tiny_data}/eval"
    fp32 = predict_dataset(load_artifact(run / "artifact")[0], data, batch_size=512)
    bf16 = predict_dataset(load_artifact(run / "artifact", dtype="bf16")[0], data, batch_size=512)
    diff = max(float(np.abs(bf16[f"p_{t}"] - fp32[f"p_{t}"]).max()) for t in ("click", "finish"))
    assert 0 < diff < 1e-2  # bf16 autocast of the dense model (measured here on CPU; meant for GPU)


def test_predict_scores_unlabelled_data(run, tiny_data, tmp_path) -> None:
    from launch.predict import main

    src = sorted(Path(tiny_data, "eval").glob("*.parquet"))[0]
    table = pq.read_table(str(src))
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    pq.write_table(table.drop_columns(["click", "finish", "row_id"]), str(unlabelled / "part.parquet"))
    out = main(["--artifact", str(run / "artifact"), "--data", str(unlabelled), "--out", str(tmp_path / "u.parquet")])
    ref = main(["--artifact", str(run / "artifact"), "--data", str(src), "--out", str(tmp_path / "l.parquet")])
    assert out["metrics"] == {} and out["rows"] == table.num_rows == ref["rows"]
    got, want = pq.read_table(str(tmp_path / "u.parquet")), pq.read_table(str(tmp_path / "l.parquet"))
    assert got.column_names == ["row_id", "user_id", "p_click", "p_finish"]
    assert set(got.column("row_id").to_pylist()) == {-1}
    assert got.column("p_click").equals(want.column("p_click"))
    missing = str(tmp_path / "no_data")
    assert missing in _one_line_exit(main, ["--artifact", str(run / "artifact"), "--data", missing])
