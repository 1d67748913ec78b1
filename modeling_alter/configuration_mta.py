"""Validation of the Mixture-of-Task-Adapters (MTA) fields, shared by the configurations of every ALTER backbone family
(`AlterConfig` for T5, `AlterCausalConfig` for Llama-family decoder-only LMs): the one place these fields are checked.

A Hub code file: it imports only transformers (and the standard library).
"""

ADAPTER_FORMS = ("plain", "gated")


def check_int(name, value, minimum):
    """Returns `value` if it is an int (not a bool) >= `minimum`; raises `ValueError` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= {minimum}.")
    return value


def check_task_names(task_names):
    """A non-empty list of unique, non-blank task names (a task's id is its position)."""
    if isinstance(task_names, str) or not task_names:
        raise ValueError(f"task_names={task_names!r} is not valid: expected a non-empty list of task names.")
    names = list(task_names)
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"task_names contains invalid names {bad!r}: expected non-empty strings.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task_names contains duplicates {duplicates}: every task needs a unique name.")
    return names


def check_placement(placement, allowed):
    """The sublayers that carry MTA, in the order of `allowed`; `"ffn"` is required."""
    if isinstance(placement, str):
        placement = [placement]
    placement = list(placement)
    unknown = [p for p in placement if p not in allowed]
    if unknown:
        raise ValueError(f"mta_placement contains unknown sublayers {unknown}; expected a subset of {list(allowed)}.")
    if "ffn" not in placement:
        raise ValueError(f"mta_placement={placement} must include 'ffn' (every block's feed-forward carries MTA).")
    return [p for p in allowed if p in placement]


def check_adapter_form(adapter_form):
    """`"plain"` or `"gated"` (see `AlterConfig`)."""
    if adapter_form not in ADAPTER_FORMS:
        raise ValueError(f"adapter_form={adapter_form!r} is not valid: expected 'plain' or 'gated'.")
    return adapter_form


def check_router_top_k(router_top_k, num_tasks, num_shared_adapters):
    """`None` (dense), `"auto"` (see `mta.resolve_top_k`) or an int in [1, number of adapters]."""
    if router_top_k is None or router_top_k == "auto":
        return router_top_k
    n_adapters = num_tasks + num_shared_adapters
    if isinstance(router_top_k, bool) or not isinstance(router_top_k, int) or router_top_k < 1:
        raise ValueError(f"router_top_k={router_top_k!r} is not valid: expected None (dense), 'auto' or an "
                         "integer >= 1.")
    if router_top_k > n_adapters:
        raise ValueError(
            f"router_top_k={router_top_k} is larger than the number of adapters ({num_tasks} task "
            f"+ {num_shared_adapters} shared = {n_adapters})."
        )
    return router_top_k


def check_prefixes(task_names, prefixes, prefix_ids):
    """Validates `task_prefixes` (task name -> non-empty string) and `task_prefix_ids` (task name -> non-empty list
    of token ids, only for tasks with a prefix); returns plain dicts or None."""
    if not prefixes:
        if prefix_ids:
            raise ValueError("task_prefix_ids is set but task_prefixes is not: set task_prefixes (task name -> input "
                             "prefix) and fill the ids with model.set_task_prefixes(tokenizer=...).")
        return None, None
    if not isinstance(prefixes, dict):
        raise ValueError(f"task_prefixes={prefixes!r} is not valid: expected a dict from task name to input prefix.")
    unknown = [name for name in prefixes if name not in task_names]
    if unknown:
        raise ValueError(f"task_prefixes names unknown task(s) {unknown}; expected names from {list(task_names)}.")
    bad = {name: p for name, p in prefixes.items() if not isinstance(p, str) or not p}
    if bad:
        raise ValueError(f"task_prefixes has invalid prefixes {bad!r}: expected non-empty strings.")
    values = list(prefixes.values())
    duplicates = sorted({p for p in values if values.count(p) > 1})
    if duplicates:
        raise ValueError(f"task_prefixes gives the same prefix {duplicates} to several tasks; each needs its own.")
    if prefix_ids:
        if set(prefix_ids) != set(prefixes):
            raise ValueError(f"task_prefix_ids has tasks {sorted(prefix_ids)} but task_prefixes has "
                             f"{sorted(prefixes)}; expected the same tasks (refill with model.set_task_prefixes).")
        for name, ids in prefix_ids.items():
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"task_prefix_ids[{name!r}]={ids!r} is not valid: expected a non-empty list of "
                                 "token ids.")
        prefix_ids = {name: list(ids) for name, ids in prefix_ids.items()}
    return dict(prefixes), (prefix_ids or None)


