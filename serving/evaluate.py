"""Evaluate a run's checkpoint on any labelled dataset with the sparse-inference model; writes <run>/eval.json.

    python -m launch.evaluate --run runs/tiny [--checkpoint PATH] [--data.eval PATH] [--section.field value]
    torchrun --nproc_per_node 2 -m launch.evaluate --run-dir runs/tiny    # rows split over the ranks

(`--run-dir` is the same flag as `--run`: torchrun would take `--run` for an abbreviation of its `--run-path`.)

The model is the one `launch.export` writes (serving.model.InferenceModel): unsharded tables read
from the checkpoint's DCP directory, experts merged from every expert-parallel shard, the MoE in
eval mode with the inference router and zero-gate experts skipped. Under torchrun each rank scores
its share of the rows (ParquetLoader, no shuffle, padding rows skipped) and the metrics are computed
over all ranks (`metrics.eval_auc`: histograms reduced, or every row all-gathered), so any world size
gives the same numbers. Every rank holds the whole model: fine up to tables of a host's memory
(training-time eval uses the sharded tables instead).

By default every row is scored (training.eval_batches is set to 0 unless given on the command line).

eval.json: {"eval": {task: {auc, uauc, logloss, ne, count, ctr}}, "checkpoint", "step", "data",
"world_size", "router"} (the "eval" block has the layout of summary.json's).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from checkpoint.format import final_checkpoint, read_meta, require_complete
from metrics.streaming import eval_accumulator
from parallel.distributed import destroy, init_distributed
from pipeline.loader import ParquetLoader
from pipeline.plan import plan_dataset
from serving.model import ServingError, from_checkpoint, load_run_config


def evaluate(run: Path, checkpoint: Path | None, overrides: list[str]) -> tuple[dict[str, Any], bool]:
    """Score the eval split on every rank of the job (or alone); returns (eval.json's content, is rank 0)."""
    cfg = load_run_config(run, overrides)
    ckpt = require_complete(checkpoint) if checkpoint is not None else final_checkpoint(run)
    if not cfg.data.eval:
        raise ServingError(f"{run / 'config.toml'}: data.eval is empty; pass --data.eval PATH")
    step = read_meta(ckpt).step
    info = init_distributed()
    try:
        t0 = time.perf_counter()
        device = info.runtime.device
        model = from_checkpoint(cfg, ckpt).to(device)
        plan = plan_dataset(cfg.data.eval, cfg.data, cfg.features)
        loader = ParquetLoader(
            plan,
            cfg.data,
            cfg.features,
            rank=info.rank,
            world_size=info.world_size,
            batch_size=cfg.data.eval_batch_size,
            seed=cfg.training.seed,
            shuffle=False,
            drop_last=False,
            num_workers=cfg.data.num_workers,
            vocabs=model.vocabs,
        )
        m = cfg.metrics
        acc = eval_accumulator(model.tasks, device, bool(cfg.features.user_id), m.eval_auc, m.eval_auc_bins)
        limit = cfg.training.eval_batches
        for i, batch in enumerate(loader):
            if limit and i >= limit:
                break
            batch = batch.to(device)
            acc.update(model(batch.sparse, batch.dense), batch.labels, batch.user_ids, batch.weights)
        metrics = acc.compute()
        result = {
            "eval": metrics,
            "checkpoint": str(ckpt),
            "step": step,
            "data": cfg.data.eval,
            "eval_batches": limit,
            "world_size": info.world_size,
            "router": "infer (sparse inference: zero-gate experts skipped)" if cfg.moe.enabled else "no MoE",
            "wall_s": time.perf_counter() - t0,
        }
        return result, info.is_main
    finally:
        if info.owns_group:
            destroy()
