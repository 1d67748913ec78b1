"""The MTA fast paths give the same outputs, statistics and gradients as the straightforward computation.

The straightforward computation (`reference_mta`, `reference_gate`) is the design written out: every adapter of the
module is applied to every token and weighted by the stage-1 one-hot or by the stage-2 gate, with no grouping,
sorting, skipping or batching. The fast paths in `AlterMTA` (one weight read per distinct task, grouped GEMMs,
(token, adapter) pairs for top-k, skipping zero weights, per-bank batched GEMMs) must agree with it.
"""

import pytest
import torch
import torch.nn.functional as F

import modeling_alter.mta as modeling
from conftest import random_batch, tiny_alter
from modeling_alter import AlterConfig
from modeling_alter.mta import AlterMTA, build_routing

D, R = 32, 8  # 16-byte aligned rows, so the CPU grouped GEMM path runs


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the straightforward computation ----------------------------------------------------------------------------


def reference_gate(mta, u, task_ids):
    """Stage-2 weights: softmax(router(u) + task embedding), top-k renormalised; task adapters mix the own task's
    one-hot with it by clamp(gate_mix, 0, 1), shared adapters take it as is; examples without a (known) task use the
    gate alone. Returns (weights, probs), both fp32."""
    n, T = mta.num_adapters, mta.num_tasks
    if task_ids is None:
        task_ids = torch.full((u.shape[0],), T)
    logits = u.float() @ mta.router.weight.float().t() + mta.task_embedding.weight.float()[task_ids][:, None]
    probs = logits.softmax(-1)
    gate = probs
    if mta.top_k is not None and mta.top_k < n:
        keep = torch.zeros_like(probs).scatter(-1, probs.topk(mta.top_k, dim=-1).indices, 1.0)
        gate = probs * keep / (probs * keep).sum(-1, keepdim=True)
    rows = []
    for i, task in enumerate(task_ids.tolist()):
        if task == T:
            rows.append(gate[i])
        else:
            own = F.one_hot(torch.tensor(task), n).float()
            mix = mta.gate_mix.float().clamp(0, 1)
            row = (1 - mix) * own + mix * gate[i]
            rows.append(torch.cat([row[..., :T], gate[i, ..., T:]], -1))  # shared adapters: the gate weight as is
    return torch.stack(rows), probs


def reference_mta(mta, u, task_ids, stage):
    """sum_j w_j * U_j act(D_j u) over every task and shared adapter j, for every token."""
    n = mta.num_adapters
    if stage == 1:
        weights = F.one_hot(task_ids, n).float()[:, None, :].expand(-1, u.shape[1], -1)
    else:
        weights, _ = reference_gate(mta, u, task_ids)
    down = list(mta.task_down) + list(mta.shared_down)
    up = list(mta.task_up) + list(mta.shared_up)
    out = torch.zeros_like(u)
    for j in range(n):
        out = out + weights[..., j : j + 1].to(u.dtype) * (mta.act(u @ down[j]) @ up[j])
    return out


def reference_stats(mta, u, task_ids, token_mask, training):
    """Per-example mean weights and entropy over the unmasked tokens, and the Switch load-balancing loss."""
    weights, probs = reference_gate(mta, u, task_ids)
    mask = torch.ones(weights.shape[:2], dtype=torch.bool) if token_mask is None else token_mask
    entropy = -(weights * weights.clamp(min=1e-9).log()).sum(-1)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean_weights = (weights * mask[..., None]).sum(1) / count
    mean_entropy = (entropy * mask).sum(1) / count.squeeze(1)
    aux = None
    if training:
        k = mta.top_k or 1
        chosen = torch.zeros_like(probs).scatter(-1, probs.topk(k, dim=-1).indices, 1.0 / k)
        f, p = chosen[mask].mean(0), probs[mask].mean(0)
        aux = mta.num_adapters * (f * p).sum()
    return mean_weights, mean_entropy, aux


# ---- helpers ------------------------------------------------------------------------------------------------------


