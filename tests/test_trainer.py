"""AlterTrainer and StageSwitchCallback: the switch, optimizers and schedules, losses, evaluation, routing report."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, ProgressCallback, TrainerCallback
from training_utils import TRAIN_TASKS, snapshot, stage_sets, tiny_args, tiny_data, tiny_model, tokenizer

from modeling_alter.callback import StageSwitchCallback
from modeling_alter.data import MultiTaskDataCollator
from modeling_alter.mta import task_parameter_of
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments


def bank_name(name):
    """A task's own adapter parameter (split during train()) named after its bank; any other name as it is."""
    split = task_parameter_of(name)
    return name if split is None else f"{name.rsplit('.task_parameters.', 1)[0]}.{split[0]}"


class Recorder(TrainerCallback):
    """Records, at every optimizer step, the stage, the optimizer's parameters and learning rate, and the schedule."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps = []
        self.snapshot_at_switch = None
        self.predictions = []  # the metrics of every on_predict

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        params = {bank_name(name) for name, p in trainer.alter_model.named_parameters() if id(p) in ids}
        self.steps.append(
            {
                "step": state.global_step + 1,
                "stage": trainer.alter_model.config.stage,
                "params": params,
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "optimizer": id(trainer.optimizer),
                "scheduler": id(trainer.lr_scheduler),
            }
        )

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self.predictions.append(metrics)

    def on_step_end(self, args, state, control, **kwargs):
        planned = self.trainer.stage_callback.planned_switch_step
        if planned is not None and state.global_step == planned:
            self.snapshot_at_switch = snapshot(self.trainer.alter_model)


def make_trainer(tmp_path, model=None, train_set=None, eval_sets=None, callbacks_first=True, **overrides):
    model = model if model is not None else tiny_model()
    if train_set is None:
        train_set, default_eval = tiny_data()
        eval_sets = eval_sets if eval_sets is not None else default_eval
    trainer = AlterTrainer(
        model=model, args=tiny_args(tmp_path, **overrides), train_dataset=train_set, eval_dataset=eval_sets,
        processing_class=tokenizer(),
    )
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    if callbacks_first:  # the recorder sees the end of stage 1 before the switch
        stage_callback = trainer.stage_callback
        trainer.callback_handler.remove_callback(stage_callback)
        trainer.callback_handler.add_callback(stage_callback)
    return trainer, recorder


def test_switch_optimizer_schedule_and_frozen_parameters(tmp_path):
    trainer, recorder = make_trainer(
        tmp_path, max_steps=7, stage1_steps=3, learning_rate=1e-2, stage2_learning_rate=4e-2, stage2_warmup_steps=2
    )
    model = trainer.alter_model
    stage1, stage2, frozen2 = stage_sets(model)
    trainer.train()

    # The switch happens at the end of step 3: steps 1-3 are stage 1, steps 4-7 stage 2.
    assert [s["stage"] for s in recorder.steps] == [1, 1, 1, 2, 2, 2, 2]
    assert trainer.stage_callback.switch_step == 3 and model.config.stage == 2
    # Each stage's optimizer holds exactly that stage's trainable set; a new optimizer and schedule at the switch.
    assert recorder.steps[0]["params"] == stage1
    assert recorder.steps[3]["params"] == stage2
    assert recorder.steps[2]["optimizer"] != recorder.steps[3]["optimizer"]
    assert recorder.steps[2]["scheduler"] != recorder.steps[3]["scheduler"]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == stage2
    # Stage 1: linear decay over its 3 steps from 1e-2, no warm-up. Stage 2: own peak 4e-2, 2 warm-up steps of 4.
    lrs = [s["lr"] for s in recorder.steps]
    assert lrs[:3] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert lrs[3:] == pytest.approx([0.0, 2e-2, 4e-2, 2e-2])
    # Frozen parameters of stage 2 are bit-identical to the end of stage 1; the stage-2 ones moved.
    before, after = recorder.snapshot_at_switch, snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in frozen2)
    assert any(not torch.equal(before[name], after[name]) for name in stage2)
    # The switch is logged with the trainable-parameter counts.
    switch_logs = [log for log in trainer.state.log_history if "stage2_trainable_parameters" in log]
    assert len(switch_logs) == 1 and switch_logs[0]["step"] == 3
    trainable = sum(p.numel() for name, p in model.named_parameters() if name in stage2)
    assert switch_logs[0]["stage2_trainable_parameters"] == trainable
    assert switch_logs[0]["stage2_frozen_parameters"] == model.num_parameters() - trainable


def test_stage1_epochs_converts_to_steps(tmp_path):
    # 48 examples, batch 8: 6 steps per epoch; 1.5 epochs of stage 1 = 9 steps.
    trainer, recorder = make_trainer(tmp_path, max_steps=-1, num_train_epochs=2, stage1_steps=None, stage1_epochs=1.5)
    trainer.train()
    assert trainer.stage_callback.switch_step == 9
    assert [s["stage"] for s in recorder.steps] == [1] * 9 + [2] * 3


def test_aux_loss_is_in_the_loss_and_logged(tmp_path):
    trainer, _ = make_trainer(tmp_path, max_steps=4, stage1_steps=2)
    trainer.train()
    stage1_logs = [log for log in trainer.state.log_history if "loss" in log and log["stage"] == 1]
    stage2_logs = [log for log in trainer.state.log_history if "loss" in log and log["stage"] == 2]
    assert len(stage1_logs) == 2 and len(stage2_logs) == 2
    assert all("aux_loss" not in log for log in stage1_logs)
    assert all(log["aux_loss"] > 0 for log in stage2_logs)

    # The training loss is the token cross-entropy plus router_aux_loss_coef times the auxiliary loss.
    model = tiny_model(router_aux_loss_coef=0.5)
    model.set_stage(2)
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path, stage1_steps=None), processing_class=tokenizer())
    train_set, _ = tiny_data()
    batch = MultiTaskDataCollator(tokenizer())([train_set[i] for i in range(8)])
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    cross_entropy = F.cross_entropy(outputs.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert outputs.aux_loss is not None and outputs.aux_loss > 0
    torch.testing.assert_close(loss, cross_entropy + 0.5 * outputs.aux_loss)


def test_gradient_accumulation_keeps_the_loss_scale(tmp_path):
    # Targets of different lengths: a per-micro-batch mean would weigh tokens differently from the full batch.
    train_set, _ = tiny_data()
    label_tokens = [sum(len(train_set[i]["labels"]) for i in range(start, start + 4)) for start in (0, 4)]
    assert label_tokens[0] != label_tokens[1]
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        trainer, _ = make_trainer(
            tmp_path / f"ga{accumulation}", model=tiny_model(router_aux_loss_coef=0.0), max_steps=4, stage1_steps=2,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
            optim="sgd",  # updates proportional to the gradients, so the weights compare the gradient scale
        )
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        results.append((losses, snapshot(trainer.alter_model)))
    (losses_1, weights_1), (losses_2, weights_2) = results
    assert losses_1 == pytest.approx(losses_2, rel=1e-5)
    for name in weights_1:
        torch.testing.assert_close(weights_1[name], weights_2[name], rtol=1e-5, atol=1e-6)


def test_per_task_evaluation_metrics(tmp_path):
    train_set, eval_sets = tiny_data()
    trainer = AlterTrainer(
        model=tiny_model(), args=tiny_args(tmp_path), train_dataset=train_set, eval_dataset=eval_sets,
        processing_class=tokenizer(), task_metrics={"sentiment": "accuracy", "copy": "rouge_l"},
    )
    metrics = trainer.evaluate()
    expected_scores = {"sentiment": "accuracy", "copy": "rouge_l", "reverse": "exact_match"}
    for task, metric in expected_scores.items():
        assert 0.0 <= metrics[f"eval_{task}_{metric}"] <= 1.0
        assert metrics[f"eval_{task}_loss"] > 0
        assert metrics[f"eval_{task}_routing_own_adapter"] == pytest.approx(1.0)  # stage 1: one-hot
        assert metrics[f"eval_{task}_routing_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_mean_score"] == pytest.approx(
        sum(metrics[f"eval_{task}_{metric}"] for task, metric in expected_scores.items()) / 3
    )
    assert metrics["eval_loss"] == pytest.approx(sum(metrics[f"eval_{task}_loss"] for task in TRAIN_TASKS) / 3)
    stats = trainer.routing_stats.to_dict()
    assert set(stats["tasks"]) == set(TRAIN_TASKS)
    assert len(stats["modules"]) == len(trainer.alter_model.mta_modules())
    assert stats["tasks"]["copy"]["num_examples"] == 4

    # A single dataset is evaluated as by Seq2SeqTrainer.
    single = trainer.evaluate(eval_sets["copy"].remove_columns("target_text"))
    assert "eval_loss" in single and "eval_mean_score" not in single


def test_per_task_evaluation_shows_one_bar_over_every_tasks_batches(tmp_path, monkeypatch):
    """One progress bar for the whole evaluation, its total known from the start (not raised task by task)."""
    from modeling_alter.console import AlterProgressCallback

    _, eval_sets = tiny_data()  # 3 tasks x 4 rows: 2 batches of 3 each
    trainer = AlterTrainer(model=tiny_model(), args=tiny_args(tmp_path, disable_tqdm=False, per_device_eval_batch_size=3),
                           eval_dataset=eval_sets, processing_class=tokenizer())
    seen = []
    original = AlterProgressCallback.on_prediction_step

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append((self.prediction_bar.n, self.prediction_bar.total))

    monkeypatch.setattr(AlterProgressCallback, "on_prediction_step", record)
    trainer.evaluate()
    assert seen == [(n, 6) for n in range(1, 7)]
    assert next(c for c in trainer.callback_handler.callbacks if isinstance(c, AlterProgressCallback)).prediction_bar is None


def test_stage1_evaluation_at_switch_heatmap_and_checkpoint_stage(tmp_path):
    trainer, recorder = make_trainer(
        tmp_path, max_steps=4, stage1_steps=2, eval_on_stage_switch=True, save_routing_heatmap=True,
        save_strategy="steps", save_steps=2, disable_tqdm=False,
    )
    trainer.train()
    # The routing report's pass ends as a prediction does: its progress bar is closed, callbacks hear on_predict.
    progress = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback))
    assert progress.prediction_bar is None
    assert recorder.predictions and all("routing_loss" in metrics for metrics in recorder.predictions)
    assert trainer.stage1_metrics["eval_copy_exact_match"] >= 0.0
    png = tmp_path / "routing_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((tmp_path / "routing_stats.json").read_text())
    assert stats["stage"] == 2 and set(stats["tasks"]) == set(TRAIN_TASKS)
    module = stats["modules"][0]
    weights = stats["tasks"]["copy"]["modules"][module]["mean_gate_weight"]
    assert set(weights) == set(TRAIN_TASKS) | {"shared_0"}
    # Checkpoints record the stage in config.json and in the callback state of trainer_state.json.
    for step, stage in ((2, 2), (4, 2)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert json.loads((checkpoint / "config.json").read_text())["stage"] == stage
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        attributes = state["stateful_callbacks"]["StageSwitchCallback"]["attributes"]
        assert attributes["stage"] == stage and attributes["switch_step"] == 2
        assert attributes["stage1_metrics"]["eval_copy_exact_match"] >= 0.0


def test_stage2_only_training(tmp_path):
    model = tiny_model()
    model.set_stage(2)
    trainer, recorder = make_trainer(tmp_path, model=model, max_steps=3, stage1_steps=None, stage2_learning_rate=3e-2)
    _, stage2, _ = stage_sets(model)
    trainer.train()
    assert [s["stage"] for s in recorder.steps] == [2, 2, 2]
    assert recorder.steps[0]["params"] == stage2
    assert recorder.steps[0]["lr"] == pytest.approx(3e-2)
    # stage1_steps=0 also trains stage 2 only, starting from a stage-1 model.
    trainer, recorder = make_trainer(tmp_path / "zero", max_steps=2, stage1_steps=0)
    trainer.train()
    assert [s["stage"] for s in recorder.steps] == [2, 2] and trainer.stage_callback.switch_step == 0


def test_training_arguments_parse_and_validate(tmp_path):
    (args,) = HfArgumentParser(AlterTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--stage1_epochs", "1.5", "--stage2_learning_rate", "1e-3",
              "--stage2_warmup_steps", "0.1", "--stage2_lr_scheduler_type", "cosine"]
    )
    assert args.stage1_epochs == 1.5 and args.stage2_learning_rate == 1e-3 and args.stage2_warmup_steps == 0.1
    assert args.predict_with_generate and args.ddp_find_unused_parameters
    bad = [
        (dict(stage1_steps=2, stage1_epochs=1.0), "stage1_steps=2"),
        (dict(stage1_steps=-1), "stage1_steps=-1"),
        (dict(stage2_learning_rate=0.0), "stage2_learning_rate=0.0"),
        (dict(stage2_warmup_steps=-2), "stage2_warmup_steps=-2"),
        (dict(stage2_lr_scheduler_type="zigzag"), "zigzag"),
        (dict(ddp_find_unused_parameters=False), "ddp_find_unused_parameters=False"),
        (dict(routing_max_samples=0), "routing_max_samples=0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            AlterTrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_bad_trainer_inputs_raise_clear_errors(tmp_path, monkeypatch):
    train_set, eval_sets = tiny_data()
    args = tiny_args(tmp_path)
    with pytest.raises(ValueError, match="'nope'"):
        AlterTrainer(model=tiny_model(), args=args, task_metrics={"copy": "nope"})
    with pytest.raises(ValueError, match="'qa'"):
        AlterTrainer(model=tiny_model(), args=args, task_metrics={"qa": "accuracy"})
    with pytest.raises(ValueError, match="optimizers"):
        optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
        AlterTrainer(model=tiny_model(), args=args, optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="AlterTrainingArguments"):
        from transformers import TrainingArguments

        # Seq2SeqTrainingArguments work (with the stage settings in a StageSwitchCallback); TrainingArguments do not
        AlterTrainer(model=tiny_model(), args=TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="stage1_steps=2 but the training arguments set stage1_steps=3.*in one place"):
        AlterTrainer(model=tiny_model(), args=args, callbacks=[StageSwitchCallback(stage1_steps=2)])
    # A switch that leaves no step for stage 2.
    trainer = AlterTrainer(model=tiny_model(), args=tiny_args(tmp_path, max_steps=3, stage1_steps=3),
                           train_dataset=train_set, processing_class=tokenizer())
    with pytest.raises(ValueError, match="stage1_steps=3 leaves no step for stage 2"):
        trainer.train()
    # A model already in stage 2 with a stage-1 switch configured.
    model = tiny_model()
    model.set_stage(2)
    trainer = AlterTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer())
    with pytest.raises(ValueError, match="already in stage 2"):
        trainer.train()
    # requires_grad changed by hand instead of set_stage.
    model = tiny_model()
    trainer = AlterTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer())
    trainer.alter_model.set_stage = lambda stage: None  # keeps the hand-made requires_grad
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="set_stage"):
        trainer.train()
    # DeepSpeed fixes its parameter groups at initialize: an in-run switch is refused with the workaround.
    trainer = AlterTrainer(model=tiny_model(), args=args, train_dataset=train_set, processing_class=tokenizer())
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    with pytest.raises(ValueError, match="DeepSpeed"):
        trainer.train()
    # An empty dict of evaluation sets.
    trainer = AlterTrainer(model=tiny_model(), args=args, processing_class=tokenizer())
    with pytest.raises(ValueError, match="empty dict"):
        trainer.evaluate({})
    with pytest.raises(ValueError, match="model_init"):
        AlterTrainer(model=tiny_model(), args=args, model_init=tiny_model)
    # FSDP flattens parameters of both stages together unless use_orig_params=True.
    trainer = AlterTrainer(model=tiny_model(), args=args, train_dataset=train_set, processing_class=tokenizer())
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1, use_orig_params=False),
                        raising=False)
    with pytest.raises(ValueError, match="use_orig_params"):
        trainer.train()
    monkeypatch.undo()  # the accelerator state is shared by every trainer


def test_stage_switch_callback_requires_alter_trainer(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    train_set, _ = tiny_data()
    trainer = Seq2SeqTrainer(
        model=tiny_model(), args=Seq2SeqTrainingArguments(str(tmp_path), max_steps=2, report_to="none", use_cpu=True),
        train_dataset=train_set, data_collator=MultiTaskDataCollator(tokenizer()),
        callbacks=[StageSwitchCallback(stage1_steps=1)],
    )
    with pytest.raises(ValueError, match="AlterTrainer"):
        trainer.train()


def test_optimizer_class_applies_to_both_stages(tmp_path):
    train_set, _ = tiny_data()
    trainer = AlterTrainer(
        model=tiny_model(), args=tiny_args(tmp_path, max_steps=4, stage1_steps=2), train_dataset=train_set,
        processing_class=tokenizer(), optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9}),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, torch.optim.SGD)
    assert inner.param_groups[0]["momentum"] == 0.9 and inner.param_groups[0]["initial_lr"] == 2e-2


def test_fsdp_that_accelerate_does_not_enable_is_reported(tmp_path, caplog):
    # Under torchrun on CPU, Accelerate keeps FSDP off (it enables it only on accelerators) and the Trainer wraps the
    # model in DDP without a word: AlterTrainer says so. (One process refuses fsdp in Trainer.__init__ already, so
    # the option is set after it.)
    train_set, _ = tiny_data()
    args = tiny_args(tmp_path, max_steps=2, stage1_steps=1)
    trainer = AlterTrainer(model=tiny_model(), args=args, train_dataset=train_set, processing_class=tokenizer())
    trainer.args.fsdp = ["full_shard"]
    assert not trainer.is_fsdp_enabled
    with caplog.at_level("WARNING", logger="modeling_alter.stages"):
        trainer.train()
    assert "ask for FSDP" in caplog.text and "Accelerate did not enable it" in caplog.text
    assert "fully_shard_alter" in caplog.text
