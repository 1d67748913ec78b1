"""Prefix routing for decoder-only ALTER models: `task_ids=None` takes each prompt's task from its token prefix (a
leading BOS skipped), in `forward`, `generate` (beams, num_return_sequences, KV cache) and `pipeline("text-generation")`
with no kwargs; and the MTA fields shared with `AlterConfig` (`configuration_mta.py`)."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast, pipeline

from causal_utils import PAD, TASKS, left_padded_batch, randomize_adapters, tiny_causal_alter, tiny_causal_lm
from modeling_alter import AlterCausalConfig, AlterConfig, AlterForCausalLM

BOS = 2
PREFIXES = {"sentiment": "sst2: ", "topic": "topic: "}  # "reverse" has no prefix
PROMPTS = ["topic: stocks fell\n", "sst2: a great movie\n", "topic: rain\n", "sst2: dull\n"]
PROMPT_TASKS = ["topic", "sentiment", "topic", "sentiment"]


def bos_tokenizer():
    """A character-level fast tokenizer that starts every input with BOS (id 2), like Llama's; left padding."""
    vocab = {"<pad>": PAD, "</s>": 1, "<s>": BOS, "<unk>": 3}
    for char in [chr(x) for x in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def tokenizer(kind):
    return bos_tokenizer() if kind == "bos" else ByT5Tokenizer(padding_side="left")


def prefixed_model(kind, stage=1, seed=0):
    """A tiny converted Llama ALTER model whose adapters change the outputs, with `PREFIXES` set for `kind`'s
    tokenizer (the model's `bos_token_id` is the tokenizer's BOS for `"bos"`, None for ByT5)."""
    source = tiny_causal_lm("llama", seed=seed, bos_token_id=BOS if kind == "bos" else None)
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=8, task_prefixes=PREFIXES).eval()
    randomize_adapters(model, gate_mix=0.7)
    model.set_task_prefixes(tokenizer=tokenizer(kind))
    model.set_stage(stage)
    return model


def batch_of(kind, prompts=PROMPTS, add_special_tokens=True):
    return tokenizer(kind)(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)


def test_causal_config_has_the_mta_fields_of_alter_config():
    config = AlterCausalConfig(task_names=TASKS)
    assert config.router_top_k == AlterConfig().router_top_k == "auto"
    assert config.adapter_form == "plain" and config.task_prefixes is None and config.task_prefix_ids is None
    bad_values = [
        dict(router_top_k=0), dict(router_top_k="2"), dict(router_top_k=True), dict(router_top_k=9),
        dict(adapter_form="swiglu"), dict(task_prefixes={"legal": "legal: "}), dict(task_prefixes="sst2: "),
        dict(task_prefixes={"sentiment": "x: ", "topic": "x: "}), dict(task_prefix_ids={"sentiment": [5]}),
        dict(task_prefixes={"sentiment": "x: "}, task_prefix_ids={"sentiment": []}),
        dict(adapter_activation="nope"), dict(stage=3), dict(task_names=["a", "a"]),
    ]
    for bad in bad_values:
        kwargs = {"task_names": TASKS, **bad}
        with pytest.raises(ValueError) as causal_error:
            AlterCausalConfig(**kwargs)
        with pytest.raises(ValueError) as t5_error:
            AlterConfig(**kwargs)
        assert str(causal_error.value) == str(t5_error.value), bad  # one validation, one message
        assert any(key in str(causal_error.value) for key in bad), (bad, str(causal_error.value))
    config = AlterCausalConfig(task_names=TASKS, router_top_k=None, adapter_form="gated",
                               task_prefixes=PREFIXES, task_prefix_ids={"sentiment": [4, 5], "topic": [6]})
    assert config.router_top_k is None and config.task_prefix_ids == {"sentiment": [4, 5], "topic": [6]}


