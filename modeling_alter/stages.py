"""ALTER's two training stages in one `train()` call of any `transformers.Trainer` subclass.

[`AlterStagesMixin`] goes first in the bases of a trainer class: `Trainer`, `Seq2SeqTrainer`, TRL's `SFTTrainer`, or
your own subclass of them. [`AlterTrainer`] is `AlterStagesMixin` + `Seq2SeqTrainer` + per-task evaluation.

```python
from trl import SFTConfig, SFTTrainer
from modeling_alter import AlterStagesMixin, StageSwitchCallback


class AlterSFTTrainer(AlterStagesMixin, SFTTrainer):
    pass


trainer = AlterSFTTrainer(
    model=alter_model, args=SFTConfig("out", max_steps=100), train_dataset=data,  # data with a task_ids column
    processing_class=tokenizer, callbacks=[StageSwitchCallback(stage1_steps=60, stage2_learning_rate=1e-3)],
)
trainer.train()  # steps 1-60 stage 1, then stage 2 with its own optimizer and schedule
```

Why a mixin and not a callback alone: `Trainer.train` creates the optimizer from the parameters that require grad,
wraps the model for DDP (which registers exactly those), and on resume loads the optimizer and scheduler states, all
before the first callback event that sees the optimizer (`on_train_begin`); and it restores callback states only
with `restore_callback_states_from_checkpoint=True`. A callback can therefore neither give stage 2's parameters to
DDP nor resume a stage-2 checkpoint into an optimizer of the right shape. Transformers' documented way to change the
optimizer and schedule is to override `create_optimizer` / `create_scheduler` in a subclass, which is what this mixin
does; the [`StageSwitchCallback`] decides when to switch and records the stage in checkpoints, as before.
"""

import contextlib
import inspect
import json
import math
import os
import shutil

from transformers.optimization import get_scheduler
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint, has_length
from transformers.utils import logging

from .callback import StageSwitchCallback
from .configuration_mta import differing_mta_settings
from .data import TASK_COLUMNS, TaskIdsCollator
from .peft_wrapping import (MTA_WEIGHTS_NAME, load_mta_weights, mta_weights_stage, save_mta_weights,
                            unwrap_alter_model)

logger = logging.get_logger(__name__)


TRAINER_STATE_NAME = "trainer_state.json"


def check_supported_options(args) -> None:
    """Raises a `ValueError` naming a `TrainingArguments` option that ALTER cannot honour (reentrant activation
    checkpointing, `every_n_layers` other than 1, `ddp_find_unused_parameters=False`, TRL's `packing` and
    `padding_free`)."""
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        kwargs = getattr(args, name, None)
        if not isinstance(kwargs, dict):
            continue
        if kwargs.get("use_reentrant"):
            raise ValueError(
                f"{name}={kwargs!r} is not supported by ALTER: reentrant checkpointing loses the gradient of the "
                "router's load-balancing loss and needs every block input to require grad. Use "
                "{'use_reentrant': False} (the default); the other torch.utils.checkpoint options are honoured."
            )
        if kwargs.get("every_n_layers", 1) != 1:
            raise ValueError(
                f"{name}={kwargs!r}: every_n_layers={kwargs['every_n_layers']!r} is not supported by ALTER, which "
                "checkpoints every block of the encoder and decoder; leave it out (or 1)."
            )
    if getattr(args, "ddp_find_unused_parameters", None) is False:
        raise ValueError(
            "ddp_find_unused_parameters=False is not valid for ALTER: a batch trains only the task adapters of the "
            "tasks it contains, and each stage freezes part of the model, so DDP must find unused parameters."
        )
    if getattr(args, "packing", False) or getattr(args, "eval_packing", False):
        raise ValueError(
            "packing=True (or eval_packing=True) is not supported for ALTER models: TRL's packing concatenates "
            "examples of different tasks into one sequence and keeps only input_ids and labels, while ALTER routes "
            "each example (one task id per sequence) to its own task adapter. Set packing=False (and "
            "eval_packing=False)."
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "padding_free=True is not supported for ALTER models: it flattens the batch into one sequence, which "
            "has one task id, while ALTER routes each example to its own task adapter. Set padding_free=False."
        )


