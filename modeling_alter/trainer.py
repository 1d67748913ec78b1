"""Two-stage training and per-task evaluation of ALTER models with the Hugging Face `Trainer`.

[`AlterTrainer`] is a [`Seq2SeqTrainer`] that runs ALTER's two stages in one `trainer.train()` call (the switch is done
by a [`StageSwitchCallback`] configured from [`AlterTrainingArguments`]), evaluates each task of a dict of evaluation
sets with its own generation metric, logs the router's auxiliary loss and routing statistics, and saves a routing
heatmap at the end of training.

```python
from modeling_alter import AlterForConditionalGeneration, AlterConfig
from modeling_alter.data import MultiTaskDataCollator, build_eval_datasets, build_multitask_dataset
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments

args = AlterTrainingArguments("out", stage1_epochs=2, num_train_epochs=3, stage2_learning_rate=1e-3)
trainer = AlterTrainer(
    model=model, args=args, train_dataset=train_set, eval_dataset={"qa": qa_eval, "nli": nli_eval},
    processing_class=tokenizer, task_metrics={"qa": "token_f1", "nli": "accuracy"},
)
trainer.train()
trainer.evaluate()  # eval_qa_loss, eval_qa_token_f1, eval_nli_loss, eval_nli_accuracy, eval_loss, eval_mean_score, ...
```
"""

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
from torch.utils.data import SequentialSampler
from transformers.trainer_utils import has_length, speed_metrics

from .callback import StageSwitchCallback, validate_stage_arguments
from .console import AlterProgressCallback, install_console
from .metrics import METRICS, compute_metric
from .routing_report import ROUTING_HEATMAP_NAME, ROUTING_STATS_NAME, RoutingStatistics, mta_module_labels
from .stages import AlterStagesMixin, unwrap_alter_model


logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class AlterTrainingArguments(Seq2SeqTrainingArguments):
    r"""
    [`Seq2SeqTrainingArguments`] plus the settings of ALTER's two stages. Parse them with `HfArgumentParser`.

    The usual `learning_rate`, `lr_scheduler_type` and `warmup_steps` apply to stage 1, whose schedule ends at the
    switch; the `stage2_*` fields configure the new schedule of stage 2, which runs until `max_steps` /
    `num_train_epochs`. `predict_with_generate` defaults to `True` here, so that `evaluate()` reports generation
    metrics, and `ddp_find_unused_parameters` to `True`, which ALTER needs under DDP (a batch trains only the task
    adapters of the tasks it contains).
    """

    stage1_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of stage 1 (task adapters, and by default the backbone) before switching to "
            "stage 2 (gate, task embeddings, shared adapters). 0 trains stage 2 only. Exclusive with stage1_epochs; "
            "with neither, the model trains in the stage it is in."
        },
    )
    stage1_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of stage 1 (rounded up to optimizer steps). Exclusive with stage1_steps."}
    )
    stage2_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of stage 2 (default: learning_rate)."}
    )
    stage2_warmup_steps: float = field(
        default=0,
        metadata={"help": "Warm-up of stage 2: a number of steps (>= 1) or a fraction of the stage-2 steps (< 1)."},
    )
    stage2_lr_scheduler_type: str | None = field(
        default=None, metadata={"help": "Learning-rate schedule of stage 2 (default: lr_scheduler_type)."}
    )
    eval_on_stage_switch: bool = field(
        default=True,
        metadata={"help": "Evaluate the stage-1 model just before the switch (when there is an evaluation dataset)."},
    )
    save_routing_heatmap: bool = field(
        default=True,
        metadata={
            "help": f"At the end of training, save the per-task routing statistics ({ROUTING_STATS_NAME}) and a "
            f"heatmap of them ({ROUTING_HEATMAP_NAME}) into output_dir."
        },
    )
    routing_max_samples: int = field(
        default=1024,
        metadata={
            "help": "At most this many examples of the training set are used for the final routing statistics when "
            "there is no evaluation dataset."
        },
    )
    predict_with_generate: bool = field(
        default=True, metadata={"help": "Whether to use generate to calculate generative metrics (ROUGE, BLEU)."}
    )
    train_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train only these tasks (e.g. tasks added with model.add_tasks): their task adapters in stage 1 "
            "and their task-embedding rows in stage 2; every other task's outputs stay bit-identical (see "
            "AlterForConditionalGeneration.set_train_tasks). Default: every task."
        },
    )

    def __post_init__(self):
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True
        elif not self.ddp_find_unused_parameters:
            raise ValueError(
                "ddp_find_unused_parameters=False is not valid for ALTER: a batch trains only the task adapters of the "
                "tasks it contains, and each stage freezes part of the model, so DDP must find unused parameters."
            )
        if isinstance(self.routing_max_samples, bool) or not isinstance(self.routing_max_samples, int) or (
            self.routing_max_samples < 1
        ):
            raise ValueError(f"routing_max_samples={self.routing_max_samples!r} is not valid: expected an integer >= 1.")
        validate_stage_arguments(
            self.stage1_steps,
            self.stage1_epochs,
            self.stage2_learning_rate,
            self.stage2_warmup_steps,
            self.stage2_lr_scheduler_type,
        )
        super().__post_init__()


