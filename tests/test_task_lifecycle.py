"""A model's life after training: add tasks, train only them, keep some tasks (DESIGN.md §6)."""

import copy

import pytest
import torch
from conftest import TASKS, random_batch, tiny_alter
from training_utils import TRAIN_TASKS, tiny_args, tiny_model, tokenizer

from modeling_alter import AlterConfig, AlterForConditionalGeneration
from modeling_alter.data import build_multitask_dataset
from modeling_alter.task_lifecycle import BLOCKED_GATE_LOGIT
from modeling_alter.synthetic_tasks import make_synthetic_tasks
from modeling_alter.trainer import AlterTrainer


pytestmark = pytest.mark.usefixtures("one_thread")



def logits(model, batch, task_ids, stage):
    model.set_stage(stage)
    with torch.no_grad():
        return model(**batch, task_ids=torch.tensor(task_ids)).logits


def trained_like(seed=0, mix=0.3, **overrides):
    """A tiny model whose adapters, gate and gate mix are non-zero, as after two-stage training."""
    model = tiny_alter(seed=seed, **overrides)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(mix)
    return model


def old_task_outputs(model, batch, num_tasks):
    """Every old task's logits, one batch per task and one mixed batch, in both stages."""
    mixed = [i % num_tasks for i in range(batch["input_ids"].shape[0])]
    out = {}
    for stage in (1, 2):
        out[stage, "mixed"] = logits(model, batch, mixed, stage)
        for task in range(num_tasks):
            out[stage, task] = logits(model, batch, [task] * batch["input_ids"].shape[0], stage)
    with torch.no_grad():  # stage 2 without task ids: the unknown-task route, and the routing weights
        output = model(**batch, output_routing_weights=True)
    out[2, "unknown"], out[2, "unknown_weights"] = output.logits, output.routing_weights
    return out


@pytest.mark.parametrize("top_k, mix", [(None, 0.3), (2, 0.3), (None, 0.0)])  # dense, top-k, one-hot task adapters
def test_add_tasks_keeps_old_tasks(top_k, mix):
    model = trained_like(router_top_k=top_k, mix=mix)
    batch = random_batch(batch=6)
    before = old_task_outputs(model, batch, 3)
    model.add_tasks(["legal", "med"], init_from=[None, "topic"])
    assert model.config.task_names == TASKS + ["legal", "med"]
    for mta in model.mta_modules().values():
        assert mta.task_down.shape == (5, 32, 8) and mta.task_up.shape == (5, 8, 32)
        assert mta.router.weight.shape == (6, 32) and mta.task_embedding.weight.shape == (6, 6)
        emb = mta.task_embedding.weight
        assert (emb[[0, 1, 2, 5]][:, [3, 4]] == BLOCKED_GATE_LOGIT).all()  # old tasks and unknown: new ones blocked
        assert emb[3, 3] == 0 and emb[4, 4] == emb[4, 1] and emb[4, 3] == BLOCKED_GATE_LOGIT
        assert mta.task_up[3].abs().sum() == 0 and torch.equal(mta.task_up[4], mta.task_up[1])
    assert model.config.visible_task_adapters == [3, 3, 3, 4, 5, 3]  # old tasks, new ones, the unknown task
    after = old_task_outputs(model, batch, 3)
    for key, value in before.items():
        if key[1] == "unknown_weights":  # the new adapters' columns are exactly 0
            assert after[key].shape[-1] == 6 and torch.equal(after[key][..., [0, 1, 2, 5]], value), key
            assert not after[key][..., [3, 4]].any()
        else:  # both stages: the same computation, bit for bit (stage 2 routes over the adapters they may use)
            assert torch.equal(after[key], value), key
    # a new task copied from another computes what it did in stage 1; a fresh one only the backbone's FFN
    assert torch.equal(logits(model, batch, [4] * 6, 1), before[1, 1])
    assert not torch.allclose(logits(model, batch, [3] * 6, 1), before[1, 0])