def make_mta(num_tasks=4, shared=1, top_k=None, mix=0.4, seed=0, dtype=torch.float32, **config_kwargs):
    torch.manual_seed(seed)
    config = AlterConfig(task_names=[f"t{i}" for i in range(num_tasks)], d_model=D, adapter_dim=R,
                         num_shared_adapters=shared, router_top_k=top_k, **config_kwargs)
    mta = AlterMTA(config)
    with torch.no_grad():
        for p in mta.parameters():
            p.normal_(0, 0.3)
        mta.task_embedding.weight.normal_(0, 2.0)
        mta.gate_mix.fill_(mix)
    return mta.to(dtype), config


def routing_for(config, task_ids, batch, stage, mask=None, stats=False):
    config.stage = stage
    return build_routing(config, task_ids, batch, mask, stats, unknown_allowed=True)


def set_trainable(mta, stage):
    for name, p in mta.named_parameters():
        task_adapter = name in ("task_down", "task_up")
        p.requires_grad_(task_adapter if stage == 1 else not task_adapter)


def run(fn, mta, u, grad):
    """Output and gradients (input and every parameter; None counts as zero) of `fn(u)` under a fixed loss."""
    mta.zero_grad(set_to_none=True)
    u = u.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = fn(u)
    if not grad:
        return out, {}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * g).sum().backward()
    grads = {"u": u.grad}
    for name, p in mta.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out.detach(), grads


def assert_same(mta, fast, slow, u, grad, atol=1e-5):
    out, grads = run(fast, mta, u, grad)
    ref, ref_grads = run(slow, mta, u, grad)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=1e-4, msg=f"gradient of {name}")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the stage-2 computations and of the grouped GEMM kernel."""
    calls = {"own_adapters": 0, "sparse_mixture": 0, "dense_mixture": 0, "grouped_mm": 0}
    for name in ("own_adapters", "sparse_mixture", "dense_mixture"):
        original = getattr(AlterMTA, f"_{name}")

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(AlterMTA, f"_{name}", counted)
    if modeling._grouped_mm is not None:
        kernel = modeling._grouped_mm

        def grouped(*args, **kwargs):
            calls["grouped_mm"] += 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(modeling, "_grouped_mm", grouped)
    return calls


# ---- stage 1 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("length", [1, 7])
def test_stage1_one_task_batch_uses_one_adapter(grad, length, spy):
    mta, config = make_mta()
    set_trainable(mta, 1)
    u = torch.randn(3, length, D)
    task_ids = torch.tensor([2, 2, 2])
    routing = routing_for(config, task_ids, 3, stage=1)
    assert routing.task_groups.adapters == (2,) and routing.order is None
    assert_same(mta, lambda x: mta(x, routing)[0], lambda x: reference_mta(mta, x, task_ids, 1), u, grad)
    assert spy["grouped_mm"] == 0
    if grad:  # only the task's own adapter receives gradient
        _, grads = run(lambda x: mta(x, routing)[0], mta, u, True)
        assert grads["task_up"][[0, 1, 3]].abs().sum() == 0 and grads["task_up"][2].abs().sum() > 0


@pytest.mark.parametrize("grouped_kernel", [True, False], ids=["grouped_mm", "python_loop"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("task_ids", [[3, 0, 3, 1, 0], [0, 1, 2, 3, 2]], ids=["some_tasks", "all_tasks"])
@pytest.mark.parametrize("length", [1, 6])
def test_stage1_mixed_tasks_read_each_adapter_once(grouped_kernel, grad, task_ids, length, spy, monkeypatch):
    if not grouped_kernel:
        monkeypatch.setattr(modeling, "_grouped_mm", None)
    mta, config = make_mta()
    set_trainable(mta, 1)
    task_ids = torch.tensor(task_ids)
    u = torch.randn(len(task_ids), length, D)
    routing = routing_for(config, task_ids, len(task_ids), stage=1)
    assert routing.task_groups.adapters == tuple(sorted(set(task_ids.tolist())))
    assert_same(mta, lambda x: mta(x, routing)[0], lambda x: reference_mta(mta, x, task_ids, 1), u, grad)
    if grouped_kernel and not grad and modeling._grouped_mm is not None:
        assert spy["grouped_mm"] >= 2  # one call per projection, not one per task


def test_stage1_few_tasks_of_many_loop_over_the_used_adapters_only(spy):
    """2 of 8 tasks: the grouped kernel would walk 6 empty groups, so the used adapters are looped over instead."""
    mta, config = make_mta(num_tasks=8)
    set_trainable(mta, 1)
    task_ids = torch.tensor([5, 1, 5])
    u = torch.randn(3, 4, D)
    routing = routing_for(config, task_ids, 3, stage=1)
    assert routing.task_groups.adapters == (1, 5) and routing.task_groups.sizes == (1, 2)
    for grad in (False, True):
        assert_same(mta, lambda x: mta(x, routing)[0], lambda x: reference_mta(mta, x, task_ids, 1), u, grad)
    assert spy["grouped_mm"] == 0


def test_stage1_each_example_is_independent_of_the_others():
    """A row's output does not depend on which tasks share its batch (the KV-cache/generation property)."""
    mta, config = make_mta()
    u = torch.randn(4, 3, D)
    task_ids = torch.tensor([1, 3, 1, 0])
    with torch.no_grad():
        together = mta(u, routing_for(config, task_ids, 4, stage=1))[0]
        for i in range(4):
            alone = mta(u[i : i + 1], routing_for(config, task_ids[i : i + 1], 1, stage=1))[0]
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=1e-6)


