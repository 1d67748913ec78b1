"""Many tasks: one parameter per task adapter while training (issue 11, part 5), and the stage-2 default."""

import copy

import pytest
import torch
from training_utils import tiny_args, tiny_data, tiny_model, tokenizer, train_keeping_the_first_checkpoint

from conftest import random_batch, tiny_alter

from modeling_alter.mta import task_parameter_of
from modeling_alter.trainer import AlterTrainer


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("adapter_form", ["plain", "gated"])
def test_split_training_steps_equal_adamw_on_per_task_adapters(adapter_form):
    """Through the model (mixed-task and one-task batches): with the task adapters split, the tasks not in a batch get
    no gradient, and over several steps torch's AdamW gives every parameter exactly what it gives the same model whose
    task adapters are held as one parameter per task by hand (None gradient, hence no update and no weight decay,
    for the tasks a step does not train)."""
    model = tiny_alter(adapter_form=adapter_form).train()
    reference = copy.deepcopy(model)
    model.split_task_adapters()
    kwargs = dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))
    split = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kwargs)
    banks = reference.task_adapter_banks()
    assert not any(bank.requires_grad for bank in model.task_adapter_banks())
    per_task = [[torch.nn.Parameter(bank.detach()[i].clone()) for i in range(bank.shape[0])] for bank in banks]
    others = [p for p in reference.parameters() if p.requires_grad and all(p is not bank for bank in banks)]
    dense = torch.optim.AdamW(others + [p for rows in per_task for p in rows], **kwargs)
    for step, tasks in enumerate([[0, 2, 0, 2], [1, 1, 1, 1], [2, 1, 1, 2], [0, 0, 0, 0], [2, 0, 1, 0]]):
        batch, task_ids = random_batch(seed=step), torch.tensor(tasks)
        for m in (model, reference):
            m(**batch, task_ids=task_ids).loss.backward()
        for bank, rows in zip(banks, per_task):
            for i, p in enumerate(rows):
                p.grad = bank.grad[i].clone() if i in tasks else None
            bank.grad = None
        for name, p in model.named_parameters():
            split_of = task_parameter_of(name)
            if split_of is not None:
                assert (p.grad is not None) == (split_of[1] in tasks), (step, name)
        split.step()
        dense.step()
        for opt in (split, dense):
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for bank, rows in zip(banks, per_task):
                bank.copy_(torch.stack(rows))
        assert model.state_dict().keys() == reference.state_dict().keys()
        for name, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), (step, name)


def test_split_model_computes_saves_and_loads_as_the_unsplit_one(tmp_path):
    from modeling_alter import AlterForConditionalGeneration

    model = tiny_alter()
    batch = random_batch()
    mixed, one = torch.tensor([0, 2, 1, 0]), torch.tensor([1, 1, 1, 1])
    with torch.no_grad():
        expected = [model(**batch, task_ids=ids).logits for ids in (mixed, one)]
    keys, params = set(model.state_dict()), set(dict(model.named_parameters()))
    model.split_task_adapters()
    assert model.task_adapters_split
    names = model.trainable_parameter_names(1)
    assert names == {name for name, p in model.named_parameters() if p.requires_grad}
    in_mta = {name for name in names if ".mta." in name}  # (and the backbone: stage1_train_backbone)
    assert in_mta and all(task_parameter_of(name) for name in in_mta)  # the per-task parameters, not the banks
    assert model.trainable_parameter_names(2) == tiny_alter().trainable_parameter_names(2)
    with torch.no_grad():
        for ids, logits in zip((mixed, one), expected):
            assert torch.equal(model(**batch, task_ids=ids).logits, logits)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "split")
    reloaded = AlterForConditionalGeneration.from_pretrained(tmp_path / "split")
    assert not reloaded.task_adapters_split
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, task_ids=mixed).logits, expected[0])
        # an update of a per-task parameter is an update of its bank (what is saved)
        down = model.mta_modules()["encoder.block.0.layer.1.mta"]
        down.task_parameters["task_down"][2].add_(1.0)
        assert torch.equal(down.task_down[2], reloaded.mta_modules()["encoder.block.0.layer.1.mta"].task_down[2] + 1)
    # a strict load fills the banks, and the per-task parameters with them
    model.load_state_dict(reloaded.state_dict())
    assert torch.equal(down.task_parameters["task_down"][2], down.task_down[2])
    # Module.to gives banks and per-task parameters separate storage: the next forward points them back
    model.double()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items()}, task_ids=mixed)
        down.task_parameters["task_up"][0].mul_(0)
    assert not down.task_up[0].any()
    with pytest.raises(ValueError, match="merge_task_adapters"):
        model.add_tasks(["new"])
    model.merge_task_adapters()
    assert not model.task_adapters_split and set(dict(model.named_parameters())) == params
    assert model.trainable_parameter_names(1) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_split_with_train_tasks_trains_only_their_parameters():
    model = tiny_alter()
    model.set_train_tasks(["topic"])
    model.split_task_adapters()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and {task_parameter_of(name)[1] for name in trainable} == {1}
    assert model.frozen_rows is None  # nothing to restore: the other tasks' parameters do not train at all
    model.set_stage(2)
    assert model.frozen_rows is not None  # stage 2: the task embeddings' other rows
    model.merge_task_adapters()
    model.set_stage(1)
    assert model.frozen_rows is not None and all(p.requires_grad for p in model.task_adapter_banks())


