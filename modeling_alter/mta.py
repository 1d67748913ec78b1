"""The Mixture-of-Task-Adapters (MTA) module and its routing, shared by every ALTER backbone family.

An MTA module sits parallel to the sublayer it extends and reads the same normalised input `u`:

    y = x + Sublayer(u) + sum_j w_j * U_j act(D_j u)

Stage 1 ("task selector"): `w` is one-hot on the example's own task adapter, and only that adapter is computed.
Stage 2 ("collaboration"): `w = (1 - m) * onehot(task) + m * gate(u, task)`, where `gate` is a token-level softmax
over the T task and S shared adapters (optionally top-k) and `m` is a learned per-module mix that starts at 0, so
the output does not move at the switch. Examples without a task id (or whose id was dropped during training) use
the gate alone, fed by an "unknown task" embedding.

Routing reaches every module through an explicit `TaskRouting` argument built once per forward (`build_routing`); no
module keeps routing state between calls. The module reads from its config only `hidden_size`, `adapter_dim`,
`adapter_activation`, `num_tasks`, `num_shared_adapters`, `num_adapters` and `router_top_k`, so any backbone's
config that has these fields can carry it.

A model's task and stage methods, its life after training (add, keep, train only some tasks) and routing by input
prefix live in `task_lifecycle.py` (`AlterTasksMixin`). This file imports only torch, transformers and
`configuration_mta`.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_mta import ADAPTER_FORMS

try:  # Transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init

# `router_top_k="auto"` (the default): dense stage-2 routing up to this many adapters, top-AUTO_TOP_K past it. Dense
# stage 2 costs grow linearly with the number of adapters (2.24x plain T5 to generate at T = 128); top-2 stays flat
# (1.23-1.26x from T = 32 to 128, see the README's scaling table).
AUTO_DENSE_MAX_ADAPTERS = 16
AUTO_TOP_K = 2


def resolve_top_k(router_top_k, num_adapters: int) -> int | None:
    """The top-k an MTA module with `num_adapters` adapters uses for a config's `router_top_k` (None: dense)."""
    if router_top_k == "auto":
        return None if num_adapters <= AUTO_DENSE_MAX_ADAPTERS else AUTO_TOP_K
    return router_top_k


# Parameters of an MTA module that belong to the task adapters (stage 1); every other MTA parameter is stage 2's.
TASK_ADAPTER_PARAMETERS = ("task_down", "task_up", "task_linear")
# Forms of an adapter: "plain" `U act(D u)`, or "gated" `U (act(D u) * (L u))`, the form of a gated FFN (T5 v1.1 /
# Flan-T5: `wo (act(wi_0 u) * wi_1 u)`), into which a gated adapter merges exactly as extra hidden units.

class RowGroups(NamedTuple):
    """The rows of a matrix sorted by adapter: block g (`sizes[g]` consecutive rows) goes through `adapters[g]`."""

    adapters: tuple[int, ...]  # ascending; only adapters with at least one row
    sizes: tuple[int, ...]
    offsets: torch.Tensor  # int32 [n]: cumulative row counts over every adapter of the bank (`grouped_mm`'s `offs`)

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "RowGroups":
        """From the number of rows of every adapter of a bank (`counts[j]` rows for adapter j)."""
        adapters = counts.nonzero().squeeze(1)
        sizes = counts[adapters]
        return cls(tuple(adapters.tolist()), tuple(sizes.tolist()), counts.cumsum(0, dtype=torch.int32))

    def repeat_rows(self, times: int) -> "RowGroups":
        """The same groups with every row repeated `times` times (examples -> tokens)."""
        if times == 1:
            return self
        return self._replace(sizes=tuple(s * times for s in self.sizes), offsets=self.offsets * times)


