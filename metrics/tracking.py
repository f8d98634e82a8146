"""The one metrics interface: `MetricsLogger.log(dict, step)` / `close()`, fanned out to sinks.

Sinks (rank 0 only; every other rank's logger is a no-op):

* JSONL, always: run_dir/metrics.jsonl, one object per `log` call ({"step", "time", **metrics});
  appended to on resume (or an elastic restart), truncated on a fresh run. Non-finite floats are
  written as null. `log_summary` writes run_dir/summary.json.
* console: one line per `log` call (step, loss, samples/s, MFU, lr, train/eval AUCs) on stdout,
  plus a tqdm progress bar over `total_steps` on stderr when `metrics.progress` (terminals only).
* W&B when `metrics.wandb`: imported lazily; mode from `resolve_wandb_mode`; files under
  run_dir/wandb; the resolved config as the run config; a run id kept in run_dir/wandb_run_id and
  reused with resume="allow" on resume / elastic restart, so the same run continues. Metrics are
  charted against a "step" metric (no monotonic-step errors after a restart); a 2-D list (the MoE
  activation matrix) becomes a heatmap image plus per-row means. ANY W&B exception warns once and
  disables the sink; training continues and metrics.jsonl keeps every row.
* `extra_sinks`: any objects with `log(metrics, step)` and `close()` (tests inject recorders);
  `log_summary(summary)` is called on them too when they have it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, TextIO

from metrics.config import WANDB_MODES, MetricsConfig
from metrics.plots import heatmap_rgb

RUN_ID_FILE = "wandb_run_id"


def to_python(value: Any) -> Any:
    """Tensors, numpy values and nested containers -> JSON-ready Python; non-finite floats -> None."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()  # torch.Tensor / numpy array or scalar
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _elastic_restart() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


class JsonlSink:
    """run_dir/metrics.jsonl, one JSON object per log call, flushed every line."""

    def __init__(self, run_dir: Path, append: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), "time": round(time.time(), 3), **to_python(metrics)}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(to_python(summary), indent=2, allow_nan=False) + "\n")

    def close(self) -> None:
        self._file.close()


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def format_line(metrics: dict[str, Any], step: int, total_steps: int = 0) -> str:
    """The console line: 'step 120/1000 | loss 0.5123 | 1,234 samples/s | MFU 12.3% | ...'.

    Only keys that are present are shown; per-task train AUCs ("train_auc/<task>") and eval
    metrics ("eval/<task>/auc", "eval/<task>/uauc", "eval/<task>/ne") are grouped at the end.
    """
    parts = [f"step {step}/{total_steps}" if total_steps > 0 else f"step {step}"]
    fmt = [
        ("epoch", "epoch {:g}"),
        ("loss", "loss {:.4f}"),
        ("samples_per_s", "{:,.0f} samples/s"),
        ("step_time_s", "{:.3f} s/step"),
        ("mfu", None),
        ("lr", "lr {:.2e}"),
        ("mem_rss_mb", "rss {:,.0f} MiB"),
    ]
    for key, pattern in fmt:
        value = _num(metrics.get(key))
        if value is None:
            continue
        parts.append(f"MFU {100 * value:.2f}%" if key == "mfu" else pattern.format(value))
    train = [(k.split("/", 1)[1], _num(v)) for k, v in metrics.items() if k.startswith("train_auc/")]
    if train:
        parts.append("train auc " + " ".join(f"{t} {v:.4f}" for t, v in train if v is not None))
    for split in ("valid", "eval"):
        tasks = [
            k.split("/")[1] for k in metrics if k.startswith(f"{split}/") and k.endswith("/auc") and k.count("/") == 2
        ]
        for task in tasks:
            shown = [(name, _num(metrics.get(f"{split}/{task}/{name}"))) for name in ("auc", "uauc", "ne")]
            parts.append(f"{split} {task} " + " ".join(f"{n} {v:.4f}" for n, v in shown if v is not None and v == v))
    if _num(metrics.get("valid/best")) is not None:
        parts.append(f"best {metrics['valid/best']:.4f}")
    return " | ".join(parts)


