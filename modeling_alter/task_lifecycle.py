"""A model's tasks over its life, shared by every ALTER model family: `AlterTasksMixin` gives each family's model
class its task and stage methods (`task_ids`, `set_stage`, `trainable_parameter_names`, `split_task_adapters`), its
life after training (`add_tasks`, `keep_tasks`, `set_train_tasks`) and routing by input prefix
(`set_task_prefixes`, `infer_task_ids` and a `generate` that infers the tasks once), with the model-independent
helpers they use (`remap_mta_tasks`, `plan_task_changes`, `FrozenRows`, `PrefixMatcher`, `tokenize_prefix`).

```python
model.add_tasks(["summarize"], init_from="qa")  # a new adapter, copied from task "qa"
model.set_train_tasks(["summarize"])             # train only it; every other task stays bit-identical
small = model.keep_tasks(["qa", "summarize"])    # a new model with two tasks
model.set_task_prefixes({"qa": "question: "}, tokenizer)  # route by prompt prefix without task_ids
```

This file goes to the Hub with the model: it imports only torch, transformers and its siblings (`mta.py`,
`configuration_mta.py`).
"""

import copy

import torch
from torch import nn

from .configuration_mta import check_prefixes, check_visible_task_adapters
from .mta import (
    TASK_ADAPTER_PARAMETERS,
    AlterMTA,
    check_stage,
    resolve_top_k,
    stage_trainable_names,
    task_parameter_of,
)


# ---- a model's life after training: add, keep and route tasks (model-independent) ------------------------------

# Gate logit of an adapter that a task may not route to (a task added later, seen from an older task or the unknown
# task): its softmax probability is exactly 0 in fp32 (exp underflows), so is its gradient, and top-k never needs it.
BLOCKED_GATE_LOGIT = -1e9


@torch.no_grad()
def remap_mta_tasks(module: AlterMTA, keep: list[int], added: list[int | None], std: float,
                    top_k: int | None) -> None:
    """Rebuilds `module`'s task dimension in place: the new tasks are the old tasks `keep` (in that order) followed by
    one new task per entry of `added` (the old task it copies, or `None` for a fresh adapter: down-projection
    ~ N(0, std), up-projection zero, so its output starts at zero).

    Parameters and their new shapes (T' = len(keep) + len(added), n' = T' + S):
    - `task_down` [T', d, r] and `task_up` [T', r, d]: kept rows, then the new adapters;
    - `router.weight` [n', d]: one row per adapter (a copied task's row, or zero);
    - `task_embedding.weight` [T' + 1, n'] (last row: the unknown task): kept rows restricted to the kept columns, so
      a kept task's gate is its old softmax renormalised over the kept adapters. A kept task and the unknown task get
      `BLOCKED_GATE_LOGIT` in the new adapters' columns, so their outputs do not change. A new task's row is its
      source's row (or the unknown task's row), with `BLOCKED_GATE_LOGIT` in the other new tasks' columns and, in its
      own column, its source's own value (or 0).
    `gate_mix` and the shared adapters are unchanged. New parameters keep the old ones' dtype and device; their
    `requires_grad` is False until the model's `set_stage` sets it.
    """
    T, S = module.num_tasks, module.shared_down.shape[0]
    keep_index = torch.tensor(keep, dtype=torch.long, device=module.task_down.device)
    n_new_tasks = len(keep) + len(added)

    def new_rows(bank, fresh):
        rows = [bank.index_select(0, keep_index)]
        for source in added:
            rows.append(bank[source:source + 1].clone() if source is not None else fresh(bank[:1]))
        return torch.cat(rows)

    down = new_rows(module.task_down, lambda like: torch.randn_like(like) * std)
    up = new_rows(module.task_up, torch.zeros_like)
    linear = new_rows(module.task_linear, lambda like: torch.randn_like(like) * std) if module.gated else None
    # adapter columns: kept tasks, new tasks, shared adapters (-1: a new column)
    columns = list(keep) + [-1] * len(added) + list(range(T, T + S))
    column_index = torch.tensor([c if c >= 0 else 0 for c in columns], dtype=torch.long, device=down.device)
    is_new = torch.tensor([c < 0 for c in columns], device=down.device)
    router = module.router.weight.index_select(0, column_index).clone()
    router[is_new] = 0
    for i, source in enumerate(added):
        if source is not None:
            router[len(keep) + i] = module.router.weight[source]
    emb = module.task_embedding.weight
    emb_rows = torch.cat([emb.index_select(0, keep_index), emb.new_empty(len(added), emb.shape[1]), emb[T:]])
    for i, source in enumerate(added):
        emb_rows[len(keep) + i] = emb[source if source is not None else T]
    new_emb = emb_rows.index_select(1, column_index)
    new_emb[:, is_new] = BLOCKED_GATE_LOGIT
    for i, source in enumerate(added):
        new_emb[len(keep) + i, len(keep) + i] = emb[source, source] if source is not None else 0.0

    def parameter(value, old):
        return nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=False)

    module.task_down = parameter(down, module.task_down)
    module.task_up = parameter(up, module.task_up)
    if module.gated:
        module.task_linear = parameter(linear, module.task_linear)
    module.router.weight = parameter(router, module.router.weight)
    module.router.out_features = router.shape[0]
    module.task_embedding.weight = parameter(new_emb, module.task_embedding.weight)
    module.task_embedding.num_embeddings = new_emb.shape[0]
    module.task_embedding.embedding_dim = new_emb.shape[1]
    module.num_tasks, module.num_adapters, module.top_k = n_new_tasks, n_new_tasks + S, top_k