class AlterStagesMixin:
    r"""
    Makes any `transformers.Trainer` subclass train an ALTER model's two stages in one `train()` call: put it first in
    the bases (`class AlterSFTTrainer(AlterStagesMixin, SFTTrainer): pass`). The constructor takes the base trainer's
    arguments unchanged.

    - **The switch**: a [`StageSwitchCallback`] passed in `callbacks` (or, with [`AlterTrainingArguments`], made
      from their `stage*` fields; with neither, the model trains in the stage it is in). At its step it calls
      `model.set_stage(2)` and `rebuild_optimizer_and_scheduler`: a new optimizer (`args.optim`, or
      `optimizer_cls_and_kwargs`) over exactly the stage-2 parameters, with `stage2_learning_rate`, and a new schedule
      (`stage2_lr_scheduler_type`, `stage2_warmup_steps`) over the remaining steps. The stage-1 schedule ends at the
      switch. Frozen parameters get no gradient and no optimizer state, so they stay bit-identical.
    - **Resume**: checkpoints record the stage (the callback's state in `trainer_state.json`, `stage` in
      `config.json`); `train(resume_from_checkpoint=...)` sets the model to that stage before the optimizer is built,
      so a stage-2 checkpoint's optimizer and schedule load into a stage-2 optimizer, and training continues exactly.
      A checkpoint whose MTA settings (`MTA_SHAPE_FIELDS`) differ from the model's is refused.
    - **Data**: a dataset's `task_ids` column (ints) or `task` column (task names) reaches the model as `task_ids`
      [batch]: both columns survive `remove_unused_columns`, and the trainer's collator is wrapped in a
      [`TaskIdsCollator`] (TRL's collators build the batch from `input_ids`/`labels` only). Without either column,
      a model with `config.task_prefixes` routes by prompt prefix. TRL's `packing` and `padding_free` are refused
      (one sequence would hold several tasks).
    - **PEFT**: a PEFT model around an ALTER model (given as `model`, or made by `SFTTrainer(peft_config=...)`)
      gets `route_task_ids_through` (PEFT's task-typed wrappers drop `task_ids`), and its injected adapters (LoRA)
      train in stage 1 with the task adapters instead of the backbone (see `peft_adapter_parameter_names`).
      Checkpoints and `save_model` also write ALTER's own weights, which PEFT does not save, as
      `alter_mta.safetensors`; resume and `load_best_model_at_end` read them (`peft_wrapping`). Prompt-learning PEFT
      methods, and PEFT under FSDP or DeepSpeed, are refused.
    - **Hub pushes during training** (`push_to_hub=True`) carry the model's code files and that weight file too.
    - **Distributed**: DDP registers the parameters of both stages when it wraps the model (so those that become
      trainable at the switch are all-reduced) and must find unused parameters (`ddp_find_unused_parameters` is set
      to `True`; `False` raises); FSDP1 needs `use_orig_params=True` (checked); DeepSpeed fixes its parameter groups
      at initialisation, so a switch inside one `train()` is refused with the two-call recipe.
    - **Many tasks**: during `train()` every task adapter is a parameter of its own (`model.split_task_adapters()`),
      so a step touches only the tasks of its batch (not under FSDP or DeepSpeed).

    `model_init` and `optimizers` are refused (each stage builds its own optimizer); pass `optimizer_cls_and_kwargs`
    to choose the optimizer class of both stages.
    """

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        arguments = bound.arguments
        if arguments.get("model_init") is not None:
            raise ValueError(f"{type(self).__name__} does not support `model_init`: pass the ALTER model as `model`.")
        optimizers = arguments.get("optimizers")
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError(
                f"{type(self).__name__} does not accept `optimizers`: it builds a new optimizer and schedule for each "
                "ALTER stage. Pass `optimizer_cls_and_kwargs` to choose the optimizer class of both stages."
            )
        training_args = arguments.get("args")
        if training_args is not None:
            check_supported_options(training_args)
        callbacks = list(arguments.get("callbacks") or [])
        given = [cb for cb in callbacks if isinstance(cb, StageSwitchCallback)]
        if len(given) > 1:
            raise ValueError(f"Pass at most one StageSwitchCallback, got {len(given)}.")
        if given:
            if training_args is not None:
                given[0].merge_args(training_args)  # the callback becomes the one source of truth; disagreements raise
        else:
            from_args = training_args is not None and hasattr(training_args, "stage1_steps")
            callbacks.append(StageSwitchCallback.from_args(training_args) if from_args else StageSwitchCallback())
        arguments["callbacks"] = callbacks
        super().__init__(*bound.args, **bound.kwargs)
        check_supported_options(self.args)
        model = self.alter_model  # raises for a model that is not ALTER
        if model is not self.model and type(self.model).__module__.startswith("peft."):
            model.route_task_ids_through(self.model)
            model.peft_adapter_parameter_names()  # raises for an adapter inside an MTA module
        train_tasks = getattr(self.args, "train_tasks", None)
        if train_tasks is not None:
            model.set_train_tasks(train_tasks)
        if self.data_collator is not None and not isinstance(self.data_collator, TaskIdsCollator):
            self.data_collator = TaskIdsCollator(self.data_collator, model.config.task_names)
        self.stage_callback.bind(self)

    # ---- model and stage ----------------------------------------------------------------------------------------

    @property
    def alter_model(self):
        """The unwrapped ALTER model (outside DDP/FSDP/compile and PEFT wrappers)."""
        return unwrap_alter_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    @property
    def stage_callback(self) -> StageSwitchCallback:
        """The [`StageSwitchCallback`] of this trainer (bound to it)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StageSwitchCallback):
                callback.bind(self)
                return callback
        raise ValueError(f"{type(self).__name__} has no StageSwitchCallback: do not remove it from the callbacks.")

    @property
    def stage1_metrics(self) -> dict | None:
        """Evaluation metrics of the stage-1 model, taken just before the switch (see `eval_on_switch`)."""
        return self.stage_callback.stage1_metrics

    def _set_signature_columns_if_needed(self):
        # Keep the task columns through `remove_unused_columns` (TRL lists only input_ids, labels and seq_lengths).
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            column for column in TASK_COLUMNS if column not in self._signature_columns
        ]

    def _resolve_checkpoint(self, resume_from_checkpoint):
        if resume_from_checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
            return checkpoint
        if resume_from_checkpoint in (None, False):
            return None
        return str(resume_from_checkpoint)

    def _restore_stage(self, checkpoint: str) -> None:
        """Reads the stage recorded in `checkpoint` (callback state, and `stage` of its `config.json`)."""
        callback = self.stage_callback
        config_stage = None
        config_path = os.path.join(checkpoint, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                stored = json.load(handle)
            config_stage = stored.get("stage")
            differ = differing_mta_settings(stored, self.alter_model.config)
            if differ:
                # Trainer loads a checkpoint with strict=False: a differing form or activation would pass unnoticed.
                raise ValueError(
                    f"Checkpoint {checkpoint} was written by an ALTER model built otherwise ({'; '.join(differ)}): "
                    "build the model with the settings it was trained with to resume.")
        attributes = None
        state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if os.path.isfile(state_path):
            stored = TrainerState.load_from_json(state_path).stateful_callbacks.get(type(callback).__name__)
            if isinstance(stored, list):
                stored = stored[0] if stored else None
            if stored is not None:
                attributes = stored.get("attributes", {})
        if attributes is not None and attributes.get("stage") is not None:
            callback.restore(attributes)
            if config_stage is not None and config_stage != callback.stage:
                raise ValueError(
                    f"Checkpoint {checkpoint} is inconsistent: its trainer state says stage {callback.stage} but its "
                    f"config.json says stage {config_stage}."
                )
        elif config_stage is not None:
            callback.restore({"stage": config_stage, "switch_step": None, "stage1_metrics": None})
        else:
            raise ValueError(f"Checkpoint {checkpoint} records no ALTER stage (no config.json nor stage state).")

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Runs both stages (see [`Trainer.train`]). Resuming from a checkpoint continues in the stage it records, with
        that stage's optimizer and schedule.
        """
        self._check_peft_support()
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        callback = self.stage_callback
        model = self.alter_model
        if checkpoint is not None:
            self._restore_stage(checkpoint)
        else:
            callback.reset(model.config.stage)
            if model.config.stage == 2 and callback.configures_switch:
                raise ValueError(
                    f"The model is already in stage 2 but a switch is configured (stage1_steps={callback.stage1_steps!r},"
                    f" stage1_epochs={callback.stage1_epochs!r}): call model.set_stage(1) first, or unset both to "
                    "train stage 2 only."
                )
        model.set_stage(callback.stage)
        switch_during_training = callback.stage == 1 and callback.configures_switch and callback.stage1_steps != 0
        if self.is_deepspeed_enabled and switch_during_training:
            raise ValueError(
                "DeepSpeed fixes the trainable parameters and optimizer groups when it initializes its engine, so "
                "ALTER cannot switch stages inside one train() call under DeepSpeed. Train the stages in two calls: "
                "(1) with stage1_steps/stage1_epochs unset, train stage 1 and save; (2) call model.set_stage(2) and "
                "train again with a new trainer (learning_rate = the stage-2 learning rate)."
            )
        if getattr(self.args, "fsdp", None) and not self.is_fsdp_enabled:
            # Accelerate enables FSDP only on accelerators: on CPU (gloo) the distributed type stays MULTI_CPU and the
            # model is wrapped in DDP without a word. Say so; docs/distributed.md has the FSDP2 recipe for CPU.
            logger.warning(
                "The training arguments ask for FSDP (fsdp=%r) but Accelerate did not enable it (distributed type %s; "
                "it enables FSDP only on GPUs and other accelerators): every process holds the whole model and "
                "trains with %s. On CPU, shard with modeling_alter.distributed.fully_shard_alter in a loop of your "
                "own (docs/distributed.md).", self.args.fsdp, self.accelerator.distributed_type,
                "DDP" if self.args.world_size > 1 else "one process")
        if self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) == 1 and not getattr(plugin, "use_orig_params", False):
                raise ValueError(
                    "FSDP with use_orig_params=False flattens parameters with different requires_grad together, "
                    "which ALTER's stages cannot train: set fsdp_config={'use_orig_params': True}."
                )
        # One parameter per task adapter while training (see "Many tasks" in the class docstring).
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            model.split_task_adapters()
        if self.optimizer is not None:  # an earlier train() call's: it holds that call's per-task parameters
            accelerated = getattr(self.accelerator, "_optimizers", None)
            if accelerated is not None and self.optimizer in accelerated:
                accelerated.remove(self.optimizer)
            self.optimizer, self.lr_scheduler = None, None
        try:
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            model.merge_task_adapters()

    def set_initial_training_values(self, args, dataloader):
        callback = self.stage_callback
        if callback.stage1_steps is None and callback.stage1_epochs is not None and not has_length(dataloader):
            # Trainer then counts the whole run (max_steps) as one epoch: stage1_epochs would mean a share of the run.
            raise ValueError(
                f"stage1_epochs={callback.stage1_epochs!r} needs a training set with a length, but this one has none "
                "(an IterableDataset, e.g. a streamed dataset): set stage1_steps instead.")
        values = super().set_initial_training_values(args, dataloader)
        num_update_steps_per_epoch, max_steps = values[1], values[-1]
        planned = callback.plan(num_update_steps_per_epoch, max_steps)
        if callback.stage == 1 and planned == 0:
            self.alter_model.set_stage(2)
            callback.stage, callback.switch_step = 2, 0
        if callback.stage == 2 and callback.switch_step is None:
            # A stage-2 checkpoint written without callback state: assume the configured switch.
            callback.switch_step = planned or 0
        return values

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # The step at whose end the switch happened is a stage-1 step: its log line comes first, then the switch's.
        result = super()._maybe_log_save_evaluate(*args, **kwargs)
        self.stage_callback.report_switch()
        return result

    def _save(self, output_dir=None, state_dict=None):
        """`Trainer._save` without Transformers' "Writing model shards" progress bar (the trainer shows its own, and a
        bar opened under the training bar (checkpoints) writes cursor-up characters into logs); for a PEFT-wrapped
        model also ALTER's own weights, which PEFT does not save (`peft_wrapping.save_mta_weights`)."""
        enabled = logging.is_progress_bar_enabled()
        if enabled:
            logging.disable_progress_bar()
        try:
            result = super()._save(output_dir, state_dict)
        finally:
            if enabled:
                logging.enable_progress_bar()
        if self.args.should_save and self._under_peft():
            save_mta_weights(self.alter_model, output_dir if output_dir is not None else self.args.output_dir)
        return result

    def _under_peft(self) -> bool:
        """Whether the trained model is a PEFT wrapper around the ALTER model (whose own weights PEFT does not save)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False) is not self.alter_model

    def _check_peft_support(self) -> None:
        """Refuses what ALTER does not support under PEFT: prompt-learning methods (prompt, prefix and P-tuning put
        virtual tokens before every input; only adapters injected into the backbone's layers, such as LoRA, were
        built and tested), and FSDP or DeepSpeed, whose sharded or engine-held weights ALTER's own weight file beside
        PEFT's (`alter_mta.safetensors`) is not written from."""
        if not self._under_peft():
            return
        wrapper = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        config = getattr(wrapper, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"PEFT's {config.peft_type} is a prompt-learning method, which ALTER does not support: use an adapter "
                "injected into the backbone's layers, such as LoraConfig(target_modules=[...]).")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "ALTER under PEFT is not supported with FSDP or DeepSpeed: PEFT saves only its own adapter, and ALTER "
                f"writes its task adapters and gate beside it ({MTA_WEIGHTS_NAME}) from the unsharded model. Train "
                "with DDP (or one process), or without PEFT.")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """`Trainer._load_from_checkpoint`; under PEFT also ALTER's own weights (`peft_wrapping.load_mta_weights`),
        which must record the stage the resumed run restored."""
        if self._under_peft():
            stage = mta_weights_stage(resume_from_checkpoint)
            if stage is None:
                raise ValueError(
                    f"Checkpoint {resume_from_checkpoint} holds PEFT's adapter but not ALTER's own weights "
                    f"({MTA_WEIGHTS_NAME}): it was not written by a trainer with AlterStagesMixin, and resuming from "
                    "it would restart the task adapters and gate from their initial values.")
            if stage != self.stage_callback.stage:
                raise ValueError(
                    f"Checkpoint {resume_from_checkpoint} is inconsistent: its trainer state says stage "
                    f"{self.stage_callback.stage} but its {MTA_WEIGHTS_NAME} says stage {stage}.")
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._under_peft():
            load_mta_weights(self.alter_model, resume_from_checkpoint, set_stage=False)

    def _load_best_model(self):
        """`Trainer._load_best_model`; under PEFT also ALTER's own weights of the best checkpoint (the run keeps its
        stage). A best checkpoint without them is skipped with a warning, as `Trainer` skips one without weights."""
        checkpoint = self.state.best_model_checkpoint
        if self._under_peft() and (checkpoint is None or mta_weights_stage(checkpoint) is None):
            logger.warning(
                "Could not load the best model: %s has PEFT's adapter but not ALTER's own weights (%s); the model "
                "keeps the weights of the last step.", checkpoint, MTA_WEIGHTS_NAME)
            return
        super()._load_best_model()
        if self._under_peft():
            load_mta_weights(self.alter_model, checkpoint, set_stage=False)

    def _push_from_checkpoint(self, checkpoint_folder):
        """`Trainer._push_from_checkpoint`, which copies a fixed list of files (config, weights, PEFT's adapter) from
        the checkpoint into `output_dir` and uploads that folder: the model's code files (which the config's
        `auto_map` names) and, under PEFT, ALTER's own weight file go along, so that every push loads."""
        if self.is_world_process_zero() and os.path.isdir(checkpoint_folder):
            for name in os.listdir(checkpoint_folder):
                if name.endswith(".py") or name == MTA_WEIGHTS_NAME:
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        return super()._push_from_checkpoint(checkpoint_folder)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        """
        The base trainer's `compute_loss`; when the model's `forward` was replaced by one that computes the loss from
        the backbone (TRL's fused LM head: `SFTTrainer` calls `model.model` itself, bypassing the ALTER model's loss),
        adds the router's load-balancing loss as the ALTER model adds it to its own loss: `router_aux_loss_coef *
        aux_loss * (label tokens of the batch / num_items_in_batch)`.
        """
        alter = self.alter_model
        coef = alter.config.router_aux_loss_coef
        patched = "forward" in alter.__dict__ and not alter.config.is_encoder_decoder
        if not (patched and model.training and coef > 0 and alter.config.stage == 2):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        recorded = []
        handle = alter.base_model.register_forward_hook(
            lambda module, args, output: recorded.append(getattr(output, "aux_loss", None)))
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch, **kwargs)
        finally:
            handle.remove()
        aux = next((a for a in reversed(recorded) if a is not None and a.requires_grad), None)
        if aux is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        labels = inputs.get("labels")
        weight = 1.0
        if num_items_in_batch is not None and labels is not None:
            weight = (labels[:, 1:] != -100).sum().to(aux.device) / num_items_in_batch
        loss = loss + coef * aux.to(loss.device) * weight
        return (loss, outputs) if return_outputs else loss

    # ---- optimizer, schedule and distributed wrapping ------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        if self.args.ddp_find_unused_parameters is None:
            # A batch trains only the task adapters of its tasks, and each stage freezes part of the model.
            self.args.ddp_find_unused_parameters = True
        super().create_accelerator_and_postprocess()
        prepare_model = self.accelerator.prepare_model

        def prepare_model_with_all_stages(model, *args, **kwargs):
            # DDP registers the parameters that require grad when it wraps the model (and FSDP sets the flat
            # parameters' requires_grad): make the parameters of both stages trainable while wrapping, so that those
            # becoming trainable at the switch are all-reduced too; then restore the current stage.
            with self._all_stages_trainable(model):
                return prepare_model(model, *args, **kwargs)

        self.accelerator.prepare_model = prepare_model_with_all_stages

    @contextlib.contextmanager
    def _all_stages_trainable(self, model):
        try:
            inner = unwrap_alter_model(self.accelerator.unwrap_model(model, keep_torch_compile=False))
        except ValueError:
            yield
            return
        names = inner.trainable_parameter_names(1) | inner.trainable_parameter_names(2)
        saved = {name: p.requires_grad for name, p in inner.named_parameters()}
        for name, param in inner.named_parameters():
            param.requires_grad_(name in names)
        try:
            yield
        finally:
            for name, param in inner.named_parameters():
                param.requires_grad_(saved[name])

    def _stage_learning_rate(self) -> float:
        callback = self.stage_callback
        if callback.stage == 2 and callback.stage2_learning_rate is not None:
            return callback.stage2_learning_rate
        return self.args.learning_rate

    def create_optimizer(self, model=None):
        """
        Creates the optimizer of the current stage: `args.optim` (or `optimizer_cls_and_kwargs`) over exactly the
        parameters that train in it, with the stage's learning rate.
        """
        if self.optimizer is not None:
            return self.optimizer
        alter_model = self.alter_model
        stage = self.stage_callback.stage or alter_model.config.stage
        opt_model = self.model if model is None else model
        expected = alter_model.trainable_parameter_names(stage)
        trainable = {name for name, p in alter_model.named_parameters() if p.requires_grad}
        if trainable != expected:
            raise ValueError(
                f"The model's trainable parameters do not match stage {stage}: call model.set_stage({stage}) instead "
                f"of changing requires_grad by hand (unexpected: {sorted(trainable - expected)[:5]}, missing: "
                f"{sorted(expected - trainable)[:5]})."
            )
        optimizer = super().create_optimizer(opt_model)
        learning_rate = self._stage_learning_rate()
        inner = getattr(optimizer, "optimizer", optimizer)
        if alter_model.frozen_rows is not None:  # train_tasks: other tasks' rows stay exactly as they are
            alter_model.frozen_rows.attach(inner)
        for group in inner.param_groups:
            group["lr"] = learning_rate
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """
        Creates the learning-rate schedule of the current stage. Stage 1 runs `args.lr_scheduler_type` with
        `args.warmup_steps` until the switch; stage 2 runs `stage2_lr_scheduler_type` with `stage2_warmup_steps` from
        the switch to the end of training.
        """
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        callback = self.stage_callback
        if callback.stage != 2:
            stage1_steps = callback.planned_switch_step or num_training_steps
            return super().create_scheduler(stage1_steps, optimizer)
        num_steps = max(num_training_steps - (callback.switch_step or 0), 1)
        warmup = callback.stage2_warmup_steps
        warmup_steps = int(warmup) if warmup >= 1 else math.ceil(num_steps * warmup)
        self.lr_scheduler = get_scheduler(
            callback.stage2_lr_scheduler_type or self.args.lr_scheduler_type,
            optimizer=optimizer if optimizer is not None else self.optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=num_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def rebuild_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """
        Replaces the optimizer and the learning-rate schedule by new ones for the model's current trainable set (used
        by [`StageSwitchCallback`] at the switch). The distributed wrapper of the model is kept: it already registers
        the parameters of both stages.
        """
        old = self.optimizer
        accelerated = getattr(self.accelerator, "_optimizers", None)
        if accelerated is not None and old in accelerated:
            accelerated.remove(old)
        self.optimizer, self.lr_scheduler = None, None
        self.create_optimizer()
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.create_scheduler(num_training_steps=num_training_steps, optimizer=self.optimizer)
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler


__all__ = ["AlterStagesMixin", "check_supported_options", "unwrap_alter_model"]
