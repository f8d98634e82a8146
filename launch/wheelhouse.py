"""Offline wheelhouse for air-gapped hosts: probe the host, build the wheels on a connected machine,
carry them over in parts of bounded size, install them there with no index, without touching torch.

    # on the host (from a checkout; stdlib + the host's torch only):
    python -m launch.wheelhouse probe > host.json
    # on a machine with the package index (from this project's .venv):
    python -m launch.wheelhouse build --host host.json --out dist/wheelhouse --part-size 60MiB
    # copy dist/wheelhouse/ (manifest.json + wheelhouse.partNNN) and the checkout to the host, then:
    python -m launch.wheelhouse install dist/wheelhouse

`build` picks the fbgemm-gpu / TorchRec release made for the host's torch (parallel/compat.py), keeps the
rest of requirements.lock, resolves their dependencies for the host's Python and platform tags with
the host's own packages as constraints, and downloads only what the host lacks (never torch nor what
torch needs). Packages published only as source (DeepSpeed, iopath) are built here into pure-Python
wheels. `install` checks every part (a missing or corrupt one is named in one line), reassembles and
verifies the wheels, installs them with `pip --no-index --no-deps`, checks that torch is unchanged and
runs `python -m launch.doctor --verify-install cpu|cuda`.

Stdlib only at import: `install` and `probe` run on a host where nothing of the stack is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from launch import parts
from parallel import compat

REPO = Path(__file__).resolve().parents[1]
STEM = "wheelhouse"
DEFAULT_PART = "60MiB"


class WheelhouseError(RuntimeError):
    """A one-line reason the build or the install cannot go on."""


def norm(name: str) -> str:
    """PEP 503 name: 'Typing_Extensions' -> 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def probe() -> dict[str, Any]:
    """This interpreter as a wheel target: Python, ABIs and platform tags it accepts, torch and its
    build variant, and every installed distribution (name -> version)."""
    import importlib.metadata as md
    import platform

    try:
        from pip._vendor.packaging import tags  # pip's copy: the host may lack `packaging`
    except ImportError:  # pragma: no cover - pip without its vendored packaging
        from packaging import tags
    try:
        import torch
    except ImportError as e:
        raise WheelhouseError(
            f"{sys.executable}: torch does not import ({e}); install the host's torch first"
        ) from None
    abis: list[str] = []
    platforms: list[str] = []
    for t in tags.sys_tags():
        if t.abi not in abis:
            abis.append(t.abi)
        if t.platform not in platforms:
            platforms.append(t.platform)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {
        "python": python,
        "implementation": tags.interpreter_name(),
        "abis": abis,
        "platforms": platforms,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "variant": compat.variant_of(torch.__version__, torch.version.cuda),
        "packages": {norm(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]},
    }


def host_from_flags(python: str, torch: str, cuda: str | None, platforms: list[str]) -> dict[str, Any]:
    """A host described by flags instead of a probe: no package list (only torch and what it needs are
    assumed present), manylinux x86_64 tags down from glibc 2.28 unless --platform is given."""
    if not platforms:
        platforms = [f"manylinux_2_{m}_x86_64" for m in range(28, 16, -1)] + ["manylinux2014_x86_64"]
    tag = "cp" + python.replace(".", "")
    return {
        "python": python,
        "implementation": "cp",
        "abis": [tag, "abi3", "none"],
        "platforms": platforms,
        "torch": torch,
        "torch_cuda": cuda,
        "variant": compat.variant_of(torch, cuda),
        "packages": {},
    }


def target_flags(host: dict[str, Any]) -> list[str]:
    """pip's flags that make it pick wheels for the host instead of this machine."""
    flags = ["--python-version", host["python"], "--implementation", host["implementation"], "--only-binary=:all:"]
    for abi in host["abis"]:
        flags += ["--abi", abi]
    for plat in host["platforms"]:
        flags += ["--platform", plat]
    return flags