class OwnTasks(NamedTuple):
    """Stage 2: each example's own task as the gate uses it."""

    embedding_rows: torch.Tensor  # [batch] row of `task_embedding`; num_tasks is the unknown task
    one_hot: torch.Tensor  # [batch, 1, num_adapters] fp32, the own task adapter (all zero for the unknown task)
    mixed: torch.Tensor  # [batch, 1, num_adapters] bool: the weights that mix with the one-hot (task adapters of an
    # example with a known task); the others are the gate's as is

    @classmethod
    def build(cls, task_ids, batch_size, num_tasks, num_adapters, device) -> "OwnTasks":
        if task_ids is None:
            task_ids = torch.full((batch_size,), num_tasks, dtype=torch.long, device=device)
        known = task_ids < num_tasks
        own = task_ids.clamp(max=num_tasks - 1)[:, None]
        one_hot = torch.zeros(batch_size, num_adapters, device=device).scatter_(1, own, known[:, None].float())
        mixed = known[:, None] & (torch.arange(num_adapters, device=device) < num_tasks)
        return cls(task_ids, one_hot[:, None, :], mixed[:, None, :])

    def visible(self, n: int, num_tasks: int) -> "OwnTasks":
        """The same with only the first `n` of the `num_tasks` task adapters' columns (and the shared ones)."""
        return self._replace(**{name: torch.cat([value[..., :n], value[..., num_tasks:]], -1)
                                for name, value in (("one_hot", self.one_hot), ("mixed", self.mixed))})


class TaskRouting(NamedTuple):
    """What every MTA module of one stack needs to route one batch; built once per forward."""

    stage: int
    task_ids: torch.Tensor | None  # [batch]; the value num_tasks means "unknown task"
    own_tasks: OwnTasks | None  # stage 2
    task_groups: RowGroups | None  # the distinct tasks and their example counts (None if a task is unknown)
    order: torch.Tensor | None  # several tasks: example indices sorted by task
    group_inverse: torch.Tensor | None  # several tasks: restores batch order after sorting by task
    token_mask: torch.Tensor | None  # [batch, length] bool, tokens counted in the statistics
    output_stats: bool
    visible_tasks: int | None = None  # stage 2: the batch routes over the first visible_tasks task adapters only


class GateParameters(NamedTuple):
    """What one stage-2 forward of an MTA module routes over: its own adapters and gate, or, for a batch whose tasks
    may route to only the first `num_tasks` task adapters (tasks added later are blocked for them, see `add_tasks`),
    exactly those, so that the computation has the shapes it had before the later tasks were added."""

    task_down: torch.Tensor  # [num_tasks, d, r]
    task_up: torch.Tensor  # [num_tasks, r, d]
    task_linear: torch.Tensor | None  # [num_tasks, d, r], gated form
    shared_down: torch.Tensor  # [S, d, r]
    shared_up: torch.Tensor  # [S, r, d]
    shared_linear: torch.Tensor | None
    router: torch.Tensor  # [num_tasks + S, d]
    embedding: torch.Tensor  # [every task + 1, num_tasks + S]: a row per task id, the last for the unknown task
    num_tasks: int
    top_k: int | None

    @property
    def num_adapters(self) -> int:
        return self.router.shape[0]


class MTAStats(NamedTuple):
    aux_loss: torch.Tensor | None
    weights: torch.Tensor | None  # [batch, num_adapters]
    entropy: torch.Tensor | None  # [batch]


# Recent PyTorch runs a GEMM per group of rows in one call. Used on CPU at inference only: its backward rejects some
# gradient layouts and its compile-time checks expect CUDA bf16; elsewhere a loop over the (few, large) groups.
_grouped_mm = getattr(F, "grouped_mm", None)

# Stage 2 on CPU computes only the (token, adapter) pairs with a weight when that skips at least this many pairs (and
# half of them): gathering, grouping and scattering the pairs cost about as much as 256 pairs of dense GEMM here.
_MIN_SKIPPED_PAIRS = 256


