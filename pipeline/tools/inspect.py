"""Print the plan of a dataset: files, rows, row groups, schema and the per-rank split.

    python -m pipeline.tools.inspect data/default/train --config configs/default.toml --world-size 2 --num-workers 1

Reads footers only. With --config the configured columns are checked (as training would) and the
batch size, shuffle and drop_last settings come from it; without, nothing is checked.
"""

from __future__ import annotations

import argparse
import tomllib
from collections import Counter
from pathlib import Path

from pipeline.config import DataConfig, FeaturesConfig
from pipeline.plan import DatasetPlan, plan_dataset
from pipeline.split import batches_per_rank, reader_span, worker_batches
from schema import ConfigError, build


def describe(
    plan: DatasetPlan, *, world_size: int, num_workers: int, batch_size: int, drop_last: bool, shuffle: bool, seed: int
) -> str:
    """The report as text (epoch 0)."""
    lines = [f"dataset {plan.uri}: {len(plan.files)} files, {plan.num_rows:,} rows, {len(plan.units)} row groups"]
    rows, groups = Counter(), Counter()
    for u in plan.units:
        rows[u.file_index] += u.num_rows
        groups[u.file_index] += 1
    sizes = plan.filesystem.get_file_info(plan.files)
    lines.append(f"{'file':<60}{'rows':>12}{'row groups':>12}{'MiB':>9}")
    for i, path in enumerate(plan.files):
        lines.append(f"{path[-60:]:<60}{rows[i]:>12,}{groups[i]:>12}{(sizes[i].size or 0) / 2**20:>9.1f}")
    for path, reason in plan.skipped:
        lines.append(f"SKIPPED {path}: {reason}")
    if plan.schema is not None:
        lines.append("schema:")
        lines += [f"  {f.name}: {f.type}" for f in plan.schema]
    n_batches = batches_per_rank(plan.num_rows, world_size, batch_size, drop_last)
    mode = "drop_last" if drop_last else "padded"
    lines.append(
        f"split: world_size {world_size} x num_workers {num_workers}, batch {batch_size} ({mode}, shuffle={shuffle}, "
        f"seed {seed}): {n_batches} batches per rank per epoch"
    )
    shares = worker_batches(n_batches, num_workers)
    for rank in range(world_size):
        parts, real_total = [], 0
        for k in range(max(1, num_workers)):
            span = reader_span(
                plan, seed=seed, epoch=0, shuffle=shuffle, rank=rank, world_size=world_size, worker=k,
                num_workers=num_workers, batch_size=batch_size, drop_last=drop_last,
            )  # fmt: skip
            real_total += span.real_rows
            parts.append(f"w{k}: {shares[k]} batches, {span.real_rows:,} rows, {len(span.pieces)} pieces")
        pad = n_batches * batch_size - real_total
        lines.append(f"  rank {rank}: {real_total:,} rows + {pad} padding | " + " | ".join(parts))
    dropped = plan.num_rows - n_batches * batch_size * world_size if drop_last else 0
    if dropped:
        lines.append(f"  {dropped} rows dropped per epoch (drop_last)")
    return "\n".join(lines)


def sections_from_toml(path: Path) -> tuple[DataConfig, FeaturesConfig, int]:
    """The [data] and [features] sections of a job TOML (validated) and its training seed."""
    try:
        tree = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"inspect: {path}: {e}") from None
    try:
        data = build(DataConfig, tree.get("data", {}), "data")
        features = build(FeaturesConfig, tree.get("features", {}), "features")
        data.validate()
        features.validate()
    except ConfigError as e:
        raise SystemExit(f"inspect: {path}: {e}") from None
    return data, features, int(tree.get("training", {}).get("seed", 0))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.inspect", description=__doc__.split("\n")[0])
    p.add_argument("path", help="directory, glob, file or URI")
    p.add_argument("--config", default="", help="job TOML: check its columns, use its data settings")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=None, help="default: data.num_workers (0)")
    p.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    a = p.parse_args(argv)
    if a.config:
        data, features, seed = sections_from_toml(Path(a.config))
    else:
        data = DataConfig(row_id_column="")
        features, seed = FeaturesConfig(labels=[], user_id="", dense=[], sparse=[]), 0
    plan = plan_dataset(a.path, data, features)
    text = describe(
        plan,
        world_size=a.world_size,
        num_workers=data.num_workers if a.num_workers is None else a.num_workers,
        batch_size=a.batch_size or data.batch_size,
        drop_last=data.drop_last,
        shuffle=data.shuffle,
        seed=seed,
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
