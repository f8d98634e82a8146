"""One training step of the two-object model, and the loss it owns.

    step = TrainStep(cfg, par, total_steps)
    metrics = step(batch, step_index)      # lr schedule -> forward -> loss -> backward -> clip -> step -> controller

    batch.sparse --DMP (tables)--> pooled KeyedTensor --regroup by name--> sparse_BI
    sparse_BI, batch.dense --DeepSpeed engine (dense model)--> logits_BK, reg_loss
    loss = sum_k BCE_k(logits_BK, labels_BK; weights_B) + reg_loss (MoE) + sum_f l2_f / 2 x mean ||sparse_BI[f]||^2
    engine.backward(loss): dense grads reduced, expert grads over the expert-data-parallel group, the
        embedding grads reach the tables, whose fused optimizer steps inside backward
    clip by the global norm -> engine.step() -> the weights' moving average (training.ema_decay) -> MoE L1
        controller on the activation averaged over ranks

Legend: B batch per rank, I pooled-embedding width, F dense features, K tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from config import JobConfig
from embeddings.pipelining import StartedLookup, finish_lookup
from embeddings.regroup import l2_columns, pooled_to_model_input
from embeddings.sharding import set_sparse_lr
from model.moe import steer_l1, train_activation
from model.output import ModelOutput, task_loss
from parallel.dense_engine import clip_grad_norm_, set_dense_lr
from parallel.distributed import all_reduce_sum
from parallel.layout import Parallelized
from pipeline.batch import Batch
from train.ema import WeightEMA
from train.schedule import lr_factor


class TrainStep:
    """Forward, loss, backward and update of one batch; also the forward used by evaluation.

    Args:
        cfg: the job config.
        par: the parallelized model (`parallel.layout.parallelize`).
        total_steps: steps of the whole run (the learning-rate schedule's length).
        ema: the moving average of the dense weights, updated after every optimizer step (None: none).
    """

    def __init__(self, cfg: JobConfig, par: Parallelized, total_steps: int, ema: WeightEMA | None = None) -> None:
        self.cfg, self.par, self.total_steps, self.ema = cfg, par, total_steps, ema
        self.tasks = list(cfg.features.labels)
        self.has_moe = bool(train_activation(par.model))
        emb = cfg.embeddings
        l2 = l2_columns(cfg.features, emb.l2, emb.vocab_l2)
        self.l2: float | Tensor = torch.tensor(l2, device=par.layout.device) if isinstance(l2, list) else l2
        """Embedding L2: one weight for every column, or an I-vector of per-feature weights."""

    def embed(self, batch: Batch, lookup: StartedLookup | None = None) -> Tensor:
        """sparse_BI: the batch's pooled embeddings (sharded lookup + input all-to-all), regrouped by name;
        with `lookup` (its input dist started ahead by `train.pipeline`), only the rest of it."""
        kt = finish_lookup(self.par.dmp, lookup) if lookup is not None else self.par.dmp(batch.sparse)
        if hasattr(kt, "wait"):
            kt = kt.wait()
        return pooled_to_model_input(kt, self.cfg.features)

    def dense(self, sparse_BI: Tensor, dense_BF: Tensor) -> ModelOutput:
        """The dense model through the engine (bf16 autocast when training.dtype = bf16)."""
        enabled = self.cfg.training.dtype == "bf16"
        with torch.autocast(self.par.layout.device.type, dtype=torch.bfloat16, enabled=enabled):
            return self.par.engine(sparse_BI, dense_BF)

    def forward(self, batch: Batch) -> ModelOutput:
        """Scores of one batch already on the device (train or eval mode as set on the modules)."""
        return self.dense(self.embed(batch), batch.dense)

    def loss(self, out: ModelOutput, batch: Batch, sparse_BI: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total loss to backpropagate, task loss, per-task losses K): BCE summed over tasks + regularizers
        (the model's MoE terms, and the embedding L2 on the batch's pooled embeddings: per feature its `l2`,
        else `embeddings.vocab_l2` for 'vocab' features and `embeddings.l2` for the others)."""
        task, per_task_K = task_loss(out.logits_BK.float(), batch.labels, batch.weights)
        total = task + out.reg_loss
        l2 = self.l2
        if isinstance(l2, Tensor):  # per-feature weights, one per column of sparse_BI
            w_B = batch.weights.to(sparse_BI.dtype)
            sq_B = (sparse_BI.pow(2) * l2.to(sparse_BI.dtype)).sum(1)  # on the device since __init__
            total = total + 0.5 * (sq_B * w_B).sum() / w_B.sum().clamp_min(1.0)
        elif l2 > 0:
            w_B = batch.weights.to(sparse_BI.dtype)
            total = total + 0.5 * l2 * (sparse_BI.pow(2).sum(1) * w_B).sum() / w_B.sum().clamp_min(1.0)
        return total, task, per_task_K

    def set_lr(self, step: int) -> float:
        """Schedule factor of `step` applied to the dense and the sparse learning rates; returns the factor."""
        t = self.cfg.training
        factor = lr_factor(step, self.total_steps, t.warmup_steps, t.lr_decay, t.min_lr_ratio)
        set_dense_lr(self.par.engine.optimizer, t.lr * factor)
        set_sparse_lr(self.par.dmp, self.cfg.embeddings.lr * factor)
        return factor

    def update(self) -> Tensor:
        """After backward: clip by the global norm, step the dense optimizer, steer the MoE controllers.
        Returns the gradient norm before clipping (0-dim, on the device)."""
        par = self.par
        grad_norm = clip_grad_norm_(par.model, self.cfg.training.grad_clip)
        par.engine.step()
        if self.ema is not None:
            self.ema.update()
        if self.has_moe:  # lambda must stay identical on every rank: steer it by the activation averaged over ranks
            world = par.layout.world_size
            active = all_reduce_sum(train_activation(par.model), par.layout.device)
            steer_l1(par.model, [a / world for a in active])
        return grad_norm

    def __call__(
        self,
        batch: Batch,
        step: int,
        lookup: StartedLookup | None = None,
        after_embed: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], ModelOutput]:
        """Train on `batch` as optimizer step `step` (0-based); returns (metrics of this rank as 0-dim tensors or
        floats, model output).

        Args:
            batch: the batch, on the training device.
            step: the optimizer step (0-based).
            lookup: the batch's lookup, started ahead (`train.pipeline.PrefetchLoader.take_lookup`).
            after_embed: called once the batch's embeddings are in: the pipeline starts the next batch's
                input dist there, so it travels while this step computes.
        """
        par = self.par
        factor = self.set_lr(step)
        par.engine.train()
        par.dmp.train()
        sparse_BI = self.embed(batch, lookup)
        if after_embed is not None:
            after_embed()
        out = self.dense(sparse_BI, batch.dense)
        total, task, per_task_K = self.loss(out, batch, sparse_BI)
        par.engine.backward(total)
        grad_norm = self.update()
        # tensors, read on the host only at log steps (no per-step device sync for metrics)
        metrics = {
            "loss": task.detach(),
            "reg_loss": out.reg_loss.detach(),
            "grad_norm": grad_norm,
            "lr": self.cfg.training.lr * factor,
            "sparse_lr": self.cfg.embeddings.lr * factor,
            **{f"loss/{k}": v.detach() for k, v in zip(self.tasks, per_task_K)},
            **out.stats,
        }
        return metrics, out
