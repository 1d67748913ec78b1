"""Training a decoder-only ALTER model with TRL's `SFTTrainer` (and plain `Trainer`) through `AlterStagesMixin`:
the same first loss as plain TRL on the converted backbone, both stages in one `train()`, frozen parameters
bit-identical, exact resume in either stage, task ids from a `task_ids`/`task` column or from prefixes (plain and
chat), prompt/completion and chat `messages` data with completion-only loss, packing refused."""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from causal_utils import TASKS, tiny_causal_lm
from modeling_alter import AlterForCausalLM, AlterStagesMixin, StageSwitchCallback, chat_task_prefixes
from modeling_alter.data import TaskIdsCollator

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}</s>"
    "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PREFIXES = {"sentiment": "sentiment: ", "topic": "topic: ", "reverse": "reverse: "}
# What `set_task_prefixes` gets: no trailing space, which this tiny BPE would keep as a token of its own (a real
# tokenizer merges it into the next word, and `tokenize_prefix` stops before it).
ROUTING_PREFIXES = {task: prefix.rstrip() for task, prefix in PREFIXES.items()}
EXAMPLES = [("sentiment", "good film", "positive"), ("topic", "the ball game", "sport"), ("reverse", "abc", "cba"),
            ("sentiment", "dull plot", "negative"), ("topic", "new chip", "tech"), ("reverse", "xyz", "zyx")]


class AlterSFTTrainer(AlterStagesMixin, SFTTrainer):
    pass


class AlterPlainTrainer(AlterStagesMixin, Trainer):
    pass


@pytest.fixture(scope="module")
def tok():
    """A fast byte-level BPE tokenizer made here (pad 0, eos 1, as the tiny models), with a chat template that marks
    the assistant's tokens (for `assistant_only_loss`)."""
    corpus = [f"{PREFIXES[t]}{x} {y}" for t, x, y in EXAMPLES] * 4
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1) and len(tokenizer) <= 384
    return tokenizer


def prompt_completion(column="task_ids", repeat=4):
    rows = {"prompt": [PREFIXES[t] + x for t, x, _ in EXAMPLES] * repeat,
            "completion": [" " + y for _, _, y in EXAMPLES] * repeat}
    if column == "task_ids":
        rows["task_ids"] = [TASKS.index(t) for t, _, _ in EXAMPLES] * repeat
    elif column == "task":
        rows["task"] = [t for t, _, _ in EXAMPLES] * repeat
    return Dataset.from_dict(rows)


def chat_messages(with_column=True, repeat=4):
    rows = {"messages": [[{"role": "user", "content": PREFIXES[t] + x}, {"role": "assistant", "content": y}]
                         for t, x, y in EXAMPLES] * repeat}
    if with_column:
        rows["task"] = [t for t, _, _ in EXAMPLES] * repeat
    return Dataset.from_dict(rows)


def alter(seed=0, **kwargs):
    torch.manual_seed(seed)
    return AlterForCausalLM.from_causal_lm(tiny_causal_lm("llama", seed=seed), task_names=TASKS, adapter_dim=8,
                                           num_shared_adapters=1, **kwargs)


def sft_args(path, **kwargs):
    defaults = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[],
                    use_cpu=True, save_strategy="no", seed=0, dataset_num_proc=None, max_length=64)
    defaults.update(kwargs)
    return SFTConfig(str(path), **defaults)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def capture_task_ids(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("task_ids")), with_kwargs=True)
    return seen


def test_first_loss_equals_plain_trl_on_the_converted_backbone(tmp_path, tok):
    """Converted, the ALTER model computes what the backbone did (zero up-projections): SFTTrainer's first loss on
    the same data, order and seed is plain TRL's."""
    data = prompt_completion()
    plain = SFTTrainer(model=tiny_causal_lm("llama"), args=sft_args(tmp_path / "plain", max_steps=1),
                       train_dataset=data.remove_columns("task_ids"), processing_class=tok)
    plain.train()
    ours = AlterSFTTrainer(model=alter(), args=sft_args(tmp_path / "alter", max_steps=1), train_dataset=data,
                           processing_class=tok)
    ours.train()
    assert losses(ours)[0] == pytest.approx(losses(plain)[0], rel=1e-6)