def _matmul_per_group(x: torch.Tensor, weights, groups: RowGroups) -> torch.Tensor:
    """`[N, a] -> [N, b]`: block g of the rows of `x` times `weights[groups.adapters[g]]` (`weights`: `[n, a, b]`, or
    one `[a, b]` parameter per adapter, see `AlterMTA.split_task_adapters`). Every adapter used is read once, whatever
    the number of its rows; the others are not read."""
    blocks = x.split(groups.sizes)
    if not isinstance(weights, torch.Tensor):
        return torch.cat([block @ _in_dtype(weights[a], x) for a, block in zip(groups.adapters, blocks)])
    weights = weights.to(x.dtype)
    aligned = all(size * x.element_size() % 16 == 0 for size in weights.shape[1:])
    if (_grouped_mm is not None and x.device.type == "cpu" and aligned and x.dtype != torch.float64
            and 2 * len(groups.adapters) >= weights.shape[0]  # an empty group costs about a tenth of a used one
            and not (torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad))
            and not torch.compiler.is_compiling()):
        return _grouped_mm(x, weights, offs=groups.offsets)
    adapters = groups.adapters
    if torch.is_grad_enabled() and weights.requires_grad:
        # Only the used adapters, unbound: the backward stacks their gradients and writes them into one zero gradient
        # of the bank (unbinding the bank would stack a zero tensor per unused adapter: the whole bank at every step).
        weights = weights.index_select(0, torch.tensor(adapters, device=weights.device)).unbind(0)
        adapters = range(len(adapters))
    return torch.cat([block @ weights[a] for a, block in zip(adapters, blocks)])


