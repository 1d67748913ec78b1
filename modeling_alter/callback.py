"""The switch from ALTER's stage 1 to stage 2 inside one `trainer.train()` call.

[`StageSwitchCallback`] decides *when* to switch (after a number of optimizer steps or epochs of stage 1) and performs
the switch: `model.set_stage(2)`, a new optimizer over exactly the stage-2 trainable parameters, a new learning-rate
schedule with its own learning rate and warm-up, and a log line with the trainable-parameter counts. It records the
stage and the step of the switch in the checkpoints (`trainer_state.json`, through [`ExportableState`]), so that
`trainer.train(resume_from_checkpoint=...)` continues in the right stage with the right optimizer and schedule.

It works together with [`AlterStagesMixin`] (of [`AlterTrainer`], or of any `Trainer` subclass that puts it first in
its bases), which binds it, restores its state when resuming, builds stage-aware optimizers and schedules, and keeps
distributed wrappers correct across the switch. This file imports neither (the trainer imports the callback, as in
Transformers).
"""

import logging
import math

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import SchedulerType

from .mta import task_parameter_of


logger = logging.getLogger(__name__)


def _check_optional_number(name, value, minimum, integer):
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r} is not valid: expected {kind} >= {minimum}.")


def validate_stage_arguments(
    stage1_steps=None,
    stage1_epochs=None,
    stage2_learning_rate=None,
    stage2_warmup_steps=0,
    stage2_lr_scheduler_type=None,
):
    """Raises a `ValueError` naming the bad value if the stage-switch settings are inconsistent."""
    if stage1_steps is not None and stage1_epochs is not None:
        raise ValueError(
            f"Set only one of stage1_steps={stage1_steps!r} and stage1_epochs={stage1_epochs!r}: the switch to "
            "stage 2 happens after a number of optimizer steps or after a number of epochs."
        )
    _check_optional_number("stage1_steps", stage1_steps, 0, integer=True)
    _check_optional_number("stage1_epochs", stage1_epochs, 0, integer=False)
    if stage2_learning_rate is not None:
        if isinstance(stage2_learning_rate, bool) or not isinstance(stage2_learning_rate, (int, float)):
            raise ValueError(f"stage2_learning_rate={stage2_learning_rate!r} is not valid: expected a number > 0.")
        if not stage2_learning_rate > 0:
            raise ValueError(f"stage2_learning_rate={stage2_learning_rate!r} is not valid: expected a number > 0.")
    _check_optional_number("stage2_warmup_steps", stage2_warmup_steps, 0, integer=False)
    if stage2_warmup_steps is None:
        raise ValueError("stage2_warmup_steps=None is not valid: expected a number >= 0.")
    if stage2_lr_scheduler_type is not None:
        try:
            SchedulerType(stage2_lr_scheduler_type)
        except ValueError:
            valid = [member.value for member in SchedulerType]
            raise ValueError(
                f"stage2_lr_scheduler_type={stage2_lr_scheduler_type!r} is not valid: expected one of {valid}."
            ) from None