@pytest.mark.parametrize("column", ["task_ids", "task"])
def test_two_stages_in_one_train_with_sft_trainer(tmp_path, tok, column):
    model = alter()
    seen = capture_task_ids(model)
    before = snapshot(model)
    stage1 = model.trainable_parameter_names(1)
    stage2 = model.trainable_parameter_names(2)
    switched = {}

    class Probe(StageSwitchCallback.__mro__[1]):  # a plain TrainerCallback that records the model at the switch
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                switched.update(snapshot(model))

    trainer = AlterSFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=prompt_completion(column), processing_class=tok,
        callbacks=[StageSwitchCallback(stage1_steps=3, stage2_learning_rate=2e-3), Probe()])
    trainer.train()
    after = snapshot(model)
    assert model.config.stage == 2 and trainer.stage_callback.switch_step == 3
    assert all(ids is not None for ids in seen) and set(torch.cat(seen).tolist()) == {0, 1, 2}
    # Stage 1 left every stage-2 parameter as it was; stage 2 left every other parameter as it was.
    changed_in_1 = {n for n in before if not torch.equal(before[n], switched[n])}
    changed_in_2 = {n for n in before if not torch.equal(switched[n], after[n])}
    assert changed_in_1 and changed_in_1 <= stage1
    assert changed_in_2 and changed_in_2 <= stage2
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert rates[:3] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # linear schedule ending at the switch
    assert rates[3] == pytest.approx(2e-3)  # stage 2: its own peak learning rate, a new schedule


@pytest.mark.parametrize("resume_step", [2, 4])
def test_resume_in_either_stage_is_exact(tmp_path, tok, resume_step):
    def run(path, resume=None):
        model = alter()
        trainer = AlterSFTTrainer(
            model=model, args=sft_args(path, save_strategy="steps", save_steps=2), processing_class=tok,
            train_dataset=prompt_completion(), callbacks=[StageSwitchCallback(stage1_steps=3, stage2_learning_rate=2e-3)])
        trainer.train(resume_from_checkpoint=resume)
        return model, losses(trainer)

    full, full_losses = run(tmp_path / "full")
    resumed, resumed_losses = run(tmp_path / "full", resume=str(tmp_path / "full" / f"checkpoint-{resume_step}"))
    assert resumed.config.stage == 2
    assert resumed_losses == full_losses  # the log history of the checkpoint, then the resumed steps
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_prefix_routing_needs_no_column_and_routes_like_the_column(tmp_path, tok):
    """With `task_prefixes`, the prompts route themselves: the same losses as with a `task_ids` column."""
    with_column = AlterSFTTrainer(model=alter(), args=sft_args(tmp_path / "a", max_steps=3),
                                  train_dataset=prompt_completion(), processing_class=tok)
    with_column.train()
    model = alter()
    model.set_task_prefixes(ROUTING_PREFIXES, tok)
    seen = capture_task_ids(model)
    by_prefix = AlterSFTTrainer(model=model, args=sft_args(tmp_path / "b", max_steps=3),
                                train_dataset=prompt_completion(column=None), processing_class=tok)
    by_prefix.train()
    assert all(ids is None for ids in seen)  # the model inferred them
    assert losses(by_prefix) == losses(with_column)


