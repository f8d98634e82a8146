"""The real launchers: `launch/train.sh` (torchrun) on 2 processes, two agents as two nodes, the
`deepspeed` launcher, and an elastic restart after kill -9 of one rank. Subprocess tests: each pays
the torch + torchrec + deepspeed import, so there are only these few."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench.faults import workers
from tests.dist_pool import free_port

REPO = Path(__file__).resolve().parents[2]


def train_sh(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """launch/train.sh configs/tiny.toml ARGS; output to a temporary file (`output`), never a pipe: a pipe
    nobody reads while a test polls the run directory fills up and blocks the ranks' prints."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "train.sh"), str(REPO / "configs" / "tiny.toml"), *args],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    """Everything the launcher printed so far."""
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def wait_output(proc: subprocess.Popen, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return output(proc)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out = wait_output(proc, timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def data_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["--data.train", f"{data}/train", "--data.eval", f"{data}/eval", "--training.output_dir", str(out), *extra]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def single_node_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    out = finish(train_sh(data_args(tiny_data, run, "--training.log_every", "2", "--parallelism.ep_size", "2")))
    assert "== eval ==" in out and "click" in out
    return run


def test_two_process_torchrun_launch(single_node_run: Path) -> None:
    summary = json.loads((single_node_run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["world_size"] == 2 and summary["ep_size"] == 2
    assert summary["rows_consumed"] == 20 * 64 * 2
    assert summary["expert_params_per_rank"] > 0
    plan = json.loads((single_node_run / "sharding_plan.json").read_text())
    assert {r for t in plan["tables"].values() for r in t["ranks"]} == {0, 1}, "tables must live on both ranks"


def test_two_nodes_train_like_one(single_node_run: Path, tiny_data, tmp_path) -> None:
    run = tmp_path / "two_nodes"
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["OMP_NUM_THREADS"] = "1"  # the threads per rank of the single-node run
    args = data_args(tiny_data, run, "--training.log_every", "2", "--parallelism.ep_size", "2")
    nodes = [train_sh(args, {**env, "NODE_RANK": str(i), "RDZV_ID": f"t{os.getpid()}"}) for i in range(2)]
    for p in nodes:
        finish(p)
    # Same steps, same data, same numbers up to float rounding: within a node DeepSpeed all-reduces
    # through its shared-memory op, across nodes through gloo, which sum in a different order (~1e-7).
    two, one = losses(run), losses(single_node_run)
    assert two.keys() == one.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a = json.loads((run / "summary.json").read_text())
    b = json.loads((single_node_run / "summary.json").read_text())
    assert a["rows_consumed"] == b["rows_consumed"] and a["steps"] == b["steps"]
    for task in b["eval"]:
        assert a["eval"][task]["auc"] == pytest.approx(b["eval"][task]["auc"], abs=1e-4)


def test_deepspeed_launcher_trains_like_torchrun(single_node_run: Path, tiny_data, tmp_path) -> None:
    # `deepspeed --module launch.train` passes --local_rank=N to every rank and names LOCAL_SIZE, not
    # LOCAL_WORLD_SIZE: both are taken, and the run equals torchrun's.
    run = tmp_path / "ds_launcher"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env["TORCH_EXTENSIONS_DIR"] = str(REPO / ".build" / "torch_extensions")
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["--module", "launch.train", "--config", str(REPO / "configs" / "tiny.toml")]
    cmd += data_args(tiny_data, run, "--training.log_every", "2", "--parallelism.ep_size", "2")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "LOCAL_WORLD_SIZE" not in out.stderr, "TorchRec fell back to guessing the local world size"
    ds, ref = losses(run), losses(single_node_run)
    assert ds.keys() == ref.keys()
    for step in ref:
        assert ds[step] == pytest.approx(ref[step], rel=1e-5), step


def test_elastic_restart_after_kill9_consumes_every_row_once(tmp_path) -> None:
    from pipeline.tools.synth import main as synth

    data = tmp_path / "data"
    synth(["--out", str(data), "--rows", "40000", "--files", "4", "--seed", "2", "--row-group-size", "3000"])
    run = tmp_path / "elastic"
    args = data_args(
        str(data),
        run,
        "--training.steps",
        "0",
        "--training.epochs",
        "1",
        "--training.checkpoint_every",
        "40",
        "--training.log_every",
        "20",
        "--training.eval_batches",
        "2",
        "--data.drop_last",
        "false",
    )
    proc = train_sh(args, {"MAX_RESTARTS": "3"})
    deadline = time.time() + 240
    while not list((run / "checkpoints").glob("step_00000040")) and time.time() < deadline:
        assert proc.poll() is None, output(proc)[-4000:]
        time.sleep(0.2)
    victims = workers(proc.pid)
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    out = finish(proc, timeout=300)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] >= 1, out[-3000:]
    assert summary["resumed_from"] and "step_" in summary["resumed_from"]
    audit = summary["audit"]
    assert audit["exactly_once"] is True, audit
    assert audit["epochs"][0]["count"] == audit["dataset"]["count"] == summary["rows_consumed"]


def run_single(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m launch.train` without torchrun: a world of one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [
        str(REPO / ".venv" / "bin" / "python"),
        "-m",
        "launch.train",
        "--config",
        str(REPO / "configs" / "tiny.toml"),
    ]
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_resume_on_another_world_size(single_node_run: Path, tiny_data, tmp_path) -> None:
    # An epoch-boundary checkpoint of 2 processes resumes on 1 process; both epochs are audited exactly once.
    run = tmp_path / "reshard"
    epoch = ("--training.steps", "0", "--data.drop_last", "false", "--moe.enabled", "false")
    finish(train_sh(data_args(tiny_data, run, *epoch, "--training.epochs", "1")))
    first = json.loads((run / "summary.json").read_text())
    res = run_single(data_args(tiny_data, run, *epoch, "--training.epochs", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["resumed_from"].endswith(f"step_{first['steps']:08d}")
    assert [a["epoch"] for a in summary["audit"]["epochs"]] == [0, 1]
    assert summary["audit"]["exactly_once"] is True
    assert summary["rows_consumed"] == 2 * summary["audit"]["dataset"]["count"]
    # A mid-epoch checkpoint with sharded experts cannot move: one clear line, no traceback.
    bad = run_single(data_args(tiny_data, single_node_run, "--training.steps", "30"))
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "step_00000020" in last and "ep_size=2" in last, last
    assert "Traceback" not in bad.stderr


def test_sigterm_to_torchrun_checkpoints_and_the_same_command_resumes(tiny_data, tmp_path) -> None:
    # A scheduler's preemption: SIGTERM to the launcher. torchrun forwards it to the ranks, which finish
    # their step, agree, write one checkpoint and exit 75; the same command resumes and every epoch is exact.
    run = tmp_path / "preempt"
    args = data_args(
        tiny_data, run, "--training.steps", "0", "--training.epochs", "8", "--training.checkpoint_every", "0",
        "--training.log_every", "2", "--data.drop_last", "false", "--moe.enabled", "false",
    )  # fmt: skip
    proc = train_sh(args)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, output(proc)[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = wait_output(proc, 120)
    assert proc.returncode != 0, out[-3000:]
    line = next(s for s in out.splitlines() if s.startswith("[preempted] at step "))
    step = int(line.split()[3].rstrip(":"))
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert line.endswith(str(ckpt)) and (ckpt / "meta.json").is_file() and not (run / "summary.json").exists()
    assert not (run / ".lock").exists()  # released on the way out
    finish(train_sh(args))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(ckpt)
    audit = summary["audit"]
    assert [a["epoch"] for a in audit["epochs"]] == list(range(8)) and audit["exactly_once"] is True, audit
    assert summary["rows_consumed"] == 8 * audit["dataset"]["count"]
    logged = [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert logged == sorted(set(logged))  # the resumed run logs each step once


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--training.lr_typo", "0.1"], "config error: unknown config key 'training.lr_typo'"),
        (["--features.dense", "d0,d_missing"], "d_missing"),
    ],
)
def test_train_sh_preflight_stops_bad_jobs_with_one_line(tiny_data, tmp_path, extra, expected) -> None:
    # Checked once before torchrun starts: one line on stderr, exit code 2, no rank ever launched.
    proc = train_sh(data_args(tiny_data, tmp_path / "run", *extra))
    out = wait_output(proc, 120)
    assert proc.returncode == 2, out[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out
    assert not (tmp_path / "run").exists()
