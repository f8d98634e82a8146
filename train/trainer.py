"""The training loop: TorchRec sparse model parallelism + DeepSpeed dense/expert parallelism.

    batch (pipeline) --KJT--> DistributedModelParallel(EmbeddingBagCollection)   tables sharded
          --pooled KeyedTensor, regrouped by name--> sparse_BE
          --DeepSpeed engine(RankMixer)--> logits_BK (experts sharded by token position)
    loss = sum_k BCE_k + MoE regularizers;  engine.backward(loss) reaches the tables, whose fused
    optimizer steps inside backward;  clip by the global norm;  engine.step() for the dense side.

Legend: B batch per rank, E embedding width, K tasks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from config.job import JobConfig
from embeddings import build_sparse_arch, pooled_to_model_input, set_sparse_lr, shard_sparse_arch, sparse_dim
from metrics.auc import EvalAccumulator, WindowedAUC
from metrics.mfu import mfu, peak_flops, rss_mb
from metrics.plots import write_plots
from metrics.tracking import MetricsLogger
from model.moe import moe_layers
from model.output import task_loss
from model.zoo import build_model
from parallel.dense_engine import clip_grad_norm_, init_engine, set_dense_lr
from parallel.distributed import DistInfo, all_reduce_sum
from parallel.expert_parallel import create_ep_groups, shard_experts
from pipeline.batch import Batch
from pipeline.loader import ParquetLoader, dataset_audit
from pipeline.plan import plan_dataset
from train.checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from train.schedule import lr_factor

MASK64 = (1 << 64) - 1


class Trainer:
    """Builds every part from the config, then `fit()` trains, evaluates and writes the run directory."""

    def __init__(self, cfg: JobConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.device = info.runtime.device
        self.run_dir = cfg.output_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        t, d, f = cfg.training, cfg.data, cfg.features
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())

        # Data: plans come from footers only; bad files fail here, before any training step.
        self.train_plan = plan_dataset(d.train, d, f)
        self.eval_plan = plan_dataset(d.eval, d, f) if d.eval else None
        self.loader = self._loader(self.train_plan, train=True)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.train {d.train}: fewer rows than one batch per rank ({d.batch_size} x {info.world_size})"
            )
        self.total_steps = t.steps or t.epochs * self.steps_per_epoch

        # Sparse side: tables sharded by TorchRec, optimizer fused into backward.
        ebc = build_sparse_arch(f, cfg.embeddings, device=torch.device("meta"), seed=t.seed)
        self.dmp, self.plan_report = shard_sparse_arch(
            ebc, f, cfg.embeddings, device=self.device, world_size=info.world_size
        )

        # Dense side: the zoo model, experts sharded by token position, under DeepSpeed.
        model = build_model(
            cfg.model,
            cfg.moe,
            sparse_dim=sparse_dim(f),
            num_dense=len(f.dense),
            num_tasks=len(f.labels),
            seed=t.seed,
        ).to(self.device)
        self.params = model.num_params()
        self.ep_size = cfg.parallelism.ep_size
        self.ep_rank = info.rank % self.ep_size
        self.expert_params_per_rank = 0
        if cfg.moe.enabled:
            create_ep_groups(self.ep_size)
            self.expert_params_per_rank = shard_experts(model, self.ep_size, self.ep_rank, t.seed)
        self.engine = init_engine(model, cfg, self.run_dir if info.is_main else None)
        self.model = self.engine.module
        self.moe = moe_layers(self.model)

        # Metrics.
        self.tasks = list(f.labels)
        self.flops_train = self.model.flops_per_sample(training=True)
        self.peak, self.peak_source = peak_flops(self.device, t.dtype, cfg.metrics.peak_flops, cache_dir=Path(".build"))
        self.window_auc = WindowedAUC(self.tasks, cfg.metrics.train_auc_window)
        self.step = 0
        self.epoch = 0
        self.audits: list[dict[str, int]] = []
        self.train_s = 0.0  # wall seconds of training steps over the whole run (kept across resumes)
        self.train_samples = 0  # global samples of those steps
        self.resumed_from: str | None = None
        self._maybe_resume()
        self.logger = MetricsLogger(
            self.run_dir,
            cfg.metrics,
            rank=info.rank,
            config_dict=cfg.to_dict(),
            resume=self.resumed_from is not None or info.restart_count > 0,
            total_steps=self.total_steps,
        )
        self.logger.log_text("sharding_plan", self.plan_report.text() + "\n")
        if info.is_main:
            (self.run_dir / "sharding_plan.json").write_text(json.dumps(self.plan_report.to_dict(), indent=2) + "\n")
            print(self.plan_report.text(), flush=True)

    # ------------------------------------------------------------------ building blocks

    def _loader(self, plan: Any, train: bool) -> ParquetLoader:
        d = self.cfg.data
        return ParquetLoader(
            plan,
            d,
            self.cfg.features,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_size=d.batch_size if train else d.eval_batch_size,
            seed=self.cfg.training.seed,
            shuffle=d.shuffle and train,
            drop_last=d.drop_last if train else False,
            num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _autocast(self) -> Any:
        enabled = self.cfg.training.dtype == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _forward(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        kt = self.dmp(batch.sparse)
        if hasattr(kt, "wait"):
            kt = kt.wait()
        sparse_BE = pooled_to_model_input(kt, self.cfg.features)
        with self._autocast():
            out = self.engine(sparse_BE, batch.dense)
        return out, sparse_BE

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Batch) -> dict[str, Any]:
        t = self.cfg.training
        factor = lr_factor(self.step, self.total_steps, t.warmup_steps, t.lr_decay, t.min_lr_ratio)
        set_dense_lr(self.engine.optimizer, t.lr * factor)
        set_sparse_lr(self.dmp, self.cfg.embeddings.lr * factor)
        self.engine.train()
        self.dmp.train()
        out, _ = self._forward(batch)
        loss, per_task = task_loss(out.logits_BK.float(), batch.labels, batch.weights)
        total = loss + out.reg_loss
        self.engine.backward(total)
        grad_norm = clip_grad_norm_(self.model, t.grad_clip)
        self.engine.step()
        if self.moe:
            # lambda must stay identical on every rank: steer it by the activation averaged over ranks
            active = all_reduce_sum([float(layer.train_active) for layer in self.moe], torch.device("cpu"))
            for layer, a in zip(self.moe, active):
                layer.update_l1(active=a / self.info.world_size)
        self.window_auc.update(torch.sigmoid(out.logits_BK.detach().float()), batch.labels, batch.weights)
        self.step += 1
        return {
            "loss": float(loss.detach()),
            "reg_loss": float(out.reg_loss.detach()),
            "grad_norm": grad_norm,
            "lr": t.lr * factor,
            "sparse_lr": self.cfg.embeddings.lr * factor,
            **{f"loss/{k}": float(v) for k, v in zip(self.tasks, per_task)},
            **{k: v for k, v in out.stats.items()},
        }

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics on the eval split over all ranks (each row once): {task: {auc, uauc, logloss, ne, ...}}."""
        if self.eval_plan is None:
            return {}
        self.engine.eval()
        self.dmp.eval()
        acc = EvalAccumulator(self.tasks)
        loader = self._loader(self.eval_plan, train=False)
        limit = self.cfg.training.eval_batches
        for i, batch in enumerate(loader):
            if limit and i >= limit:
                break
            batch = batch.to(self.device, non_blocking=True)
            out, _ = self._forward(batch)
            acc.update(torch.sigmoid(out.logits_BK.float()), batch.labels, batch.user_ids, batch.weights)
        self.engine.train()
        self.dmp.train()
        return acc.compute()

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "train_s": self.train_s,
            "train_samples": self.train_samples,
            "step": self.step,
            "epoch": self.epoch,
            "audits": [dict(a) for a in self.audits],
            "loader": self.loader.state_dict(),
            # the epoch a re-layout (another world size) starts with, when saved at an epoch boundary
            "next_epoch": (
                self.loader.epoch
                if self.loader.batches_done == 0
                else self.loader.epoch + 1
                if self.loader.batches_done >= len(self.loader)
                else None
            ),
        }

    def save(self) -> Path:
        if self.loader.batches_done >= len(self.loader):
            self._record_audit()  # an epoch-end checkpoint carries that epoch's audit even across a re-layout
        return save_checkpoint(
            self.ckpt_root,
            step=self.step,
            epoch=self.epoch,
            dmp=self.dmp,
            model=self.model,
            optimizer=self.engine.optimizer,
            trainer_state=self._trainer_state(),
            ep_size=self.ep_size,
            ep_rank=self.ep_rank,
            expert_dp_rank=self.info.rank // self.ep_size,
            model_name=self.cfg.model.name,
            keep_last=self.cfg.training.keep_last,
        )

    def _maybe_resume(self) -> None:
        path = resolve_resume(self.cfg.training.resume, self.ckpt_root)
        if path is None:
            return
        meta, state = load_checkpoint(
            path,
            dmp=self.dmp,
            model=self.model,
            optimizer=self.engine.optimizer,
            ep_size=self.ep_size,
            model_name=self.cfg.model.name,
        )
        self.step = int(state["step"])
        self.train_s, self.train_samples = float(state["train_s"]), int(state["train_samples"])
        self.epoch = int(state["epoch"])
        self.audits = [dict(a) for a in state["audits"]]
        if state["loader"] is None:
            # Another world size: the loader position is per rank, so only an epoch boundary can move.
            if state["next_epoch"] is None:
                raise CheckpointError(
                    f"{path}: saved mid-epoch on world_size={meta.world_size}; the data-loader position is per rank, "
                    f"so resume it on {meta.world_size} processes (a checkpoint at an epoch boundary resumes on any)"
                )
            self.epoch = int(state["next_epoch"])
            self.loader.set_epoch(self.epoch)
            if self.cfg.training.steps == 0:  # epochs mode: the remaining epochs at this world size's step count
                self.total_steps = self.step + (self.cfg.training.epochs - self.epoch) * self.steps_per_epoch
        else:
            self.loader.load_state_dict(state["loader"])
        self.resumed_from = str(path)
        if self.info.is_main:
            print(f"[resume] {path} at step {self.step}, epoch {self.epoch}", flush=True)

    # ------------------------------------------------------------------ the loop

    def _record_audit(self) -> None:
        """Append (or refresh) the audit of the loader's current epoch, reduced over ranks. Collective."""
        audit = self._global_audit()
        audit["complete"] = int(self.loader.batches_done >= len(self.loader))
        if self.audits and self.audits[-1]["epoch"] == audit["epoch"]:
            self.audits[-1] = audit
        else:
            self.audits.append(audit)

    def _global_audit(self) -> dict[str, int]:
        a = self.loader.audit()
        cnt, lo, hi = all_reduce_sum([a["count"], a["checksum"] & 0xFFFFFFFF, a["checksum"] >> 32], torch.device("cpu"))
        checksum = (int(lo) + (int(hi) << 32)) & MASK64
        return {"epoch": int(a["epoch"]), "count": int(cnt), "checksum": checksum}

    def fit(self) -> dict[str, Any]:
        t, info = self.cfg.training, self.info
        wall0 = time.perf_counter()
        last_eval: dict[str, dict[str, float]] = {}
        timer_t0, timer_steps = time.perf_counter(), 0
        while self.step < self.total_steps:
            for batch in self.loader:
                batch = batch.to(self.device, non_blocking=True)
                row = self.train_step(batch)
                timer_steps += 1
                done = self.step >= self.total_steps
                if self.step % t.log_every == 0 or done:
                    dt = time.perf_counter() - timer_t0
                    self.train_s += dt
                    self.train_samples += timer_steps * self.cfg.data.batch_size * info.world_size
                    self._log_step(row, timer_steps, dt)
                    timer_t0, timer_steps = time.perf_counter(), 0
                paused = time.perf_counter()  # eval and checkpoint time is not training time
                if t.eval_every and self.step % t.eval_every == 0 and not done:
                    last_eval = self.evaluate()
                    self.logger.log(_flatten_eval(last_eval), self.step)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not done:
                    self.save()
                timer_t0 += time.perf_counter() - paused
                if done:
                    break
            epoch_done = self.loader.batches_done >= len(self.loader)
            if epoch_done or self.step >= self.total_steps:
                self._record_audit()  # what this epoch consumed on every rank (all of it when epoch_done)
            if epoch_done:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
        final_eval = self.evaluate() if self.eval_plan is not None else last_eval
        self.save()
        summary = self._summary(final_eval, time.perf_counter() - wall0)
        if final_eval:
            self.logger.log(_flatten_eval(final_eval), self.step)
        self.logger.log_summary(summary)
        if info.is_main and self.cfg.metrics.plots:
            self.logger.log_images({p.stem: p for p in write_plots(self.run_dir)}, self.step)
        self.logger.close()
        return summary

    def _log_step(self, row: dict[str, Any], steps: int, dt: float) -> None:
        info = self.info
        rows = [row["loss"], row["reg_loss"], float(steps * self.cfg.data.batch_size)]
        loss, reg, samples = all_reduce_sum(rows, torch.device("cpu"))
        sps = samples / max(dt, 1e-9)
        sps_rank = sps / info.world_size
        out: dict[str, Any] = {k: v for k, v in row.items() if not isinstance(v, torch.Tensor)}
        out.update(
            loss=loss / info.world_size,
            reg_loss=reg / info.world_size,
            epoch=self.epoch,
            samples_per_s=sps,
            samples_per_s_per_rank=sps_rank,
            step_time_s=dt / max(steps, 1),
            mfu=mfu(self.flops_train, sps_rank, self.peak),
            mem_rss_mb=rss_mb(),
        )
        for k, v in row.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.tolist() if v.numel() > 1 else float(v)
        for task, value in self.window_auc.compute().items():
            out[f"train_auc/{task}"] = value
        for k, v in self.loader.stats().items():
            out[f"data/{k}"] = v
        self.logger.log(out, self.step)

    def _summary(self, final_eval: dict[str, dict[str, float]], wall_s: float) -> dict[str, Any]:
        # throughput of the run's training steps, across resumes (eval and checkpoint time excluded)
        sps = self.train_samples / self.train_s if self.train_s > 0 else 0.0
        rows_consumed = sum(a["count"] for a in self.audits)
        summary: dict[str, Any] = {
            "eval": {
                task: {"auc": m["auc"], "uauc": m["uauc"], "logloss": m["logloss"], "ne": m.get("ne", math.nan)}
                for task, m in final_eval.items()
            },
            "params": int(self.params),
            "flops_per_sample": float(self.model.flops_per_sample(training=False)),
            "mfu": mfu(self.flops_train, sps / self.info.world_size, self.peak),
            "samples_per_s": sps,
            "steps": int(self.step),
            "wall_s": float(wall_s),
            "rows_consumed": int(rows_consumed),
            "restarts": int(self.info.restart_count),
            "world_size": self.info.world_size,
            "ep_size": self.ep_size,
            "expert_params_per_rank": int(self.expert_params_per_rank),
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "resumed_from": self.resumed_from,
            "audit": {"epochs": self.audits},
            "data_health": self.loader.stats(),
            "sharding": self.plan_report.to_dict(),
        }
        if self.cfg.data.row_id_column:
            ref = dataset_audit(self.train_plan, self.cfg.data)
            summary["audit"]["dataset"] = ref
            complete = [a for a in self.audits if a.get("complete")]
            # Every complete epoch consumed exactly the dataset's rows (count and order-free checksum);
            # None when no epoch completed (a run of training.steps shorter than an epoch).
            summary["audit"]["exactly_once"] = (
                all(a["count"] == ref["count"] and a["checksum"] == ref["checksum"] for a in complete)
                if complete
                else None
            )
        return summary


def _flatten_eval(ev: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{k}": v for task, m in ev.items() for k, v in m.items()}


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