@pytest.mark.parametrize("routing", ["column", "chat_prefixes"])
def test_chat_messages_with_assistant_only_loss(tmp_path, tok, routing):
    """Chat data (`messages`) with completion-only loss (`assistant_only_loss`): task ids from a `task` column, or
    from prefixes rendered by the chat template (`chat_task_prefixes`), give the same training."""
    reference = AlterSFTTrainer(model=alter(), args=sft_args(tmp_path / "ref", max_steps=3, assistant_only_loss=True),
                                train_dataset=chat_messages(), processing_class=tok,
                                callbacks=[StageSwitchCallback(stage1_steps=2)])
    reference.train()
    labels = reference.train_dataset[0]["labels"]
    assert -100 in labels and any(label != -100 for label in labels)  # only the assistant's tokens are learned
    if routing == "column":
        assert reference.state.global_step == 3 and reference.alter_model.config.stage == 2
        return
    model = alter()
    rendered = chat_task_prefixes(tok, ROUTING_PREFIXES)
    assert rendered["sentiment"] == "<|user|>sentiment:"
    model.set_task_prefixes(rendered, tok)
    trainer = AlterSFTTrainer(model=model, args=sft_args(tmp_path / "chat", max_steps=3, assistant_only_loss=True),
                              train_dataset=chat_messages(with_column=False), processing_class=tok,
                              callbacks=[StageSwitchCallback(stage1_steps=2)])
    trainer.train()
    assert losses(trainer) == losses(reference)
    # At inference the rendered prompt routes too.
    prompt = tok.apply_chat_template([{"role": "user", "content": "topic: a match"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert model.infer_task_ids(prompt["input_ids"]).tolist() == [TASKS.index("topic")]


def test_plain_chat_prefix_does_not_match_a_chat_prompt(tok):
    """Why `chat_task_prefixes` exists: the template's tokens come first."""
    model = alter()
    model.set_task_prefixes(ROUTING_PREFIXES, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "topic: a match"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    model.set_stage(2)
    assert model.infer_task_ids(prompt["input_ids"]).tolist() == [len(TASKS)]  # the unknown task


@pytest.mark.parametrize("option", [dict(packing=True), dict(padding_free=True)])
def test_packing_and_padding_free_are_refused(tmp_path, tok, option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}=True.* is not supported for ALTER"):
        AlterSFTTrainer(model=alter(), args=sft_args(tmp_path, **option), train_dataset=prompt_completion(),
                        processing_class=tok)


def test_plain_trainer_with_the_mixin_switches_stages(tmp_path, tok):
    """Any Trainer subclass: `Trainer` itself, with a padding collator and a `task` column."""
    from transformers import DataCollatorForLanguageModeling

    texts = [PREFIXES[t] + x + " " + y for t, x, y in EXAMPLES] * 2
    data = Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts],
                              "task": [t for t, _, _ in EXAMPLES] * 2})
    model = alter()
    seen = capture_task_ids(model)
    trainer = AlterPlainTrainer(
        model=model, args=TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                            use_cpu=True, save_strategy="no"),
        train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[StageSwitchCallback(stage1_steps=2, stage2_learning_rate=1e-3)])
    assert isinstance(trainer.data_collator, TaskIdsCollator)
    trainer.train()
    assert model.config.stage == 2 and trainer.stage_callback.switch_step == 2
    assert all(ids is not None for ids in seen)


def test_plain_trainer_without_the_mixin_is_told_how(tmp_path, tok):
    trainer = SFTTrainer(model=alter(), args=sft_args(tmp_path, max_steps=2), train_dataset=prompt_completion(),
                         processing_class=tok, callbacks=[StageSwitchCallback(stage1_steps=1)])
    with pytest.raises(ValueError, match="AlterStagesMixin first in your trainer's bases"):
        trainer.train()


def test_task_ids_collator_errors():
    collator = TaskIdsCollator(lambda features: {"n": len(features)}, TASKS)
    assert collator([{"task": "topic"}, {"task_ids": 2}])["task_ids"].tolist() == [1, 2]
    assert collator([{"x": 1}]) == {"n": 1}
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        collator([{"task": "nope"}])
    with pytest.raises(ValueError, match="task_ids=0 but task='topic'"):
        collator([{"task_ids": 0, "task": "topic"}])
    with pytest.raises(ValueError, match="task_ids=7"):
        collator([{"task_ids": 7}])
    with pytest.raises(ValueError, match="Feature 1 of the batch has no task"):
        collator([{"task_ids": 0}, {"x": 1}])
    with pytest.raises(ValueError, match="collator=3"):
        TaskIdsCollator(3, TASKS)


def test_sft_loss_keeps_the_router_load_balancing_loss(tmp_path, tok):
    """TRL computes the loss from the backbone (its fused LM head), bypassing the ALTER model's loss: the mixin adds
    the router's load-balancing loss back, so a stage-2 step's loss is the ALTER model's own."""
    model = alter(router_top_k=1, task_id_drop_rate=0.0, router_aux_loss_coef=0.5)
    model.set_stage(2)
    trainer = AlterSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=prompt_completion(),
                              processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    items = int((batch["labels"][:, 1:] != -100).sum())
    own = model(**batch, num_items_in_batch=items)  # (the load-balancing loss exists where gradients do)
    ours = trainer.compute_loss(model, batch, num_items_in_batch=items)
    assert own.aux_loss is not None and float(own.aux_loss) > 0
    torch.testing.assert_close(ours.detach(), own.loss.detach(), rtol=1e-5, atol=1e-6)
