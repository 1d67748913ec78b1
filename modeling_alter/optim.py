"""AdamW whose task-adapter banks update only the tasks a step trained: the optimizer cost of stage 1 stops growing with
the number of tasks.

Every MTA module keeps its T task adapters as one stacked parameter (`task_down` [T, d, r], `task_up` [T, r, d]); a
stage-1 batch trains only the tasks it contains, so the other rows of the gradient are exactly zero. Plain AdamW still
reads and writes every row (moments, weight decay) at every step, which at T = 128 costs more than the model's own
update. `RowSparseAdamW` updates, in such "row-sparse" parameters, only the rows whose gradient is non-zero, each
with its own step count, through PyTorch's own AdamW arithmetic, so that each row follows exactly (bit for bit on
CPU, against the non-fused kernel) what `torch.optim.AdamW` does to a task adapter held as its own parameter, which
receives no gradient, and so no update, on the steps whose batch does not contain its task.

Weight decay (decoupled, `p *= 1 - lr * weight_decay`) therefore applies to a task's adapter on the steps that train
that task, not on every step: a task seen in 1 step of 10 decays 10 times less than with dense AdamW. A row whose
gradient is exactly zero although its task was in the batch is treated as untouched too. Every other parameter is
updated by `torch.optim.AdamW` itself.
"""

import torch
from torch.optim.adam import adam


class RowSparseAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` plus row-sparse updates of the parameters in `row_sparse` (see the module docstring).

    Args:
        params: as for `torch.optim.AdamW` (tensors or param-group dicts).
        row_sparse: parameters (among `params`) whose rows (dim 0) are updated only when their gradient is non-zero,
            e.g. `model.task_adapter_banks()`.
        kwargs: `torch.optim.AdamW`'s (`lr`, `betas`, `eps`, `weight_decay`, `amsgrad`, `maximize`, `foreach`,
            `fused`). With `fused=True` the other parameters use the fused kernel and the row-sparse ones the
            single-tensor (or foreach) kernel: the same arithmetic, rounded as the non-fused AdamW rounds it.
            `capturable` and `differentiable` are not supported for the row-sparse parameters.

    State of a row-sparse parameter: `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`) of its full shape, and `step`, a
    float32 tensor [rows] counting each row's updates.
    """

    def __init__(self, params, row_sparse=(), **kwargs):
        super().__init__(params, **kwargs)
        self._row_sparse_ids = {id(p) for p in row_sparse}
        for group in self.param_groups:
            if any(id(p) in self._row_sparse_ids for p in group["params"]) and (
                group.get("capturable") or group.get("differentiable")
            ):
                raise ValueError("RowSparseAdamW supports capturable=False and differentiable=False for its row-sparse "
                                 "parameters.")

    def is_row_sparse(self, param) -> bool:
        return id(param) in self._row_sparse_ids

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and self.is_row_sparse(p):
                    held[p] = p.grad
                    p.grad = None  # AdamW skips parameters without a gradient
        try:
            super().step()
        finally:
            for p, grad in held.items():
                p.grad = grad
        for group in self.param_groups:
            for p in group["params"]:
                if p in held:
                    self._row_step(p, held[p], group)
        return loss

    def _row_step(self, p, grad, group):
        if grad.is_sparse:
            raise ValueError("RowSparseAdamW needs dense gradients.")
        rows = grad.reshape(grad.shape[0], -1).any(1).nonzero().flatten().tolist()  # one read, no temporary
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].dim() == 0:  # state of a dense AdamW (e.g. an older checkpoint): same count for every row
            state["step"] = state["step"].reshape(1).repeat(p.shape[0]).float()
        if not rows:
            return
        beta1, beta2 = group["betas"]
        adam(
            [p[i] for i in rows],
            [grad[i] for i in rows],
            [state["exp_avg"][i] for i in rows],
            [state["exp_avg_sq"][i] for i in rows],
            [state["max_exp_avg_sq"][i] for i in rows] if group["amsgrad"] else [],
            [state["step"][i] for i in rows],
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=None,
            has_complex=False,
            decoupled_weight_decay=True,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


__all__ = ["RowSparseAdamW"]