def test_stage2_training_after_add_tasks_routes_old_tasks_over_their_adapters():
    """An old-task batch computes over the adapters it may use: the same loss and gradients (to rounding) as over
    all adapters with the new ones blocked, and no gradient at all for the new adapters' router rows. (The
    load-balancing loss, left out here, counts the adapters the batch may use, as it did before the tasks were added;
    over all adapters it would count the blocked one too.)"""
    model = trained_like(router_aux_loss_coef=0.0)
    model.add_tasks(["legal"])
    model.set_stage(2)
    model.train()
    full = copy.deepcopy(model)
    full.config.visible_task_adapters = None  # every adapter, the new one blocked by its gate logit alone
    batch, old = random_batch(), torch.tensor([0, 2, 1, 0])
    for m in (model, full):
        torch.manual_seed(0)  # the same task-id drops
        m(**batch, task_ids=old).loss.backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            if name.endswith("router.weight"):
                assert not p.grad[3].any(), name


def test_add_tasks_errors():
    model = trained_like()
    with pytest.raises(ValueError, match=r"\['topic'\] already exist"):
        model.add_tasks(["topic"])
    with pytest.raises(ValueError, match=r"\['a'\] given more than once"):
        model.add_tasks(["a", "a"])
    with pytest.raises(ValueError, match=r"init_from names unknown task\(s\) \['nope'\]"):
        model.add_tasks(["a"], init_from="nope")
    with pytest.raises(ValueError, match="2 entries for 1 new tasks"):
        model.add_tasks(["a"], init_from=["topic", None])
    with pytest.raises(ValueError, match="at least one new task"):
        model.add_tasks([])
    assert model.config.task_names == TASKS


def test_added_task_saves_and_reloads(tmp_path):
    model = trained_like()
    model.add_tasks("legal", init_from="reverse")
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForSeq2SeqLM

    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()  # the Auto classes, as after any save
    assert type(loaded) is AlterForConditionalGeneration
    assert loaded.config.task_names == TASKS + ["legal"] and loaded.config.visible_task_adapters == [3, 3, 3, 4, 3]
    batch = random_batch()
    for stage in (1, 2):
        assert torch.equal(logits(loaded, batch, [3, 0, 3, 2], stage), logits(model, batch, [3, 0, 3, 2], stage))
        assert torch.equal(logits(loaded, batch, [1, 0, 1, 2], stage), logits(trained_like(), batch, [1, 0, 1, 2], stage))


def test_dropping_the_added_tasks_gives_back_the_original_model():
    original = trained_like()
    model = trained_like()
    model.add_tasks(["legal", "med"], init_from="topic")
    back = model.keep_tasks(TASKS)
    assert back.config.visible_task_adapters is None and back.config.num_adapters == original.config.num_adapters
    batch = random_batch(batch=6)
    outputs = old_task_outputs(back, batch, 3)
    for key, value in old_task_outputs(original, batch, 3).items():
        assert torch.equal(outputs[key], value), key
    # renumbered tasks: the blocked gate logits alone keep "med" away from "legal"
    assert model.keep_tasks(["med", "legal", "topic"]).config.visible_task_adapters is None
    with pytest.raises(ValueError, match=r"visible_task_adapters=\[3, 3\] is not valid: expected None or 4"):
        AlterConfig(task_names=TASKS, visible_task_adapters=[3, 3])
    with pytest.raises(ValueError, match="integers in \\[1, 3\\]"):
        AlterConfig(task_names=TASKS, visible_task_adapters=[3, 3, 4, 3])
    assert AlterConfig(task_names=TASKS, visible_task_adapters=[3, 3, 3, 3]).visible_task_adapters is None


