"""Validation of the Mixture-of-Task-Adapters (MTA) fields, shared by the configurations of every ALTER backbone family.

A Hub code file: it imports only transformers (and the standard library).
"""


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


def set_mta_fields(config, *, task_names, adapter_dim, adapter_activation, num_shared_adapters, mta_placement,
                   allowed_placements, router_top_k, router_aux_loss_coef, task_id_drop_rate, stage,
                   stage1_train_backbone):
    """Validates the MTA fields and sets them on `config`; every error is a `ValueError` that names the bad value.
    See `AlterConfig` for the meaning of each field."""
    from transformers.activations import ACT2FN

    config.task_names = check_task_names(task_names)
    config.adapter_dim = check_int("adapter_dim", adapter_dim, minimum=1)
    if adapter_activation not in ACT2FN:
        raise ValueError(
            f"adapter_activation={adapter_activation!r} is not a known activation; expected one of {sorted(ACT2FN)}."
        )
    config.adapter_activation = adapter_activation
    config.num_shared_adapters = check_int("num_shared_adapters", num_shared_adapters, minimum=0)
    config.mta_placement = check_placement(mta_placement, allowed_placements)
    if router_top_k is not None:
        n_adapters = len(config.task_names) + config.num_shared_adapters
        check_int("router_top_k", router_top_k, minimum=1)
        if router_top_k > n_adapters:
            raise ValueError(
                f"router_top_k={router_top_k} is larger than the number of adapters ({len(config.task_names)} task "
                f"+ {config.num_shared_adapters} shared = {n_adapters})."
            )
    config.router_top_k = router_top_k
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


__all__ = ["check_int", "check_task_names", "check_placement", "set_mta_fields"]