def plan_task_changes(task_names: list[str], keep=None, add=None, init_from=None) -> tuple[list[int], list]:
    """Validates a change of a model's task list and returns `(keep, added)` for `remap_mta_tasks`.

    `keep`: names of the existing tasks to keep (default: all, in order); `add`: new task names; `init_from`: `None`,
    one existing task name for every new task, or a list with one entry (a name or `None`) per new task."""
    index = {name: i for i, name in enumerate(task_names)}
    if keep is None:
        keep_ids = list(range(len(task_names)))
    else:
        if isinstance(keep, str):
            keep = [keep]
        keep = list(keep)
        if not keep:
            raise ValueError(f"keep_tasks needs at least one task name; this model has tasks {task_names}.")
        unknown = [name for name in keep if name not in index]
        if unknown:
            raise ValueError(f"Unknown task name(s) {unknown} to keep; this model has tasks {task_names}.")
        duplicates = sorted({name for name in keep if keep.count(name) > 1})
        if duplicates:
            raise ValueError(f"Task name(s) {duplicates} given more than once to keep_tasks.")
        keep_ids = [index[name] for name in keep]
    add = [] if add is None else ([add] if isinstance(add, str) else list(add))
    bad = [name for name in add if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"New task names {bad!r} are not valid: expected non-empty strings.")
    existing = sorted(name for name in add if name in index)
    if existing:
        raise ValueError(f"Task name(s) {existing} already exist in this model (tasks {task_names}); new tasks need "
                         "new names.")
    duplicates = sorted({name for name in add if add.count(name) > 1})
    if duplicates:
        raise ValueError(f"New task name(s) {duplicates} given more than once.")
    sources = init_from if isinstance(init_from, (list, tuple)) else [init_from] * len(add)
    if len(sources) != len(add):
        raise ValueError(f"init_from has {len(sources)} entries for {len(add)} new tasks; expected one per new task.")
    unknown = [source for source in sources if source is not None and source not in index]
    if unknown:
        raise ValueError(f"init_from names unknown task(s) {unknown}; expected None or one of {task_names}.")
    return keep_ids, [None if source is None else index[source] for source in sources]


