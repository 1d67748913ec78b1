"""The ALTER model: conversion, stages, routing, generation, save/load, and the usual Transformers machinery."""

import pytest
import torch

from conftest import TASKS, random_batch, tiny_alter, tiny_t5
from modeling_alter import AlterConfig, AlterForConditionalGeneration


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


# ---- conversion -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,tied", [("relu", True), ("gated-gelu", False)])
def test_from_t5_matches_t5_in_both_stages(ffn, tied):
    t5 = tiny_t5(ffn, tied)
    batch = random_batch()
    reference = logits(t5, batch)
    model = AlterForConditionalGeneration.from_t5(t5, task_names=TASKS, adapter_dim=8).eval()
    assert model.config.is_gated_act == (ffn != "relu")
    mixed = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(logits(model, batch, task_ids=mixed), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, batch, task_ids=torch.tensor([2, 2, 2, 2])), reference, atol=1e-5, rtol=0)
    model.set_stage(2)
    torch.testing.assert_close(logits(model, batch, task_ids=mixed), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, batch), reference, atol=1e-5, rtol=0)


def test_from_t5_accepts_a_folder(tmp_path, t5_gated):
    t5_gated.save_pretrained(tmp_path)
    model = AlterForConditionalGeneration.from_t5(str(tmp_path), task_names=TASKS).eval()
    batch = random_batch()
    torch.testing.assert_close(logits(model, batch, task_ids=torch.tensor([0, 1, 2, 0])), logits(t5_gated, batch),
                               atol=1e-5, rtol=0)


def test_from_t5_rejects_other_models():
    with pytest.raises(ValueError, match="T5-family"):
        AlterForConditionalGeneration.from_t5(tiny_alter(), task_names=TASKS)


