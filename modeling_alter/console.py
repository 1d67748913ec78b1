"""What `AlterTrainer` prints: a progress bar, one short line per logging step, a per-task table per evaluation and
one summary line at the end of training, instead of the raw metric dictionaries of Transformers' `ProgressCallback`
and `PrinterCallback`.

`AlterTrainer` swaps those two default callbacks (exactly those classes; a subclass of them passed by the user stays)
for `AlterProgressCallback`. The logs themselves are unchanged: every metric still reaches `trainer.state.log_history`
and the `report_to` integrations.
"""

import math
import sys

from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import has_length

_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def per_task_table(title: str, metrics: dict, task_metrics: dict[str, str], prefix: str = "eval") -> str:
    """A Markdown table of a per-task evaluation: one row per task in `task_metrics` (task -> metric name) with its
    score and loss (`{prefix}_{task}_{metric}`, `{prefix}_{task}_loss`), and the means (`{prefix}_mean_score`,
    `{prefix}_loss`). Missing values are shown as `–`. `title` becomes a `###` heading above it."""

    def cell(key):
        value = metrics.get(key)
        return "–" if value is None else f"{value:.3f}"

    lines = [f"### {title}", "| task | metric | score | loss |", "|---|---|---:|---:|"]
    for task, metric in task_metrics.items():
        lines.append(f"| {task} | {metric} | {cell(f'{prefix}_{task}_{metric}')} | {cell(f'{prefix}_{task}_loss')} |")
    lines.append(f"| **mean** | | {cell(f'{prefix}_mean_score')} | {cell(f'{prefix}_loss')} |")
    return "\n".join(lines)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4g}"