class FrozenRows:
    """Keeps some rows (dim 0) of some parameters exactly as they are while the rest of those parameters train.

    `rows` maps each parameter to the indices of its rows to keep. `install_grad_hooks()` zeroes those rows'
    gradients (so they neither move the other rows through gradient clipping nor fill optimizer moments), and
    `restore()` copies the saved rows back; `attach(optimizer)` calls it after every optimizer step, which undoes the
    one change an element-wise optimizer can still make with a zero gradient: decoupled weight decay. The trained
    rows see exactly the optimizer's update (AdamW's, weight decay included) that they would see alone.
    """

    def __init__(self, rows: dict[nn.Parameter, torch.Tensor]):
        self.rows = {p: index for p, index in rows.items() if index.numel()}
        self.saved = {p: p.detach()[index].clone() for p, index in self.rows.items()}
        self._handles = []

    def install_grad_hooks(self) -> None:
        for param, index in self.rows.items():
            mask = torch.ones(param.shape[0], *([1] * (param.dim() - 1)), dtype=param.dtype, device=param.device)
            mask[index] = 0
            self._handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))

    @torch.no_grad()
    def restore(self, *args, **kwargs) -> None:
        for param, index in self.rows.items():
            param[index] = self.saved[param]

    def attach(self, optimizer) -> None:
        """Restores the rows after every `optimizer.step()`."""
        self._handles.append(optimizer.register_step_post_hook(self.restore))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---- routing by prompt prefix -------------------------------------------------------------------------------------


def tokenize_prefix(tokenizer, prefix: str, probes=("x", "hello world", "1 2 3", "The")) -> list[int]:
    """Token ids that every input starting with `prefix` starts with (`add_special_tokens=False`): the longest common
    start of the tokenizations of `prefix + probe` for a few probes (a trailing space of the prefix may merge with the
    next word, so the prefix's own tokenization is not always a prefix of the input's)."""
    runs = [tokenizer(prefix + probe, add_special_tokens=False)["input_ids"] for probe in probes]
    common = []
    for ids in zip(*runs):
        if any(i != ids[0] for i in ids):
            break
        common.append(ids[0])
    if not common:
        raise ValueError(f"Task prefix {prefix!r} has no token that every input starting with it shares; use a "
                         "prefix that tokenizes to at least one token of its own (e.g. ending with ':').")
    return common