# ---- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(task_names=[]), "non-empty list"),
        (dict(task_names=["a", "b", "a"]), "duplicates \\['a'\\]"),
        (dict(task_names=["a", ""]), "invalid names"),
        (dict(adapter_dim=0), "adapter_dim=0"),
        (dict(num_shared_adapters=-1), "num_shared_adapters=-1"),
        (dict(router_top_k=5), "router_top_k=5 is larger than the number of adapters"),
        (dict(mta_placement=["ffn", "moe"]), "unknown sublayers \\['moe'\\]"),
        (dict(mta_placement=["self_attention"]), "must include 'ffn'"),
        (dict(stage=3), "stage=3"),
        (dict(task_id_drop_rate=1.0), "task_id_drop_rate=1.0"),
        (dict(adapter_activation="nope"), "adapter_activation='nope'"),
        (dict(feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    base = dict(task_names=["a", "b", "c"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        AlterConfig(**base)


def test_config_round_trip(tmp_path):
    config = AlterConfig(task_names=["a", "b"], mta_placement=["cross_attention", "ffn"], router_top_k=2)
    config.save_pretrained(tmp_path)
    loaded = AlterConfig.from_pretrained(tmp_path)
    assert loaded.task_names == ["a", "b"] and loaded.mta_placement == ["ffn", "cross_attention"]
    assert loaded.router_top_k == 2 and loaded.model_type == "alter" and loaded.num_adapters == 3


# ---- stages and trainable sets --------------------------------------------------------------------------------


def expected_trainable(model, stage):
    names = set()
    for name, _ in model.named_parameters():
        in_mta = ".mta." in name
        task_adapter = name.endswith(("task_down", "task_up"))
        if stage == 1 and (not in_mta or task_adapter):
            names.add(name)
        if stage == 2 and in_mta and not task_adapter:
            names.add(name)
    return names


@pytest.mark.parametrize("placement", [["ffn"], ["ffn", "self_attention", "cross_attention"]])
def test_trainable_sets_per_stage(placement):
    model = tiny_alter(mta_placement=placement)
    n_mta = 4 * len(placement) - (2 if "cross_attention" in placement else 0)  # the encoder has no cross-attention
    assert len(model.mta_modules()) == n_mta
    d, r, T, S = 32, 8, len(TASKS), 1
    per_mta_stage2 = S * 2 * d * r + d * (T + S) + (T + 1) * (T + S) + 1
    per_mta_task = T * 2 * d * r
    total = sum(p.numel() for p in model.parameters())
    for stage in (1, 2):
        model.set_stage(stage)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected_trainable(model, stage) == model.trainable_parameter_names(stage)
        assert model.config.stage == stage
    model.set_stage(1)
    assert model.num_parameters(only_trainable=True) == total - n_mta * per_mta_stage2
    model.set_stage(2)
    assert model.num_parameters(only_trainable=True) == n_mta * per_mta_stage2
    assert model.num_parameters() == total
    assert total == sum(p.numel() for p in tiny_t5().parameters()) + n_mta * (per_mta_task + per_mta_stage2)


def test_stage1_adapters_only():
    model = tiny_alter(stage1_train_backbone=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("task_down", "task_up")) for n in trainable)


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_reaches_exactly_the_trainable_set(stage):
    model = tiny_alter().train()
    model.set_stage(stage)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(0.5)  # so that the gate itself receives gradient
    batch = random_batch()
    model(**batch, task_ids=torch.tensor([0, 1, 2, 0])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == model.trainable_parameter_names(stage)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_set_stage_rejects_bad_stage():
    with pytest.raises(ValueError, match="stage=3 is not valid: expected 1 or 2"):
        tiny_alter().set_stage(3)


def test_no_jump_at_the_switch():
    model = tiny_alter()
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.shared_up.zero_()  # as after stage 1, which does not train the shared adapters
    batch = random_batch()
    task_ids = torch.tensor([0, 1, 2, 1])
    before = logits(model, batch, task_ids=task_ids)
    model.set_stage(2)
    after = logits(model, batch, task_ids=task_ids)
    assert (before - after).abs().max() < 1e-4
    # and the gate does move the output once its mix is non-zero
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(0.5)
    assert (logits(model, batch, task_ids=task_ids) - before).abs().max() > 1e-3


def test_stage1_computes_only_the_examples_own_adapter():
    model = tiny_alter()
    batch = random_batch()
    task_ids = torch.tensor([0, 1, 2, 1])
    mixed = logits(model, batch, task_ids=task_ids)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_up[0].add_(1.0)  # changes task 0 only
    changed = logits(model, batch, task_ids=task_ids)
    assert (changed[0] - mixed[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1:], mixed[1:], atol=0, rtol=0)


# ---- stage-2 routing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
def test_stage2_routing_outputs_and_aux_loss(top_k):
    model = tiny_alter(router_top_k=top_k).train()
    model.set_stage(2)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(1.0)
    batch = random_batch()
    torch.manual_seed(0)  # the same task ids are dropped in each call below
    out = model(**batch, task_ids=torch.tensor([0, 1, 2, 0]), output_routing_weights=True)
    n_mta, n_adapters = len(model.mta_modules()), len(TASKS) + 1
    assert out.routing_weights.shape == (4, n_mta, n_adapters)
    assert out.routing_entropy.shape == (4, n_mta)
    torch.testing.assert_close(out.routing_weights.sum(-1), torch.ones(4, n_mta))
    assert out.aux_loss is not None and out.aux_loss > 0
    model.config.router_aux_loss_coef = 0.0
    torch.manual_seed(0)
    without_aux = model(**batch, task_ids=torch.tensor([0, 1, 2, 0])).loss
    model.config.router_aux_loss_coef = 0.5
    torch.manual_seed(0)
    with_aux = model(**batch, task_ids=torch.tensor([0, 1, 2, 0])).loss
    torch.testing.assert_close(with_aux - without_aux, 0.5 * out.aux_loss.detach(), rtol=1e-4, atol=1e-5)
    if top_k is not None:
        mta = next(iter(model.mta_modules().values()))
        weights, _ = mta.gate_weights(torch.randn(4, 5, 32), torch.tensor([0, 1, 2, 0]))
        assert ((weights > 0).sum(-1) <= top_k).all()


def test_stage2_without_task_ids_uses_the_unknown_task_embedding():
    model = tiny_alter()
    model.set_stage(2)
    batch = random_batch()
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_embedding.weight[len(TASKS)].zero_()
    unknown = logits(model, batch)
    explicit_unknown = logits(model, batch, task_ids=torch.full((4,), len(TASKS)))
    torch.testing.assert_close(unknown, explicit_unknown, atol=0, rtol=0)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_embedding.weight[len(TASKS)].normal_()
    assert (logits(model, batch) - unknown).abs().max() > 1e-4


def test_task_ids_are_dropped_during_stage2_training_only():
    model = tiny_alter(task_id_drop_rate=0.5).train()
    model.set_stage(2)
    batch = random_batch(batch=64, pad=False)
    task_ids = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    out = model(**batch, task_ids=task_ids, output_routing_weights=True)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.zero_()
    torch.manual_seed(0)
    out = model(**batch, task_ids=task_ids, output_routing_weights=True)
    own = out.routing_weights[:, 0, 0]
    dropped = (own < 1).sum().item()
    assert 16 < dropped < 48  # about half of the 64 examples routed as unknown
    model.eval()
    out = model(**batch, task_ids=task_ids, output_routing_weights=True)
    assert torch.equal(out.routing_weights[:, 0, 0], torch.ones(64))
    assert out.aux_loss is None  # the load-balancing loss is a training loss


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_ids,match",
    [
        (torch.tensor([0, 1, 3, 0]), "task_ids contains 3, out of range: expected 0..2"),
        (torch.tensor([0, -1, 1, 0]), "task_ids contains -1, out of range"),
        (torch.tensor([[0, 1, 2, 0]]), r"task_ids has shape \(1, 4\); expected \(4,\)"),
        (torch.tensor([0, 1, 2]), r"task_ids has shape \(3,\); expected \(4,\)"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "task_ids has dtype torch.float32; expected torch.long"),
        ([0, 1, 2, 0], "task_ids must be a torch.LongTensor"),
        (None, "task_ids is required for a stage-1 ALTER model"),
    ],
)
def test_bad_task_ids_get_clear_errors(task_ids, match):
    model = tiny_alter()
    with pytest.raises(ValueError, match=match):
        model(**random_batch(), task_ids=task_ids)


def test_stage1_generate_without_task_ids_fails_clearly():
    model = tiny_alter()
    with pytest.raises(ValueError, match="task_ids is required"):
        model.generate(input_ids=torch.randint(2, 100, (2, 5)), max_new_tokens=3)


def test_unknown_task_name():
    model = tiny_alter()
    assert model.task_ids(["topic", "sentiment"]).tolist() == [1, 0]
    assert model.task_ids("reverse").tolist() == [2]
    with pytest.raises(ValueError, match=r"Unknown task name\(s\) \['medical'\]; this model knows"):
        model.task_ids(["topic", "medical"])


def test_stage2_out_of_range_names_the_unknown_id():
    model = tiny_alter()
    model.set_stage(2)
    with pytest.raises(ValueError, match=r"expected 0..2 or 3 \(unknown task, stage 2\)"):
        model(**random_batch(), task_ids=torch.tensor([0, 1, 4, 0]))


def test_bad_attention_mask_shape():
    model = tiny_alter()
    batch = random_batch()
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 8\); expected \(4, 9\)"):
        model(**batch, task_ids=torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("override,match", [
    (dict(task_names=TASKS + ["extra"]), "task_names: checkpoint has"),
    (dict(adapter_dim=16), "adapter_dim: checkpoint has 8, config asks for 16"),
])
def test_mismatched_checkpoint_fails_clearly(tmp_path, override, match):
    tiny_alter().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        AlterForConditionalGeneration.from_pretrained(tmp_path, **override)


def test_corrupt_checkpoint_fails_clearly(tmp_path):
    tiny_alter().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        AlterForConditionalGeneration.from_pretrained(tmp_path)


def test_unexpected_forward_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"Unexpected arguments \['task_id'\]"):
        tiny_alter()(**random_batch(), task_ids=torch.tensor([0, 1, 2, 0]), task_id=1)


def test_decoder_routing_statistics_ignore_padded_targets():
    model = tiny_alter()
    model.set_stage(2)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(0.5)
    batch = random_batch(batch=2, pad=False)
    batch["labels"][1, 3:] = -100
    task_ids = torch.tensor([0, 2])
    with torch.no_grad():
        together = model(**batch, task_ids=task_ids, output_routing_weights=True)
        alone = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                      labels=batch["labels"][1:, :3], task_ids=task_ids[1:], output_routing_weights=True)
    torch.testing.assert_close(together.routing_weights[1], alone.routing_weights[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.routing_entropy[1], alone.routing_entropy[0], atol=1e-5, rtol=1e-5)


def test_gate_mix_below_zero_gets_the_gradient_that_brings_it_back():
    """`m = clamp(gate_mix, 0, 1)`: once an optimizer step pushes `gate_mix` below 0 (it starts at exactly 0), a plain
    clamp's zero gradient would keep the task adapters one-hot for the rest of stage 2. The inward gradient passes."""
    model = tiny_alter().train()
    model.set_stage(2)
    batch, task_ids = random_batch(), torch.tensor([0, 1, 2, 0])
    mtas = list(model.mta_modules().values())
    with torch.no_grad():
        for mta in mtas:
            mta.gate_mix.fill_(0.5)
        target = model(**batch, task_ids=task_ids).logits  # what the model gives with the gate mixed in
        for mta in mtas:
            mta.gate_mix.fill_(-0.05)
        one_hot = model(**batch, task_ids=task_ids).logits
        for mta in mtas:
            mta.gate_mix.fill_(0.0)
        # the forward clamps: below 0 is exactly the one-hot route
        torch.testing.assert_close(model(**batch, task_ids=task_ids).logits, one_hot, rtol=0, atol=0)
        for mta in mtas:
            mta.gate_mix.fill_(-0.05)
    # a loss that wants the mix back: every gate_mix gets a gradient pointing up (descent moves it by -grad)
    ((model(**batch, task_ids=task_ids).logits - target) ** 2).mean().backward()
    assert all(mta.gate_mix.grad is not None and mta.gate_mix.grad < 0 for mta in mtas)
    # a loss that wants it further out gets no gradient: the parameter does not drift below 0
    model.zero_grad()
    ((model(**batch, task_ids=task_ids).logits - target) ** 2).mean().neg().backward()
    assert all(mta.gate_mix.grad == 0 for mta in mtas)
    # inside [0, 1] the gradient passes as through a plain clamp
    model.zero_grad()
    for mta in mtas:
        with torch.no_grad():
            mta.gate_mix.fill_(0.3)
    ((model(**batch, task_ids=task_ids).logits - target) ** 2).mean().backward()
    assert all(mta.gate_mix.grad != 0 for mta in mtas)
