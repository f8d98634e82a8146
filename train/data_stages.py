"""The data-derived stages a run computes over its training rows before building the model, and the check
that a checkpoint was trained with the same ones.

    vocabs = vocabularies(cfg, info, train_plan, run_dir)     # id vocabularies; vocab_size "auto" resolved
    choices = dense_choices(cfg, info, train_plan, run_dir)   # dense statistics and each feature's transform
    check_vocabs(checkpoint_dir, vocabs, cfg.features)        # on resume: the table rows mean the same ids

Both stages are collective (each rank reads its share of the row groups), cached in the run directory
under a key of the data, and printed on rank 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from checkpoint.format import CheckpointError
from config import JobConfig
from parallel.distributed import DistInfo, all_gather_object, broadcast_object
from pipeline import dense_prep, vocab
from pipeline.config import FeaturesConfig
from pipeline.errors import DataError
from pipeline.plan import DatasetPlan
from train.checkpoint import CheckpointMismatchError


def vocabularies(
    cfg: JobConfig, info: DistInfo, train_plan: DatasetPlan, run_dir: Path, valid_plan: DatasetPlan | None = None
) -> dict[str, vocab.IdVocab]:
    """Id vocabularies of the 'vocab' features over the training rows (collective; cached in the run
    directory, whose copy every checkpoint carries); resolves their tables' vocab_size. Printed. The item
    catalogues of `a[s]` features read the validation carve's rows too (`valid_plan`; no labels)."""
    f = cfg.features
    if not vocab.vocab_tables(f):
        return {}
    vocabs, reused = vocab.load_or_count_vocabs(
        train_plan, f, run_dir / vocab.VOCAB_FILE, rank=info.rank,
        world_size=info.world_size, gather=all_gather_object, broadcast=broadcast_object, carve=valid_plan,
    )  # fmt: skip
    vocab.resolve_sizes(f, vocabs)
    if info.is_main:
        where = "reused from" if reused else "counted over the training rows, saved in"
        print(f"{vocab.report(vocabs)}\n(vocabularies {where} {vocab.VOCAB_FILE})", flush=True)
    return vocabs


def dense_choices(
    cfg: JobConfig, info: DistInfo, train_plan: DatasetPlan, run_dir: Path
) -> list[dense_prep.DenseChoice]:
    """Dense-feature statistics over the training rows (collective; cached in the run directory) and the
    transform of each feature; written to the run directory and printed. A resumed run gets the same
    statistics from the cache (and the same numbers again from its checkpoint)."""
    f = cfg.features
    if not f.dense:
        return []
    stats, reused = dense_prep.load_or_compute_stats(
        train_plan, f, run_dir / dense_prep.STATS_FILE, rank=info.rank,
        world_size=info.world_size, gather=all_gather_object, broadcast=broadcast_object,
    )  # fmt: skip
    choices = dense_prep.resolve(f, stats)
    if info.is_main:
        dense_prep.write_choices(run_dir / dense_prep.CHOICES_FILE, choices, stats)
        where = "reused from" if reused else "computed over the training rows, cached in"
        print(f"{dense_prep.report(choices, stats)}\n(statistics {where} {dense_prep.STATS_FILE})", flush=True)
    return choices


def check_vocabs(path: Path, vocabs: dict[str, vocab.IdVocab], features: FeaturesConfig) -> None:
    """Checkpoint `path` carries this run's id vocabularies (its table rows mean the same ids).

    Raises:
        CheckpointError: its vocab.npz is missing or unreadable (a damaged checkpoint: 'auto' falls back).
        CheckpointMismatchError: it was trained with other vocabularies (the data changed).
    """
    if not vocabs:
        return
    try:
        saved = vocab.load_vocabs(path / vocab.VOCAB_FILE, features)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    changed = [
        t for t, v in vocabs.items()
        if saved[t].oov_buckets != v.oov_buckets or not np.array_equal(saved[t].ids, v.ids)
    ]  # fmt: skip
    if changed:
        raise CheckpointMismatchError(
            f"{path}: trained with other id vocabularies for tables {changed} (did the training data change?); "
            "its table rows would mean other ids. Resume with the same data or start a new run directory"
        )
