"""The training loop: data -> `TrainStep` -> logs, validation, checkpoints, summary.

    Trainer(cfg, info)        plans the data (footers only; the validation carve, if any), computes the
                              dense-feature statistics (cached), builds the sparse arch and the zoo model,
                              `parallelize`s them (tables, experts, DeepSpeed engine), resumes if asked
    trainer.fit()             epochs of `TrainStep` (which owns the loss); logs; validation every
                              eval_every steps and at every epoch end (best checkpoint, early stopping);
                              the last checkpoint; the best weights restored; data.eval scored; summary.json

Without validation data, eval_every scores data.eval, as the final evaluation does.

Legend: B batch per rank, K tasks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint.format import BEST_DIR
from config import JobConfig
from config.job import dense_input_spec
from embeddings.regroup import sparse_dim, sparse_group_widths
from embeddings.tables import build_sparse_arch
from metrics.auc import WindowedAUC, eval_metrics_flat
from metrics.baselines import baseline_report, below_prior, format_baselines
from metrics.mfu import mfu, peak_flops, rss_mb
from metrics.plots import write_plots
from metrics.tracking import MetricsLogger
from model.dense_input import dense_inputs
from model.zoo import build_model
from parallel.distributed import DistInfo, all_gather_object, all_reduce_sum, average_buffers
from parallel.env import REPO
from parallel.layout import parallelize
from pipeline import dense_prep, vocab
from pipeline.audit import MOD
from pipeline.loader import ParquetLoader, dataset_audit
from pipeline.plan import DatasetPlan, carve_tail, plan_dataset
from pipeline.split import dropped_units
from train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointParts,
    check_config_drift,
)
from train.data_stages import check_vocabs, dense_choices, vocabularies
from train.ema import WeightEMA
from train.pipeline import PrefetchLoader
from train.rundir import Preempted, Preemption, drop_rows_after
from train.step import TrainStep
from train.validation import BestTracker, evaluate_split

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

        # Data: plans come from footers only; bad files fail here, before any training step.
        train_plan = plan_dataset(d.train, d, f)
        self.valid_plan: DatasetPlan | None = plan_dataset(d.valid, d, f) if d.valid else None
        if d.valid_fraction > 0:
            train_plan, self.valid_plan = carve_tail(train_plan, d.valid_fraction)
        self.train_plan = train_plan
        self.eval_plan = plan_dataset(d.eval, d, f) if d.eval else None
        # Id vocabularies of 'vocab' features: counted over the training rows (cached in the run directory,
        # copied into every checkpoint), table sizes ("auto") resolved first; `a[s]` catalogues read the carve too.
        carve = self.valid_plan if d.valid_fraction > 0 else None
        self.vocabs = vocabularies(cfg, info, self.train_plan, self.run_dir, carve)
        self.loader = self._loader(self.train_plan, train=True)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.train {d.train}: fewer rows than one batch per rank ({d.batch_size} x {info.world_size})"
            )
        self.total_steps = t.steps or t.epochs * self.steps_per_epoch

        # Dense features: statistics over the training rows (cached), each transform resolved ('auto'
        # included) and written into the config, so config.toml alone rebuilds the same model.
        self.dense_choices = dense_choices(cfg, info, self.train_plan, self.run_dir)
        f.dense_transforms = {c.name: c.transform for c in self.dense_choices}
        if info.is_main:
            (self.run_dir / "config.toml").write_text(cfg.to_toml())

        # The sparse arch (tables on "meta": DMP materialises only local shards) and the zoo model, then
        # tables sharded, experts sharded by token position and the DeepSpeed engine (parallel.layout).
        sparse_arch = build_sparse_arch(f, cfg.embeddings, device=torch.device("meta"), seed=t.seed)
        model = build_model(
            cfg.model,
            cfg.moe,
            sparse_dim=sparse_dim(f),
            sparse_groups=sparse_group_widths(f),
            dense=dense_input_spec(f),
            num_tasks=len(f.labels),
            seed=t.seed,
        )
        for module in dense_inputs(model):
            module.set_stats(**dense_prep.model_buffers(self.dense_choices))
        model = model.to(self.device)
        self.params = model.num_params()
        self.par = parallelize(cfg, info, sparse_arch, model, self.run_dir)
        self.layout, self.dmp, self.engine, self.model = self.par.layout, self.par.dmp, self.par.engine, self.par.model
        self.plan_report = self.par.plan_report
        self.ema = WeightEMA(self.model, t.ema_decay)  # training.ema_decay = 0: off
        self.step_fn = TrainStep(cfg, self.par, self.total_steps, self.ema)
        # batch i+1 copied and its input dist started while step i computes (training.pipeline)
        self.loader = PrefetchLoader(self.loader, self.device, self.dmp, enabled=t.pipeline)
        self.ckpt = CheckpointManager(
            self.ckpt_root,
            CheckpointParts(
                self.dmp,
                self.model,
                self.engine.optimizer,
                self.layout,
                cfg.model.name,
                files={vocab.VOCAB_FILE: self.run_dir / vocab.VOCAB_FILE} if self.vocabs else {},
                ema=self.ema,
            ),  # fmt: skip
            keep_last=t.keep_last,
            config=cfg.to_dict(),
        )

        # Metrics.
        self.tasks = list(f.labels)
        self.flops_train = self.model.flops_per_sample(training=True)
        self.peak, self.peak_source = peak_flops(
            self.device, t.dtype, cfg.metrics.peak_flops, cache_dir=REPO / ".build"
        )
        self.window_auc = WindowedAUC(self.tasks, cfg.metrics.train_auc_window, distributed=True, device=self.device)
        self.step = 0
        self.epoch = 0
        self.audits: list[dict[str, int]] = []
        self.train_s = 0.0  # wall seconds of training steps over the whole run (kept across resumes)
        self.train_samples = 0  # global samples of those steps
        self.resumed_from: str | None = None
        self.config_changes: dict[str, list[Any]] = {}
        self.tracker = BestTracker.from_config(t)
        self.restored_best: str | None = None
        self._maybe_resume()
        if info.is_main and (self.resumed_from is not None or info.restart_count > 0):
            drop_rows_after(self.run_dir / "metrics.jsonl", self.step)  # the crashed attempt's later rows
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
            vocabs=self.vocabs,
            train=train,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, plan: DatasetPlan | None) -> dict[str, dict[str, float]]:
        """Metrics of `plan` over all ranks (each row once): {task: {auc, uauc, logloss, ne, ...}}; {} without a plan.
        Collective (batch-norm statistics are averaged over ranks first)."""
        if plan is None:
            return {}
        average_buffers(self.model)
        loader = self._loader(plan, train=False)
        with self.ema.applied():  # training.ema_decay: the averaged weights are the ones scored
            return evaluate_split(self.step_fn, loader, self.tasks, self.device, self.cfg.training.eval_batches)

    def _validate(self) -> None:
        """Score the validation rows, follow the metric, keep the best checkpoint. Collective."""
        metrics = self.evaluate(self.valid_plan)
        improved = self.tracker.update(metrics, self.step, self.epoch + self.loader.batches_done / len(self.loader))
        row = eval_metrics_flat(metrics, prefix="valid")
        row[f"valid/{self.tracker.metric}"] = self.tracker.curve[-1]["value"]
        row["valid/best"] = self.tracker.best
        self.logger.log(row, self.step)
        if improved and self.cfg.training.restore_best:
            self.save(name=BEST_DIR)

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "train_s": self.train_s,
            "train_samples": self.train_samples,
            "step": self.step,
            "epoch": self.epoch,
            "audits": [dict(a) for a in self.audits],
            "tracker": self.tracker.state_dict(),
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

    def save(self, name: str | None = None) -> Path:
        """Write checkpoint step_<N> (or `name`, e.g. the best one). Collective."""
        if self.loader.batches_done >= len(self.loader):
            self._record_audit()  # an epoch-end checkpoint carries that epoch's audit even across a re-layout
        average_buffers(self.model)
        return self.ckpt.save(self.step, self.epoch, self._trainer_state(), name=name)

    def _maybe_resume(self) -> None:
        """Resume from `training.resume`: every file is verified against its checkpoint's meta.json first; with
        'auto' a corrupt or unloadable checkpoint is reported in one line and the one written before it is
        tried; one that does not fit this run (a config that changes the model, data or optimizer, another
        model or expert layout) stops the run (never a fallback). Collective."""
        resume = self.cfg.training.resume
        candidates = self.ckpt.candidates(resume)
        for i, path in enumerate(candidates):
            try:
                meta = self.ckpt.verify(path)
                self.config_changes = check_config_drift(path, meta, self.cfg.to_dict())
                check_vocabs(path, self.vocabs, self.cfg.features)
                meta, state = self.ckpt.load(path)
                break
            except CheckpointMismatchError:
                raise  # intact but another model / layout / config: an older checkpoint is no way out
            except CheckpointError as e:
                if resume != "auto" or i == len(candidates) - 1:
                    raise
                if self.info.is_main:
                    print(f"[resume] WARNING: {e}; falling back to {candidates[i + 1]}", flush=True)
        else:
            return
        self.ckpt.parent = path
        self.step = int(state["step"])
        self.train_s, self.train_samples = float(state["train_s"]), int(state["train_samples"])
        self.epoch = int(state["epoch"])
        self.audits = [dict(a) for a in state["audits"]]
        self.tracker.load_state_dict(state["tracker"])
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
                self.step_fn.total_steps = self.total_steps
        else:
            self.loader.load_state_dict(state["loader"])
        self.resumed_from = str(path)
        if self.info.is_main:
            changed = f"; config changes kept: {sorted(self.config_changes)}" if self.config_changes else ""
            print(f"[resume] {path} at step {self.step}, epoch {self.epoch}{changed}", flush=True)

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
        cnt, lo, hi = all_reduce_sum([a["count"], a["checksum"] & 0xFFFFFFFF, a["checksum"] >> 32], self.device)
        checksum = (int(lo) + (int(hi) << 32)) & MASK64
        return {"epoch": int(a["epoch"]), "count": int(cnt), "checksum": checksum}

    def fit(self) -> dict[str, Any]:
        """Train (validating and checkpointing on the way), then end with the best weights, the test
        evaluation and summary.json. SIGTERM / SIGUSR1: checkpoint at the next step end and raise Preempted."""
        wall0 = time.perf_counter()
        with Preemption() as preemption:
            self._train(preemption)
        return self._finish(wall0)

    def _preempt_agreed(self, preemption: Preemption) -> bool:
        """Whether any rank got SIGTERM / SIGUSR1 (a tiny all-reduce per step, so every rank stops at the same one)."""
        return all_reduce_sum([float(preemption.requested)], self.device)[0] > 0

    def _train(self, preemption: Preemption) -> None:
        t, info = self.cfg.training, self.info
        last_eval: dict[str, dict[str, float]] = {}
        timer_t0, timer_steps = time.perf_counter(), 0
        while self.step < self.total_steps and not self.tracker.stopped:
            for batch in self.loader:  # on the device
                ahead = self.loader.prefetch_next if self.step + 1 < self.total_steps else None
                row, out = self.step_fn(batch, self.step, lookup=self.loader.take_lookup(), after_embed=ahead)
                self.step += 1
                self.window_auc.update(torch.sigmoid(out.logits_BK.detach().float()), batch.labels, batch.weights)
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
                    if self.valid_plan is not None:
                        self._validate()
                    else:
                        last_eval = self.evaluate(self.eval_plan)
                        self.logger.log(eval_metrics_flat(last_eval), self.step)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not done:
                    self.save()
                timer_t0 += time.perf_counter() - paused
                if self._preempt_agreed(preemption):
                    path = self.save()
                    if info.is_main:
                        print(f"[preempted] at step {self.step}: wrote {path}", flush=True)
                    self.logger.close()
                    raise Preempted(path, self.step)
                if done or self.tracker.stopped:
                    break
            epoch_done = self.loader.batches_done >= len(self.loader)
            if epoch_done or self.step >= self.total_steps or self.tracker.stopped:
                self._record_audit()  # what this epoch consumed on every rank (all of it when epoch_done)
            if epoch_done:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                if self.valid_plan is not None and not self.tracker.stopped:
                    paused = time.perf_counter()
                    self._validate()  # every epoch end
                    timer_t0 += time.perf_counter() - paused
        self.last_eval = last_eval

    def _finish(self, wall0: float) -> dict[str, Any]:
        """After the loop: last validation, last checkpoint, the best weights back, the test evaluation, summary."""
        t, info = self.cfg.training, self.info
        last_eval = self.last_eval
        if self.valid_plan is not None and (not self.tracker.curve or self.tracker.curve[-1]["step"] != self.step):
            self._validate()  # the run's last weights are validated too
        self.save()
        self.ema.finalize()  # the run ends with the averaged weights (the best checkpoint holds them too)
        best = self.ckpt_root / BEST_DIR
        if self.valid_plan is not None and t.restore_best and self.tracker.best_step is not None:
            self.ckpt.load_weights(best)  # end with the best validation weights: what data.eval scores
            self.restored_best = str(best)
            if info.is_main:
                print(f"[best] restored {best} (step {self.tracker.best_step}, {self.tracker.metric} "
                      f"{self.tracker.best:.5f})", flush=True)  # fmt: skip
        final_eval = self.evaluate(self.eval_plan) if self.eval_plan is not None else last_eval
        summary = self._summary(final_eval, time.perf_counter() - wall0)
        # trivial baselines fit on the training rows: a model that loses to them says so
        m = self.cfg.metrics
        summary["baselines"] = baseline_report(
            self.train_plan, {"valid": self.valid_plan, "eval": self.eval_plan}, self.cfg.features, self.device,
            rank=info.rank, world_size=info.world_size, gather=all_gather_object, mode=m.eval_auc, bins=m.eval_auc_bins,
        )  # fmt: skip
        scored = "eval" if self.eval_plan is not None else "valid"
        summary["below_prior"] = below_prior(final_eval, summary["baselines"].get(scored, {})) if final_eval else []
        if info.is_main and final_eval and scored in summary["baselines"]:
            print(format_baselines(final_eval, summary["baselines"][scored]), flush=True)
            for line in summary["below_prior"]:
                print(line, flush=True)
        if final_eval:
            self.logger.log(eval_metrics_flat(final_eval), self.step)
        self.logger.log_summary(summary)
        if info.is_main and self.cfg.metrics.plots:
            # under plots/: a plot named like a metric ("loss") would turn that metric's summary into an image
            self.logger.log_images({f"plots/{p.stem}": p for p in write_plots(self.run_dir)}, self.step)
        self.logger.close()
        return summary

    def _log_step(self, row: dict[str, Any], steps: int, dt: float) -> None:
        info = self.info
        rows = [float(row["loss"]), float(row["reg_loss"]), float(steps * self.cfg.data.batch_size)]
        loss, reg, samples = all_reduce_sum(rows, self.device)
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
                | ({"auc_bound": m["auc_bound"]} if "auc_bound" in m else {})
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
            "input_pipeline": (
                "lookup ahead" if self.loader.split_lookup else "copy ahead" if self.loader.ahead else "off"
            ),
            "world_size": self.info.world_size,
            "ep_size": self.layout.ep_size,
            "expert_params_per_rank": int(self.par.expert_params_per_rank),
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "resumed_from": self.resumed_from,
            "config_changes": self.config_changes,
            "audit": {"epochs": self.audits},
            "data_health": self.loader.stats(),
            "sharding": self.plan_report.to_dict(),
            "data": {
                "train_rows": self.train_plan.num_rows,
                "valid_rows": self.valid_plan.num_rows if self.valid_plan is not None else 0,
                "eval_rows": self.eval_plan.num_rows if self.eval_plan is not None else 0,
            },
            "dense_preprocess": {c.name: c.transform for c in self.dense_choices},
            "vocab": {t: v.summary() for t, v in self.vocabs.items()},
        }
        if self.valid_plan is not None:
            tr = self.tracker
            summary["valid"] = {
                "metric": tr.metric, "best": tr.best, "best_step": tr.best_step, "stopped_early": tr.stopped,
                "restored_best": self.restored_best, "curve": tr.curve,
            }  # fmt: skip
        if self.cfg.data.row_id_column:
            summary["audit"] |= self._audit_verdict()
        return summary

    def _audit_verdict(self) -> dict[str, Any]:
        """Every complete epoch consumed each training row exactly once: its audit plus the rows drop_last left
        out of that epoch (counted apart, in `dropped`) equal the dataset's (count and order-free checksum).
        exactly_once is None when no epoch completed (a run of training.steps shorter than an epoch)."""
        d = self.cfg.data
        ref = dataset_audit(self.train_plan, d)
        dropped, ok = {}, []
        for a in (a for a in self.audits if a.get("complete")):
            units = dropped_units(
                self.train_plan, seed=self.cfg.training.seed, epoch=int(a["epoch"]), shuffle=d.shuffle,
                world_size=self.info.world_size, batch_size=d.batch_size, drop_last=d.drop_last,
            )  # fmt: skip
            left = dataset_audit(self.train_plan, d, units) if units else {"count": 0, "checksum": 0}
            dropped[str(a["epoch"])] = left["count"]
            ok.append(
                a["count"] + left["count"] == ref["count"]
                and (a["checksum"] + left["checksum"]) % MOD == ref["checksum"]
            )
        return {"dataset": ref, "dropped": dropped, "exactly_once": all(ok) if ok else None}
