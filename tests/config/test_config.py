"""Config tree: TOML files, overrides, unknown keys, invalid combinations."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from config import ConfigError, JobConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny", "default", "rankmixer_100m"])
def test_shipped_configs_load(name: str) -> None:
    path = CONFIGS / f"{name}.toml"
    if not path.exists():
        pytest.skip(f"{path.name} not shipped")
    cfg = load_config(["--config", str(path)])
    assert cfg.features.sparse and cfg.features.labels == ["click", "finish"]


def test_tiny_exercises_moe() -> None:
    cfg = load_config(["--config", str(CONFIGS / "tiny.toml")])
    assert cfg.moe.enabled and cfg.model.name == "rankmixer"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        [
            "--config",
            str(CONFIGS / "tiny.toml"),
            "--training.steps",
            "7",
            "--training.lr=0.5",
            "--metrics.wandb",
            "false",
            "--model.tower_hidden",
            "[8, 4]",
            "--embeddings.table_sharding",
            '{u0 = "row_wise"}',
        ]
    )
    assert cfg.training.steps == 7 and cfg.training.lr == 0.5 and cfg.metrics.wandb is False
    assert cfg.model.tower_hidden == [8, 4]
    assert cfg.embeddings.table_sharding == {"u0": "row_wise"}


def test_unknown_key_on_command_line_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'training.stepz'.*valid keys here: name, output_dir"):
        load_config(["--config", str(CONFIGS / "tiny.toml"), "--training.stepz", "3"])
    with pytest.raises(ConfigError, match="unknown config key 'trainng'"):
        load_config(["--config", str(CONFIGS / "tiny.toml"), "--trainng.steps", "3"])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    text = (CONFIGS / "tiny.toml").read_text().replace("[model]", "[model]\nnum_tokenz = 3", 1)
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="unknown config key 'model.num_tokenz'"):
        load_config(["--config", str(f)])
    g = tmp_path / "bad2.toml"
    g.write_text(text.replace("num_tokenz = 3", "").replace('name = "u0"', 'name = "u0", colour = 1'))
    with pytest.raises(ConfigError, match=r"unknown config key 'features.sparse\[0\].colour'"):
        load_config(["--config", str(g)])


def test_wrong_types_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'training.steps': expected an integer"):
        load_config(["--config", str(CONFIGS / "tiny.toml"), "--training.steps", "many"])


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["--model.d_model", "30"], 1, "divisible by model.num_tokens"),
        (["--parallelism.ep_size", "2"], 1, "must divide the world size"),
        (["--parallelism.ep_size", "2", "--moe.enabled", "false"], 2, "needs moe.enabled"),
        (["--parallelism.ep_size", "8"], 8, "must divide model.num_tokens"),
        (["--model.name", "transformer"], 1, "model.name"),
        (["--moe.router", "softmax"], 1, "moe.router"),
        (["--moe.target_activation", "0"], 1, "moe.target_activation"),
        (["--data.on_bad_file", "ignore"], 1, "data.on_bad_file"),
        (["--embeddings.table_sharding", '{nope = "row_wise"}'], 1, "unknown table 'nope'"),
        (["--model.name", "dcnv2"], 1, "moe.enabled needs a RankMixer model"),
        (["--data.shuffle_window", "0"], 1, "data.shuffle_window must be >= 1"),
        (["--model.attn_heads", "3"], 1, "divisible by model.attn_heads"),
        (["--model.tower_hidden", "[0]"], 1, "model.tower_hidden widths"),
        (["--embeddings.sharding", "data_parallel"], 1, "embeddings.sharding"),
        (["--model.tokenization", "words"], 1, "model.tokenization"),
        (["--model.ffn_activation", "swiglu"], 1, "model.ffn_activation"),
        (["--model.ffn_activation", "geglu"], 1, "model.ffn_activation = 'geglu' applies to the dense FFN"),
        (["--model.tokenization", "groups"], 1, r"model.num_tokens \(4\) must be >= the 5 groups"),
    ],
)
def test_invalid_combinations_rejected(overrides: list[str], world: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(["--config", str(CONFIGS / "tiny.toml"), *overrides], world_size=world)


def test_group_tokens_valid_with_enough_tokens() -> None:
    cfg = load_config(
        ["--config", str(CONFIGS / "tiny.toml"), "--model.tokenization", "groups", "--model.num_tokens", "8"]
    )
    assert cfg.model.tokenization == "groups"


def test_ep_size_two_valid_on_two_ranks() -> None:
    cfg = load_config(["--config", str(CONFIGS / "tiny.toml"), "--parallelism.ep_size", "2"], world_size=2)
    assert cfg.parallelism.ep_size == 2


def test_shared_table_mismatch(tmp_path: Path) -> None:
    text = (CONFIGS / "tiny.toml").read_text()
    text = text.replace(
        '{ name = "s_cat", group = "sequence", vocab_size = 1000',
        '{ name = "s_cat", group = "sequence", vocab_size = 999',
    )
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="table 'category' is shared"):
        load_config(["--config", str(f)])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(["--config", str(CONFIGS / "tiny.toml"), "--training.seed", "5"])
    f = tmp_path / "resolved.toml"
    f.write_text(cfg.to_toml())
    again = load_config(["--config", str(f)])
    assert again == cfg
    assert tomllib.loads(f.read_text())["training"]["seed"] == 5


def test_global_batch_size_sets_the_per_rank_batch(tmp_path: Path) -> None:
    """The click-log recipe's 512 rows per step on 1, 2 and 4 processes; a run directory's config.toml (written
    at one world size) loads at another with the same global batch; a world size that does not divide it,
    a command-line batch_size beside it, and a negative one are refused naming the key."""
    recipe = ["--config", str(CONFIGS / "recsys.toml")]
    for world in (1, 2, 4):
        cfg = load_config(recipe, world_size=world)
        assert (cfg.data.global_batch_size, cfg.data.batch_size) == (512, 512 // world)
    saved = tmp_path / "config.toml"
    saved.write_text(load_config(recipe, world_size=2).to_toml())  # batch_size = 256 and global 512 both in it
    assert load_config(["--config", str(saved)], world_size=1).data.batch_size == 512
    with pytest.raises(ConfigError, match=r"'data.global_batch_size' = 512 must be a multiple of the world size \(3\)"):
        load_config(recipe, world_size=3)
    with pytest.raises(ConfigError, match=r"--data.batch_size is derived from data.global_batch_size \(512\)"):
        load_config([*recipe, "--data.batch_size", "64"])
    per_rank = load_config([*recipe, "--data.batch_size", "64", "--data.global_batch_size", "0"], world_size=2)
    assert per_rank.data.batch_size == 64  # 0: batch_size is per rank, as without the key
    assert load_config([*recipe, "--data.global_batch_size", "96"], world_size=2).data.batch_size == 48
    with pytest.raises(ConfigError, match="data.global_batch_size must be >= 0"):
        load_config([*recipe, "--data.global_batch_size", "-2"])


def test_missing_file_is_clear() -> None:
    with pytest.raises(ConfigError, match="config file not found: nope.toml"):
        load_config(["--config", "nope.toml"])


def test_defaults_construct() -> None:
    assert JobConfig().output_dir == Path("runs/default")