# ---- stage 2 ------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sparse_when_it_skips_half_the_pairs", "sparse_only_when_it_skips_half_the_adapters"])
def path(request, monkeypatch):
    """When the CPU takes the (token, adapter)-pair path: the tiny shapes here are below the production threshold."""
    monkeypatch.setattr(modeling, "_MIN_SKIPPED_PAIRS", 0 if request.param.startswith("sparse") else 10**9)
    return request.param


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("task_ids", [[0, 3, 1, 0], None, [2, 4, 4, 1]], ids=["tasks", "no_task_ids", "some_unknown"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("mix", [0.0, 0.4, 1.0])
def test_stage2_matches_the_straightforward_computation(grad, task_ids, top_k, mix, path):
    mta, config = make_mta(top_k=top_k, mix=mix)
    set_trainable(mta, 2)
    task_ids = None if task_ids is None else torch.tensor(task_ids)
    u = torch.randn(4, 5, D)
    routing = routing_for(config, task_ids, 4, stage=2)
    assert_same(mta, lambda x: mta(x, routing)[0], lambda x: reference_mta(mta, x, task_ids, 2), u, grad)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_tasks,shared", [(4, 1), (6, 0), (3, 2)])
def test_stage2_top_k_computes_only_chosen_adapters(top_k, num_tasks, shared, spy, monkeypatch):
    monkeypatch.setattr(modeling, "_MIN_SKIPPED_PAIRS", 0)
    mta, config = make_mta(num_tasks=num_tasks, shared=shared, top_k=top_k, mix=0.6)
    set_trainable(mta, 2)
    task_ids = torch.arange(6) % num_tasks
    u = torch.randn(6, 9, D)
    routing = routing_for(config, task_ids, 6, stage=2)
    for grad in (False, True):
        assert_same(mta, lambda x: mta(x, routing)[0], lambda x: reference_mta(mta, x, task_ids, 2), u, grad)
    if (top_k + 1) * 2 <= num_tasks + shared:
        assert spy["sparse_mixture"] > 0
    # changing an adapter that no token chose leaves the output unchanged
    with torch.no_grad():
        weights, _ = mta.gate_weights(u, task_ids)
        unused = (weights.reshape(-1, mta.num_adapters) == 0).all(0).nonzero().flatten().tolist()
        before = mta(u, routing)[0]
        for j in unused:
            (mta.task_up[j] if j < num_tasks else mta.shared_up[j - num_tasks]).add_(1.0)
        torch.testing.assert_close(mta(u, routing)[0], before, atol=0, rtol=0)


def test_stage2_at_the_switch_costs_only_the_own_and_shared_adapters(spy):
    """gate_mix == 0 (right after the switch): at inference the task adapters' weights are exactly one-hot, so stage 2
    computes the examples' own adapters (as stage 1 does) plus the shared bank; in training every adapter stays in
    (gate_mix's gradient)."""
    mta, config = make_mta(mix=0.0)
    set_trainable(mta, 2)
    task_ids = torch.tensor([1, 1, 3])
    u = torch.randn(3, 8, D)
    with torch.no_grad():
        stage2 = mta(u, routing_for(config, task_ids, 3, stage=2))[0]
        reference = reference_mta(mta, u, task_ids, 2)
        stage1 = mta(u, routing_for(config, task_ids, 3, stage=1))[0]
        mta.shared_up.zero_()  # as at the switch: shared adapters start with a zero output
        at_switch = mta(u, routing_for(config, task_ids, 3, stage=2))[0]
    torch.testing.assert_close(stage2, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at_switch, stage1, atol=1e-6, rtol=0)
    assert spy["own_adapters"] == 3 and spy["dense_mixture"] == 0 and spy["sparse_mixture"] == 0
    with torch.no_grad():
        mta.shared_up.normal_(0, 0.3)
    _, grads = run(lambda x: mta(x, routing_for(config, task_ids, 3, stage=2))[0], mta, u, True)
    _, ref_grads = run(lambda x: reference_mta(mta, x, task_ids, 2), mta, u, True)
    assert grads["gate_mix"].abs() > 0
    torch.testing.assert_close(grads["gate_mix"], ref_grads["gate_mix"], atol=1e-5, rtol=1e-4)


def test_gate_mix_is_clamped_and_shared_adapters_learn_from_the_switch():
    """The mix acts within [0, 1]; at gate_mix == 0 the shared adapters already receive gradient (through their gate
    weight), and the router and task embeddings as soon as the shared adapters are non-zero: stage 2 is not stuck at
    its start."""
    mta, config = make_mta(mix=1.7)
    u = torch.randn(3, 8, D)
    task_ids = torch.tensor([0, 2, 3])
    routing = routing_for(config, task_ids, 3, stage=2)
    with torch.no_grad():
        above = mta(u, routing)[0]
        mta.gate_mix.fill_(1.0)
        torch.testing.assert_close(mta(u, routing)[0], above, atol=0, rtol=0)
        mta.gate_mix.fill_(0.0)
        mta.shared_up.zero_()
    set_trainable(mta, 2)
    _, grads = run(lambda x: mta(x, routing)[0], mta, u, True)
    for name in ("shared_up", "gate_mix"):  # the first stage-2 step: the shared adapters start to learn
        assert grads[name].abs().sum() > 0, name
    with torch.no_grad():
        mta.shared_up.normal_(0, 0.3)  # after it, the gate learns through them
    _, grads = run(lambda x: mta(x, routing)[0], mta, u, True)
    for name in ("router.weight", "task_embedding.weight", "shared_up", "shared_down", "gate_mix"):
        assert grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("shared", [0, 1, 3])
def test_dense_and_sparse_paths_on_any_support(grad, shared):
    """Both stage-2 computations, called directly with arbitrary weights: sparse skips exactly the pairs outside
    the support, dense computes them all."""
    mta, _ = make_mta(num_tasks=5, shared=shared)
    set_trainable(mta, 2)
    n = mta.num_adapters
    g = torch.Generator().manual_seed(3)
    u = torch.randn(3, 4, D, generator=g)
    weights = torch.rand(3, 4, n, generator=g)
    support = torch.rand(3, 4, n, generator=g) < 0.4
    support[..., 0] = True
    sparse_weights = weights * support

    def reference(x):
        down = list(mta.task_down) + list(mta.shared_down)
        up = list(mta.task_up) + list(mta.shared_up)
        return sum(sparse_weights[..., j : j + 1] * (mta.act(x @ down[j]) @ up[j]) for j in range(n))

    full = mta._gate_parameters(None)
    assert_same(mta, lambda x: mta._sparse_mixture(x, sparse_weights, support, full), reference, u, grad)
    assert_same(mta, lambda x: mta._dense_mixture(x, sparse_weights, full), reference, u, grad)


@pytest.mark.parametrize("stage,top_k", [(1, None), (2, None), (2, 2)])
def test_bfloat16_inference(stage, top_k):
    mta, config = make_mta(top_k=top_k, dtype=torch.bfloat16)
    task_ids = torch.tensor([0, 2, 2, 3])
    u = torch.randn(4, 6, D, dtype=torch.bfloat16)
    with torch.no_grad():
        out = mta(u, routing_for(config, task_ids, 4, stage=stage))[0]
        ref = reference_mta(mta, u, task_ids, stage)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


# ---- statistics, masks, and no stale state ----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("task_ids", [[0, 3, 1], None])
def test_stage2_statistics_with_a_token_mask(training, top_k, task_ids):
    mta, config = make_mta(top_k=top_k)
    mta.train(training)
    task_ids = None if task_ids is None else torch.tensor(task_ids)
    u = torch.randn(3, 6, D)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    with torch.set_grad_enabled(training):  # the load-balancing loss is a training loss: only with gradients
        _, stats = mta(u, routing_for(config, task_ids, 3, stage=2, mask=mask, stats=True))
        weights, entropy, aux = reference_stats(mta, u, task_ids, mask, training)
    torch.testing.assert_close(stats.weights.detach(), weights.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.detach(), entropy.detach(), atol=1e-6, rtol=1e-5)
    if training:
        torch.testing.assert_close(stats.aux_loss, aux, atol=1e-6, rtol=1e-5)
    else:
        assert stats.aux_loss is None


def test_weights_changed_in_place_are_used_at_once():
    """No cached copy of the weights: edits through `.data` (which bypass version counters) show immediately."""
    for stage, top_k in ((1, None), (2, None), (2, 2)):
        mta, config = make_mta(top_k=top_k)
        task_ids = torch.tensor([0, 1, 3])
        u = torch.randn(3, 4, D)
        routing = routing_for(config, task_ids, 3, stage=stage)
        with torch.no_grad():
            mta(u, routing)
            mta.task_down.data.mul_(-1.5)
            mta.shared_up.data.add_(0.3)
            mta.task_up.data[1] += 0.2
            torch.testing.assert_close(mta(u, routing)[0], reference_mta(mta, u, task_ids, stage), atol=1e-5, rtol=1e-4)


# ---- the whole model, padded batches -------------------------------------------------------------------------------------


def reference_forward(self, u, routing):
    """`AlterMTA.forward` with the straightforward computation (statistics from the reference gate)."""
    out = reference_mta(self, u, routing.task_ids, routing.stage)
    if routing.stage == 1:
        return out, modeling.MTAStats(None, None, None)
    weights, probs = reference_gate(self, u, routing.task_ids)
    return out, self._gate_stats(weights, probs, routing, self._gate_parameters(None))


@pytest.mark.parametrize(
    "stage,top_k,task_ids",
    [(1, None, [2, 0, 1, 0]), (1, None, [1, 1, 1, 1]), (2, None, [2, 0, 1, 0]), (2, 2, [2, 0, 1, 3]),
     (2, 2, None), (2, 1, [1, 1, 1, 1])],
)
def test_whole_model_with_padding_matches_the_straightforward_model(stage, top_k, task_ids, monkeypatch):
    model = tiny_alter(router_top_k=top_k, task_id_drop_rate=0.0).train()
    model.set_stage(stage)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(0.6)
    batch = random_batch(pad=True)
    batch["decoder_attention_mask"] = torch.ones_like(batch["labels"])
    batch["decoder_attention_mask"][1, -2:] = 0
    task_ids = None if task_ids is None else torch.tensor(task_ids)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**batch, task_ids=task_ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), out.loss.detach(), grads

    def eval_logits():
        with torch.no_grad():
            model.eval()
            logits = model(**batch, task_ids=task_ids).logits
            model.train()
        return logits

    fast = loss_and_grads(), eval_logits()
    monkeypatch.setattr(AlterMTA, "forward", reference_forward)
    slow = loss_and_grads(), eval_logits()
    (logits, loss, grads), eval_fast = fast
    (ref_logits, ref_loss, ref_grads), eval_slow = slow
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eval_fast, eval_slow, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():  # a parameter the reference leaves without gradient gets none (or zeros) here
        ref = ref_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, ref, atol=1e-4, rtol=1e-3, msg=name)