class ConsoleSink:
    """One line per log call on `stream`, and a progress bar over `total_steps` on `bar_file`.

    Args:
        total_steps: progress-bar total (0 = no bar).
        progress: show the bar (metrics.progress).
        stream: where the lines go (default stdout).
        bar_file: where the bar goes (default stderr).
        bar_disable: tqdm's `disable`; None = only when `bar_file` is a terminal.
    """

    def __init__(
        self,
        total_steps: int,
        progress: bool,
        stream: TextIO | None = None,
        bar_file: TextIO | None = None,
        bar_disable: bool | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.stream = stream
        self._want_bar = progress and total_steps > 0
        self._bar_file = bar_file
        self._bar_disable = bar_disable
        self._bar: Any = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        line = format_line(metrics, step, self.total_steps)
        if self._want_bar:
            from tqdm import tqdm  # noqa: PLC0415 - only rank 0 with a bar needs it

            if self._bar is None:
                self._bar = tqdm(
                    total=self.total_steps,
                    initial=min(step, self.total_steps),
                    file=self._bar_file or sys.stderr,
                    disable=self._bar_disable,
                    dynamic_ncols=True,
                    unit="step",
                    leave=True,
                )
            elif step > self._bar.n:
                self._bar.update(min(step, self.total_steps) - self._bar.n)
            tqdm.write(line, file=self.stream or sys.stdout)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def resolve_wandb_mode(cfg_mode: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """'online', 'offline' or 'disabled' from metrics.wandb_mode and the environment.

    'online' and 'disabled' in the config are taken as they are. With the default 'offline', an
    explicit WANDB_MODE in the environment wins, else WANDB_API_KEY switches to online.
    """
    if cfg_mode not in WANDB_MODES:
        raise ValueError(f"metrics.wandb_mode: expected 'online', 'offline' or 'disabled', got {cfg_mode!r}")
    if cfg_mode != "offline":
        return cfg_mode
    env_mode = environ.get("WANDB_MODE", "")
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode in ("online", "disabled"):
        return env_mode
    return "online" if environ.get("WANDB_API_KEY") else "offline"


def resolve_run_id(run_dir: Path, run_id: str | None, resume: bool) -> str:
    """The W&B run id: `run_id` if given, else the stored one on resume / elastic restart, else new.

    The id is (re)written to run_dir/wandb_run_id.
    """
    path = run_dir / RUN_ID_FILE
    if run_id is None and (resume or _elastic_restart()) and path.exists():
        run_id = path.read_text().strip() or None
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """Weights & Biases behind the sink interface; every failure warns once and disables it."""

    def __init__(
        self, run_dir: Path, cfg: MetricsConfig, config_dict: dict[str, Any], run_id: str | None, resume: bool
    ) -> None:
        self.run: Any = None
        self._images: dict[str, Any] = {}
        try:
            import wandb  # noqa: PLC0415 - lazy: only rank 0 with W&B on pays the import

            self._wandb = wandb
            mode = resolve_wandb_mode(cfg.wandb_mode)
            sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
            # under `wandb agent` the agent decides the run id (WANDB_RUN_ID): ours would be ignored
            run_id = None if sweep else resolve_run_id(run_dir, run_id, resume)
            self.run = wandb.init(
                project=cfg.wandb_project,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                group=cfg.wandb_group or None,
                tags=list(cfg.wandb_tags) or None,
                notes=cfg.wandb_notes or None,
                job_type=cfg.wandb_job_type or None,
                config=to_python(config_dict),
                settings=wandb.Settings(console="off", silent=True),
            )
            (run_dir / RUN_ID_FILE).write_text(self.run.id + "\n")  # the id W&B really uses (a sweep's too)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self._fail("init", e)

    def _fail(self, where: str, e: BaseException) -> None:
        warnings.warn(
            f"W&B {where} failed ({type(e).__name__}: {e}); W&B logging disabled, training continues "
            "(metrics.jsonl keeps every row)",
            RuntimeWarning,
            stacklevel=3,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001, S110 - already disabled; nothing more to report
                pass

    def _convert(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Scalars as they are; a 2-D numeric list (e.g. moe/active_LT, layers x tokens) -> a heatmap image
        under `<key>/heatmap`, one scalar per cell (`<key>/l<i>_t<j>`) and per-row means; strings dropped."""
        out: dict[str, Any] = {}
        for key, value in to_python(metrics).items():
            if isinstance(value, bool | int | float):
                out[key] = value
            elif isinstance(value, list) and value and all(isinstance(r, list) for r in value):
                out[f"{key}/heatmap"] = self._wandb.Image(heatmap_rgb(value, key))
                for i, row in enumerate(value):
                    nums = [v for v in row if isinstance(v, int | float)]
                    if nums:
                        out[f"{key}/row{i}_mean"] = sum(nums) / len(nums)
                    out.update({f"{key}/l{i}_t{j}": v for j, v in enumerate(row) if isinstance(v, int | float)})
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                out.update({f"{key}/{i}": v for i, v in enumerate(value)})
        return out

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**self._convert(metrics), "step": int(step)})
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(to_python(summary))
        except Exception as e:  # noqa: BLE001
            self._fail("summary", e)

    def log_text(self, name: str, text: str) -> None:
        if self.run is None:
            return
        try:
            self.run.config.update({name: text}, allow_val_change=True)
        except Exception as e:  # noqa: BLE001
            self._fail("config update", e)

    def log_images(self, images: dict[str, Path], step: int | None) -> None:
        if self.run is None:
            return
        try:
            row: dict[str, Any] = {k: self._wandb.Image(str(p)) for k, p in images.items()}
            if step is not None:
                row["step"] = int(step)
            self.run.log(row)
        except Exception as e:  # noqa: BLE001
            self._fail("image log", e)

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
            # finish() only *asks* W&B's service process to close the run's stream (inform_finish is a
            # fire-and-forget publish); the service flushes the buffered .wandb file when it gets to it. A
            # reader right after finish() raced that flush under CPU load and found only the header (no data
            # is lost: the service flushes before it exits). teardown() waits for the service to exit, so
            # the run file is complete when close() returns.
            self._wandb.teardown()
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)
        self.run = None


class MetricsLogger:
    """The one metrics interface of a run: `log(dict, step)`, `log_summary`, `close()`.

    Args:
        run_dir: the run directory (created if missing).
        cfg: the metrics config section.
        rank: global rank; only rank 0 writes anything, other ranks' calls are no-ops.
        config_dict: the resolved job config (W&B run config).
        run_id: W&B run id to use (default: stored in run_dir/wandb_run_id or new).
        resume: continue a run: append to metrics.jsonl and reuse the W&B run id.
        total_steps: progress-bar total (0 = no bar).
        extra_sinks: more sinks (objects with log(metrics, step) and close()).

    Example:
        logger = MetricsLogger(run_dir, cfg.metrics, rank=rank, config_dict=cfg.to_dict(), total_steps=1000)
        logger.log({"loss": 0.52, "samples_per_s": 1.2e5, "mfu": 0.31, "lr": 1e-3}, step=10)
        logger.log_summary({"eval/ctr/auc": 0.71})
        logger.close()
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: MetricsConfig,
        *,
        rank: int,
        config_dict: dict[str, Any],
        run_id: str | None = None,
        resume: bool = False,
        total_steps: int = 0,
        extra_sinks: list[Any] | None = None,
    ) -> None:
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.sinks: list[Any] = []
        self._wandb: WandbSink | None = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks.append(JsonlSink(self.run_dir, append=resume or _elastic_restart()))
        self.sinks.append(ConsoleSink(total_steps, cfg.progress))
        if cfg.wandb and cfg.wandb_mode != "disabled":
            self._wandb = WandbSink(self.run_dir, cfg, config_dict, run_id, resume)
            self.sinks.append(self._wandb)
        self.sinks.extend(extra_sinks or [])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log one row of metrics at `step` (see metrics/__init__.py for the key names)."""
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final numbers: run_dir/summary.json, the W&B run summary, and sinks that have log_summary."""
        for sink in self.sinks:
            if hasattr(sink, "log_summary"):
                sink.log_summary(summary)

    def log_text(self, name: str, text: str) -> None:
        """A text artifact (e.g. the sharding plan): run_dir/<name>.txt and a W&B config entry."""
        if self.rank != 0:
            return
        (self.run_dir / f"{name}.txt").write_text(text)
        if self._wandb is not None:
            self._wandb.log_text(name, text)

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """PNG files (e.g. from `write_plots`) as W&B images; the files themselves stay in run_dir."""
        if self._wandb is not None:
            self._wandb.log_images(images, step)

    def close(self) -> None:
        """Flush and close every sink (the W&B run is finished)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        self._wandb = None
