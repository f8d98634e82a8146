"""Sparse side: TorchRec embedding tables, sharding, regrouping into the model input, checkpoints.

    arch = tables.build_sparse_arch(cfg.features, cfg.embeddings, device=torch.device("meta"), seed=seed)
    dmp, report = sharding.shard_sparse_arch(arch, cfg.features, cfg.embeddings, device=device, world_size=ws)
    x_BI = regroup.pooled_to_model_input(dmp(batch.sparse), cfg.features)     # B x sparse_dim(cfg.features)

Modules: `config` (the [embeddings] section; no torchrec import), `tables`, `sharding`, `regroup`,
`checkpoint`. This file imports nothing, so reading the config section stays fast.
"""