def test_gated_adapters_and_auto_top_k_in_the_causal_model():
    source = tiny_causal_lm("qwen2")
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=8, adapter_form="gated").eval()
    assert all(m.task_linear is not None for m in model.mta_modules().values())
    assert {m.top_k for m in model.mta_modules().values()} == {None}  # "auto": dense up to 16 adapters
    batch = batch_of("byt5")
    with torch.no_grad():  # exact at conversion, in both stages
        for stage in (1, 2):
            model.set_stage(stage)
            out = model(**batch, task_ids=model.task_ids(PROMPT_TASKS)).logits
            assert torch.allclose(out, source(**batch).logits, atol=1e-5)
    many = AlterCausalConfig(task_names=[f"t{i}" for i in range(20)], hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    assert {m.top_k for m in AlterForCausalLM(many).mta_modules().values()} == {2}


@pytest.mark.parametrize("kind", ["bos", "byt5"])
def test_prefix_ids_never_hold_bos_and_bos_is_skipped(kind):
    model = prefixed_model(kind)
    tok = tokenizer(kind)
    assert model.config.task_prefix_ids["sentiment"] == tok("sst2: ", add_special_tokens=False)["input_ids"]
    assert all(BOS not in ids for ids in model.config.task_prefix_ids.values())
    expected = model.task_ids(PROMPT_TASKS)
    for add_special_tokens in (True, False):  # with and without the tokenizer's BOS (ByT5 adds EOS only)
        batch = batch_of(kind, add_special_tokens=add_special_tokens)
        assert (batch["input_ids"][:, :1] == PAD).any()  # left padding
        assert torch.equal(model.infer_task_ids(batch["input_ids"], batch["attention_mask"]), expected)
    if kind == "bos":
        assert (batch_of(kind)["input_ids"] == BOS).sum() == len(PROMPTS)


def test_a_tokenizer_bos_the_model_does_not_know_is_refused():
    source = tiny_causal_lm("llama", bos_token_id=None)
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=8, task_prefixes=PREFIXES)
    with pytest.raises(ValueError, match="BOS token id 2.*config.bos_token_id=None"):
        model.set_task_prefixes(tokenizer=bos_tokenizer())


@pytest.mark.parametrize("kind", ["bos", "byt5"])
@pytest.mark.parametrize("stage", [1, 2])
def test_forward_routes_a_mixed_left_padded_batch_by_prefix(kind, stage):
    model = prefixed_model(kind, stage=stage)
    batch = batch_of(kind)
    with torch.no_grad():
        inferred = model(**batch).logits
        explicit = model(**batch, task_ids=model.task_ids(PROMPT_TASKS)).logits
        wrong = model(**batch, task_ids=model.task_ids(["reverse"] * len(PROMPTS))).logits
    assert torch.equal(inferred, explicit)
    assert not torch.allclose(inferred, wrong, atol=1e-4)  # the route matters


@pytest.mark.parametrize("kind", ["bos", "byt5"])
def test_generate_infers_once_for_beams_return_sequences_and_cached_steps(kind):
    model = prefixed_model(kind, stage=2)
    batch = batch_of(kind)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False,
                  pad_token_id=PAD)
    with torch.no_grad():
        inferred = model.generate(**batch, **kwargs)
        explicit = model.generate(**batch, task_ids=model.task_ids(PROMPT_TASKS), **kwargs)
        wrong = model.generate(**batch, task_ids=model.task_ids(["reverse"] * len(PROMPTS)), **kwargs)
        greedy = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        greedy_explicit = model.generate(**batch, task_ids=model.task_ids(PROMPT_TASKS), max_new_tokens=6,
                                         do_sample=False, pad_token_id=PAD)
    assert torch.equal(inferred, explicit) and not torch.equal(inferred, wrong)
    assert torch.equal(greedy, greedy_explicit)


