"""AlterForCausalLM: conversion exactness, task routing, generate() with task_ids, stages, checkpointing, threads."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from causal_utils import TASKS, left_padded_batch, row, tiny_causal_alter, tiny_causal_lm
from modeling_alter import AlterCausalConfig, AlterForCausalLM


# ---- conversion ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_conversion_matches_the_source_model_in_both_stages(model_type, attn):
    source = tiny_causal_lm(model_type, attn_implementation=attn)
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=8, router_top_k=2,
                                            mta_placement=["ffn", "self_attention"]).eval()
    assert model.config._attn_implementation == attn
    assert model.config.backbone_model_type == model_type
    batch = left_padded_batch()
    with torch.no_grad():
        expected = source(**batch).logits
        for stage in (1, 2):
            model.set_stage(stage)
            for task_ids in (torch.tensor([0, 1, 2, 0]), None if stage == 2 else torch.tensor([1, 1, 1, 1])):
                logits = model(**batch, task_ids=task_ids).logits
                torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # 2 layers x (attention + FFN) MTA modules, parameters named as in the source (the backbone loads as is).
    assert len(model.mta_modules()) == 4
    source_names = set(source.state_dict())
    assert {n for n in model.state_dict() if ".mta." not in n} == source_names


def test_conversion_rejects_other_architectures_and_fields():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="model_type='t5'"):
        AlterForCausalLM.from_causal_lm(t5, task_names=TASKS)
    with pytest.raises(ValueError, match="backbone_model_type='llama'"):
        AlterForCausalLM.from_causal_lm(tiny_causal_lm("qwen2"), task_names=TASKS, backbone_model_type="llama")
    with pytest.raises(ValueError, match="backbone_model_type='gpt2'"):
        AlterCausalConfig(backbone_model_type="gpt2")
    with pytest.raises(ValueError, match="cross_attention"):
        AlterCausalConfig(mta_placement=["ffn", "cross_attention"])
    with pytest.raises(ValueError, match="router_top_k=5"):
        AlterCausalConfig(task_names=TASKS, num_shared_adapters=1, router_top_k=5)
    with pytest.raises(ValueError, match="task_names contains duplicates"):
        AlterCausalConfig(task_names=["a", "a"])


def test_from_causal_lm_loads_a_saved_checkpoint_by_path(tmp_path):
    source = tiny_causal_lm("llama")
    source.save_pretrained(tmp_path)
    model = AlterForCausalLM.from_causal_lm(str(tmp_path), task_names=TASKS).eval()
    ids = left_padded_batch()["input_ids"][:, -3:]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, task_ids=torch.tensor([0, 1, 2, 0])).logits, source(ids).logits,
                                   rtol=0, atol=1e-5)
    assert getattr(model.config, "base_model", None) is None  # a local path is never recorded


def test_config_round_trip_keeps_the_backbone_fields(tmp_path):
    config = tiny_causal_alter("qwen3", randomize=False).config
    config.save_pretrained(tmp_path)
    again = AlterCausalConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.head_dim == config.head_dim and again.layer_types == config.layer_types


# ---- task routing --------------------------------------------------------------------------------------------------

def test_stage1_requires_valid_task_ids():
    model = tiny_causal_alter()
    ids = left_padded_batch()["input_ids"]
    with pytest.raises(ValueError, match="task_ids is required for a stage-1"):
        model(ids)
    with pytest.raises(ValueError, match="task_ids contains 3, out of range"):
        model(ids, task_ids=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"task_ids has shape \(2,\)"):
        model(ids, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="Unknown task name"):
        model.task_ids(["nope"])


@pytest.mark.parametrize("stage", [1, 2])
def test_each_example_of_a_mixed_left_padded_batch_gives_what_it_gives_alone(stage):
    model = tiny_causal_alter(stage=stage, mta_placement=["ffn", "self_attention"])
    batch, task_ids = left_padded_batch(), torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        together = model(**batch, task_ids=task_ids, output_routing_weights=True)
        for i in range(4):
            alone = model(**row(batch, i), task_ids=task_ids[i:i + 1], output_routing_weights=True)
            torch.testing.assert_close(together.logits[i, -1], alone.logits[0, -1], rtol=0, atol=1e-5)
            # padding is left out of the routing statistics
            torch.testing.assert_close(together.routing_weights[i], alone.routing_weights[0], rtol=0, atol=1e-5)
    assert together.routing_weights.shape == (4, 4, len(TASKS) + 1)


def test_task_ids_change_the_output_and_stage2_routes_without_them():
    model = tiny_causal_alter(stage=1)
    ids = left_padded_batch()["input_ids"]
    with torch.no_grad():
        outs = [model(ids, task_ids=torch.full((4,), t)).logits for t in range(3)]
        assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3
        model.set_stage(2)
        unknown = model(ids).logits
        assert torch.equal(unknown, model(ids, task_ids=torch.full((4,), len(TASKS))).logits)


def test_set_stage_trains_exactly_the_stage_sets():
    model = tiny_causal_alter(randomize=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.weight" in trainable
    assert "model.layers.1.mta.ffn.task_down" in trainable and "model.layers.1.mta.ffn.router.weight" not in trainable
    model.set_stage(2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == model.trainable_parameter_names(2)
    assert all(".mta." in n for n in trainable) and "model.layers.0.mta.ffn.gate_mix" in trainable
    assert not any(n.endswith(("task_down", "task_up")) for n in trainable)


def test_loss_is_on_the_labelled_tokens_only_and_stage2_adds_the_aux_loss():
    model = tiny_causal_alter(stage=2, gate_mix=0.5, router_top_k=2).train()
    model.config.task_id_drop_rate = 0.0
    batch = left_padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-2] = -100  # only the last two tokens are the answer
    out = model(**batch, task_ids=torch.tensor([0, 1, 2, 0]), labels=labels)
    logits = out.logits[:, :-1].flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, expected + model.config.router_aux_loss_coef * out.aux_loss)
    out.loss.backward()
    assert model.model.layers[0].mta["ffn"].router.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad is None  # frozen in stage 2


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_causal_alter(stage=1).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert model.model.gradient_checkpointing
        batch = left_padded_batch()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, task_ids=torch.tensor([0, 1, 2, 0]), labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(".mta." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# ---- generate ------------------------------------------------------------------------------------------------------


def test_the_head_of_a_frozen_model_reads_the_kept_positions_contiguous():
    """`logits_to_keep` (1 in `generate`) slices a longer sequence; given that strided slice, `matmul` would broadcast
    a weight that needs no gradient (stage 2: frozen backbone) into a batched GEMM, several times the plain model's
    cost for the head. The head gets the kept positions contiguous, and the logits are those of the full run."""
    model = tiny_causal_alter("llama", stage=2)
    assert not model.lm_head.weight.requires_grad
    contiguous = []
    model.lm_head.register_forward_hook(lambda module, args, out: contiguous.append(args[0].is_contiguous()))
    batch = left_padded_batch()
    with torch.no_grad():
        last = model(**batch, logits_to_keep=1).logits
        full = model(**batch).logits
    assert contiguous == [True, True]
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)

DECODING = {
    "greedy": dict(do_sample=False),
    "beam_multi": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}


def test_generate_right_after_conversion_matches_the_source_model():
    source = tiny_causal_lm("qwen3")
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS).eval()
    batch = left_padded_batch()
    for kwargs in DECODING.values():
        expected = source.generate(**batch, max_new_tokens=5, **kwargs)
        assert torch.equal(model.generate(**batch, task_ids=torch.tensor([0, 1, 2, 0]), max_new_tokens=5, **kwargs),
                           expected)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("strategy", sorted(DECODING))
def test_generate_mixed_tasks_with_left_padding_equals_per_example_runs(stage, strategy):
    model = tiny_causal_alter("llama", stage=stage, router_top_k=2 if stage == 2 else None)
    batch, task_ids = left_padded_batch(), torch.tensor([2, 0, 1, 0])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, **DECODING[strategy])
    together = model.generate(**batch, task_ids=task_ids, **kwargs)
    per_row = kwargs.get("num_return_sequences", 1)
    width = batch["input_ids"].shape[1]
    for i in range(4):
        single = row(batch, i)
        alone = model.generate(**single, task_ids=task_ids[i:i + 1], **kwargs)
        n = single["input_ids"].shape[1]
        assert torch.equal(together[i * per_row:(i + 1) * per_row, width - n:], alone)
    uncached = model.generate(**batch, task_ids=task_ids, use_cache=False, **kwargs)
    assert torch.equal(uncached, together)


def test_generate_samples_with_task_ids_and_num_return_sequences():
    model = tiny_causal_alter(stage=1)
    batch, task_ids = left_padded_batch(), torch.tensor([2, 0, 1, 0])
    kwargs = dict(do_sample=True, top_k=20, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4)
    torch.manual_seed(0)
    first = model.generate(**batch, task_ids=task_ids, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(model.generate(**batch, task_ids=task_ids, **kwargs), first)
    assert first.shape == (12, batch["input_ids"].shape[1] + 4)
    with pytest.raises(ValueError, match="task_ids is required"):
        model.generate(**batch, max_new_tokens=2)


def test_concurrent_callers_with_different_tasks_get_their_own_routing():
    model = tiny_causal_alter(stage=1)
    batch = left_padded_batch()
    expected = {t: model.generate(**batch, task_ids=torch.full((4,), t), max_new_tokens=6, min_new_tokens=6)
                for t in range(3)}
    results, errors = {}, []

    def worker(t, k):
        try:
            results[t, k] = model.generate(**batch, task_ids=torch.full((4,), t), max_new_tokens=6, min_new_tokens=6)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t, k)) for k in range(3) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({tuple(v.flatten().tolist()) for v in expected.values()}) == 3  # the tasks differ
    for (t, _), out in results.items():
        assert torch.equal(out, expected[t])


def test_auto_model_for_causal_lm_builds_and_reloads_in_process(tmp_path):
    model = tiny_causal_alter("qwen2", stage=2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is AlterForCausalLM and reloaded.config.stage == 2
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == reloaded.trainable_parameter_names(2)
    batch = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch, task_ids=torch.tensor([0, 1, 2, 3])).logits,
                                   model(**batch, task_ids=torch.tensor([0, 1, 2, 3])).logits, rtol=0, atol=0)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # tied as Qwen2
