"""Every Seq2SeqTrainer option that a T5 fine-tuning script commonly sets, run briefly with AlterTrainer on a converted
tiny T5 and compared with Seq2SeqTrainer on that T5 (same data, same seed): the converted model computes exactly
what the T5 does, so the first training losses and the predictions before training must agree."""

import logging
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)
from training_utils import TRAIN_TASKS, tiny_data, tokenizer

from modeling_alter import AlterForConditionalGeneration
from modeling_alter.callback import StageSwitchCallback
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments, longest_first

COMMON = dict(
    per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3, max_steps=4, logging_steps=1,
    save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0, generation_max_length=12,
    dataloader_pin_memory=False,
)


def tiny_t5(seed=0):
    tok = tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    return model


@pytest.fixture(scope="module")
def data():
    return tiny_data(num_train_per_task=8, num_eval_per_task=3)


def train_pair(tmp_path, options, train_set, eval_set=None, compute_metrics=None, alter_extra=None, t5_options=None):
    """T5 with Seq2SeqTrainer and its converted ALTER with AlterTrainer under the same options (`t5_options`, when
    given, for the T5); returns both trainers."""
    tok = tokenizer()
    t5 = tiny_t5()
    alter = AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8,
                                                  num_shared_adapters=1, task_id_drop_rate=0.0)
    t5_trainer = Seq2SeqTrainer(
        model=t5, args=Seq2SeqTrainingArguments(str(tmp_path / "t5"), **{**COMMON, **(t5_options or options)}),
        data_collator=DataCollatorForSeq2Seq(tok, model=t5), train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tok, compute_metrics=compute_metrics,
    )
    alter_options = dict(save_routing_heatmap=False, eval_on_stage_switch=False, predict_with_generate=False,
                         **(alter_extra or {}))
    alter_trainer = AlterTrainer(
        model=alter, args=AlterTrainingArguments(str(tmp_path / "alter"), **{**COMMON, **options, **alter_options}),
        train_dataset=train_set, eval_dataset=eval_set, processing_class=tok, compute_metrics=compute_metrics,
    )
    return t5_trainer, alter_trainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


TRAINING_OPTIONS = {
    "label_smoothing_factor": dict(label_smoothing_factor=0.1),
    "gradient_accumulation_steps": dict(gradient_accumulation_steps=2),
    "group_by_length": dict(train_sampling_strategy="group_by_length"),
    "gradient_checkpointing": dict(gradient_checkpointing=True,
                                   gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}),
    "bf16": dict(bf16=True),
    "torch_compile": dict(torch_compile=True, torch_compile_backend="eager"),
}


