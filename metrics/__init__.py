"""Metrics a user can trust: eval/train AUCs, MFU, tracking sinks and end-of-run plots.

Modules:
    auc       auc, uauc, logloss, normalized_entropy, EvalAccumulator (all ranks), WindowedAUC
    mfu       peak_flops (GPU table / measured + cached CPU GEMM peak), mfu, rss_mb
    tracking  MetricsLogger: log(dict, step) / log_summary / close -> JSONL, console, W&B, extra sinks
    plots     write_plots(run_dir) -> loss.png, auc.png, throughput.png, moe_activation.png

Metric keys (one flat dict per `MetricsLogger.log` call; "step" is added by the logger):

    loss                     train loss (mean over the log interval, all ranks)
    loss/<task>              per-task train loss
    lr, sparse_lr            dense and embedding learning rates
    samples_per_s            global training throughput (all ranks)
    samples_per_s_per_rank   samples_per_s / world size (what MFU uses)
    step_time_s              mean wall time of one optimizer step
    mfu                      model FLOPs utilisation of one rank, a fraction (0.31 = 31 %)
    train_auc/<task>         AUC over the last metrics.train_auc_window steps
    eval/<task>/auc          eval AUC (all ranks)
    eval/<task>/uauc         eval user-averaged AUC
    eval/<task>/logloss      eval logloss (nats)
    eval/<task>/ne           eval normalized entropy
    eval/<task>/count, eval/<task>/ctr   eval rows (weight > 0) and weighted base rate
    moe/active_LT            L x T nested list: share of each token's experts active, per layer
    moe/l1_lambda            current ReLU-routing L1 coefficient
    moe/dead_experts         share of experts never active over the log interval
    data/<counter>           data health counters (e.g. data/repaired_values, data/skipped_rows)
    epoch                    current epoch (float allowed)
    mem_rss_mb               resident memory of rank 0 (MiB)

`EvalAccumulator.compute()` returns {task: {"auc", ...}}; `auc.eval_metrics_flat` turns it into the
"eval/<task>/<name>" keys above.

Import from the submodules (`from metrics.auc import auc`): this package re-exports nothing,
because the functions `auc` and `mfu` would shadow the modules of the same names.
"""