def test_keep_tasks_stage1_exact_and_stage2_renormalised():
    model = trained_like(num_shared_adapters=2)
    batch = random_batch(batch=4)
    before = old_task_outputs(model, batch, 3)
    small = model.keep_tasks(["reverse", "sentiment"])
    assert model.config.task_names == TASKS  # the original model is untouched
    assert small.config.task_names == ["reverse", "sentiment"] and small.config.num_adapters == 4
    for mta in small.mta_modules().values():
        assert mta.task_down.shape[0] == 2 and mta.task_embedding.weight.shape == (3, 4)
    assert torch.equal(logits(small, batch, [0] * 4, 1), before[1, 2])
    assert torch.equal(logits(small, batch, [1] * 4, 1), before[1, 0])
    assert torch.equal(logits(small, batch, [0, 1, 0, 1], 1), logits(model, batch, [2, 0, 2, 0], 1))
    # Stage 2: the old gate renormalised over the kept adapters = the old model with the dropped adapter blocked
    blocked = trained_like(num_shared_adapters=2)
    with torch.no_grad():
        for mta in blocked.mta_modules().values():
            mta.task_embedding.weight[:, 1] = float("-inf")
    for new, old in ((0, 2), (1, 0)):
        kept = logits(small, batch, [new] * 4, 2)
        torch.testing.assert_close(kept, logits(blocked, batch, [old] * 4, 2), rtol=0, atol=1e-5)
        assert (kept - before[2, old]).abs().max() > 1e-3  # and it does differ from the full model's stage 2
    # the unknown-task route is renormalised the same way
    model.set_stage(2), blocked.set_stage(2), small.set_stage(2)
    with torch.no_grad():
        torch.testing.assert_close(small(**batch).logits, blocked(**batch).logits, rtol=0, atol=1e-5)


def test_keep_tasks_errors_and_top_k_cap():
    model = trained_like(router_top_k=4)
    with pytest.raises(ValueError, match=r"Unknown task name\(s\) \['nope'\] to keep; this model has tasks"):
        model.keep_tasks(["topic", "nope"])
    with pytest.raises(ValueError, match="at least one task name"):
        model.keep_tasks([])
    with pytest.raises(ValueError, match="more than once"):
        model.keep_tasks(["topic", "topic"])
    assert model.keep_tasks(["topic"]).config.router_top_k == 2  # 1 task + 1 shared adapter


def _new_task_data(name, source_task="copy"):
    train, _ = make_synthetic_tasks(16, 2, seed=0, tasks=[source_task])
    return build_multitask_dataset({name: train[source_task]}, tokenizer(), TRAIN_TASKS + [name], seed=0,
                                   max_source_length=32, max_target_length=32)


def test_train_tasks_trains_only_the_new_task_in_both_stages(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # as after a two-stage training
        for mta in model.mta_modules().values():
            for p in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                p.normal_(0, 0.5)
            mta.gate_mix.fill_(0.3)
    model.set_stage(2)
    model.add_tasks(["legal"], init_from="copy")
    model.eval()
    batch = random_batch(batch=3, vocab=200)
    before = old_task_outputs(model, batch, 3)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.set_stage(1)
    model.config.task_id_drop_rate = 0.5  # dropped ids reach the unknown task's row, which must not move
    args = tiny_args(tmp_path, train_tasks=["legal"], weight_decay=0.1, max_steps=4,
                     stage1_steps=2, max_grad_norm=1.0)
    trainer = AlterTrainer(model=model, args=args, train_dataset=_new_task_data("legal"),
                           processing_class=tokenizer())
    assert model.train_tasks == ("legal",)
    trainer.train()
    assert model.config.stage == 2
    model.eval()
    after = old_task_outputs(model, batch, 3)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, params_before[name])}
    assert changed and all(".mta." in name and name.endswith(("task_down", "task_up", "task_embedding.weight"))
                           for name in changed)
    for name, p in model.named_parameters():  # within those: only the new task's rows (index 3) moved
        if name in changed:
            assert torch.equal(p[:3], params_before[name][:3]), name
            if name.endswith("task_embedding.weight"):
                assert torch.equal(p[4], params_before[name][4]), name  # the unknown task's row
    assert any(name.endswith("task_embedding.weight") for name in changed)  # stage 2 trained the new row
    assert any(name.endswith("task_up") for name in changed)  # stage 1 trained the new adapter


def test_set_train_tasks_errors_and_reset():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Unknown task name\(s\) \['legal'\]"):
        model.set_train_tasks(["legal"])
    with pytest.raises(ValueError, match="at least one task name"):
        model.set_train_tasks([])
    model.set_train_tasks(["copy"])
    assert all(name.endswith(("task_down", "task_up")) for name in model.trainable_parameter_names(1))
    assert model.frozen_rows is not None
    model.set_train_tasks(None)
    assert model.frozen_rows is None and "encoder.embed_tokens.weight" in model.trainable_parameter_names(1)
