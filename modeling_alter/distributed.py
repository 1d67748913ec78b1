"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for ALTER models in a training loop of your own (docs/distributed.md).

`fully_shard` refuses 0-dimensional parameters ("fully_shard doesn't support scalar parameters"), and every MTA
module has one: `gate_mix`, the learned stage-2 mix `m` (a 0-d tensor in every saved checkpoint, so its shape is
kept). `fully_shard_alter` shards every decoder / encoder block and the root module as usual, leaves the `gate_mix`
scalars out of the sharding (`ignored_params`: each rank holds the whole scalar) and averages their gradients over
the ranks as they are accumulated, which is what FSDP's reduce-scatter does for every sharded parameter: the ranks'
`gate_mix` stay identical and train as under DDP or one process.
"""

import torch
import torch.distributed as dist
from torch import nn


def scalar_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's 0-dimensional parameters by name (an ALTER model: every MTA module's `gate_mix`)."""
    return {name: p for name, p in model.named_parameters() if p.dim() == 0}


def fully_shard_alter(model: nn.Module, group=None, **fully_shard_kwargs) -> nn.Module:
    """
    Applies FSDP2 to an ALTER model (`AlterForConditionalGeneration` or `AlterForCausalLM`) in place and returns it:
    `fully_shard` on every module whose class is in `model._no_split_modules` (the T5 blocks / the decoder layers),
    before them on each T5 `relative_attention_bias` embedding (called by the stack outside block 0), then on the
    model, with the 0-d `gate_mix` parameters left replicated and their gradients averaged over `group`
    (the default process group) by a post-accumulate-grad hook (`all_reduce`, then divided by the group size).

    Wrap with both stages' parameters present (the model as built; `set_stage` may be called before or after), then
    call `model.set_stage(n)` and build the optimizer over `[p for p in model.parameters() if p.requires_grad]`, as
    for any model: FSDP2 keeps each parameter's `requires_grad` (no flattening), so the stage switch of ALTER works
    as without FSDP. Save with `torch.distributed.checkpoint.state_dict.get_model_state_dict` (full or sharded).

    Args:
        model: an ALTER model on the device it trains on (CPU with the gloo backend, or CUDA with NCCL).
        group: the process group of the data-parallel ranks (default: the default group); a `mesh` in
            `fully_shard_kwargs` must span the same ranks.
        fully_shard_kwargs: passed to every `fully_shard` call (`mesh`, `reshard_after_forward`, `mp_policy`, ...);
            an `ignored_params` set is extended, not replaced.

    Raises:
        ValueError: `model` has no `_no_split_modules` naming its blocks, or `torch.distributed` is not initialised.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("fully_shard_alter needs an initialised process group (torch.distributed.init_process_group, "
                         "e.g. under torchrun).")
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes and m is not model]
    if not blocks:
        raise ValueError(f"model={type(model).__name__} has no blocks named by _no_split_modules="
                         f"{sorted(block_classes)}; expected an ALTER model.")
    scalars = scalar_parameters(model)
    kwargs = dict(fully_shard_kwargs)
    kwargs["ignored_params"] = set(kwargs.get("ignored_params") or ()) | set(scalars.values())
    # T5's relative position bias lives in block 0 but the stack computes it before the blocks run (once for every
    # block): its embedding becomes a unit of its own, which FSDP gathers when that embedding is called.
    for name, module in model.named_modules():
        if name.endswith("relative_attention_bias"):
            fully_shard(module, **kwargs)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    world = dist.get_world_size(group)

    def average(param):
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
            param.grad.div_(world)

    for param in scalars.values():
        trainable = param.requires_grad
        param.requires_grad_(True)  # a hook needs it; it stays when the stage freezes and unfreezes the parameter
        param.register_post_accumulate_grad_hook(average)
        param.requires_grad_(trainable)
    return model


__all__ = ["fully_shard_alter", "scalar_parameters"]