class AlterProgressCallback(ProgressCallback):
    """[`ProgressCallback`] that prints readable lines instead of metric dictionaries.

    - a training log (`loss`, ...): `step 100/1500 · stage 1 · loss 2.301 · learning_rate 0.001916 · ...`;
    - a per-task evaluation: the table of `per_task_table`, titled with the stage and step;
    - the start of training: when stage 2 begins; the switch to stage 2: one line with the parameter counts;
    - the end of training: one summary line (steps, time, mean training loss).

    With `bars=False` (replacing `PrinterCallback`, i.e. `disable_tqdm=True`) it shows no bar and prints every log as
    `PrinterCallback` does. During training, an evaluation shows its own bar only on an interactive terminal: in a
    log file the nested bar's cursor movements would be stray characters.

    Args:
        task_metrics: task -> metric name of every task (the rows of the evaluation tables).
        bars: show tqdm progress bars (`ProgressCallback`) or print lines only (`PrinterCallback`).
        stage_callback: the trainer's `StageSwitchCallback`, whose planned switch step is printed when training
            starts (optional).
    """

    def __init__(self, task_metrics: dict[str, str], bars: bool = True, stage_callback=None):
        super().__init__()
        if not isinstance(task_metrics, dict):
            raise ValueError(f"task_metrics must be a dict of task -> metric name, got {type(task_metrics).__name__}.")
        self.task_metrics = dict(task_metrics)
        self.bars = bars
        self.stage_callback = stage_callback
        self.current_step = 0
        # Batches of the whole evaluation that is about to run (all tasks), set by `AlterTrainer.evaluate`.
        self.evaluation_batches = None

    # ---- bars ---------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        switch = getattr(self.stage_callback, "planned_switch_step", None)
        if state.is_world_process_zero and switch is not None and getattr(self.stage_callback, "stage", None) == 1:
            # (the StageSwitchCallback comes before this one and has planned the switch)
            print(f"Stage 1 until step {switch:,}, then stage 2 until step {state.max_steps:,}.", flush=True)
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self.bars or (self.training_bar is not None and not _interactive()):
            return
        bar = self.prediction_bar
        if bar is not None and has_length(eval_dataloader) and bar.total is not None and bar.n >= bar.total:
            # A per-task evaluation runs one dataloader per task under one bar: the next task's batches extend it
            # (when the trainer did not announce the total, `evaluation_batches`).
            bar.total += len(eval_dataloader)
            bar.refresh()
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if bar is None and self.prediction_bar is not None and self.evaluation_batches:
            self.prediction_bar.total = self.evaluation_batches
            self.prediction_bar.refresh()

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluation_batches = None
        super().on_evaluate(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_end(args, state, control, **kwargs)

    # ---- lines --------------------------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        if self.bars and self.training_bar is None:  # as ProgressCallback: nothing outside training
            return
        text = self.format(logs, state, kwargs.get("model"))
        if text:
            if self.training_bar is not None:
                self.training_bar.write(text)
            else:
                print(text, flush=True)

    def format(self, logs: dict, state, model=None) -> str:
        """The text printed for one `Trainer.log` call (empty for nothing)."""
        logs = {key: value for key, value in logs.items() if key != "total_flos"}
        stage = getattr(getattr(model, "config", None), "stage", None)
        if "train_runtime" in logs:
            runtime = logs["train_runtime"]
            rate = logs.get("train_steps_per_second")
            loss = logs.get("train_loss")
            parts = [f"Training done: {state.global_step:,} steps in {_duration(runtime)}"]
            if rate:
                parts.append(f" ({rate:.2f} steps/s)")
            if loss is not None and math.isfinite(loss):
                parts.append(f", mean training loss {loss:.4f}")
            return "".join(parts) + "."
        if "stage2_trainable_parameters" in logs:
            return (f"Switched to stage 2 at step {state.global_step:,}: "
                    f"{logs['stage2_trainable_parameters']:,} trainable parameters (gate, task embeddings, shared "
                    f"adapters), {logs.get('stage2_frozen_parameters', 0):,} frozen.")
        prefix = _eval_prefix(logs, self.task_metrics)
        if prefix is not None:
            where = f"Stage {stage} (step {state.global_step})" if stage is not None else f"Step {state.global_step}"
            present = {task: metric for task, metric in self.task_metrics.items()
                       if f"{prefix}_{task}_loss" in logs or f"{prefix}_{task}_{metric}" in logs}
            return "\n" + per_task_table(where, logs, present, prefix) + "\n"
        if "loss" in logs:
            head = f"step {state.global_step:,}/{state.max_steps:,}" if state.max_steps else f"step {state.global_step}"
            first = [key for key in ("stage", "loss", "aux_loss") if key in logs]
            rest = [f"{key} {_number(logs[key])}" for key in [*first, *(k for k in logs if k not in first)]]
            return " · ".join([head, *rest])
        shown = {key: value for key, value in logs.items() if not key.endswith(_SPEED_SUFFIXES)}
        return " · ".join(f"{key} {_number(value)}" for key, value in shown.items())


def _eval_prefix(logs: dict, task_metrics: dict[str, str]) -> str | None:
    """The metric prefix (`eval`, `test`, ...) of a per-task evaluation's logs, or None for other logs."""
    for key in logs:
        if key.endswith("_mean_score"):
            return key[: -len("_mean_score")]
        for task in task_metrics:
            if key.endswith(f"_{task}_loss"):
                return key[: -len(f"_{task}_loss")]
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def _interactive() -> bool:
    stream = sys.stderr  # tqdm writes to stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def install_console(trainer, task_metrics: dict[str, str], stage_callback=None) -> None:
    """Replaces the trainer's default `ProgressCallback` / `PrinterCallback` (exactly those classes) by an
    `AlterProgressCallback` with the same role."""
    handler = trainer.callback_handler
    for index, callback in enumerate(list(handler.callbacks)):
        if type(callback) in (ProgressCallback, PrinterCallback):
            handler.callbacks[index] = AlterProgressCallback(
                task_metrics, bars=type(callback) is ProgressCallback, stage_callback=stage_callback)


__all__ = ["AlterProgressCallback", "install_console", "per_task_table"]