def _alter_setting(args, name):
    """An ALTER field of the training arguments, or its `AlterTrainingArguments` default for plain
    `Seq2SeqTrainingArguments`."""
    return getattr(args, name, AlterTrainingArguments.__dataclass_fields__[name].default)


def has_accelerator() -> bool:
    """Whether PyTorch sees an accelerator (CUDA, XPU, MPS, ...): `torch.accelerator.is_available()`, or
    `torch.cuda.is_available()` on a PyTorch older than 2.6, which has no `torch.accelerator`."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def causal_prompts(inputs, pad_token_id) -> tuple[dict[str, torch.Tensor], int]:
    """The prompts of a decoder-only batch (`input_ids` = prompt + answer, `labels` -100 on the prompt and padding):
    each row's non-padding tokens before its first label, left-padded for `generate`. Returns the generation inputs
    (`input_ids`, `attention_mask` `[batch, width]` and every other batch-sized input except `labels`, e.g.
    `task_ids`) and `width`."""
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    mask = inputs.get("attention_mask", torch.ones_like(input_ids)).bool()
    answer = (labels != -100).cumsum(1) > 0
    prompt = mask & ~answer
    lengths = prompt.sum(1)
    if int(lengths.min()) == 0:
        row = int(lengths.argmin())
        raise ValueError(
            f"Example {row} of the evaluation batch has no prompt token (its first token already has a label): a "
            "decoder-only model generates from the prompt, so tokenize with build_eval_datasets(..., decoder_only=True)."
        )
    width = int(lengths.max())
    pad = 0 if pad_token_id is None else int(pad_token_id)
    ids = input_ids.new_full((input_ids.shape[0], width), pad)
    attention = torch.zeros_like(ids)
    for i in range(input_ids.shape[0]):
        n = int(lengths[i])
        ids[i, width - n:] = input_ids[i][prompt[i]]
        attention[i, width - n:] = 1
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
    return {"input_ids": ids, "attention_mask": attention, **rest}, width


def trim_causal_batch(inputs: dict) -> dict:
    """A decoder-only training batch made cheaper at the language-model head, with the same loss and gradients.

    `inputs` holds `input_ids`, `attention_mask` and `labels` `[batch, length]` (-100 on prompt and padding). Only the
    positions that predict a label need logits, and the labels of prompt + answer examples sit at the end of the
    sequence: with `k` = 1 + the number of positions from the first label of the batch to the end, the batch gets
    `logits_to_keep=k` (the model's head then runs on the last `k` positions only) and `labels[:, -k:]`, which
    `AlterForCausalLM.forward` shifts against those logits exactly as it shifts the full ones. With left padding every
    answer ends at the last position, so `k` is the longest answer + 1; with right padding `k` also spans the
    shorter rows' prompt ends and padding (still exact, less saved). A batch without `attention_mask`, labels,
    `input_ids`, with `logits_to_keep` or `position_ids` already set, or whose labels start at position 0, is
    returned unchanged.

    It also adds `position_ids` counted from each row's first attended token (`attention_mask.cumsum(-1) - 1`), the
    positions `generate` gives left-padded prompts, so that a left-padded training row and the same prompt at
    generation see the same positions (right padding: unchanged positions for every token).
    """
    labels, mask = inputs.get("labels"), inputs.get("attention_mask")
    if labels is None or mask is None or inputs.get("input_ids") is None or labels.dim() != 2:
        return inputs
    if "logits_to_keep" in inputs or "position_ids" in inputs:
        return inputs
    has_label = labels != -100
    if not bool(has_label.any()):
        return inputs
    first = int(has_label.any(0).int().argmax())  # the first position that holds a label in any row
    if first == 0:
        return inputs
    keep = labels.shape[1] - first + 1
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {**inputs, "labels": labels[:, -keep:], "logits_to_keep": keep, "position_ids": position_ids}


def longest_first(dataset):
    """`dataset` with its rows ordered by decreasing `input_ids` length (ties keep their order), so that evaluation
    batches hold rows of similar length and pad less; the predictions and the `target_text` references are then
    paired in that same order, and the per-task metrics are means over rows (or corpus scores) that do not depend on
    it. A dataset without a `select` method or an `input_ids` column is returned unchanged."""
    if not hasattr(dataset, "select") or "input_ids" not in (getattr(dataset, "column_names", None) or ()):
        return dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return dataset if order == list(range(len(lengths))) else dataset.select(order)


class AlterTrainer(AlterStagesMixin, Seq2SeqTrainer):
    r"""
    A [`Seq2SeqTrainer`] for [`AlterForConditionalGeneration`] that trains both stages in one `train()` call and
    evaluates per task.

    - **Stages** ([`AlterStagesMixin`], which any other trainer class can use too): a [`StageSwitchCallback`] (made
      from `args`, or the one passed in `callbacks`) switches the model to stage 2 at the configured step or epoch; the
      optimizer holds exactly the current stage's trainable parameters, and each stage has its own learning rate and
      schedule. Checkpoints record the stage, so `train(resume_from_checkpoint=...)` continues in either stage exactly
      as the uninterrupted run. A dataset's `task_ids` or `task` column reaches the model; a PEFT model around an ALTER
      model routes its task ids as the ALTER model does.
    - **Loss**: the model's loss (cross-entropy summed over label tokens and divided by the number of label tokens of
      the whole accumulated batch, so gradient accumulation keeps the loss scale, plus `router_aux_loss_coef` times the
      router's load-balancing loss in stage 2). Training logs carry `aux_loss` (the unweighted auxiliary loss) and
      `stage`. A decoder-only model's training batches go through `trim_causal_batch`: the language-model head runs
      only on the trailing positions that predict labels (`logits_to_keep`), with the same loss; left-pad the
      training batches (`tokenizer.padding_side = "left"`) for the largest saving.
    - **Evaluation**: with a dict `{task: dataset}` as evaluation set, `evaluate()` reports per task
      `{prefix}_{task}_loss` and `{prefix}_{task}_{metric}` (the metric named by `task_metrics[task]`, default
      `exact_match`, computed on `model.generate(..., task_ids=...)` outputs against the dataset's `target_text`
      column or its decoded labels), their means `{prefix}_loss` and `{prefix}_mean_score`, and routing statistics
      per task (`{prefix}_{task}_routing_entropy`, `_routing_own_adapter`, `_routing_shared_adapters`; the per-module
      tables are in `trainer.routing_stats` and logged at INFO level). Each task's rows are evaluated longest first
      (`longest_first`: batches of similar lengths pad less), and a decoder-only model's loss forward runs the head
      only where labels are, as in training. A single dataset is evaluated as by `Seq2SeqTrainer`.
    - **End of training**: routing statistics on the evaluation set (or on up to `args.routing_max_samples` training
      examples) are saved to `routing_stats.json` and drawn in `routing_heatmap.png` in `args.output_dir`.
    - **Many tasks**: during `train()` every task adapter is also a parameter of its own (`model.split_task_adapters()`,
      views of the stacked banks, which are still what checkpoints hold), so a stage-1 step's backward pass, gradient
      clipping and optimizer (whichever `args.optim` names) touch only the tasks of its batch, at any number of tasks:
      each task's adapter trains exactly as a parameter of its own that gets no gradient, hence no update and no
      weight decay, on the steps whose batch does not contain its task. (Under FSDP and DeepSpeed, which flatten
      parameters into storage of their own, the banks train as stacked parameters.)
    - **Distributed**: DDP (`torchrun`, `accelerate launch`) registers the parameters of both stages when it wraps the
      model, so the parameters that become trainable at the switch are all-reduced; FSDP needs `use_orig_params=True`
      (checked); DeepSpeed fixes its parameter groups when it initializes, so a switch inside one `train()` call is
      refused with an explanation (train the two stages in two `train()` calls instead).

    Args:
        model ([`AlterForConditionalGeneration`]): the model to train.
        args ([`AlterTrainingArguments`]): the training arguments (default: `AlterTrainingArguments("trainer_output")`).
        task_metrics (`dict[str, str]`, *optional*): task name -> generation metric name, one of
            `modeling_alter.metrics.METRICS` (`exact_match`, `accuracy`, `token_f1`, `rouge_l`).
        optimizer_cls_and_kwargs (`tuple[type, dict]`, *optional*): the optimizer class and its keyword arguments for
            both stages (as in [`Trainer`]); the learning rate is each stage's.
        The other arguments are those of [`Seq2SeqTrainer`]. Without `data_collator`, a [`MultiTaskDataCollator`] over
        `processing_class` is used. `optimizers` and `model_init` are not accepted (each stage builds its own
        optimizer, and the ALTER model is given as `model`).
    """

    def __init__(
        self,
        model=None,
        args: AlterTrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        task_metrics: dict[str, str] | None = None,
        optimizer_cls_and_kwargs=None,
    ):
        if args is None:
            args = AlterTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, Seq2SeqTrainingArguments):
            raise ValueError(
                "AlterTrainer needs AlterTrainingArguments, or Seq2SeqTrainingArguments with the stage settings in a "
                f"StageSwitchCallback, got {type(args).__name__}."
            )
        if args.dataloader_pin_memory and not has_accelerator():
            # Pinned memory only speeds up copies to an accelerator; without one, PyTorch warns on every run.
            args.dataloader_pin_memory = False
        alter = unwrap_alter_model(model) if model is not None else None
        if alter is None:
            raise ValueError("AlterTrainer trains an AlterForConditionalGeneration or AlterForCausalLM, got None.")
        if not alter.config.is_encoder_decoder and args.label_smoothing_factor > 0:
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} is not supported for a decoder-only ALTER model "
                "(Trainer's label smoother would not shift its labels); use 0."
            )
        if data_collator is None and processing_class is not None and hasattr(processing_class, "pad"):
            from .data import MultiTaskDataCollator

            # With the model, `decoder_input_ids` come from the labels (as `DataCollatorForSeq2Seq(tok, model=...)`
            # makes them), so the forward still has decoder inputs when Trainer takes the labels out of the batch
            # (label smoothing, `compute_loss_func`).
            data_collator = MultiTaskDataCollator(processing_class, model=alter)
        self.task_metrics = self._check_task_metrics(task_metrics, alter.config.task_names)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # Seq2SeqTrainer does not forward it; Trainer.create_optimizer reads it for both stages.
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        # Progress bars, step lines, per-task tables and a summary line instead of Transformers' metric dicts.
        install_console(self, {task: self.task_metrics.get(task, "exact_match") for task in alter.config.task_names},
                        self.stage_callback)
        self.routing_stats = None
        self._routing_collector = None
        self._aux_loss_sum = torch.zeros(())
        self._aux_loss_count = 0
        self._last_train_stage = None

    @staticmethod
    def _check_task_metrics(task_metrics, task_names):
        task_metrics = dict(task_metrics or {})
        for task, metric in task_metrics.items():
            if task not in task_names:
                raise ValueError(f"task_metrics names an unknown task {task!r}; the model's tasks are {list(task_names)}.")
            if metric not in METRICS:
                raise ValueError(
                    f"task_metrics[{task!r}]={metric!r} is not a known metric; expected one of {sorted(METRICS)}."
                )
        return task_metrics

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Runs both stages (see [`AlterStagesMixin.train`] and [`Trainer.train`]). At the end, saves the routing
        statistics and heatmap (see `args.save_routing_heatmap`).
        """
        self._aux_loss_sum = torch.zeros(())
        self._aux_loss_count = 0
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        if _alter_setting(self.args, "save_routing_heatmap"):
            self.save_routing_report(self.args.output_dir)
        return output

    # ---- loss and logs ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        [`Trainer.compute_loss`]. When Trainer takes the labels out of the batch (label smoothing,
        `compute_loss_func`), the decoder inputs are made from them first if the collator did not make them, and with
        label smoothing the router's load-balancing loss is added as the model adds it to its own loss.
        """
        labels = inputs.get("labels")
        takes_labels = self.label_smoother is not None or self.compute_loss_func is not None
        if takes_labels and labels is not None and "decoder_input_ids" not in inputs and (
            "decoder_inputs_embeds" not in inputs
        ):
            inputs = {**inputs, "decoder_input_ids": self.alter_model.prepare_decoder_input_ids_from_labels(labels)}
        if model.training and not self.alter_model.config.is_encoder_decoder and not takes_labels:
            inputs = trim_causal_batch(inputs)  # the head only where labels are (same loss and gradients)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        coef = self.alter_model.config.router_aux_loss_coef
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if self.label_smoother is not None and self.compute_loss_func is None and labels is not None and (
            aux is not None and coef > 0
        ):
            weight = 1.0 if num_items_in_batch is None else (labels != -100).sum().to(aux.device) / num_items_in_batch
            loss = loss + coef * aux * weight
        if model.training:
            self._last_train_stage = self.alter_model.config.stage
            aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
            if aux_loss is not None:
                self._aux_loss_sum = self._aux_loss_sum.to(aux_loss.device) + aux_loss.detach().float()
                self._aux_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `stage` and `aux_loss` (mean unweighted router auxiliary loss since the last log) to training logs."""
        if "loss" in logs and self._last_train_stage is not None:
            logs["stage"] = self._last_train_stage
            if self._aux_loss_count:
                aux_loss = (self._aux_loss_sum / self._aux_loss_count).float()
                if self.accelerator.num_processes > 1:
                    aux_loss = self.accelerator.gather(aux_loss.to(self.accelerator.device)).mean()
                logs["aux_loss"] = round(float(aux_loss), 6)
                self._aux_loss_sum = torch.zeros(())
                self._aux_loss_count = 0
        super().log(logs, start_time)

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation batches in the dataset's order. Per-task scores pair the generations with the dataset's
        `target_text` column, and Transformers 5 also groups evaluation batches by length (a shuffled order) when
        `train_sampling_strategy="group_by_length"`; with several processes, Accelerate's sharding keeps the order and
        `gather_for_metrics` restores it."""
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def _new_routing_statistics(self) -> RoutingStatistics:
        model = self.alter_model
        config = model.config
        adapters = list(config.task_names) + [f"shared_{i}" for i in range(config.num_shared_adapters)]
        return RoutingStatistics(config.task_names, mta_module_labels(model), adapters)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """
        [`Seq2SeqTrainer.prediction_step`]; while routing statistics are collected (per-task evaluation), the loss
        forward also returns the routing weights, which are accumulated per task.
        """
        collector = self._routing_collector
        # A decoder-only model's inputs hold prompt + answer: generation must start from the prompt alone (below).
        causal = not self.alter_model.config.is_encoder_decoder and "labels" in inputs
        if not causal and (collector is None or "task_ids" not in inputs or "labels" not in inputs):
            with self._generation_config_kept():
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys,
                                               **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        collect = collector is not None and "task_ids" in inputs
        loss_only = prediction_loss_only or self.args.prediction_loss_only
        returns_logits = not loss_only and not self.args.predict_with_generate
        # Unless the logits are returned, the head runs only where labels are, as in training (the same loss).
        forward_inputs = trim_causal_batch(inputs) if causal and not returns_logits else inputs
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**forward_inputs, output_routing_weights=collect)
        if self.label_smoother is not None:
            loss = self.label_smoother(outputs, forward_inputs["labels"], shift_labels=causal).detach().mean()
        else:
            loss = outputs["loss"].detach().mean()
        if collect:
            statistics = (inputs["task_ids"], outputs["routing_weights"], outputs["routing_entropy"])
            if self.accelerator.num_processes > 1:
                # Every process accumulates the statistics of the whole batch, without the samples that the
                # distributed sampler repeats to even out the last batches.
                statistics = self.accelerator.gather_for_metrics(statistics)
            collector.update(*statistics)
        if loss_only:
            return loss, None, None
        labels = inputs["labels"]
        if returns_logits:
            return loss, outputs["logits"].detach(), labels
        generation_inputs = {
            k: v for k, v in inputs.items() if k not in ("labels", "decoder_input_ids", "decoder_attention_mask")
        }
        if causal:
            generation_inputs, width = causal_prompts(inputs, self.alter_model.generation_config.pad_token_id)
            gen_kwargs = gen_kwargs or dict(getattr(self, "_gen_kwargs", {}))
            if gen_kwargs.get("max_new_tokens") is None and gen_kwargs.get("max_length") is not None:
                # For a decoder-only model `generation_max_length` bounds the answer, as for an encoder-decoder.
                gen_kwargs["max_new_tokens"] = gen_kwargs.pop("max_length")
        with self._generation_config_kept():
            _, generated_tokens, _ = super().prediction_step(
                model, generation_inputs, prediction_loss_only=False, ignore_keys=ignore_keys, **gen_kwargs
            )
        if causal:  # the left-padded prompt comes back in front of the answer
            generated_tokens = generated_tokens[:, width:]
        return loss, generated_tokens, labels

    @contextlib.contextmanager
    def _generation_config_kept(self):
        """`Seq2SeqTrainer.prediction_step` fills the model's `generation_config` with Transformers' defaults
        (`max_length=20`, ...) after generating, which then warns on every later `generate(max_new_tokens=...)` and is
        saved with the model: evaluation leaves the model's generation config as it found it."""
        model = self.model
        saved = copy.deepcopy(getattr(model, "generation_config", None))
        try:
            yield
        finally:
            if saved is not None:
                saved._from_model_config = False  # as Seq2SeqTrainer leaves it: not rebuilt from the config per batch
                model.generation_config = saved

    def _decode(self, token_ids) -> list[str]:
        tokenizer = self.processing_class
        if tokenizer is None or not hasattr(tokenizer, "batch_decode"):
            raise ValueError("AlterTrainer needs `processing_class` (the tokenizer) to decode generations for metrics.")
        token_ids = np.asarray(token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        token_ids = np.where(token_ids < 0, pad, token_ids)
        return tokenizer.batch_decode(token_ids.tolist(), skip_special_tokens=True)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """
        Evaluates the model. With a dict `{task: dataset}` (passed, or as the trainer's `eval_dataset`), evaluates each
        task: loss, the task's generation metric (`task_metrics`, default `exact_match`) and routing statistics, plus
        the means over tasks `{prefix}_loss` and `{prefix}_mean_score` (see the class docstring). Otherwise behaves as
        [`Seq2SeqTrainer.evaluate`]. `gen_kwargs` go to `model.generate` (e.g. `max_new_tokens`, `num_beams`).
        """
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(datasets, dict):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix, **gen_kwargs)
        if not datasets:
            raise ValueError("eval_dataset is an empty dict: give at least one task's evaluation set.")

        self._memory_tracker.start()
        gen_kwargs = gen_kwargs.copy()
        if gen_kwargs.get("max_length") is None and gen_kwargs.get("max_new_tokens") is None:
            if self.args.generation_max_length is not None:
                gen_kwargs["max_length"] = self.args.generation_max_length
        if gen_kwargs.get("num_beams") is None and self.args.generation_num_beams is not None:
            gen_kwargs["num_beams"] = self.args.generation_num_beams
        self._gen_kwargs = gen_kwargs

        start_time = time.time()
        metrics, losses, scores, num_samples = {}, [], [], 0
        collector = self._new_routing_statistics()
        self._routing_collector = collector
        generate = self.args.predict_with_generate and not self.args.prediction_loss_only
        per_process = self.args.eval_batch_size * self.args.world_size
        for callback in self.callback_handler.callbacks:  # one progress bar over every task's batches
            if isinstance(callback, AlterProgressCallback):
                callback.evaluation_batches = sum(math.ceil(len(d) / per_process) for d in datasets.values())
        try:
            for task, dataset in datasets.items():
                # Drop the samples that distributed sampling repeats, so that predictions pair up with references.
                self.gather_function = self.accelerator.gather_for_metrics
                dataset = longest_first(dataset)
                dataloader = self.get_eval_dataloader(dataset)
                output = self.evaluation_loop(
                    dataloader,
                    description=f"Evaluation of {task}",
                    prediction_loss_only=not generate,
                    ignore_keys=ignore_keys,
                    metric_key_prefix=f"{metric_key_prefix}_{task}",
                )
                num_samples += output.num_samples
                metrics.update(output.metrics)
                loss = output.metrics.get(f"{metric_key_prefix}_{task}_loss")
                if loss is not None:
                    losses.append(loss)
                if generate and output.predictions is not None:
                    predictions = self._decode(output.predictions)
                    if hasattr(dataset, "column_names") and "target_text" in dataset.column_names:
                        references = list(dataset["target_text"])
                    elif output.label_ids is not None:
                        references = self._decode(output.label_ids)
                    else:
                        raise ValueError(
                            f"The evaluation set of task {task!r} has neither a `target_text` column nor labels, so "
                            "its generations cannot be scored."
                        )
                    metric = self.task_metrics.get(task, "exact_match")
                    score = compute_metric(metric, predictions, references)
                    metrics[f"{metric_key_prefix}_{task}_{metric}"] = score
                    scores.append(score)
        finally:
            self._routing_collector = None

        self.routing_stats = collector
        metrics.update(collector.summary(metric_key_prefix))
        collector.log_table(logger)
        if losses:
            metrics[f"{metric_key_prefix}_loss"] = float(np.mean(losses))
        if scores:
            metrics[f"{metric_key_prefix}_mean_score"] = float(np.mean(scores))
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(
                metric_key_prefix, start_time, num_samples=num_samples, num_steps=math.ceil(num_samples / total_batch_size)
            )
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    # ---- routing report -----------------------------------------------------------------------------------------

    def compute_routing_statistics(self, dataset=None) -> RoutingStatistics:
        """
        Runs the model (forward only) over `dataset` (a dataset with `task_ids`, or a dict of them; default: the
        evaluation set, else up to `args.routing_max_samples` training examples) and returns the per-task routing
        statistics. Every process must call it. Each pass ends as `Trainer.predict` ends one: callbacks get
        `on_predict` with its metrics (`routing_loss`).
        """
        if dataset is None:
            dataset = self.eval_dataset
        if dataset is None:
            dataset = self.train_dataset
            limit = _alter_setting(self.args, "routing_max_samples")
            if dataset is not None and hasattr(dataset, "select") and len(dataset) > limit:
                dataset = dataset.select(range(limit))
        if dataset is None:
            raise ValueError("compute_routing_statistics needs a dataset: the trainer has no evaluation or training set.")
        datasets = dataset if isinstance(dataset, dict) else {"all": dataset}
        collector = self._new_routing_statistics()
        self._routing_collector = collector
        try:
            for name, part in datasets.items():
                output = self.evaluation_loop(
                    self.get_eval_dataloader(part),
                    description=f"Routing statistics ({name})",
                    prediction_loss_only=True,
                    metric_key_prefix="routing",
                )
                self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        finally:
            self._routing_collector = None
        return collector

    def save_routing_report(self, output_dir: str | os.PathLike | None = None, dataset=None) -> RoutingStatistics:
        """
        Computes the routing statistics (see `compute_routing_statistics`) and saves them to `routing_stats.json` and
        `routing_heatmap.png` in `output_dir` (default `args.output_dir`) on the main process.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        stats = self.compute_routing_statistics(dataset)
        self.routing_stats = stats
        if self.args.should_save and stats.tasks_seen:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, ROUTING_STATS_NAME), "w", encoding="utf-8") as handle:
                json.dump({"stage": self.alter_model.config.stage, **stats.to_dict()}, handle, indent=2)
            stats.plot(
                os.path.join(output_dir, ROUTING_HEATMAP_NAME),
                title=f"ALTER routing (stage {self.alter_model.config.stage}, step {self.state.global_step})",
            )
        return stats


__all__ = ["AlterTrainer", "AlterTrainingArguments", "RoutingStatistics", "StageSwitchCallback", "has_accelerator",
           "longest_first", "mta_module_labels", "trim_causal_batch"]
