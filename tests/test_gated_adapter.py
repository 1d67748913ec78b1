"""The gated adapter form `U (act(D u) * L u)` (mirrors a gated FFN): every MTA path, task changes, exact export."""

import pytest
import torch
from conftest import TASKS, random_batch, tiny_t5
from test_mta_fast_paths import D, make_mta, reference_gate, routing_for
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

import modeling_alter.mta as mta_module
from hub_upload.export_task import task_to_t5
from modeling_alter import AlterConfig, AlterForConditionalGeneration
from modeling_alter.mta import AlterMTA


pytestmark = pytest.mark.usefixtures("one_thread")


def make_gated(**kwargs):
    return make_mta(adapter_form="gated", adapter_activation="gelu_new", **kwargs)


def reference_gated(mta, u, task_ids, stage):
    """sum_j w_j * U_j (act(D_j u) * L_j u) over every adapter j, for every token."""
    n = mta.num_adapters
    if stage == 1:
        weights = torch.nn.functional.one_hot(task_ids, n).float()[:, None, :].expand(-1, u.shape[1], -1)
    else:
        weights, _ = reference_gate(mta, u, task_ids)
    down = list(mta.task_down) + list(mta.shared_down)
    linear = list(mta.task_linear) + list(mta.shared_linear)
    up = list(mta.task_up) + list(mta.shared_up)
    out = torch.zeros_like(u)
    for j in range(n):
        out = out + weights[..., j:j + 1] * ((mta.act(u @ down[j]) * (u @ linear[j])) @ up[j])
    return out


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("stage, task_ids, top_k, mix", [
    (1, [2, 2, 2], None, 0.4), (1, [0, 3, 1], None, 0.4), (2, [0, 3, 1], None, 0.4), (2, [0, 3, 1], 2, 0.4),
    (2, [0, 3, 1], None, 0.0), (2, None, 2, 0.4),
])
def test_gated_paths_match_the_straightforward_computation(grad, stage, task_ids, top_k, mix):
    mta, config = make_gated(top_k=top_k, mix=mix)
    ids = None if task_ids is None else torch.tensor(task_ids)
    u = torch.randn(3, 40, D, requires_grad=grad)  # many tokens: the sparse top-k path pays on CPU
    routing = routing_for(config, ids, 3, stage)
    with torch.set_grad_enabled(grad):
        out, _ = mta(u, routing)
        expected = reference_gated(mta, u, ids, stage)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if grad:
            g1 = torch.autograd.grad(out.square().sum(), [u, mta.task_linear, mta.task_down])
            g2 = torch.autograd.grad(expected.square().sum(), [u, mta.task_linear, mta.task_down])
            for a, b in zip(g1, g2):  # fp32 sums over 120 tokens in another order: rounding differs by CPU
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_gated_parameters_train_in_stage1_and_follow_task_changes():
    model = AlterForConditionalGeneration(AlterConfig(task_names=TASKS, vocab_size=120, d_model=32, d_ff=64, d_kv=8,
                                                      num_layers=2, num_heads=4, adapter_dim=8,
                                                      adapter_form="gated", feed_forward_proj="gated-gelu",
                                                      adapter_activation="gelu_new", decoder_start_token_id=0))
    stage1 = model.trainable_parameter_names(1)
    assert any(n.endswith("task_linear") for n in stage1)
    assert any(n.endswith("shared_linear") for n in model.trainable_parameter_names(2))
    assert sum(p.numel() for p in model.task_adapter_banks()) == 3 * 3 * 32 * 8 * 4  # 3 banks x 3 tasks x 4 FFNs
    model.add_tasks(["legal"], init_from="topic")
    mta = next(iter(model.mta_modules().values()))
    assert mta.task_linear.shape == (4, 32, 8) and torch.equal(mta.task_linear[3], mta.task_linear[1])
    assert model.keep_tasks(["legal"]).mta_modules()["encoder.block.0.layer.1.mta"].task_linear.shape[0] == 1
    plain = AlterForConditionalGeneration(AlterConfig(task_names=TASKS, d_model=32, num_layers=1, num_heads=2, d_kv=8,
                                                      d_ff=64, vocab_size=50))
    assert not any("linear" in name for name in plain.state_dict())  # the plain layout is unchanged


def test_gated_adapter_on_flan_like_t5_exports_exactly(tmp_path):
    model = AlterForConditionalGeneration.from_t5(tiny_t5("gated-gelu", False), task_names=TASKS, adapter_dim=8,
                                                  adapter_form="gated", adapter_activation="gelu_new").eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_up.normal_(0, 0.5)
    batch = random_batch(batch=3)
    t5 = task_to_t5(model, "reverse")
    t5.save_pretrained(tmp_path)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(t5) is T5ForConditionalGeneration and t5.config.is_gated_act and t5.config.d_ff == 64 + 8
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids(["reverse"] * 3)).logits
        torch.testing.assert_close(t5(**batch).logits, expected, rtol=0, atol=1e-5)
    relu = AlterForConditionalGeneration.from_t5(tiny_t5("relu", True), task_names=TASKS, adapter_form="gated",
                                                 adapter_activation="relu")
    with pytest.raises(ValueError, match="the adapter is gated .* but the FFN is not"):
        task_to_t5(relu, "topic")
    assert mta_module.ADAPTER_FORMS == ("plain", "gated")
    with pytest.raises(ValueError, match="adapter_form='x' is not valid"):
        AlterConfig(task_names=["a"], adapter_form="x")


@pytest.mark.parametrize("grad", [False, True])
def test_gated_sparse_top_k_path(grad, monkeypatch):
    mta, config = make_gated(num_tasks=8, top_k=2)
    calls = []
    original = AlterMTA._sparse_mixture
    monkeypatch.setattr(AlterMTA, "_sparse_mixture", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(mta_module, "_MIN_SKIPPED_PAIRS", 0)
    ids = torch.tensor([0, 5, 7])
    u = torch.randn(3, 20, D, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out, _ = mta(u, routing_for(config, ids, 3, 2))
        torch.testing.assert_close(out, reference_gated(mta, u, ids, 2), rtol=1e-5, atol=1e-5)
    assert calls