class PrefixMatcher:
    """Infers each example's task from the token ids its input starts with.

    Built from `prefix_ids` (one list of token ids per task, `[]` for a task without a prefix). `matcher(input_ids
    [batch, length], attention_mask [batch, length] or None)` returns task ids [batch] (long), with `-1` where no
    prefix matches (an input shorter than every prefix included). The input starts at its first attended token, so
    left and right padding both work. When several prefixes match, the longest wins. One vectorised comparison per
    batch, on the input's device; no decoding, no host synchronisation.

    With `skip_token_id` (a decoder-only model's BOS), an input whose first attended token is that id is matched from
    the token after it, so prompts tokenized with and without a leading BOS route alike (prefix ids never hold it).
    """

    def __init__(self, prefix_ids: list[list[int]]):
        width = max([len(ids) for ids in prefix_ids] + [1])
        table = torch.full((len(prefix_ids), width), -1, dtype=torch.long)
        for i, ids in enumerate(prefix_ids):
            table[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.table = table  # [tasks, width], -1 past each prefix
        self.lengths = torch.tensor([len(ids) for ids in prefix_ids])
        self._on_device = {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 skip_token_id: int | None = None) -> torch.Tensor:
        batch, length = input_ids.shape
        width = self.table.shape[1]
        if attention_mask is None:
            start = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
            valid = torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
        else:
            mask = attention_mask.bool()
            start = mask.long().argmax(1)  # the first attended token (0 for right padding)
            valid = mask.sum(1)
        if skip_token_id is not None and length > 0:
            skip = (input_ids.gather(1, start[:, None]).squeeze(1) == skip_token_id).long()
            start, valid = (start + skip).clamp(max=length - 1), valid - skip
        positions = start[:, None] + torch.arange(width, device=input_ids.device)
        window = input_ids.gather(1, positions.clamp(max=length - 1))  # [batch, width]
        if input_ids.device not in self._on_device:
            self._on_device[input_ids.device] = (self.table.to(input_ids.device), self.lengths.to(input_ids.device))
        table, lengths = self._on_device[input_ids.device]
        inside = torch.arange(width, device=input_ids.device)[None, None] < lengths[None, :, None]
        equal = (window[:, None, :] == table[None]) | ~inside  # [batch, tasks, width]
        matched = equal.all(-1) & (lengths[None] > 0) & (lengths[None] <= valid[:, None])
        score = torch.where(matched, lengths[None], -1)  # the longest matching prefix
        best = score.max(1)
        return torch.where(best.values >= 0, best.indices, -1)



def prefix_task_ids(config, matcher: PrefixMatcher, input_ids, attention_mask=None, skip_token_id=None) -> torch.Tensor:
    """Task ids [batch] from the inputs' prefixes with `matcher` (built from `config.task_prefix_ids`; a leading
    `skip_token_id` is skipped, see `PrefixMatcher`): an unmatched example gets the unknown task (`config.num_tasks`)
    in stage 2 and raises `ValueError` in stage 1."""
    task_ids = matcher(input_ids, attention_mask, skip_token_id)
    if config.stage == 2:
        return task_ids.masked_fill(task_ids < 0, config.num_tasks)
    unmatched = (task_ids < 0).nonzero().flatten().tolist()
    if unmatched:
        raise ValueError(
            f"Example(s) {unmatched} start with none of the task prefixes {config.task_prefixes}; a stage-1 ALTER "
            "model needs each example's task: add the prefix, or pass task_ids."
        )
    return task_ids


def prefix_matcher_for(config) -> PrefixMatcher:
    """A `PrefixMatcher` over `config.task_prefix_ids` (tasks in `config.task_names` order; [] for no prefix)."""
    if not config.task_prefix_ids:
        hint = (" (config.task_prefixes is set: fill the token ids with model.set_task_prefixes(tokenizer=tok))"
                if getattr(config, "task_prefixes", None) else "")
        raise ValueError("This model has no task prefixes to infer task ids from" + hint + "; pass task_ids.")
    return PrefixMatcher([config.task_prefix_ids.get(name, []) for name in config.task_names])


class AlterTasksMixin:
    """What an ALTER model of any backbone family does with its tasks and stages (a `PreTrainedModel` with
    `GenerationMixin` whose MTA modules are `AlterMTA`s; placed before them in the bases). The model defines
    `_mta_init_std()`, the standard deviation its `_init_weights` gives new down-projections.

    - Tasks and stages: `task_ids`, `mta_modules`, `task_adapter_banks`, `trainable_parameter_names`, `set_stage`.
    - A model's life after training: `add_tasks`, `keep_tasks`, `set_train_tasks` / `train_tasks` / `frozen_rows`.
    - Routing by input prefix: `set_task_prefixes`, `infer_task_ids`, and a `generate` that, without `task_ids` and
      with `config.task_prefixes` set, infers each example's task once from its input and passes it as `task_ids` (so
      every decoding step, beam and returned sequence uses it). The model's `forward` calls `infer_task_ids` itself
      when it gets `task_ids=None` on a fresh input.

    `prefix_skip_bos = True` (decoder-only models): a leading `config.bos_token_id` is skipped before matching, so a
    tokenizer that adds BOS (Llama) and one that does not route the same prompt alike; the prefix ids never hold BOS.
    """

    _train_task_names = None  # see `set_train_tasks`
    _frozen_rows = None
    _prefix_matcher = None  # ((task names, task_prefix_ids) at build time, PrefixMatcher)
    prefix_skip_bos = False

    # ---- tasks and stages -------------------------------------------------------------------------------------

    def task_ids(self, names) -> torch.LongTensor:
        """Maps task names (a list, or one name) to a LongTensor of task ids on the model's device."""
        if isinstance(names, str):
            names = [names]
        index = {name: i for i, name in enumerate(self.config.task_names)}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise ValueError(f"Unknown task name(s) {unknown}; this model knows {self.config.task_names}.")
        return torch.tensor([index[name] for name in names], dtype=torch.long, device=self.device)

    def mta_modules(self) -> dict[str, AlterMTA]:
        """Every MTA module by its parameter-path name, encoder first (the order of `routing_weights`)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, AlterMTA)}

    def task_adapter_banks(self) -> list[nn.Parameter]:
        """The stacked task-adapter parameters (`task_down` [T, d, r], `task_up` [T, r, d] and, gated form,
        `task_linear` [T, d, r] of every MTA module), whose row t is task t's."""
        return [p for m in self.mta_modules().values() for p in (m.task_down, m.task_up, m.task_linear)
                if p is not None]

    def split_task_adapters(self) -> None:
        """Gives every task adapter parameters of its own, views of the banks' rows (see
        `AlterMTA.split_task_adapters`): a stage-1 step then costs the optimizer, gradient clipping and the backward
        pass only the tasks of its batch, whatever the number of tasks, and each task's adapter trains exactly as with
        one parameter per task. `AlterTrainer.train` splits for its duration. Keeps the stage's trainable set."""
        for module in self.mta_modules().values():
            module.split_task_adapters()
        self.set_stage(self.config.stage)

    def merge_task_adapters(self) -> None:
        """Undoes `split_task_adapters` (the banks hold every update already)."""
        for module in self.mta_modules().values():
            module.merge_task_adapters()
        self.set_stage(self.config.stage)

    @property
    def task_adapters_split(self) -> bool:
        """Whether `split_task_adapters` is in effect."""
        return any(m.task_parameters is not None for m in self.mta_modules().values())

    def trainable_parameter_names(self, stage: int) -> set[str]:
        """Names of the parameters that train in `stage` (1 or 2). With `set_train_tasks(names)`, only the MTA
        parameters that hold rows of those tasks: the task adapters in stage 1, the task embeddings in stage 2 (their
        other rows are kept frozen, see `frozen_rows`)."""
        if self._train_task_names is None:
            peft_names = self.peft_adapter_parameter_names()
            if peft_names is None:
                return stage_trainable_names(self.named_parameters(), stage, self.config.stage1_train_backbone)
            # Under PEFT the adapters it injected (LoRA, ...) train the backbone in stage 1; its weights stay frozen.
            names = stage_trainable_names(self.named_parameters(), stage, train_backbone=False)
            return names | peft_names if stage == 1 else names
        check_stage(stage)
        if stage == 1 and self.task_adapters_split:
            train = set(self.task_ids(list(self._train_task_names)).tolist())
            return {name for name, _ in self.named_parameters()
                    if (split := task_parameter_of(name)) is not None and split[1] in train}
        leaves = TASK_ADAPTER_PARAMETERS if stage == 1 else ("task_embedding.weight",)
        return {name for name, _ in self.named_parameters() if ".mta." in f".{name}" and name.endswith(leaves)}

    # ---- under a PEFT wrapper (`peft.get_peft_model(model, LoraConfig(...))`) ------------------------------------

    def peft_adapter_parameter_names(self) -> set[str] | None:
        """Names of the parameters that PEFT injected into this model (LoRA's `lora_A`/`lora_B`, copies of
        `modules_to_save`, ...: the sub-modules each PEFT layer lists in `adapter_layer_names`), or `None` when no PEFT
        adapter is injected. Under PEFT, stage 1 trains the task adapters and these parameters instead of the backbone
        (`trainable_parameter_names`), stage 2 as without PEFT.

        Raises `ValueError` if a PEFT adapter sits inside an MTA module (e.g. `target_modules="all-linear"` wraps the
        router): ALTER's stages own those parameters."""
        names = None
        for module_name, module in self.named_modules():
            layer_names = getattr(module, "adapter_layer_names", None)
            if layer_names is None or not type(module).__module__.startswith("peft."):
                continue
            if ".mta." in f".{module_name}.":
                raise ValueError(
                    f"PEFT put an adapter on {module_name}, inside an ALTER MTA module, whose parameters ALTER's stages "
                    "train themselves: target only the backbone's modules (e.g. LoraConfig(target_modules=['q_proj', "
                    "'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']) for a decoder-only model, "
                    "['q', 'k', 'v', 'o', 'wi', 'wo'] for T5) instead of 'all-linear'.")
            names = set() if names is None else names
            prefix = f"{module_name}." if module_name else ""
            for attribute in layer_names:
                child = getattr(module, attribute, None)
                if isinstance(child, (nn.Module, nn.ParameterDict)):
                    names |= {f"{prefix}{attribute}.{name}" for name, _ in child.named_parameters()}
        return names

    def route_task_ids_through(self, wrapper: nn.Module) -> nn.Module:
        """Makes `wrapper` (a PEFT model around this model, e.g. `get_peft_model(model, LoraConfig(...))`) hand
        `task_ids` on to this model, as its `forward` does not: `PeftModelForCausalLM.forward` and
        `PeftModelForSeq2SeqLM.forward` take a `task_ids` argument of their own and pass it on only to PEFT's Poly
        adapters. Two forward pre-hooks carry it past them (`wrapper`: `task_ids` -> `alter_task_ids`; PEFT's tuner
        model and this model: back to `task_ids`); `generate` needs none (PEFT passes its keyword arguments on).
        Returns `wrapper`. Idempotent. `AlterTrainer` (and any trainer with `AlterStagesMixin`) calls it.

        Without it, a forward of such a wrapper without prefix routing raises a `ValueError` naming this method,
        rather than routing stage 1 nowhere or stage 2 silently without the ids."""
        if getattr(wrapper, "_alter_routes_task_ids", False):
            return wrapper

        def rename(source, target):
            def hook(module, args, kwargs):
                if source in kwargs:
                    kwargs = dict(kwargs)
                    kwargs[target] = kwargs.pop(source)
                    return args, kwargs
                return None
            return hook

        wrapper.register_forward_pre_hook(rename("task_ids", "alter_task_ids"), with_kwargs=True)
        inner = [self]
        tuner = getattr(wrapper, "base_model", None)  # PEFT's LoraModel, ..., which calls this model's forward
        if isinstance(tuner, nn.Module) and tuner is not self and tuner is not wrapper:
            inner.append(tuner)
        for module in inner:
            if not getattr(module, "_alter_receives_task_ids", False):
                module.register_forward_pre_hook(rename("alter_task_ids", "task_ids"), with_kwargs=True)
                module._alter_receives_task_ids = True
        wrapper._alter_routes_task_ids = True
        self._alter_peft_routed = True
        return wrapper

    def _check_task_ids_reach_the_model(self) -> None:
        """Called by `forward` when it gets `task_ids=None`: raises if a PEFT wrapper of a task type whose `forward`
        drops `task_ids` wraps this model and `route_task_ids_through` was not called (see there)."""
        peft_config = self.__dict__.get("peft_config")
        if not peft_config or self.__dict__.get("_alter_peft_routed") or self.config.task_prefixes:
            return
        for config in peft_config.values():
            task_type = getattr(getattr(config, "task_type", None), "value", getattr(config, "task_type", None))
            peft_type = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
            if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and peft_type != "POLY":
                raise ValueError(
                    f"This ALTER model is wrapped by PEFT (task_type={task_type!r}), whose forward keeps task_ids for "
                    "its own Poly adapters and drops them for LoRA and the others, so the ALTER model got "
                    "task_ids=None. Call `model.route_task_ids_through(peft_model)` once after `get_peft_model(model, "
                    "config)` (AlterTrainer and trainers with AlterStagesMixin do it for you), or leave task_type out "
                    "of the PEFT config (PeftModel passes every argument on).")

    def set_stage(self, stage: int) -> None:
        """Sets `config.stage` and makes exactly that stage's parameters trainable (the rest frozen)."""
        check_stage(stage)
        self.config.stage = stage
        trainable = self.trainable_parameter_names(stage)
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        if self._frozen_rows is not None:
            self._frozen_rows.remove()
            self._frozen_rows = None
        if self._train_task_names is not None:
            train = set(self.task_ids(list(self._train_task_names)).tolist())
            rows = {}
            for module in self.mta_modules().values():
                if stage == 1 and module.task_parameters is not None:
                    continue  # split: the other tasks' own parameters do not train at all
                # stage 1: rows of the task adapters; stage 2: rows of the task embedding (the last: unknown task)
                params = (module.task_down, module.task_up, module.task_linear) if stage == 1 else (
                    module.task_embedding.weight,)
                for param in (p for p in params if p is not None):
                    frozen = [i for i in range(param.shape[0]) if i not in train]
                    rows[param] = torch.tensor(frozen, dtype=torch.long, device=param.device)
            if rows:
                self._frozen_rows = FrozenRows(rows)
                self._frozen_rows.install_grad_hooks()

    # ---- a model's life after training: add, keep, train only some tasks --------------------------------------

    @property
    def frozen_rows(self) -> FrozenRows | None:
        """With `set_train_tasks`, the rows of the current stage's trainable parameters that belong to other tasks:
        their gradients are zeroed, and `frozen_rows.attach(optimizer)` (which `AlterTrainer` calls) restores them
        after every optimizer step, so weight decay cannot move them either."""
        return self._frozen_rows

    def set_train_tasks(self, names) -> None:
        """Trains only the tasks `names` (e.g. tasks just added with `add_tasks`), or every task again with `None`.

        Stage 1 then trains exactly those tasks' adapters (never the backbone), stage 2 exactly their task-embedding
        rows; every other task's outputs stay bit-identical. Applies to the current stage at once and to later
        `set_stage` calls."""
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            if not names:
                raise ValueError(
                    f"train_tasks needs at least one task name (or None); tasks: {self.config.task_names}.")
            self.task_ids(names)  # names the known tasks in its error for an unknown one
        self._train_task_names = None if names is None else tuple(names)
        self.set_stage(self.config.stage)

    @property
    def train_tasks(self) -> tuple[str, ...] | None:
        """The tasks `set_train_tasks` restricted training to (None: all)."""
        return self._train_task_names

    def add_tasks(self, names, init_from=None) -> None:
        """Adds tasks in place: for each new name, a task adapter in every MTA module (a copy of `init_from`'s, or a
        fresh one whose up-projection is zero, so it starts as the backbone alone), a task-embedding row and a gate
        column; `config.task_names` grows at the end, so existing task ids keep their values.

        `init_from`: `None`, an existing task name for every new task, or one entry per new task. Existing tasks and
        the unknown-task route get a blocked gate logit (`BLOCKED_GATE_LOGIT`) for the new adapters, so their
        outputs in stage 1 and stage 2 stay what they were, bit for bit (`config.visible_task_adapters` records which
        adapters each task may use, and a stage-2 batch of older tasks is computed over those only), except when
        `router_top_k="auto"` and the model passes 16 adapters (every task then routes top-2); a new task's gate
        sees every older adapter and its own.
        Follow with `set_train_tasks(names)` to train only the new tasks (a stage-2 model: a short stage 1, then a
        short stage 2 of their embedding rows)."""
        keep, added = plan_task_changes(self.config.task_names, add=names, init_from=init_from)
        if not added:
            raise ValueError("add_tasks needs at least one new task name.")
        new_names = [names] if isinstance(names, str) else list(names)
        self._remap_tasks(keep, added, list(self.config.task_names) + new_names)

    def keep_tasks(self, names):
        """Returns a new, smaller model with only the tasks `names` (in that order; ids are re-numbered by it). This
        model is not changed.

        Stage 1: each kept task's outputs are exactly what they were. Stage 2: each token's gate is the old softmax
        restricted to the kept task adapters and the shared adapters and renormalised to sum to 1 (the dropped
        adapters' weight is spread proportionally over the kept ones), i.e. exactly the old model with the dropped
        adapters' gate logits at minus infinity; an integer `router_top_k` is capped at the new number of adapters
        (`"auto"` re-resolves for it)."""
        keep, _ = plan_task_changes(self.config.task_names, keep=names)
        frozen, self._frozen_rows = self._frozen_rows, None
        if frozen is not None:
            frozen.remove()  # hooks do not deep-copy
        try:
            model = copy.deepcopy(self)
        finally:
            if frozen is not None:
                self._frozen_rows = frozen
                frozen.install_grad_hooks()
        names = [self.config.task_names[i] for i in keep]
        train = self._train_task_names
        kept_train = tuple(t for t in train if t in names) if train is not None else ()
        model._train_task_names = kept_train or None
        model._remap_tasks(keep, [], names)
        return model

    def _remap_tasks(self, keep, added, new_names) -> None:
        if self.task_adapters_split:
            raise ValueError("Cannot add or drop tasks while the task adapters are split (during AlterTrainer.train, "
                             "or after split_task_adapters()): call merge_task_adapters() first.")
        std = self._mta_init_std()
        num_adapters = len(new_names) + self.config.num_shared_adapters
        top_k = self.config.router_top_k
        if top_k is not None and top_k != "auto":
            top_k = self.config.router_top_k = min(top_k, num_adapters)
        for module in self.mta_modules().values():
            remap_mta_tasks(module, keep, added, std, resolve_top_k(top_k, num_adapters))
        old_count = len(self.config.task_names)
        limits = self.config.visible_task_adapters or [old_count] * (old_count + 1)
        if added:  # an old task and the unknown task keep theirs; a new one sees the older tasks and itself
            limits = limits[:-1] + [old_count + i + 1 for i in range(len(added))] + limits[-1:]
        elif keep == list(range(len(keep))):  # the first tasks, in order
            limits = [min(v, len(keep)) for v in limits[: len(keep)] + limits[-1:]]
        else:  # renumbered: the blocked gate logits alone say which adapters a task may use
            limits = None
        self.config.task_names = list(new_names)
        self.config.visible_task_adapters = check_visible_task_adapters(limits, len(new_names))
        if self.config.task_prefixes:
            prefixes = {k: v for k, v in self.config.task_prefixes.items() if k in new_names}
            ids = self.config.task_prefix_ids
            self.config.task_prefixes = prefixes or None
            self.config.task_prefix_ids = {k: v for k, v in ids.items() if k in prefixes} if ids and prefixes else None
        self.set_stage(self.config.stage)

    # ---- routing by input prefix ----------------------------------------------------------------------------

    def _prefix_skip_token_id(self):
        return getattr(self.config, "bos_token_id", None) if self.prefix_skip_bos else None

    def set_task_prefixes(self, prefixes: dict[str, str] | None = None, tokenizer=None) -> None:
        """Sets `config.task_prefixes` (default: keep the current ones) and fills `config.task_prefix_ids` with
        `tokenizer` (see `tokenize_prefix`); both are saved in `config.json`. An empty dict turns prefix routing off.
        Decoder-only models raise `ValueError` if the tokenizer starts inputs with a BOS other than
        `config.bos_token_id` (it could not be skipped when matching)."""
        prefixes = self.config.task_prefixes if prefixes is None else prefixes
        if prefixes and tokenizer is None:
            raise ValueError("set_task_prefixes needs the tokenizer, to turn each prefix into the token ids inputs "
                             "start with.")
        if prefixes and self.prefix_skip_bos:
            bos = getattr(tokenizer, "bos_token_id", None)
            first = tokenizer("x")["input_ids"][:1]
            if bos is not None and first == [bos] and bos != self._prefix_skip_token_id():
                raise ValueError(f"The tokenizer starts every input with its BOS token id {bos}, but "
                                 f"config.bos_token_id={self.config.bos_token_id!r}; set config.bos_token_id={bos} so "
                                 "that prefix matching skips it.")
        ids = {name: tokenize_prefix(tokenizer, prefix) for name, prefix in prefixes.items()} if prefixes else None
        self.config.task_prefixes, self.config.task_prefix_ids = check_prefixes(self.config.task_names, prefixes, ids)

    def infer_task_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Task ids [batch] from the inputs' prefixes (`config.task_prefix_ids`): each example's longest matching
        prefix, counted from its first attended token (after a leading BOS for decoder-only models). An unmatched
        example gets the unknown task (`num_tasks`) in stage 2 and raises `ValueError` in stage 1."""
        ids = self.config.task_prefix_ids or {}
        key = (tuple(self.config.task_names), tuple((name, tuple(ids[name])) for name in sorted(ids)))
        cached = getattr(self, "_prefix_matcher", None)
        if cached is None or cached[0] != key:
            cached = self._prefix_matcher = (key, prefix_matcher_for(self.config))
        return prefix_task_ids(self.config, cached[1], input_ids, attention_mask, self._prefix_skip_token_id())

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`; with `task_ids` not given and `config.task_prefixes` set, each example's task
        comes from its input's prefix (see `infer_task_ids`), expanded for beams like explicit `task_ids`."""
        if kwargs.get("task_ids") is None and self.config.task_prefixes:
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            if input_ids is not None and not input_ids.is_floating_point():
                kwargs["task_ids"] = self.infer_task_ids(input_ids, kwargs.get("attention_mask"))
        return super().generate(inputs, *args, **kwargs)


__all__ = ["AlterTasksMixin", "BLOCKED_GATE_LOGIT", "FrozenRows", "PrefixMatcher", "plan_task_changes", "prefix_matcher_for",
           "prefix_task_ids", "remap_mta_tasks", "tokenize_prefix"]