def pip(python: str, args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run `python -m pip ARGS`; on failure, a one-line error with pip's last line."""
    proc = subprocess.run(
        [python, "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        last = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no output")
        if "externally-managed-environment" in proc.stderr:  # PEP 668: pip's last line is only a hint
            last = "error: externally-managed-environment"
        raise WheelhouseError(f"{what} failed: {last.strip()}")


def report(python: str, reqs: list[str], workdir: Path, name: str, extra: list[str]) -> list[dict[str, Any]]:
    """What `pip install --dry-run --ignore-installed` would install: pip's installation report items."""
    req_file = workdir / f"{name}.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    out = workdir / f"{name}.json"
    pip(python, ["install", "-q", "--dry-run", "--ignore-installed", "--report", str(out), "-r", str(req_file), *extra],
        f"resolving {name}")  # fmt: skip
    return json.loads(out.read_text())["install"]


def torch_only(items: list[dict[str, Any]], roots: list[str]) -> set[str]:
    """Names reachable from torch in the resolved graph but not from the other roots without torch."""
    from packaging.requirements import Requirement

    names = {norm(i["metadata"]["name"]) for i in items}
    edges: dict[str, set[str]] = {}
    for i in items:
        deps = set()
        for spec in i["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            if norm(req.name) in names:
                deps.add(norm(req.name))
        edges[norm(i["metadata"]["name"])] = deps

    def reach(starts: list[str], blocked: str | None) -> set[str]:
        seen, todo = set(), [s for s in starts if s != blocked]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo += [d for d in edges.get(n, ()) if d != blocked]
        return seen

    return reach(["torch"], None) - reach([r for r in roots if r != "torch"], "torch")


def build(host: dict[str, Any], out: Path, part_bytes: int, index_url: str | None, fbgemm_index: str | None) -> dict:
    """Resolve, download and split the wheels the host needs into `out` (manifest + parts)."""
    python = sys.executable
    variant = host["variant"]
    rel = compat.release_for(host["torch"], host["python"], variant)
    resolved, nodeps = compat.stack_requirements(rel, variant)
    stage = out / ".stage"
    shutil.rmtree(stage, ignore_errors=True)
    built, wheels = stage / "built", stage / "wheels"
    built.mkdir(parents=True)
    wheels.mkdir()
    index = ["--index-url", index_url] if index_url else []
    # 1. Packages published only as source: build them here (pure Python, or refuse).
    for item in report(python, resolved, stage, "sources", ["--no-deps", *index]):
        url = item["download_info"]["url"]
        if url.endswith((".tar.gz", ".zip", ".tar.bz2")):
            pin = f"{item['metadata']['name']}=={item['metadata']['version']}"
            pip(python, ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(built), pin, *index],
                f"building a wheel of {pin}", env={"DS_BUILD_OPS": "0"})  # fmt: skip
    for whl in built.glob("*.whl"):
        if not whl.name.endswith(("-none-any.whl", "-py3-none-any.whl")):
            raise WheelhouseError(f"{whl.name}: builds a platform wheel here; build it on a machine like the host")
    # 2. Resolve for the host: its packages (and its torch) as constraints, our pins where we have them.
    ours = {norm(r.split("==")[0]) for r in resolved}
    host_torch = host["torch"].partition("+")[0]
    pins = [f"{n}=={v.partition('+')[0]}" for n, v in host["packages"].items() if n not in ours and n != "torch"]
    (stage / "host-constraints.txt").write_text("\n".join(pins) + "\n")
    flags = [*target_flags(host), "--find-links", str(built), *index]
    items = report(python, [*resolved, f"torch=={host_torch}"], stage, "host",  # --target: pip < 23.3 wants it
                   [*flags, "--target", str(stage / "target"), "-c", str(stage / "host-constraints.txt")])  # fmt: skip
    skip = torch_only(items, ["torch", *ours])
    need = []  # the exact files the resolution picked (URLs: no second index look-up per package)
    for i in items:
        name, version = norm(i["metadata"]["name"]), i["metadata"]["version"]
        if name in skip or host["packages"].get(name) == version:
            continue
        need.append(i["download_info"]["url"])
    # 3. Download: the resolved set, then fbgemm (from the CUDA index on a GPU host) and TorchRec, no deps.
    (stage / "download.txt").write_text("\n".join(need) + "\n")
    if need:  # empty when the host already has every dependency at the resolved version
        pip(python, ["download", "-q", "--no-deps", "-d", str(wheels), "-r", str(stage / "download.txt"), *flags],
            "downloading the dependencies")  # fmt: skip
    fb_index = index
    if variant != "cpu":
        fb_index = ["--index-url", fbgemm_index or compat.CUDA_INDEX.format(variant=variant)]
    pip(python, ["download", "-q", "--no-deps", "-d", str(wheels), nodeps[0], *target_flags(host), *fb_index],
        f"downloading {nodeps[0]} ({variant})")  # fmt: skip
    pip(python, ["download", "-q", "--no-deps", "-d", str(wheels), nodeps[1], *target_flags(host), *index],
        f"downloading {nodeps[1]}")  # fmt: skip
    if any(norm(w.name.split("-")[0]) == "torch" for w in wheels.glob("*.whl")):
        raise WheelhouseError("the resolution pulled a torch wheel; the host's torch must be left alone")
    target = {k: host[k] for k in ("python", "implementation", "torch", "torch_cuda", "variant")}
    extra = {"target": target, "release": rel.__dict__, "requirements": {"resolved": resolved, "no_deps": nodeps}}
    manifest = parts.split(wheels, out, part_bytes, STEM, extra)
    shutil.rmtree(stage)
    return manifest


def torch_identity(python: str) -> str:
    """'<version> <file>' of the torch that `python` imports ('' when none)."""
    code = "import torch; print(torch.__version__, torch.__file__)"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def install(folder: Path, python: str, doctor: bool = True, pip_args: list[str] | None = None) -> int:
    """Check, reassemble and install a wheelhouse into `python`'s environment; returns the wheel count."""
    manifest = parts.read_manifest(folder)
    target = manifest.get("target") or {}
    proc = subprocess.run([python, "-m", "launch.wheelhouse", "probe"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    if proc.returncode != 0:
        raise WheelhouseError(f"probing {python} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    host = json.loads(proc.stdout)
    want = (target.get("python"), compat.torch_minor(target.get("torch", "0.0")), target.get("variant"))
    have = (host["python"], compat.torch_minor(host["torch"]), host["variant"])
    if want != have:
        raise WheelhouseError(
            f"{folder}: built for Python {want[0]}, torch {want[1]} ({want[2]}); {python} has Python {have[0]}, "
            f"torch {host['torch']} ({have[2]}): build a wheelhouse from this host's probe"
        )
    wheels = parts.reassemble(folder, folder / "wheels")
    before = torch_identity(python)
    cmd = ["install", "-q", "--no-index", "--no-deps", "--find-links", str(folder / "wheels"), *(pip_args or [])]
    try:
        pip(python, [*cmd, *map(str, wheels)], "installing the wheels")
    except WheelhouseError as e:
        if "externally-managed" in str(e) or "externally managed" in str(e):
            raise WheelhouseError(
                f"{python}'s environment is managed by the system (PEP 668): install into a venv made with "
                "--system-site-packages, or pass --pip-arg=--break-system-packages"
            ) from None
        raise
    if torch_identity(python) != before:
        raise WheelhouseError(f"installing changed the host's torch ({before} -> {torch_identity(python)})")
    if doctor:
        kind = "cpu" if target["variant"] == "cpu" else "cuda"
        proc = subprocess.run([python, "-m", "launch.doctor", "--verify-install", kind], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        if proc.returncode != 0:
            raise WheelhouseError(f"installed, but the doctor says: {proc.stderr.strip().splitlines()[0]}")
    return len(wheels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.wheelhouse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="print this interpreter's target description (JSON) for `build --host`")
    b = sub.add_parser("build", help="resolve, download and split the wheels for a host")
    b.add_argument("--host", type=Path, help="the host's `probe` output (default: this interpreter)")
    b.add_argument("--python", help="host Python (MAJOR.MINOR), instead of --host")
    b.add_argument("--torch", help="host torch version with its build label, e.g. 2.11.0+cu130, instead of --host")
    b.add_argument("--cuda", help="host torch.version.cuda, for a torch without a build label")
    b.add_argument("--platform", action="append", default=[], help="host platform tag (repeatable)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--part-size", default=DEFAULT_PART, help=f"largest part (default {DEFAULT_PART})")
    b.add_argument("--index-url", help="package index to resolve and download from (default: pip's)")
    b.add_argument("--fbgemm-index-url", help="index of fbgemm-gpu's CUDA build (default: PyTorch's for the variant)")
    v = sub.add_parser("verify", help="check every part against the manifest")
    v.add_argument("folder", type=Path)
    i = sub.add_parser("install", help="check, reassemble and install into this interpreter's environment")
    i.add_argument("folder", type=Path)
    i.add_argument("--python", default=sys.executable, help="interpreter of the environment (default: this one)")
    i.add_argument("--no-doctor", action="store_true", help="skip `launch.doctor --verify-install`")
    i.add_argument("--pip-arg", action="append", default=[], help="extra argument for pip install (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "probe":
            print(json.dumps(probe(), indent=1, sort_keys=True))
        elif args.cmd == "build":
            if args.host:
                host = json.loads(args.host.read_text())
            elif args.python or args.torch:
                if not (args.python and args.torch):
                    raise WheelhouseError("--python and --torch go together (or give --host host.json)")
                host = host_from_flags(args.python, args.torch, args.cuda, args.platform)
            else:
                host = probe()
            m = build(host, args.out, parts.parse_size(args.part_size), args.index_url, args.fbgemm_index_url)
            mib = m["archive"]["bytes"] / parts.MiB
            print(f"wheelhouse: {len(m['files'])} wheels, {mib:.1f} MiB in {len(m['parts'])} parts -> {args.out}")
        elif args.cmd == "verify":
            m = parts.check(args.folder)
            print(f"wheelhouse: {len(m['parts'])} parts OK ({args.folder})")
        else:
            n = install(args.folder, args.python, doctor=not args.no_doctor, pip_args=args.pip_arg)
            print(f"wheelhouse: installed {n} wheels into {args.python}'s environment; torch untouched")
    except (WheelhouseError, parts.PartError, compat.CompatError, ValueError, OSError) as e:
        print(f"wheelhouse: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