class StageSwitchCallback(TrainerCallback, ExportableState):
    r"""
    Switches an ALTER model from stage 1 (task adapters, and by default the backbone) to stage 2 (gate, task
    embeddings and shared adapters) once, during training.

    At the end of optimizer step `stage1_steps` (or of epoch `stage1_epochs`), it:

    1. evaluates the stage-1 model if `eval_on_switch` and the trainer has an evaluation dataset (the metrics are
       kept in `stage1_metrics` and in the checkpoints),
    2. calls `model.set_stage(2)`,
    3. replaces the trainer's optimizer by a new one over exactly the stage-2 trainable parameters, with learning
       rate `stage2_learning_rate` (default: the trainer's `learning_rate`),
    4. replaces the learning-rate schedule by a new one of type `stage2_lr_scheduler_type` (default: the trainer's
       `lr_scheduler_type`) over the remaining steps, with `stage2_warmup_steps` warm-up steps (a number >= 1) or
       fraction of the stage-2 steps (a number < 1), and
    5. logs the number of trainable and frozen parameters.

    Use it through [`AlterTrainer`], which creates it from its [`AlterTrainingArguments`], or takes the one passed in
    `callbacks` (then plain `Seq2SeqTrainingArguments` work too, and settings given both here and in
    `AlterTrainingArguments` must agree, see `merge_args`), or pass it in `callbacks` of any trainer class with
    [`AlterStagesMixin`] (e.g. TRL's `SFTTrainer`); it needs the trainer to rebuild the optimizer and is bound to it
    by the mixin.

    Args:
        stage1_steps (`int`, *optional*):
            Number of optimizer steps of stage 1. `0` trains stage 2 only.
        stage1_epochs (`float`, *optional*):
            Number of epochs of stage 1 (converted to optimizer steps, rounded up). Exclusive with `stage1_steps`.
            With neither, no switch happens and the model trains in the stage it is in.
        stage2_learning_rate (`float`, *optional*):
            Peak learning rate of stage 2.
        stage2_warmup_steps (`float`, defaults to 0):
            Warm-up of the stage-2 schedule: steps (>= 1) or a fraction of the stage-2 steps (< 1).
        stage2_lr_scheduler_type (`str`, *optional*):
            A `transformers.SchedulerType` value for stage 2.
        eval_on_switch (`bool`, defaults to `True`):
            Evaluate the stage-1 model just before the switch.

    Attributes recorded in checkpoints:
        stage (`int`): the stage training is in (`None` before training starts).
        switch_step (`int`): the global step at the end of which stage 2 began (`None` while in stage 1).
        planned_switch_step (`int`): the step at the end of which stage 2 begins (computed when training starts).
        stage1_metrics (`dict`): the evaluation metrics of the stage-1 model, if `eval_on_switch` evaluated it.
    """

    def __init__(
        self,
        stage1_steps: int | None = None,
        stage1_epochs: float | None = None,
        stage2_learning_rate: float | None = None,
        stage2_warmup_steps: float = 0,
        stage2_lr_scheduler_type: str | None = None,
        eval_on_switch: bool = True,
    ):
        validate_stage_arguments(
            stage1_steps, stage1_epochs, stage2_learning_rate, stage2_warmup_steps, stage2_lr_scheduler_type
        )
        self.stage1_steps = stage1_steps
        self.stage1_epochs = stage1_epochs
        self.stage2_learning_rate = stage2_learning_rate
        self.stage2_warmup_steps = stage2_warmup_steps
        self.stage2_lr_scheduler_type = (
            SchedulerType(stage2_lr_scheduler_type).value if stage2_lr_scheduler_type is not None else None
        )
        self.eval_on_switch = bool(eval_on_switch)
        self.stage = None
        self.switch_step = None
        self.stage1_metrics = None
        self.planned_switch_step = None
        self._trainer = None
        self._pending_report = None

    @classmethod
    def from_args(cls, args) -> "StageSwitchCallback":
        """Creates the callback from the stage fields of an [`AlterTrainingArguments`]."""
        return cls(
            stage1_steps=args.stage1_steps,
            stage1_epochs=args.stage1_epochs,
            stage2_learning_rate=args.stage2_learning_rate,
            stage2_warmup_steps=args.stage2_warmup_steps,
            stage2_lr_scheduler_type=args.stage2_lr_scheduler_type,
            eval_on_switch=args.eval_on_stage_switch,
        )

    # (name in AlterTrainingArguments, attribute of the callback) of every stage setting
    SETTINGS = (
        ("stage1_steps", "stage1_steps"),
        ("stage1_epochs", "stage1_epochs"),
        ("stage2_learning_rate", "stage2_learning_rate"),
        ("stage2_warmup_steps", "stage2_warmup_steps"),
        ("stage2_lr_scheduler_type", "stage2_lr_scheduler_type"),
        ("eval_on_stage_switch", "eval_on_switch"),
    )
    DEFAULTS = {
        "stage1_steps": None,
        "stage1_epochs": None,
        "stage2_learning_rate": None,
        "stage2_warmup_steps": 0,
        "stage2_lr_scheduler_type": None,
        "eval_on_switch": True,
    }

    def merge_args(self, args) -> None:
        """
        Makes this callback the one source of truth for the stage settings when both it and the training arguments
        (an `AlterTrainingArguments`) carry them: a setting left at its default on one side takes the other side's
        value; a setting given on both sides with different values raises a `ValueError` naming both. Arguments
        without stage settings (a plain `Seq2SeqTrainingArguments`) change nothing.
        """
        for arg_name, attribute in self.SETTINGS:
            if not hasattr(args, arg_name):
                continue
            value = getattr(args, arg_name)
            if arg_name == "stage2_lr_scheduler_type" and value is not None:
                value = SchedulerType(value).value
            if value == self.DEFAULTS[attribute]:  # the AlterTrainingArguments field's default (a test checks)
                continue
            mine = getattr(self, attribute)
            if mine != self.DEFAULTS[attribute] and mine != value:
                raise ValueError(
                    f"The StageSwitchCallback sets {attribute}={mine!r} but the training arguments set "
                    f"{arg_name}={value!r}: give each stage setting in one place (the callback or "
                    "AlterTrainingArguments), or the same value in both."
                )
            setattr(self, attribute, value)
        validate_stage_arguments(
            self.stage1_steps, self.stage1_epochs, self.stage2_learning_rate, self.stage2_warmup_steps,
            self.stage2_lr_scheduler_type,
        )

    @property
    def configures_switch(self) -> bool:
        """Whether a switch to stage 2 is configured (`stage1_steps` or `stage1_epochs` is set)."""
        return self.stage1_steps is not None or self.stage1_epochs is not None

    def bind(self, trainer) -> None:
        """Attaches the trainer whose model, optimizer and schedule the switch replaces."""
        self._trainer = trainer

    # ---- state recorded in checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {
                "stage1_steps": self.stage1_steps,
                "stage1_epochs": self.stage1_epochs,
                "stage2_learning_rate": self.stage2_learning_rate,
                "stage2_warmup_steps": self.stage2_warmup_steps,
                "stage2_lr_scheduler_type": self.stage2_lr_scheduler_type,
                "eval_on_switch": self.eval_on_switch,
            },
            "attributes": {
                "stage": self.stage,
                "switch_step": self.switch_step,
                "planned_switch_step": self.planned_switch_step,
                "stage1_metrics": self.stage1_metrics,
            },
        }

    def reset(self, stage: int) -> None:
        """Starts a fresh run in `stage` (no switch recorded yet unless the run starts in stage 2)."""
        self.stage = stage
        self.switch_step = None if stage == 1 else 0
        self.stage1_metrics = None

    def restore(self, attributes: dict) -> None:
        """Restores the attributes recorded in a checkpoint (see `state`)."""
        self.stage = attributes.get("stage")
        self.switch_step = attributes.get("switch_step")
        self.stage1_metrics = attributes.get("stage1_metrics")

    # ---- schedule of the switch ----------------------------------------------------------------------------------

    def plan(self, num_update_steps_per_epoch: int, max_steps: int) -> int | None:
        """
        Computes the global step at the end of which stage 2 begins (`planned_switch_step`), or `None` if no switch
        is configured, and checks that both stages get steps.
        """
        if self.stage1_steps is not None:
            step = self.stage1_steps
            setting = f"stage1_steps={self.stage1_steps}"
        elif self.stage1_epochs is not None:
            step = math.ceil(self.stage1_epochs * num_update_steps_per_epoch)
            setting = f"stage1_epochs={self.stage1_epochs} ({step} steps of {num_update_steps_per_epoch} per epoch)"
        else:
            self.planned_switch_step = None
            return None
        if step >= max_steps:
            raise ValueError(
                f"{setting} leaves no step for stage 2: training runs {max_steps} optimizer steps in total. Lower "
                "it, or raise num_train_epochs / max_steps."
            )
        self.planned_switch_step = step
        return step

    # ---- events -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer is None:
            raise ValueError(
                "StageSwitchCallback needs a trainer that builds each ALTER stage's optimizer: use AlterTrainer, or put "
                "modeling_alter.AlterStagesMixin first in your trainer's bases (e.g. `class AlterSFTTrainer("
                "AlterStagesMixin, SFTTrainer): pass`). A callback alone cannot: Trainer creates the optimizer, wraps "
                "the model for DDP and loads a resumed optimizer before any callback sees them (see "
                "docs/training-with-trl.md)."
            )
        if self.stage == 1 and self.planned_switch_step is not None:
            logger.info(
                f"ALTER: stage 1 until step {self.planned_switch_step}, then stage 2 until step {state.max_steps}."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.stage == 1 and self.planned_switch_step is not None and state.global_step >= self.planned_switch_step:
            # The evaluation and the log line of the switch go through the trainer's callbacks, which reset the
            # control flags that the step's own logging, evaluation and saving depend on: keep them.
            flags = (control.should_log, control.should_evaluate, control.should_save)
            self.switch(state, defer_report=True)
            control.should_log, control.should_evaluate, control.should_save = flags
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.report_switch()

    def report_switch(self) -> None:
        """Logs the switch's line and parameter counts if `switch(..., defer_report=True)` left them pending.
        `AlterTrainer` calls it after the step's own log line, which belongs to stage 1."""
        pending, self._pending_report = getattr(self, "_pending_report", None), None
        if pending is not None and self._trainer is not None:
            message, logs = pending
            logger.info(message)
            self._trainer.log(logs)

    def switch(self, state, defer_report: bool = False) -> None:
        """Performs the switch to stage 2 at the current step (see the class docstring). With `defer_report`, the
        log line of the switch waits for `report_switch` (after the last stage-1 step's own log line)."""
        trainer = self._trainer
        if trainer is None:
            raise ValueError("StageSwitchCallback.switch needs a trainer: use the callback through AlterTrainer or a "
                             "trainer with AlterStagesMixin.")
        if self.eval_on_switch and trainer.eval_dataset is not None:
            self.stage1_metrics = {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
        model = trainer.alter_model
        model.set_stage(2)
        self.stage = 2
        self.switch_step = state.global_step
        trainer.rebuild_optimizer_and_scheduler(state.max_steps)

        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        num_trainable = sum(p.numel() for name, p in model.named_parameters() if name in trainable)
        # (each task's own adapter parameters during training are views of the banks: counted once, as the banks)
        num_total = sum(p.numel() for name, p in model.named_parameters() if task_parameter_of(name) is None)
        group = trainer.optimizer.param_groups[0]
        learning_rate = group.get("initial_lr", group["lr"])  # the schedule's peak, not the warm-up's first value
        message = (
            f"ALTER: switched to stage 2 at step {state.global_step}: {num_trainable:,} trainable parameters in "
            f"{len(trainable)} tensors (gate, task embeddings, shared adapters), {num_total - num_trainable:,} "
            f"frozen; new optimizer and learning-rate schedule (peak learning rate {learning_rate:g})."
        )
        logs = {
            "stage": 2,
            "stage2_trainable_parameters": num_trainable,
            "stage2_frozen_parameters": num_total - num_trainable,
        }
        self._pending_report = (message, logs)
        if not defer_report:
            self.report_switch()


__all__ = ["StageSwitchCallback", "validate_stage_arguments"]
