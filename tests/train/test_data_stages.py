"""A checkpoint is resumed only with the id vocabularies it was trained with (train.data_stages.check_vocabs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from checkpoint.format import CheckpointError
from pipeline.config import FeaturesConfig, SparseFeature
from pipeline.vocab import VOCAB_FILE, IdCounts, build_vocabs, save_vocabs
from train.checkpoint import CheckpointMismatchError
from train.data_stages import check_vocabs


def _vocabs(ids: list[int]) -> tuple[FeaturesConfig, dict]:
    f = FeaturesConfig(
        labels=["y"], user_id="", sparse=[SparseFeature(name="item", id_mapping="vocab", vocab_size="auto")]
    )
    counts = IdCounts(limit=100, width=64)
    counts.add(np.array(ids * 2, np.int64))
    return f, build_vocabs(f, {"item": counts.finish()})


def test_resume_needs_the_checkpoints_vocabularies(tmp_path: Path) -> None:
    f, mine = _vocabs([1, 2, 3])
    ckpt = tmp_path / "step_10"
    ckpt.mkdir()
    with pytest.raises(CheckpointError, match="cannot read the id vocabularies"):
        check_vocabs(ckpt, mine, f)  # a checkpoint without its vocab.npz is damaged: 'auto' falls back
    save_vocabs(ckpt / VOCAB_FILE, mine)
    check_vocabs(ckpt, mine, f)  # the same vocabularies: fine
    _, other = _vocabs([1, 2, 4])  # the training data changed: row 3 would mean another item
    with pytest.raises(CheckpointMismatchError, match=r"other id vocabularies for tables \['item'\]"):
        check_vocabs(ckpt, other, f)
    check_vocabs(ckpt, {}, FeaturesConfig(labels=["y"], sparse=[SparseFeature(name="x")]))  # no vocab features