@pytest.mark.parametrize("option", list(TRAINING_OPTIONS))
def test_training_option_matches_seq2seq_trainer_on_t5(option, tmp_path, data, monkeypatch):
    train_set, _ = data
    options = TRAINING_OPTIONS[option]
    # Gradient accumulation: ALTER's loss is per label token of the whole accumulated batch, so its first loss is
    # the one T5 gets on the same 16 examples in one batch (T5 itself ignores `num_items_in_batch` and reports the
    # sum of the two micro-batch means).
    t5_options = dict(per_device_train_batch_size=16) if option == "gradient_accumulation_steps" else None
    steps = 4
    if option == "torch_compile":
        # Compiling is slow on CPU: ALTER alone compiles (the eager backend computes what eager mode computes), over
        # one step of each stage.
        steps, t5_options = 2, dict(max_steps=2)
        options = dict(options, max_steps=2)
        import torch._dynamo.config as dynamo_config

        monkeypatch.setattr(dynamo_config, "recompile_limit", 1)  # then eager: no recompile per batch shape
    t5_trainer, alter_trainer = train_pair(tmp_path, options, train_set, alter_extra=dict(stage1_steps=steps // 2),
                                           t5_options=t5_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t5_trainer.train()
        alter_trainer.train()
    t5_losses, alter_losses = losses(t5_trainer), losses(alter_trainer)
    assert len(alter_losses) == len(t5_losses) == steps
    assert all(np.isfinite(alter_losses))
    if option == "group_by_length":
        # The sampler draws from the global RNG, which the two runs leave in different states: compare the order
        # both samplers give from the same seed, and that it groups by length.
        orders = []
        for trainer in (t5_trainer, alter_trainer):
            torch.manual_seed(0)
            orders.append(list(trainer._get_train_sampler(train_set)))
        assert orders[0] == orders[1] and sorted(orders[0]) == list(range(len(train_set)))
        return
    # Before the first update the converted model is the T5: same batches, same loss (bf16: to bf16 precision).
    tolerance = 2e-2 if option == "bf16" else 1e-4
    assert alter_losses[0] == pytest.approx(t5_losses[0], rel=tolerance), (alter_losses, t5_losses)
    assert alter_trainer.alter_model.config.stage == 2


def test_label_smoothing_adds_router_loss_in_stage_2(tmp_path, data):
    """With label smoothing the model computes no loss itself; the trainer adds the load-balancing loss as the model
    would (stage 2, `router_aux_loss_coef`), and makes the decoder inputs from the labels for any collator."""
    train_set, _ = data
    tok = tokenizer()
    alter = AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8,
                                                  router_aux_loss_coef=0.5, task_id_drop_rate=0.0)
    alter.set_stage(2)
    args = AlterTrainingArguments(str(tmp_path), **COMMON, label_smoothing_factor=0.1, save_routing_heatmap=False)
    from modeling_alter.data import MultiTaskDataCollator

    trainer = AlterTrainer(model=alter, args=args, train_dataset=train_set, processing_class=tok,
                           data_collator=MultiTaskDataCollator(tok))  # a collator without the model
    batch = trainer.data_collator([train_set[i] for i in range(4)])
    assert "decoder_input_ids" not in batch
    alter.train()
    loss = trainer.compute_loss(alter, dict(batch))
    outputs = alter(**batch)
    smoothed = trainer.label_smoother(outputs, batch["labels"])
    assert outputs.aux_loss is not None and float(outputs.aux_loss.detach()) > 0
    torch.testing.assert_close(loss, smoothed + 0.5 * outputs.aux_loss, rtol=1e-4, atol=1e-5)


def strip_labels(dataset):
    return dataset.remove_columns(["labels"])


@pytest.mark.parametrize("with_labels", [True, False])
def test_predict_with_generate_matches_t5(with_labels, tmp_path, data):
    _, eval_sets = data
    labelled = eval_sets["copy"].remove_columns(["target_text"])
    test_set = labelled if with_labels else strip_labels(labelled)
    options = dict(predict_with_generate=True, include_for_metrics=["inputs"], eval_accumulation_steps=1)
    seen = {}

    def compute_metrics(prediction):
        seen.setdefault("inputs", []).append(prediction.inputs)
        return {"num_predictions": float(len(prediction.predictions))}

    t5_trainer, alter_trainer = train_pair(tmp_path, options, test_set, compute_metrics=compute_metrics)
    alter_trainer.args.predict_with_generate = True
    # Plain T5 with DataCollatorForSeq2Seq fails on a set without labels (the collator's `"labels": None` makes
    # Seq2SeqTrainer run a loss forward): its reference generations come from the labelled set.
    t5_output = t5_trainer.predict(labelled)
    alter_output = alter_trainer.predict(test_set)
    assert np.array_equal(alter_output.predictions, t5_output.predictions)
    assert ("test_loss" in alter_output.metrics) == with_labels
    if with_labels:
        assert alter_output.metrics["test_loss"] == pytest.approx(t5_output.metrics["test_loss"], rel=1e-5)
        assert np.array_equal(alter_output.label_ids, t5_output.label_ids)
        assert alter_output.metrics["test_num_predictions"] == len(test_set)
        # include_for_metrics=["inputs"]: the same inputs reach compute_metrics
        assert len(seen["inputs"]) == 2 and np.array_equal(seen["inputs"][0], seen["inputs"][1])
    else:
        assert alter_output.label_ids is None


def test_forward_without_decoder_inputs_names_what_is_missing():
    alter = AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8)
    with pytest.raises(ValueError, match="no decoder inputs.*labels.*decoder_input_ids.*generate"):
        alter(input_ids=torch.tensor([[5, 6, 1]]), task_ids=torch.tensor([0]))