def check_visible_task_adapters(visible, num_tasks):
    """`None`, or one int in [1, num_tasks] per task and a last one for the unknown task (see `AlterConfig`); a list
    that lets every task see every adapter is stored as `None`."""
    if visible is None:
        return None
    if (isinstance(visible, (str, dict)) or not hasattr(visible, "__len__") or len(visible) != num_tasks + 1
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= num_tasks for v in visible)):
        raise ValueError(f"visible_task_adapters={visible!r} is not valid: expected None or {num_tasks + 1} integers "
                         f"in [1, {num_tasks}] (one per task, then the unknown task).")
    return None if all(v == num_tasks for v in visible) else list(visible)


def check_activation(name, value):
    """`value` if it is a key of `transformers.activations.ACT2FN`; raises `ValueError` naming `name` otherwise."""
    from transformers.activations import ACT2FN

    if value not in ACT2FN:
        raise ValueError(f"{name}={value!r} is not a known activation; expected one of {sorted(ACT2FN)}.")
    return value


# The config fields that decide the MTA modules' weights and computation: a checkpoint loads only into a model that
# agrees on all of them.
MTA_SHAPE_FIELDS = ("task_names", "adapter_dim", "adapter_activation", "adapter_form", "num_shared_adapters",
                    "mta_placement")


def differing_mta_settings(stored, config) -> list[str]:
    """The `MTA_SHAPE_FIELDS` on which `stored` (a dict, e.g. a checkpoint's `config.json`) and `config` disagree, each
    as "adapter_form='plain' there, 'gated' here"; fields `stored` lacks are not compared."""
    return [f"{key}={stored[key]!r} there, {getattr(config, key, None)!r} here" for key in MTA_SHAPE_FIELDS
            if key in stored and stored[key] != getattr(config, key, None)]


def set_mta_fields(config, *, task_names, adapter_dim, adapter_activation, adapter_form, num_shared_adapters,
                   mta_placement, allowed_placements, router_top_k, router_aux_loss_coef, task_id_drop_rate, stage,
                   stage1_train_backbone, task_prefixes, task_prefix_ids, visible_task_adapters=None):
    """Validates the MTA fields and sets them on `config`; every error is a `ValueError` that names the bad value.
    See `AlterConfig` for the meaning of each field; `allowed_placements` are the backbone's sublayers that may carry
    MTA (`mta_placement` is stored in their order)."""
    config.task_names = check_task_names(task_names)
    config.adapter_dim = check_int("adapter_dim", adapter_dim, minimum=1)
    config.adapter_activation = check_activation("adapter_activation", adapter_activation)
    config.adapter_form = check_adapter_form(adapter_form)
    config.num_shared_adapters = check_int("num_shared_adapters", num_shared_adapters, minimum=0)
    config.mta_placement = check_placement(mta_placement, allowed_placements)
    config.task_prefixes, config.task_prefix_ids = check_prefixes(config.task_names, task_prefixes, task_prefix_ids)
    config.router_top_k = check_router_top_k(router_top_k, len(config.task_names), config.num_shared_adapters)
    config.router_aux_loss_coef = float(router_aux_loss_coef)
    if config.router_aux_loss_coef < 0:
        raise ValueError(f"router_aux_loss_coef={router_aux_loss_coef} must be >= 0.")
    config.task_id_drop_rate = float(task_id_drop_rate)
    if not 0.0 <= config.task_id_drop_rate < 1.0:
        raise ValueError(f"task_id_drop_rate={task_id_drop_rate} must be in [0, 1).")
    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r} is not valid: expected 1 or 2.")
    config.stage = stage
    config.stage1_train_backbone = bool(stage1_train_backbone)
    config.visible_task_adapters = check_visible_task_adapters(visible_task_adapters, len(config.task_names))


__all__ = ["ADAPTER_FORMS", "MTA_SHAPE_FIELDS", "differing_mta_settings", "check_int", "check_task_names",
           "check_placement", "check_adapter_form", "check_router_top_k", "check_prefixes", "check_visible_task_adapters",
           "check_activation", "set_mta_fields"]
