"""Split a folder of files into parts of at most N bytes with a SHA-256 manifest; check and reassemble.

For hosts that take uploads of limited size (an air-gapped GPU cluster, a device machine that carries
64 MiB a call). The files go into one uncompressed tar (wheels are zip files already), the tar is cut
into `<stem>.partNNN` files, and `manifest.json` records every part's size and SHA-256, the whole
archive's, and every file's. Stdlib only.

    manifest = split(src_dir, out_dir, part_bytes=60 * MiB, stem="wheelhouse", extra={...})
    check(out_dir)                 # PartError naming the first missing / short / corrupt part
    files = reassemble(out_dir, dest_dir)  # verified parts -> verified files in dest_dir
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 4 * MiB


class PartError(RuntimeError):
    """A missing, short or corrupt part, or a bad manifest (one line: which, where, the fix)."""


def parse_size(text: str) -> int:
    """'60MiB' / '60M' / '512KiB' / '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"part size {text!r}: expected a positive size such as 60MiB, 512KiB or 1000000")
    return int(m.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[m.group(2).upper()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def split(src: Path, out: Path, part_bytes: int, stem: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pack every file directly under `src` into parts under `out` (which must not hold old parts)."""
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not files:
        raise PartError(f"{src}: nothing to pack")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{stem}.part*"):
        old.unlink()
    archive = out / f"{stem}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            tar.add(p, arcname=p.name, recursive=False)
    whole = hashlib.sha256()
    parts = []
    with open(archive, "rb") as f:
        index = 0
        while block := f.read(part_bytes):
            whole.update(block)
            name = f"{stem}.part{index:03d}"
            (out / name).write_bytes(block)
            parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    size = archive.stat().st_size
    archive.unlink()
    manifest = {
        "format": FORMAT,
        "stem": stem,
        "part_bytes": part_bytes,
        "archive": {"bytes": size, "sha256": whole.hexdigest()},
        "parts": parts,
        "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a parts folder, or a one-line PartError."""
    path = folder / MANIFEST
    if not path.is_file():
        raise PartError(f"{path}: no manifest; copy {MANIFEST} from the build machine together with the parts")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartError(f"{path}: corrupt manifest ({e.__class__.__name__}: {e}); copy it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "parts" not in manifest:
        raise PartError(f"{path}: not a parts manifest of format {FORMAT}; copy it again or rebuild the parts")
    return manifest


def _present(folder: Path, manifest: dict[str, Any]) -> None:
    """Every part there and of its size (cheap: no reading); PartError naming the first that is not."""
    total = len(manifest["parts"])
    for i, part in enumerate(manifest["parts"]):
        path = folder / part["name"]
        where = f"part {i + 1} of {total}"
        if not path.is_file():
            raise PartError(f"{path}: missing ({where}, {part['bytes']} bytes); copy it from the build machine")
        size = path.stat().st_size
        if size != part["bytes"]:
            raise PartError(f"{path}: {size} bytes, the manifest says {part['bytes']} ({where}); copy it again")


def _check_digest(folder: Path, manifest: dict[str, Any], i: int, digest: str) -> None:
    """PartError when part i's SHA-256 is not the manifest's."""
    part = manifest["parts"][i]
    if digest != part["sha256"]:
        where = f"part {i + 1} of {len(manifest['parts'])}"
        raise PartError(
            f"{folder / part['name']}: corrupt ({where}: SHA-256 {digest[:12]}..., manifest {part['sha256'][:12]}...); "
            "copy it again"
        )


def check(folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every part present, of its size and SHA-256; PartError naming the first that is not."""
    manifest = manifest or read_manifest(folder)
    _present(folder, manifest)
    for i, part in enumerate(manifest["parts"]):
        _check_digest(folder, manifest, i, sha256_file(folder / part["name"]))
    return manifest


def reassemble(folder: Path, dest: Path) -> list[Path]:
    """Check the parts, rebuild the archive, unpack and verify every file into `dest`.

    Each part is read once: hashed and appended to the archive (kept beside the parts until every part
    and the whole archive check out, so a corrupt part leaves `dest` untouched)."""
    manifest = read_manifest(folder)
    _present(folder, manifest)
    archive = folder / f".{manifest['stem']}.tar.partial"
    try:
        whole = hashlib.sha256()
        with open(archive, "wb") as out:
            for i, part in enumerate(manifest["parts"]):
                h = hashlib.sha256()
                with open(folder / part["name"], "rb") as f:
                    while block := f.read(CHUNK):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                _check_digest(folder, manifest, i, h.hexdigest())
        if whole.hexdigest() != manifest["archive"]["sha256"]:  # parts each fine but not these parts
            msg = f"{folder}: the parts do not form the archive of {MANIFEST}; rebuild and copy them together"
            raise PartError(msg)
        dest.mkdir(parents=True, exist_ok=True)
        names = {f["name"] for f in manifest["files"]}
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if m.name not in names or not m.isfile()]
            if bad:
                raise PartError(f"{folder}: archive holds {bad[0]!r}, not listed in {MANIFEST}")
            tar.extractall(dest, members=members, filter="data")
    finally:
        archive.unlink(missing_ok=True)
    paths = []
    for f in manifest["files"]:
        path = dest / f["name"]
        if sha256_file(path) != f["sha256"]:
            raise PartError(f"{path}: SHA-256 differs from {MANIFEST} after unpacking; rebuild the parts")
        paths.append(path)
    return paths