def test_trainer_updates_only_the_tasks_in_the_batch(tmp_path):
    model = tiny_model()
    train_set, _ = tiny_data()
    copy_only = train_set.filter(lambda row: row["task_ids"] == 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = tiny_args(tmp_path, weight_decay=0.1, max_steps=2, stage1_steps=None)
    trainer = AlterTrainer(model=model, args=args, train_dataset=copy_only, processing_class=tokenizer())
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # args.optim's own optimizer
    assert not model.task_adapters_split and set(dict(model.named_parameters())) == set(before)
    banks = {id(p) for p in model.task_adapter_banks()}
    for name, p in model.named_parameters():
        if id(p) in banks:
            assert torch.equal(p[[0, 2]], before[name][[0, 2]]), name  # other tasks: no update, no weight decay
            if name.endswith("task_down"):
                assert not torch.equal(p[1], before[name][1]), name
        elif p.requires_grad and name.endswith("wi.weight"):
            assert not torch.equal(p, before[name]), name  # the backbone trains as usual


def test_a_second_train_call_trains_the_task_adapters_again(tmp_path):
    """Each train() call splits the task adapters anew, so it builds a new optimizer over the new per-task parameters
    (an optimizer kept from the first call would hold parameters the model no longer computes with)."""
    model = tiny_model()
    train_set, _ = tiny_data()
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path, max_steps=2, stage1_steps=None),
                           train_dataset=train_set, processing_class=tokenizer())
    trainer.train()
    first = trainer.optimizer
    after_first = [p.detach().clone() for p in model.task_adapter_banks()]
    trainer.train()
    assert trainer.optimizer is not first
    assert all(not torch.equal(p, q) for p, q in zip(model.task_adapter_banks(), after_first))


def test_load_best_model_at_end_loads_into_the_split_banks(tmp_path):
    """Trainer loads the best checkpoint inside train(), while the adapters are split: the load fills the banks (and
    so the per-task views), with no missing-key complaint about the views."""
    from modeling_alter import AlterForConditionalGeneration

    model = tiny_model()
    trainer = train_keeping_the_first_checkpoint(model, tmp_path)
    best = AlterForConditionalGeneration.from_pretrained(trainer.state.best_model_checkpoint)
    assert model.state_dict().keys() == best.state_dict().keys()
    assert all(torch.equal(p, best.state_dict()[name]) for name, p in model.state_dict().items())


def test_auto_top_k_is_dense_up_to_16_adapters_and_top2_past_them():
    from modeling_alter import AlterConfig
    from modeling_alter.mta import AUTO_DENSE_MAX_ADAPTERS, AUTO_TOP_K

    assert AlterConfig(task_names=["a"]).router_top_k == "auto"
    few = tiny_alter(task_names=[f"t{i}" for i in range(AUTO_DENSE_MAX_ADAPTERS - 1)])  # + 1 shared = 16
    assert {m.top_k for m in few.mta_modules().values()} == {None}
    few.add_tasks(["one_more"])  # 17 adapters: top-2 from now on, still "auto" in the config
    assert few.config.router_top_k == "auto" and {m.top_k for m in few.mta_modules().values()} == {AUTO_TOP_K}
    assert {m.top_k for m in few.keep_tasks(["t0", "t1"]).mta_modules().values()} == {None}
    dense = tiny_alter(task_names=[f"t{i}" for i in range(20)], router_top_k=None)
    assert {m.top_k for m in dense.mta_modules().values()} == {None}  # an explicit None stays dense
