"""The device calls that carry a wheelhouse to a GPU host in parts, then install and run the device check.

    python -m bench.gpu_stage dist/wheelhouse [--limit-mib 64] [--json calls.json]

A device machine that takes at most `--limit-mib` per call (the working tree included) gets one part
per call: each call carries one `wheelhouse.partNNN` (plus the manifest) and moves it into `.stage/`,
a git-ignored folder that stays on the host between calls while the machine is held. The last call
checks and installs the wheelhouse there (`launch.wheelhouse install`) and runs `bench.gpu_check`; it
also carries the pipeline's compiled pass (`.build/native/*.so`, portable x86_64 flags), since the
host may have no C compiler.
Prints one line per call (`carry` paths, then the command) and optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE = ".stage/wheelhouse"
CHECK = "python3 -m bench.gpu_check --device cuda --profile --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log"


def tree_bytes() -> int:
    """Bytes of what the device call copies anyway: tracked and untracked-but-not-ignored files."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    return sum((REPO / f).stat().st_size for f in files if (REPO / f).is_file())


def calls(folder: Path, limit_bytes: int) -> list[dict[str, object]]:
    """One call per part (carry it, move it into .stage), then the install and the device check."""
    if not folder.resolve().is_relative_to(REPO):
        raise SystemExit(f"gpu_stage: {folder} is outside the checkout; build the wheelhouse under it (dist/)")
    manifest = json.loads((folder / "manifest.json").read_text())
    rel = folder.resolve().relative_to(REPO)
    base = tree_bytes() + (folder / "manifest.json").stat().st_size
    out: list[dict[str, object]] = []
    for part in manifest["parts"]:
        if base + part["bytes"] > limit_bytes:
            raise SystemExit(
                f"gpu_stage: {part['name']} ({part['bytes']} bytes) + the tree ({base} bytes) exceed "
                f"{limit_bytes} bytes a call; rebuild with a smaller --part-size"
            )
        cmd = f"mkdir -p {STAGE} && mv {rel}/manifest.json {rel}/{part['name']} {STAGE}/ && ls {STAGE} | wc -l"
        out.append({"carry": [f"{rel}/manifest.json", f"{rel}/{part['name']}"], "command": cmd})
    # the pipeline's compiled pass, built here with portable flags: the host may have no C compiler
    native = [str(p.relative_to(REPO)) for p in (REPO / ".build" / "native").glob("*.so")]
    out.append({"carry": native, "command": f"python3 -m launch.wheelhouse install {STAGE} && {CHECK}"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_stage", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a wheelhouse built by launch.wheelhouse (manifest.json + parts)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="most a call may carry, tree included")
    p.add_argument("--json", type=Path, default=None, help="also write the calls here")
    args = p.parse_args(argv)
    plan = calls(args.folder, int(args.limit_mib * 1024 * 1024))
    for i, c in enumerate(plan, 1):
        print(f"call {i}/{len(plan)}  carry={','.join(c['carry']) or '-'}  {c['command']}")
    if args.json:
        args.json.write_text(json.dumps(plan, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
