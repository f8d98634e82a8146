"""The command line as a user meets it: --help, flag forms, launcher arguments, unknown names, ranges."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config import ConfigError, JobConfig, load_config
from config.training import DENSE_OPTIMIZERS, LR_DECAYS
from embeddings.config import SHARDING_TYPES, SPARSE_OPTIMIZERS
from model.config import MODEL_NAMES
from schema.tree import fields_of

TINY = ["--config", "configs/tiny.toml"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_lists_every_field_with_type_default_and_doc_without_torch() -> None:
    code = (
        "import sys\n"
        "from launch import train\n"
        "try:\n    train.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported before --help answered'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    fields = fields_of(JobConfig)
    assert len(fields) > 60
    for key, _type, _default, doc in fields:
        assert f"--{key} " in text, f"--help does not list --{key}"
        if doc:
            assert doc.split()[0] in text
    assert "--training.lr FLOAT  (default 0.001)" in text
    assert "--metrics.wandb bool  (default true)" in text
    assert "Peak dense learning rate." in text


def test_flag_forms() -> None:
    cfg = load_config([*TINY, "--metrics.wandb", "--model.tower_hidden", "32,16", "--training.lr=0.02"])
    assert cfg.metrics.wandb is True and cfg.model.tower_hidden == [32, 16] and cfg.training.lr == 0.02
    cfg = load_config([*TINY, "--metrics.wandb", "false", "--model.tower_hidden", "[8, 4]", "--data.shuffle=off"])
    assert cfg.metrics.wandb is False and cfg.model.tower_hidden == [8, 4] and cfg.data.shuffle is False
    # a bare boolean flag followed by another override does not swallow it
    cfg = load_config([*TINY, "--metrics.plots", "--training.steps", "3"])
    assert cfg.metrics.plots is True and cfg.training.steps == 3
    cfg = load_config([*TINY, "--embeddings.table_sharding", '{item = "row_wise"}'])
    assert cfg.embeddings.table_sharding == {"item": "row_wise"}
    with pytest.raises(ConfigError, match="config key 'training.steps': expected an integer, got 'many'"):
        load_config([*TINY, "--training.steps", "many"])
    with pytest.raises(ConfigError, match="config key 'metrics.wandb': expected true/false"):
        load_config([*TINY, "--metrics.wandb=maybe"])
    with pytest.raises(ConfigError, match="'training' is a section"):
        load_config([*TINY, "--training", "x"])


@pytest.mark.parametrize("form", [["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=1"]])
def test_deepspeed_launcher_arguments_are_accepted(form: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = load_config([*form, *TINY])
    assert cfg.model.num_tokens == 4 and os.environ["LOCAL_RANK"] == "1"


@pytest.mark.parametrize(
    "key, bad, allowed",
    [
        ("training.optimizer", "adamx", DENSE_OPTIMIZERS),
        ("training.lr_decay", "step", LR_DECAYS),
        ("training.dtype", "fp16", ("fp32", "bf16")),
        ("embeddings.optimizer", "lamb", SPARSE_OPTIMIZERS),
        ("embeddings.sharding", "data_parallel", SHARDING_TYPES),
        ("model.name", "transformer", MODEL_NAMES),
        ("model.mixing", "mlp", ("paper", "article")),
        ("moe.router", "softmax", ("relu", "topk")),
        ("metrics.wandb_mode", "cloud", ("offline", "online", "disabled")),
        ("data.on_bad_file", "ignore", ("error", "skip")),
    ],
)
def test_unknown_names_are_one_line_errors(key: str, bad: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config([*TINY, f"--{key}", bad])
    msg = str(e.value)
    assert "\n" not in msg and f"'{key}' = '{bad}'" in msg
    assert all(name in msg for name in allowed)


@pytest.mark.parametrize(
    "override, match",
    [
        (["--training.lr", "-0.5"], "training.lr must be > 0.0, got -0.5"),
        (["--training.lr", "nan"], "training.lr must be a finite number"),
        (["--embeddings.lr", "-1"], "embeddings.lr must be > 0.0"),
        (["--training.log_every", "0"], "training.log_every must be >= 1"),
        (["--training.keep_last", "0"], "training.keep_last must be >= 1"),
        (["--training.checkpoint_every", "-5"], "training.checkpoint_every must be >= 0"),
        (["--training.grad_clip", "-1"], "training.grad_clip must be >= 0.0"),
        (["--training.warmup_steps", "-1"], "training.warmup_steps must be >= 0"),
        (["--training.eval_every", "-2"], "training.eval_every must be >= 0"),
        (["--training.min_lr_ratio", "2"], r"training.min_lr_ratio must be in \[0.0, 1.0\]"),
        (["--training.resume", "sometimes"], "training.resume' = 'sometimes'; expected auto or never or the path"),
        (["--data.train", ""], "config key 'data.train' is empty"),
        (["--metrics.peak_flops", "-1"], "metrics.peak_flops must be >= 0.0"),
        (["--moe.l1_step", "1"], "moe.l1_step must be > 1.0"),
    ],
)
def test_nonsense_values_are_rejected(override: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config([*TINY, *override])


def test_dispatch_tables_cover_exactly_the_config_names() -> None:
    """Every name the config accepts has an implementation, and no implementation is unreachable."""
    from embeddings.sharding import OPTIMIZERS as SPARSE_IMPL
    from embeddings.tables import POOLING_TYPES
    from model.zoo import MODELS
    from parallel.dense_engine import OPTIMIZERS as DENSE_IMPL
    from pipeline.config import POOLINGS

    assert tuple(DENSE_IMPL) == DENSE_OPTIMIZERS
    assert tuple(SPARSE_IMPL) == SPARSE_OPTIMIZERS
    assert tuple(MODELS) == MODEL_NAMES
    assert tuple(POOLING_TYPES) == POOLINGS