def test_gradient_checkpointing_kwargs_are_honoured(tmp_path, data, monkeypatch, caplog):
    """The kwargs reach torch.utils.checkpoint (they were silently ignored); reentrant mode is refused by name."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    real = modeling_utils.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", spy)
    train_set, _ = data
    alter = AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8)
    alter.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"preserve_rng_state": False})
    alter.train()
    batch = AlterTrainer(model=alter, args=AlterTrainingArguments(str(tmp_path), **COMMON), processing_class=tokenizer()
                         ).data_collator([train_set[i] for i in range(4)])
    alter(**batch).loss.backward()
    assert calls and all(c == {"preserve_rng_state": False, "use_reentrant": False} for c in calls), calls

    with pytest.raises(ValueError, match="use_reentrant"):
        AlterTrainer(model=alter, args=AlterTrainingArguments(
            str(tmp_path), **COMMON, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}))
    # Transformers < 5 asks for reentrant checkpointing by default: the model overrides it with a warning naming it.
    alter.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    calls.clear()
    with caplog.at_level(logging.WARNING):
        alter(**batch).loss.backward()
    assert "use_reentrant" in caplog.text
    assert calls and all(c == {"use_reentrant": False} for c in calls), calls


# ---- the stage settings: in the callback, in AlterTrainingArguments, or both --------------------------------------


def alter_model():
    return AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8, task_id_drop_rate=0.0)


def test_plain_seq2seq_arguments_with_the_callback(tmp_path, data):
    train_set, _ = data
    args = Seq2SeqTrainingArguments(str(tmp_path), **COMMON)
    callback = StageSwitchCallback(stage1_steps=2, stage2_learning_rate=5e-3)
    trainer = AlterTrainer(model=alter_model(), args=args, train_dataset=train_set, processing_class=tokenizer(),
                           callbacks=[callback])
    trainer.train()
    assert trainer.alter_model.config.stage == 2 and callback.switch_step == 2
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 5e-3
    stages = [entry["stage"] for entry in trainer.state.log_history if "loss" in entry]
    assert stages == [1, 1, 2, 2]


def test_callback_and_arguments_merge_or_disagree_clearly(tmp_path, data):
    train_set, _ = data
    # Both given, complementary: one source of truth (the callback) holding both.
    callback = StageSwitchCallback(stage1_steps=2)
    args = AlterTrainingArguments(str(tmp_path), **COMMON, stage2_learning_rate=4e-3)
    trainer = AlterTrainer(model=alter_model(), args=args, train_dataset=train_set, processing_class=tokenizer(),
                           callbacks=[callback])
    assert trainer.stage_callback is callback
    assert (callback.stage1_steps, callback.stage2_learning_rate) == (2, 4e-3)
    # The same value on both sides is fine; different values name both.
    AlterTrainer(model=alter_model(), args=AlterTrainingArguments(str(tmp_path), **COMMON, stage1_steps=2),
                 processing_class=tokenizer(), callbacks=[StageSwitchCallback(stage1_steps=2)])
    with pytest.raises(ValueError, match=r"stage2_learning_rate=0\.001.*stage2_learning_rate=0\.004"):
        AlterTrainer(model=alter_model(), args=AlterTrainingArguments(str(tmp_path), **COMMON, stage2_learning_rate=4e-3),
                     processing_class=tokenizer(), callbacks=[StageSwitchCallback(stage2_learning_rate=1e-3)])
    with pytest.raises(ValueError, match="stage1_steps=2 and stage1_epochs=1"):
        AlterTrainer(model=alter_model(), args=AlterTrainingArguments(str(tmp_path), **COMMON, stage1_epochs=1),
                     processing_class=tokenizer(), callbacks=[StageSwitchCallback(stage1_steps=2)])
    with pytest.raises(ValueError, match="Seq2SeqTrainingArguments"):
        AlterTrainer(model=alter_model(), args=object())


def test_per_task_scores_pair_each_generation_with_its_own_reference_when_grouping_by_length(tmp_path, monkeypatch):
    """Transformers 5 also groups evaluation batches by length (a shuffled order) under
    `train_sampling_strategy="group_by_length"`, while per-task scores read the references from the dataset's
    `target_text` column: AlterTrainer evaluates each task's rows in one fixed order (longest first) and reads the
    references in that order, so the generations and references scored are the same pairs as without grouping
    (before, they were misaligned and the main job scored at chance)."""
    import modeling_alter.trainer as trainer_module

    _, eval_sets = tiny_data(num_train_per_task=4, num_eval_per_task=24)
    alter = AlterForConditionalGeneration.from_t5(tiny_t5(), task_names=TRAIN_TASKS, adapter_dim=8)
    scored = []
    real = trainer_module.compute_metric
    monkeypatch.setattr(trainer_module, "compute_metric", lambda metric, predictions, references: (
        scored.append(list(zip(predictions, references))), real(metric, predictions, references))[1])
    for grouping in ({}, dict(train_sampling_strategy="group_by_length")):
        args = AlterTrainingArguments(str(tmp_path), **{**COMMON, "per_device_eval_batch_size": 4, **grouping},
                                      predict_with_generate=True, save_routing_heatmap=False)
        AlterTrainer(model=alter, args=args, eval_dataset=eval_sets, processing_class=tokenizer()).evaluate()
    plain, grouped = scored[: len(eval_sets)], scored[len(eval_sets):]
    assert len({prediction for pairs in plain for prediction, _ in pairs}) > 1  # the order is visible in the outputs
    assert grouped == plain
    first = next(iter(eval_sets.values()))
    assert [reference for _, reference in plain[0]] == longest_first(first)["target_text"] != first["target_text"]


def test_stage1_epochs_needs_a_training_set_with_a_length(tmp_path):
    """A streamed (iterable) training set trains with stage1_steps; with stage1_epochs, which Trainer could only read
    as a share of max_steps, it is refused before any step."""
    from training_utils import tiny_args, tiny_model

    stream = tiny_data()[0].to_iterable_dataset()
    model = tiny_model()
    with pytest.raises(ValueError, match=r"stage1_epochs=0.5 needs a training set with a length.*set stage1_steps"):
        AlterTrainer(model=model, args=tiny_args(tmp_path, stage1_steps=None, stage1_epochs=0.5),
                     train_dataset=stream, processing_class=tokenizer()).train()
    assert model.config.stage == 1
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path), train_dataset=stream, processing_class=tokenizer())
    trainer.train()
    assert model.config.stage == 2 and trainer.stage_callback.switch_step == 3


def test_resuming_with_a_model_built_otherwise_is_refused(tmp_path):
    """Trainer loads a checkpoint with strict=False, so a model with another adapter form or activation would resume
    silently wrong; the checkpoint's config.json is compared first."""
    from training_utils import tiny_args, tiny_model

    train_set = tiny_data()[0]
    AlterTrainer(model=tiny_model(), args=tiny_args(tmp_path, save_strategy="steps", save_steps=2),
                 train_dataset=train_set, processing_class=tokenizer()).train()
    for changed, said in ((dict(adapter_activation="gelu"), "adapter_activation='relu' there, 'gelu' here"),
                          (dict(adapter_form="gated"), "adapter_form='plain' there, 'gated' here")):
        trainer = AlterTrainer(model=tiny_model(**changed), args=tiny_args(tmp_path), train_dataset=train_set,
                               processing_class=tokenizer())
        with pytest.raises(ValueError, match=f"was written by an ALTER model built otherwise \\({said}\\)"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    AlterTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=train_set,
                 processing_class=tokenizer()).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