@pytest.mark.parametrize("kind", ["bos", "byt5"])
def test_unmatched_prompts_raise_in_stage1_and_route_unknown_in_stage2(kind):
    prompts = ["sst2: fine\n", "no prefix here\n"]
    model = prefixed_model(kind, stage=1)
    batch = batch_of(kind, prompts)
    with pytest.raises(ValueError, match=r"Example\(s\) \[1\] start with none of the task prefixes"):
        model(**batch)
    with pytest.raises(ValueError, match="start with none of the task prefixes"):
        model.generate(**batch, max_new_tokens=2, pad_token_id=PAD)
    model.set_stage(2)
    unknown = torch.tensor([0, model.config.num_tasks])
    assert torch.equal(model.infer_task_ids(batch["input_ids"], batch["attention_mask"]), unknown)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch, task_ids=unknown).logits)
        assert torch.equal(model.generate(**batch, max_new_tokens=4, pad_token_id=PAD),
                           model.generate(**batch, task_ids=unknown, max_new_tokens=4, pad_token_id=PAD))


@pytest.mark.parametrize("kind", ["bos", "byt5"])
def test_pipeline_routes_by_prompt_prefix_with_no_kwargs(kind, tmp_path):
    model = prefixed_model(kind, stage=1)
    model.save_pretrained(tmp_path)
    tokenizer(kind).save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), trust_remote_code=True)
    loaded = generator.model
    assert loaded.config.task_prefix_ids == model.config.task_prefix_ids
    # token ids, not text: the tiny random model also generates ids the character tokenizer cannot decode
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_tensors=True)
    for prompt, task in zip(PROMPTS[:2], PROMPT_TASKS[:2]):
        for add_special_tokens in (False, True):  # the pipeline's default, then with the tokenizer's BOS
            routed = generator(prompt, add_special_tokens=add_special_tokens, **options)[0]["generated_token_ids"]
            explicit = generator(prompt, add_special_tokens=add_special_tokens, task_ids=loaded.task_ids([task]),
                                 **options)[0]["generated_token_ids"]
            other = "reverse"
            wrong = generator(prompt, add_special_tokens=add_special_tokens, task_ids=loaded.task_ids([other]),
                              **options)[0]["generated_token_ids"]
            assert routed == explicit and routed != wrong, (prompt, routed, wrong)
    with pytest.raises(ValueError, match="start with none of the task prefixes"):
        generator("no prefix\n", **options)


def test_causal_model_adds_and_keeps_tasks_like_t5():
    """The task lifecycle (`task_lifecycle.AlterTasksMixin`) is shared: adding a task leaves every old task's logits
    bit-identical in both stages, training only the new task touches only its adapters, and keep_tasks keeps a task's
    outputs."""
    model = tiny_causal_alter(stage=1)
    batch = left_padded_batch()
    old_ids = torch.tensor([0, 1, 2, 1])
    before = {}
    with torch.no_grad():
        for stage in (2, 1):
            model.set_stage(stage)
            before[stage] = model(**batch, task_ids=old_ids).logits
    model.add_tasks(["legal_qa"], init_from="topic")
    assert model.config.task_names == [*TASKS, "legal_qa"]
    with torch.no_grad():
        for stage in (2, 1):
            model.set_stage(stage)
            torch.testing.assert_close(model(**batch, task_ids=old_ids).logits, before[stage], atol=0, rtol=0)
        copied = model(**batch, task_ids=model.task_ids(["legal_qa"] * 4)).logits
        topic = model(**batch, task_ids=model.task_ids(["topic"] * 4)).logits
    torch.testing.assert_close(copied, topic, atol=0, rtol=0)  # a copy of `topic`'s adapter computes what it does
    model.set_train_tasks(["legal_qa"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mta." in name and name.rsplit(".", 1)[-1] in ("task_down", "task_up")
                             for name in trainable)
    kept = model.keep_tasks(["reverse"])
    assert kept.config.task_names == ["reverse"]
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch, task_ids=torch.zeros(4, dtype=torch.long)).logits,
                                   model(**batch, task_ids=model.task_ids(["reverse"] * 4)).logits, atol=0, rtol=0)
