"""RankMixer, its ablations and baselines (pure PyTorch; no torch.distributed).

Modules, in dependency order: `config` (the [model] and [moe] sections; no torch import), `init`,
`tokenizer`, `mixing`, `ffn`, `moe`, `output`, `rankmixer`, `baselines`, `zoo` (`build_model`).
This file imports nothing, so reading the config sections stays fast.
"""
