"""Many tasks: the row-sparse AdamW of the task-adapter banks (issue 11, part 5)."""

import copy

import pytest
import torch
from training_utils import tiny_args, tiny_data, tiny_model, tokenizer

from modeling_alter.optim import RowSparseAdamW
from modeling_alter.trainer import AlterTrainer


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("amsgrad", [False, True])
def test_row_sparse_adamw_equals_adamw_on_per_task_parameters(amsgrad):
    """Each row of a stacked bank follows exactly what AdamW does to that row held as its own parameter, which gets
    no gradient (hence no update, no weight decay) on the steps that do not train it."""
    torch.manual_seed(0)
    rows, shape = 6, (3, 4)
    bank = torch.nn.Parameter(torch.randn(rows, *shape))
    other = torch.nn.Parameter(torch.randn(5))  # a dense parameter in the same optimizer
    separate = [torch.nn.Parameter(bank.detach()[i].clone()) for i in range(rows)]
    other_ref = torch.nn.Parameter(other.detach().clone())
    kwargs = dict(lr=0.05, weight_decay=0.1, betas=(0.8, 0.9), amsgrad=amsgrad)
    sparse = RowSparseAdamW([bank, other], row_sparse=[bank], **kwargs)
    dense = torch.optim.AdamW(separate + [other_ref], **kwargs)
    for step, touched in enumerate([[0, 2], [2], [1, 2, 5], [], [0, 5], [3]]):
        grad = torch.zeros(rows, *shape)
        for i in touched:
            grad[i] = torch.randn(shape)
        bank.grad, other.grad = grad, torch.full((5,), 0.1 * step)
        for i, p in enumerate(separate):
            p.grad = grad[i].clone() if i in touched else None
        other_ref.grad = other.grad.clone()
        sparse.step()
        dense.step()
        for i in range(rows):
            assert torch.equal(bank[i], separate[i]), (step, i)
        assert torch.equal(other, other_ref)
    assert sparse.state[bank]["step"].tolist() == [2, 1, 3, 1, 0, 2]
    assert torch.equal(bank[4], bank[4].detach())  # never touched: never decayed
    restored = RowSparseAdamW([bank, other], row_sparse=[bank], **kwargs)
    restored.load_state_dict(sparse.state_dict())
    assert torch.equal(restored.state[bank]["step"], sparse.state[bank]["step"])


@pytest.mark.parametrize("adapter_form", ["plain", "gated"])
def test_training_steps_equal_adamw_on_per_task_adapters(adapter_form):
    """Through the model (mixed-task and one-task batches, so both gathers of a bank's rows): a bank's gradient is
    exactly zero on the rows of the tasks not in the batch, and over several steps `RowSparseAdamW` gives every
    parameter exactly what `torch.optim.AdamW` gives the same model whose task adapters are one parameter per task
    (None gradient, hence no update and no weight decay, for the tasks a step does not train)."""
    from conftest import random_batch, tiny_alter

    model = tiny_alter(adapter_form=adapter_form).train()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9))
    sparse = RowSparseAdamW([p for p in model.parameters() if p.requires_grad], row_sparse=model.task_adapter_banks(),
                            **kwargs)
    banks = reference.task_adapter_banks()
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
                assert (i in tasks) == bool(bank.grad[i].any()), (step, i)
            bank.grad = None
        sparse.step()
        dense.step()
        for opt in (sparse, dense):
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for bank, rows in zip(banks, per_task):
                bank.copy_(torch.stack(rows))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), (step, name)


def test_row_sparse_adamw_refuses_capturable():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="capturable=False"):
        RowSparseAdamW([p], row_sparse=[p], capturable=True)


def test_trainer_updates_only_the_tasks_in_the_batch(tmp_path):
    model = tiny_model()
    train_set, _ = tiny_data()
    copy_only = train_set.filter(lambda row: row["task_ids"] == 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = tiny_args(tmp_path, weight_decay=0.1, max_steps=2, stage1_steps=None)
    trainer = AlterTrainer(model=model, args=args, train_dataset=copy_only, processing_class=tokenizer())
    trainer.train()
    assert type(trainer.optimizer.optimizer) is RowSparseAdamW
    banks = {id(p) for p in model.task_adapter_banks()}
    for name, p in model.named_parameters():
        if id(p) in banks:
            assert torch.equal(p[[0, 2]], before[name][[0, 2]]), name  # other tasks: no update, no weight decay
            if name.endswith("task_down"):
                assert not torch.equal(p[1], before[name][1]), name
        elif p.requires_grad and name.endswith("wi.weight"):
            assert not torch.equal(p, before[name]), name  # the backbone trains as usual


def test_auto_top_k_is_dense_up_to_16_adapters_and_top2_past_them():
    from conftest import tiny_alter

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
