"""The offline wheelhouse (launch.wheelhouse, launch.parts, launch.compat): the compatibility table,
parts and manifest with a missing / short / corrupt part named in one line, and the round trip on
this machine's own cpu target -- build from the host's probe, parts of 8 MiB, offline install into a
fresh environment that has only torch, a few steps trained there through the real launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import parts, wheelhouse
from launch.parts import MiB, PartError
from parallel import compat
from parallel.compat import CompatError
from tests.launch.host_env import make_host

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the compatibility table


def test_pinned_row_is_the_lock() -> None:
    stages = compat.lock_stages()
    rel = compat.release_for(stages["torch"][0].split("==")[1])
    assert rel.source == "verified"
    assert stages["fbgemm"] == [f"fbgemm-gpu-cpu=={rel.fbgemm}"] and stages["nodeps"] == [f"torchrec=={rel.torchrec}"]


def test_release_for_host_torch_and_variant() -> None:
    rel = compat.release_for("2.11.0+cu130", "3.12", "cu130")
    assert (rel.fbgemm, rel.torchrec) == ("1.6.0", "1.6.1")
    assert compat.variant_of("2.11.0+cu130", "13.0") == "cu130"
    assert compat.variant_of("2.13.0+cpu", None) == "cpu"
    assert compat.variant_of("2.12.1", "12.8") == "cu128" and compat.variant_of("2.12.1", None) == "cpu"
    resolved, nodeps = compat.stack_requirements(rel, "cu130")
    assert nodeps == ["fbgemm-gpu==1.6.0", "torchrec==1.6.1"]
    assert "deepspeed==0.19.8" in resolved and not any(r.startswith(("pytest", "ruff", "torch==")) for r in resolved)
    assert compat.stack_requirements(rel, "cpu")[1][0] == "fbgemm-gpu-cpu==1.6.0"


@pytest.mark.parametrize(
    ("torch", "python", "variant", "words"),
    [
        ("2.5.1+cu124", None, None, "no fbgemm-gpu/TorchRec release is known for torch 2.5.1"),
        ("2.13.0", "3.9", None, "has no build for Python 3.9"),
        ("2.13.0+cu118", None, "cu118", "has no cu118 build"),
        ("2.13.0+rocm6.3", None, None, "neither +cpu nor +cuXYZ"),
        ("latest", None, None, "not of the form"),
    ],
)
def test_no_release_is_one_line(torch: str, python: str | None, variant: str | None, words: str) -> None:
    with pytest.raises(CompatError) as e:
        compat.release_for(torch, python, variant or compat.variant_of(torch, None))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_flags_describe_the_host_not_this_machine() -> None:
    host = wheelhouse.host_from_flags("3.12", "2.11.0+cu130", None, [])
    flags = wheelhouse.target_flags(host)
    assert flags[:4] == ["--python-version", "3.12", "--implementation", "cp"] and "--only-binary=:all:" in flags
    assert "cp312" in flags and "manylinux_2_28_x86_64" in flags and host["variant"] == "cu130"


def test_torch_only_keeps_what_others_share() -> None:
    def item(name: str, *deps: str) -> dict:
        return {"metadata": {"name": name, "version": "1", "requires_dist": list(deps)}}

    items = [
        item("torch", "sympy", "filelock", "nvidia-cublas; platform_system == 'Linux'", "opt-einsum; extra == 'x'"),
        item("sympy", "mpmath"), item("mpmath"), item("filelock"), item("nvidia-cublas"),
        item("deepspeed", "torch", "filelock"), item("opt-einsum"),
    ]  # fmt: skip
    assert wheelhouse.torch_only(items, ["torch", "deepspeed"]) == {"torch", "sympy", "mpmath", "nvidia-cublas"}


# ---------------------------------------------------------------- parts and manifest


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate((2500, 10, 7000)):
        (src / f"w{i}.whl").write_bytes(bytes((i * 31 + k) % 251 for k in range(size)))
    manifest = parts.split(src, tmp_path / "out", 4096, "wheelhouse", {"target": {"python": "3.11"}})
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 4096 for p in manifest["parts"])
    return tmp_path / "out"


def test_parts_round_trip(packed: Path, tmp_path: Path) -> None:
    files = parts.reassemble(packed, tmp_path / "back")
    assert [f.name for f in files] == ["w0.whl", "w1.whl", "w2.whl"]
    for f in files:
        assert f.read_bytes() == (tmp_path / "src" / f.name).read_bytes()


def one_line_error(folder: Path, capsys) -> str:
    assert wheelhouse.main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("wheelhouse: ")
    return err


def test_missing_part_is_named(packed: Path, capsys) -> None:
    (packed / "wheelhouse.part001").unlink()
    err = one_line_error(packed, capsys)
    assert "wheelhouse.part001: missing (part 2 of" in err


def test_corrupt_part_is_named(packed: Path, capsys) -> None:
    path = packed / "wheelhouse.part002"
    data = bytearray(path.read_bytes())
    data[17] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "wheelhouse.part002: corrupt (part 3 of" in one_line_error(packed, capsys)
    with pytest.raises(PartError, match="part002: corrupt"):
        parts.reassemble(packed, packed / "never")
    assert not (packed / "never").exists()


def test_short_part_and_bad_manifest_are_named(packed: Path, capsys) -> None:
    path = packed / "wheelhouse.part000"
    path.write_bytes(path.read_bytes()[:-5])
    assert "wheelhouse.part000: 4091 bytes, the manifest says 4096" in one_line_error(packed, capsys)
    (packed / "manifest.json").write_text('{"format": 1, "parts": [')
    assert "manifest.json: corrupt manifest" in one_line_error(packed, capsys)
    (packed / "manifest.json").unlink()
    assert "manifest.json: no manifest" in one_line_error(packed, capsys)


def test_part_size_parsing() -> None:
    assert parts.parse_size("60MiB") == 60 * MiB and parts.parse_size("512k") == 512 * 1024
    assert parts.parse_size("1000") == 1000
    with pytest.raises(ValueError, match="expected a positive size"):
        parts.parse_size("-3M")


def test_install_refuses_a_wheelhouse_for_another_host(packed: Path, capsys) -> None:
    manifest = json.loads((packed / "manifest.json").read_text())
    manifest["target"] = {"python": "3.12", "torch": "2.11.0+cu130", "variant": "cu130"}
    (packed / "manifest.json").write_text(json.dumps(manifest))
    assert wheelhouse.main(["install", str(packed), "--no-doctor"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built for Python 3.12, torch 2.11 (cu130)" in err and "\n" not in err


def test_a_system_managed_python_gets_the_way_out(packed: Path, capsys, monkeypatch) -> None:
    import torch

    manifest = json.loads((packed / "manifest.json").read_text())
    manifest["target"] = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "torch": torch.__version__,
                          "variant": compat.variant_of(torch.__version__, torch.version.cuda)}  # fmt: skip
    (packed / "manifest.json").write_text(json.dumps(manifest))

    def refuse(python: str, args: list[str], what: str, env=None) -> None:
        assert "--no-index" in args and "--no-deps" in args and "--break-system-packages" not in args
        raise wheelhouse.WheelhouseError(f"{what} failed: error: externally-managed-environment")

    monkeypatch.setattr(wheelhouse, "pip", refuse)
    assert wheelhouse.main(["install", str(packed), "--no-doctor"]) == 2
    err = capsys.readouterr().err.strip()
    assert "managed by the system (PEP 668)" in err and "--pip-arg=--break-system-packages" in err


# ---------------------------------------------------------------- the round trip


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> dict:
    """A fresh environment with only torch, its probe, and a wheelhouse built for it in parts of 8 MiB."""
    root = tmp_path_factory.mktemp("airgap")
    python = make_host(root / "host")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = subprocess.run([str(python), "-m", "launch.wheelhouse", "probe"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    (root / "host.json").write_text(probe.stdout)
    out = root / "wheelhouse"
    assert wheelhouse.main(["build", "--host", str(root / "host.json"), "--out", str(out), "--part-size", "8MiB"]) == 0
    return {"root": root, "python": python, "wheelhouse": out, "probe": json.loads(probe.stdout)}


def test_build_for_the_host(host: dict) -> None:
    manifest = json.loads((host["wheelhouse"] / "manifest.json").read_text())
    names = [f["name"] for f in manifest["files"]]
    assert manifest["target"]["variant"] == "cpu" and manifest["target"]["torch"] == host["probe"]["torch"]
    assert all(p["bytes"] <= 8 * MiB for p in manifest["parts"]) and len(manifest["parts"]) > 3
    dists = {wheelhouse.norm(n.split("-")[0]) for n in names}
    assert {"fbgemm-gpu-cpu", "torchrec", "deepspeed", "pyarrow", "wandb", "tensordict", "iopath"} <= dists
    assert not dists & {"torch", "numpy", "sympy", "fbgemm-gpu", "pytest", "ruff"}  # the host's, or not for hosts
    assert not list(host["wheelhouse"].glob("*.whl")) and not (host["wheelhouse"] / ".stage").exists()


def test_offline_install_and_train(host: dict, tiny_data: str, tmp_path: Path) -> None:
    python, folder = str(host["python"]), host["wheelhouse"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    install = [python, "-m", "launch.wheelhouse", "install", str(folder), "--pip-arg=--no-compile"]  # no .pyc: faster
    # a corrupt part stops the install before anything is installed, named in one line
    part = folder / "wheelhouse.part002"
    good = part.read_bytes()
    part.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    proc = subprocess.run(install, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "wheelhouse.part002: corrupt (part 3 of" in proc.stderr
    part.write_bytes(good)
    torch_before = wheelhouse.torch_identity(python)
    proc = subprocess.run(install, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch untouched" in proc.stdout and wheelhouse.torch_identity(python) == torch_before
    where = subprocess.run([python, "-c", "import torchrec, deepspeed; print(torchrec.__file__, deepspeed.__file__)"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.count(str(host["root"] / "host")) == 2
    # a few steps through the real launcher (torchrun, 2 processes on gloo) in that environment
    run = tmp_path / "run"
    args = ["--data.train", f"{tiny_data}/train", "--data.eval", f"{tiny_data}/eval", "--training.output_dir", str(run),
            "--training.steps", "4", "--training.checkpoint_every", "0", "--training.log_every", "2"]  # fmt: skip
    train_env = {**os.environ, "PYTHON": python, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/train.sh", "configs/tiny.toml", *args], cwd=REPO, env=train_env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    shutil.rmtree(folder / "wheels", ignore_errors=True)