def _in_dtype(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weight` in `x`'s dtype (a bf16 activation under autocast, say); no operation when it already is."""
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


_NO_STATS = MTAStats(None, None, None)


class _UnitClamp(torch.autograd.Function):
    """`clamp(x, 0, 1)` whose gradient also passes where `x` lies outside [0, 1] and the gradient points back inside.

    A plain clamp has a zero gradient outside its range, so a parameter that one optimizer step pushes below 0 never
    comes back (`gate_mix` starts at exactly 0, where that happens on the first stage-2 step whose gradient favours
    the one-hot route). Passing only the inward gradients keeps the forward value and lets the loss reopen the mix.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # gradient descent moves x by -grad: below 0 it may only move up (grad < 0), above 1 only down (grad > 0)
        passes = ((x >= 0) & (x <= 1)) | ((x < 0) & (grad < 0)) | ((x > 1) & (grad > 0))
        return torch.where(passes, grad, torch.zeros_like(grad))


def _masked_token_mean(values, token_mask):
    """Mean over dim 1 of [batch, length, ...] values, counting only tokens where `token_mask` is true."""
    if token_mask is None:
        return values.mean(1)
    mask = token_mask.to(values.dtype).view(*token_mask.shape, *([1] * (values.dim() - 2)))
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def _drop_task_parameters(module, state_dict, prefix, local_metadata):
    """State-dict hook of a split MTA module: its per-task parameters are views of the banks, which are saved."""
    for key in [key for key in state_dict if key.startswith(prefix + "task_parameters.")]:
        del state_dict[key]


def _after_load_with_task_parameters(module, incompatible_keys):
    """Load hook of a split MTA module: the per-task parameters are not in a state dict (they are the banks' rows)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if ".task_parameters." not in f".{key}"]
    module._alias_task_parameters()


class AlterMTA(nn.Module):
    """Mixture-of-Task-Adapters for one sublayer: T task adapters, S shared adapters and the stage-2 gate.

    What it computes, each path checked against the straightforward computation in `tests/test_mta_fast_paths.py`:
    - stage 1 reads one adapter per distinct task of the batch (a one-task batch: exactly one adapter);
    - stage 2 computes every adapter for every token with one batched GEMM per projection and bank (task, shared),
      or, on CPU when it skips enough work (top-k over many tokens or many adapters), only the (token, adapter)
      pairs that may have a weight; at inference with `gate_mix <= 0` (right after the switch) the task adapters
      are computed as in stage 1 (one per example), plus the shared adapters weighted by the gate;
    - weights are used in place: never concatenated, copied into a cache, or differentiated when frozen.
    """

    def __init__(self, config):
        super().__init__()
        d, r = config.hidden_size, config.adapter_dim
        self.num_tasks = config.num_tasks
        self.num_adapters = config.num_adapters
        self.top_k = resolve_top_k(config.router_top_k, config.num_adapters)
        self.task_down = nn.Parameter(torch.empty(config.num_tasks, d, r))
        self.task_up = nn.Parameter(torch.empty(config.num_tasks, r, d))
        self.shared_down = nn.Parameter(torch.empty(config.num_shared_adapters, d, r))
        self.shared_up = nn.Parameter(torch.empty(config.num_shared_adapters, r, d))
        self.act = ACT2FN[config.adapter_activation]
        self.gated = getattr(config, "adapter_form", "plain") == "gated"
        # gated form: the linear branch L of each adapter (`[n, d, r]`, like T5's wi_1); None for the plain form
        self.task_linear = nn.Parameter(torch.empty(config.num_tasks, d, r)) if self.gated else None
        self.shared_linear = nn.Parameter(torch.empty(config.num_shared_adapters, d, r)) if self.gated else None
        self.router = nn.Linear(d, self.num_adapters, bias=False)
        # One row per task plus a last row for the unknown task, embedded directly in gate-logit space.
        self.task_embedding = nn.Embedding(config.num_tasks + 1, self.num_adapters)
        self.gate_mix = nn.Parameter(torch.zeros(()))
        self.register_module("task_parameters", None)  # see split_task_adapters
        self._split_hooks = []  # non-empty while split

    def forward(self, u: torch.Tensor, routing: TaskRouting, sublayer_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MTAStats]:
        """`u` `[batch, length, hidden]` (the sublayer's normalised input) -> (the MTA output of the same shape, its
        statistics). With `sublayer_out` (the sublayer's output, same shape), returns `sublayer_out + MTA(u)`, added
        by the last GEMM (`addmm`) where the path allows instead of a separate pass over the output."""
        if routing.stage == 2:
            return self._collaboration(u, routing, sublayer_out)
        stats = _NO_STATS
        if routing.output_stats:
            weights = F.one_hot(routing.task_ids, self.num_adapters).float()
            stats = MTAStats(None, weights, torch.zeros(u.shape[0], device=u.device))
        return self._own_adapters(u, routing, sublayer_out), stats

    def _own_adapters(self, u, routing, out=None):
        """Each example's own task adapter (stage 1), plus `out` if given: examples sorted by task, one GEMM per
        task's block of rows."""
        groups = routing.task_groups
        down, up, linear = self._task_weights()
        if len(groups.adapters) == 1:  # the fewest operations: at a decoding step each costs more than its arithmetic
            task = groups.adapters[0]
            x = u.reshape(-1, u.shape[-1])
            hidden = self.act(torch.mm(x, _in_dtype(down[task], x)))
            if self.gated:
                hidden = hidden * torch.mm(x, _in_dtype(linear[task], x))
            if out is None:
                return torch.mm(hidden, _in_dtype(up[task], x)).view(u.shape)
            return torch.addmm(out.reshape(x.shape), hidden, _in_dtype(up[task], x)).view(out.shape)
        x = u.index_select(0, routing.order).flatten(0, 1)
        tokens = groups.repeat_rows(u.shape[1])
        hidden = self.act(_matmul_per_group(x, down, tokens))
        if self.gated:
            hidden = hidden * _matmul_per_group(x, linear, tokens)
        result = _matmul_per_group(hidden, up, tokens).view_as(u).index_select(0, routing.group_inverse)
        return result if out is None else out + result

    # ---- task adapters as one parameter per task (training many tasks) -----------------------------------------

    def split_task_adapters(self) -> None:
        """Holds each task's adapter weights also as parameters of their own: `task_parameters[name][t]` (`name` in
        `task_down`, `task_up`, `task_linear`) is a leaf parameter that is a view of row t of the bank `name`.

        Stage 1 then computes through the per-task parameters: a backward pass gives gradients only to the tasks of
        its batch (the others keep `grad=None`), so gradient clipping and the optimizer (any `torch.optim` one) touch
        only those tasks, whatever the number of tasks; each task's adapter trains exactly as a parameter of its own.
        The banks stay the storage: they hold every update, are what `state_dict()` saves and `load_state_dict()`
        loads (the per-task parameters are left out of both), and what stage 2 computes with. While split, the banks
        do not train (see `stage_trainable_names`). `AlterTrainer.train` splits for its duration; undo with
        `merge_task_adapters`."""
        if self.task_parameters is not None:
            return
        self.task_parameters = nn.ModuleDict({
            name: nn.ParameterList([nn.Parameter(bank.detach()[t], requires_grad=False) for t in range(bank.shape[0])])
            for name in TASK_ADAPTER_PARAMETERS if (bank := getattr(self, name)) is not None})
        # (the public name of the state-dict hook is recent in PyTorch; older versions have the private one)
        on_state_dict = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        self._split_hooks = [on_state_dict(_drop_task_parameters),
                             self.register_load_state_dict_post_hook(_after_load_with_task_parameters)]

    def merge_task_adapters(self) -> None:
        """Undoes `split_task_adapters`: the banks alone hold the task adapters again (their values are kept)."""
        if self.task_parameters is None:
            return
        self._alias_task_parameters()
        for handle in self._split_hooks:
            handle.remove()
        self._split_hooks = []
        self.task_parameters = None

    def _alias_task_parameters(self) -> None:
        """Points every per-task parameter back at its bank's row. `Module.to` gives the banks and the per-task
        parameters new storage separately (with the same values), `load_state_dict(assign=True)` gives the banks new
        values: either way the bank is right."""
        for name, rows in self.task_parameters.items():
            bank = getattr(self, name)
            if rows[0].data_ptr() != bank.data_ptr() or rows[0].device != bank.device:
                for t, param in enumerate(rows):
                    param.data = bank.detach()[t]

    def _task_weights(self):
        """(down, up, linear) of the task adapters: the banks, or while split the per-task parameters."""
        if not self._split_hooks:
            return self.task_down, self.task_up, self.task_linear
        self._alias_task_parameters()
        split = self.task_parameters
        return split["task_down"], split["task_up"], split["task_linear"] if self.gated else None

    def gate_weights(self, u: torch.Tensor, task_ids: torch.Tensor | None):
        """Stage-2 routing in fp32: returns the mixture weights `w` [batch, length, n] and the gate's softmax."""
        own = OwnTasks.build(task_ids, u.shape[0], self.num_tasks, self.num_adapters, u.device)
        weights, probs, _ = self._gate(u, own, self._gate_parameters(None), need_probs=True)
        return weights, probs

    def _gate_parameters(self, visible_tasks: int | None) -> GateParameters:
        """This module's adapters and gate, or only the first `visible_tasks` task adapters with the shared ones."""
        full = GateParameters(self.task_down, self.task_up, self.task_linear, self.shared_down, self.shared_up,
                              self.shared_linear, self.router.weight, self.task_embedding.weight, self.num_tasks,
                              self.top_k)
        n, T = visible_tasks, self.num_tasks
        if n is None or n >= T:
            return full
        emb = full.embedding
        return full._replace(
            task_down=self.task_down[:n], task_up=self.task_up[:n],
            task_linear=self.task_linear[:n] if self.gated else None,
            router=torch.cat([full.router[:n], full.router[T:]]), embedding=torch.cat([emb[:, :n], emb[:, T:]], 1),
            num_tasks=n, top_k=None if self.top_k is None else min(self.top_k, n + self.shared_down.shape[0]))

    def _gate(self, u, own: OwnTasks, p: GateParameters, need_probs: bool):
        """Task adapters `w = (1 - m) * onehot(task) + m * gate` with `m = clamp(gate_mix, 0, 1)` (`m = 1` for the
        unknown task), shared adapters `w = gate`; the softmax (None unless `need_probs`, or dense: it is the gate);
        and with top-k each token's top k indices. Top-k renormalises the kept probabilities, computed as the softmax
        of the k largest logits (the same function, fewer operations)."""
        logits = F.linear(u.float(), p.router.float()) + p.embedding.float()[own.embedding_rows][:, None]
        top_index = None
        if p.top_k is not None and p.top_k < p.num_adapters:
            top_logits, top_index = logits.topk(p.top_k, dim=-1)
            gate = torch.zeros_like(logits).scatter(-1, top_index, top_logits.softmax(-1))
            probs = logits.softmax(-1) if need_probs else None
        else:
            gate = probs = logits.softmax(-1)
        mix = self.gate_mix.float()
        trains_mix = mix.requires_grad and torch.is_grad_enabled()
        # Shared adapters (and the unknown task) take the gate weight whatever the mix: the shared ones start with a
        # zero output, so the switch does not move the output, and they and the gate learn from the first step.
        mix = torch.where(own.mixed, _UnitClamp.apply(mix) if trains_mix else mix.clamp(0, 1), 1.0)
        return torch.lerp(own.one_hot, gate, mix), probs, top_index

    def _collaboration(self, u, routing, sublayer_out=None):
        own, p = routing.own_tasks, self._gate_parameters(routing.visible_tasks)
        n, T = p.num_tasks, self.num_tasks
        if n < T:
            own = own.visible(n, T)
        weights, probs, top_index = self._gate(u, own, p, need_probs=self.training and torch.is_grad_enabled())
        training = torch.is_grad_enabled() and weights.requires_grad
        on_cpu = u.device.type == "cpu"  # the branches below read values on the host, which stalls an accelerator
        if not training and on_cpu and routing.task_groups is not None and float(self.gate_mix) <= 0.0:
            out = self._own_adapters(u, routing, sublayer_out)  # the task adapters' weights are exactly one-hot
            if p.shared_down.shape[0]:
                shared = weights[..., p.num_tasks :].reshape(-1, p.shared_down.shape[0]).to(u.dtype)
                out = self._weighted_bank(u.reshape(-1, u.shape[-1]), p.shared_down, p.shared_up, shared,
                                          out.reshape(-1, u.shape[-1]), p.shared_linear).view_as(u)
        else:
            support = self._support(weights, top_index, own, training) if top_index is not None and on_cpu else None
            if support is not None and self._sparse_pays(support, p):
                out = self._sparse_mixture(u, weights, support, p, sublayer_out)
            else:
                out = self._dense_mixture(u, weights, p, sublayer_out)
        stats = self._gate_stats(weights, probs, routing, p)
        if n < T and stats.weights is not None:  # the statistics name every adapter: the blocked ones weigh 0
            w = stats.weights
            stats = stats._replace(weights=torch.cat([w[..., :n], w.new_zeros(*w.shape[:-1], T - n), w[..., n:]], -1))
        return out, stats

    @staticmethod
    def _support(weights, top_index, own: OwnTasks, training: bool):
        """`[..., n]` bool, the (token, adapter) pairs the sparse path computes: without gradients the pairs with a
        weight; with them each token's top k and its own task whatever the values (a zero weight has a gradient)."""
        if not training:
            return weights.ne(0)
        return torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, top_index, True) | (own.one_hot > 0)

    def _sparse_pays(self, support, p: GateParameters):
        """Whether computing only the pairs in `support` ([..., n] bool) saves more than it costs: it must skip half
        the (token, adapter) pairs and enough of them to pay for gathering them, or skip reading at least half
        the adapters (which the dense path reads whether used or not)."""
        counts = support.reshape(-1, p.num_adapters).sum(0).tolist()  # pairs per adapter: one host read
        pairs, used = sum(counts), sum(count > 0 for count in counts)
        skipped = support.numel() - pairs
        return skipped >= max(pairs, _MIN_SKIPPED_PAIRS) or 2 * used <= p.num_adapters

    def _dense_mixture(self, u, weights, p: GateParameters, out=None):
        """Every adapter for every token (plus `out` if given): per bank (task, shared), one batched GEMM down and one
        GEMM up."""
        x, w = u.reshape(-1, u.shape[-1]), weights.reshape(-1, p.num_adapters).to(u.dtype)
        out = out.reshape(-1, out.shape[-1]) if out is not None else None
        out = self._weighted_bank(x, p.task_down, p.task_up, w[:, : p.num_tasks], out, p.task_linear)
        if p.shared_down.shape[0]:
            out = self._weighted_bank(x, p.shared_down, p.shared_up, w[:, p.num_tasks :], out, p.shared_linear)
        return out.view_as(u)

    def _weighted_bank(self, x, down, up, w, out=None, linear=None):
        """`out + sum_j w[:, j] * A_j(x)` over the adapters of one bank (`down` [n, d, r], `up` [n, r, d]; gated
        form: `linear` [n, d, r])."""
        n, d, r = down.shape
        up = up.to(x.dtype).reshape(n * r, d)
        hidden = self._bank_hidden(x, down, n, d, r, activate=True)
        if linear is not None:
            hidden = hidden * self._bank_hidden(x, linear, n, d, r, activate=False)
        hidden = (hidden * w[:, :, None]).reshape(-1, n * r)
        return hidden @ up if out is None else torch.addmm(out, hidden, up)

    def _bank_hidden(self, x, weights, n, d, r, activate):
        """`[N, n, r]`: every adapter's projection `x @ weights[j]` (activated for the down-projection)."""
        weights = weights.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
            # [d, n*r] weights (a copy) so that the backward is one GEMM, with no weight gradient when frozen
            hidden = (x @ weights.permute(1, 0, 2).reshape(d, n * r)).view(-1, n, r)
        elif n == 1:  # one adapter (the shared one, say): a plain GEMM
            hidden = torch.mm(x, weights[0]).view(-1, 1, r)
        else:  # a batched GEMM reads the weights in place
            hidden = torch.bmm(x.expand(n, *x.shape), weights).transpose(0, 1)
        return self.act(hidden) if activate else hidden

    def _sparse_mixture(self, u, weights, support, p: GateParameters, out=None):
        """Only the (token, adapter) pairs in `support` (plus `out` if given): pairs sorted by adapter, one GEMM per
        adapter used, each pair's result added into its token's row."""
        d, n, T = u.shape[-1], p.num_adapters, p.num_tasks
        x = u.reshape(-1, d)
        adapter, token = support.reshape(-1, n).t().nonzero().unbind(1)  # sorted by adapter, then token
        pair_weights = weights.reshape(-1, n)[token, adapter].to(u.dtype)[:, None]
        counts = torch.bincount(adapter, minlength=n)
        rows = x.index_select(0, token)
        out = torch.zeros_like(x) if out is None else out.reshape(x.shape).clone()
        start = 0
        for down, up, linear, bank_counts in ((p.task_down, p.task_up, p.task_linear, counts[:T]),
                                              (p.shared_down, p.shared_up, p.shared_linear, counts[T:])):
            end = start + int(bank_counts.sum())
            if end > start:
                groups = RowGroups.from_counts(bank_counts)
                hidden = self.act(_matmul_per_group(rows[start:end], down, groups)) * pair_weights[start:end]
                if linear is not None:
                    hidden = hidden * _matmul_per_group(rows[start:end], linear, groups)
                out.index_add_(0, token[start:end], _matmul_per_group(hidden, up, groups))
            start = end
        return out.view_as(u)

    def _gate_stats(self, weights, probs, routing, p: GateParameters):
        """Switch-Transformer load-balancing loss (training only) and, when asked for, routing statistics."""
        aux_loss = None
        if self.training and torch.is_grad_enabled():
            k = p.top_k or 1
            chosen = F.one_hot(probs.topk(k, dim=-1).indices, p.num_adapters).sum(-2).float() / k
            chosen, probs = chosen.flatten(0, 1), probs.flatten(0, 1)
            if routing.token_mask is not None:
                chosen, probs = chosen[routing.token_mask.reshape(-1)], probs[routing.token_mask.reshape(-1)]
            aux_loss = p.num_adapters * (chosen.mean(0) * probs.mean(0)).sum()
        if not routing.output_stats:
            return MTAStats(aux_loss, None, None)
        entropy = -(weights * weights.clamp(min=1e-9).log()).sum(-1)
        return MTAStats(aux_loss, _masked_token_mean(weights, routing.token_mask),
                        _masked_token_mean(entropy, routing.token_mask))




def build_routing(config, task_ids, batch_size, token_mask, output_stats, unknown_allowed, device=None):
    """Validates `task_ids` and precomputes what the MTA modules of one stack share."""
    if task_ids is not None:
        if not isinstance(task_ids, torch.Tensor):
            raise ValueError(f"task_ids must be a torch.LongTensor of shape ({batch_size},), got {type(task_ids).__name__}.")
        if task_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"task_ids has dtype {task_ids.dtype}; expected torch.long (integer task indices).")
        if task_ids.shape != (batch_size,):
            raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}; expected ({batch_size},), one id per example.")
        task_ids = task_ids.long()
        low, high = int(task_ids.min()), int(task_ids.max())
        limit = config.num_tasks + (1 if unknown_allowed and config.stage == 2 else 0)
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            unknown = f" or {config.num_tasks} (unknown task, stage 2)" if limit > config.num_tasks else ""
            raise ValueError(
                f"task_ids contains {bad}, out of range: expected 0..{config.num_tasks - 1}{unknown} for tasks "
                f"{config.task_names}."
            )
    elif config.stage == 1:
        raise ValueError(
            "task_ids is required for a stage-1 ALTER model (each example uses its own task adapter): pass "
            f"task_ids=model.task_ids([...]) with names from {config.task_names}, or route by prompt prefix "
            "(model.set_task_prefixes({task: prefix, ...}, tokenizer=tok), then inputs that start with a prefix need "
            "no task ids), or call model.set_stage(2) to route without task ids."
        )
    mask = token_mask.bool() if token_mask is not None else None
    own_tasks = None
    if config.stage == 2:
        device = task_ids.device if task_ids is not None else device
        own_tasks = OwnTasks.build(task_ids, batch_size, config.num_tasks, config.num_adapters, device)
    groups = order = inverse = None
    # Stage 2 uses the task groups only on CPU (gate_mix == 0 at inference); building them reads values on the host.
    if task_ids is not None and high < config.num_tasks and (config.stage == 1 or task_ids.device.type == "cpu"):
        groups = RowGroups.from_counts(torch.bincount(task_ids, minlength=config.num_tasks))
        if len(groups.adapters) > 1:
            order = torch.argsort(task_ids, stable=True)
            inverse = torch.argsort(order)
    visible = None
    limits = getattr(config, "visible_task_adapters", None)
    if config.stage == 2 and limits:  # tasks added later are blocked for this batch: route over the others only
        present = task_ids.unique().tolist() if task_ids is not None else [config.num_tasks]
        visible = max(limits[t] for t in present)
    return TaskRouting(config.stage, task_ids, own_tasks, groups, order, inverse, mask, output_stats,
                       visible if visible is not None and visible < config.num_tasks else None)




def init_mta_weights(module: "AlterMTA", std: float) -> None:
    """Initialises an MTA module: down-projections ~ N(0, std), and everything that shapes the output at zero (the
    up-projections, router, task embeddings and `gate_mix`), so a fresh or converted model computes exactly what
    its backbone computes."""
    init.normal_(module.task_down, mean=0.0, std=std)
    init.normal_(module.shared_down, mean=0.0, std=std)
    if module.gated:
        init.normal_(module.task_linear, mean=0.0, std=std)
        init.normal_(module.shared_linear, mean=0.0, std=std)
    init.zeros_(module.task_up)
    init.zeros_(module.shared_up)
    init.zeros_(module.router.weight)
    init.zeros_(module.task_embedding.weight)
    init.zeros_(module.gate_mix)


def check_stage(stage) -> None:
    """Raises `ValueError` unless `stage` is 1 or 2."""
    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r} is not valid: expected 1 or 2.")


def stage_trainable_names(named_parameters, stage: int, train_backbone: bool) -> set[str]:
    """Names (from `named_parameters`, an iterable of `(name, parameter)`) of the parameters that train in `stage`:
    stage 1 trains the task adapters (and the backbone when `train_backbone`); stage 2 trains every other MTA
    parameter (gates, task embeddings, shared adapters, `gate_mix`). MTA parameters are those under a module
    attribute named `mta`."""
    check_stage(stage)
    all_names = [name for name, _ in named_parameters]
    per_task = {name for name in all_names if task_parameter_of(name)}  # split_task_adapters: stage 1's
    split = {name.rsplit(".task_parameters.", 1)[0] for name in per_task}
    names = set(per_task) if stage == 1 else set()
    for name in all_names:
        if name in per_task:
            continue
        module, _, leaf = name.rpartition(".")
        in_mta = ".mta." in f".{name}"
        if stage == 1:
            if (in_mta and leaf in TASK_ADAPTER_PARAMETERS and module not in split) or (not in_mta and train_backbone):
                names.add(name)
        elif in_mta and leaf not in TASK_ADAPTER_PARAMETERS:
            names.add(name)
    return names


def task_parameter_of(name: str) -> tuple[str, int] | None:
    """(bank, task id) of a per-task parameter's name (`"...mta.task_parameters.task_down.3"` -> `("task_down", 3)`,
    see `AlterMTA.split_task_adapters`); None for any other name."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "task_parameters" and parts[-2] in TASK_ADAPTER_PARAMETERS:
        return parts[-2], int(parts[-1])
    return None


__all__ = ["AlterMTA", "TaskRouting", "MTAStats", "build_routing", "init_mta_weights", "stage_trainable_names",
           "task_parameter_of", "resolve_top_k", "ADAPTER_FORMS", "TASK_ADAPTER_PARAMETERS", "check_stage"]
