"""ALTER's two-stage training under FSDP2 (`torch.distributed.fsdp.fully_shard`), DDP and one process, on CPU (gloo).

Run with `torchrun --nproc_per_node 2 tests/scripts/fsdp_two_stage.py OUT_DIR` (tests/test_distributed.py does).

Why a loop of its own and not `AlterTrainer`: Accelerate turns FSDP on only for accelerator devices (its
`AcceleratorState` sets `DistributedType.FSDP` only when the distributed type is MULTI_GPU/NPU/XPU/...); on CPU the
type is MULTI_CPU, so `TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})` with `use_cpu=True` is ignored
without a message and the Trainer wraps the model in `DistributedDataParallel` (`trainer.is_fsdp_enabled` is False).
This script therefore writes the training loop itself with the public API that a custom loop uses: stage 1 with
AdamW over `model.trainable_parameter_names(1)`, then `model.set_stage(2)` and a new AdamW over the stage-2
trainable set (what the `StageSwitchCallback` does inside `trainer.train()`).

Three runs of the same steps and the same global batch of 8 (4 per rank) from the same initial weights:
- `fsdp`: `modeling_alter.distributed.fully_shard_alter`: every T5 block and the root module `fully_shard`-ed over
  the 2 ranks (parameters are DTensor shards; the 0-d `gate_mix` scalars, which `fully_shard` refuses, replicated
  with their gradients averaged);
- `ddp`: `DistributedDataParallel` over the 2 ranks, wrapped with both stages' parameters trainable;
- `single` (rank 0 only): one process, the two halves of the global batch as two accumulated micro-batches.
Each rank's loss is `2 * (sum of its token losses / tokens of the global batch + coef * its aux loss / 2)`, so that
the mean over the 2 ranks that FSDP's reduce-scatter and DDP's all-reduce take equals the one-process sum over the 2
micro-batches (`sum of token losses / global tokens + coef * aux / 2` each).

Writes to OUT_DIR: `{run}_rank{R}.safetensors` (full weights at the end; FSDP's gathered with
`get_model_state_dict(full_state_dict=True)`), `{run}_switch_rank{R}.safetensors` (at the end of stage 1),
`fsdp_saved/` (the FSDP run's gathered weights saved with `save_pretrained` by rank 0), `fsdp_dcp/` (a sharded
`torch.distributed.checkpoint` of the FSDP run, reloaded into a freshly sharded model to check it) and `result.json`.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_utils import tiny_data, tiny_model, tokenizer  # noqa: E402

from modeling_alter.data import MultiTaskDataCollator  # noqa: E402
from modeling_alter.distributed import fully_shard_alter, scalar_parameters  # noqa: E402

STAGE1_STEPS, STAGE2_STEPS, GLOBAL_BATCH = 3, 3, 8
LEARNING_RATES = {1: 1e-2, 2: 5e-2}


def global_batches(world_size):
    """The steps' global batches, each split into `world_size` equal micro-batches (padded per micro-batch)."""
    train_set, _ = tiny_data(num_train_per_task=8, num_eval_per_task=1)
    collate = MultiTaskDataCollator(tokenizer())
    rows = [train_set[i % len(train_set)] for i in range((STAGE1_STEPS + STAGE2_STEPS) * GLOBAL_BATCH)]
    per = GLOBAL_BATCH // world_size
    steps = []
    for s in range(STAGE1_STEPS + STAGE2_STEPS):
        chunk = rows[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]
        steps.append([collate(chunk[r * per:(r + 1) * per]) for r in range(world_size)])
    return steps


def loss_of(model, batch, global_tokens, parts, averaged_over):
    """`averaged_over * (sum(token losses) / global_tokens + coef * aux / parts)`, from the logits, for one of the
    `parts` micro-batches of a global batch whose gradients are then averaged over `averaged_over` processes: the
    gradient of the global batch's mean token loss plus `coef` times the micro-batches' mean aux loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                task_ids=batch["task_ids"])
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                           ignore_index=-100, reduction="sum")
    loss = ce / global_tokens
    if out.aux_loss is not None:
        loss = loss + model_config(model).router_aux_loss_coef * out.aux_loss / parts
    return loss * averaged_over


def model_config(model):
    return getattr(model, "module", model).config


def optimizer_for(model, stage):
    """AdamW over exactly the stage's trainable set (the model's own `requires_grad` flags after `set_stage`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LEARNING_RATES[stage], weight_decay=0.01)


def full_state(model):
    """Every parameter by name as a full (unsharded) CPU tensor. Under FSDP a collective: each rank all-gathers the
    shards itself, and the replicated `gate_mix` scalars are that rank's own values, so ranks can be compared."""
    inner = getattr(model, "module", model)
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = inner.state_dict()
    names = {name for name, _ in inner.named_parameters()}
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k in names}


def train(model, batches, rank, world_size, micro_batches, after_stage1):
    """Stage 1, the switch, stage 2; `micro_batches(step)` gives this process's micro-batches of the global batch."""
    inner = getattr(model, "module", model)
    inner.set_stage(1)
    optimizer = optimizer_for(model, 1)
    losses = []
    for step in range(STAGE1_STEPS + STAGE2_STEPS):
        if step == STAGE1_STEPS:
            after_stage1()
            inner.set_stage(2)  # the public switch: the stage-2 trainable set, then a new optimizer over it
            optimizer = optimizer_for(model, 2)
        global_tokens = sum(int((b["labels"] != -100).sum()) for b in batches[step])
        total = 0.0
        for batch in micro_batches(step):
            loss = loss_of(model, batch, global_tokens, parts=len(batches[step]), averaged_over=world_size)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batches = global_batches(world)
    result = {"world_size": world}

    def snapshot(name, model):
        def save():
            state = full_state(model)
            save_file(state, str(out / f"{name}_switch_rank{rank}.safetensors"))
        return save

    # ---- FSDP2 ---------------------------------------------------------------------------------------------------
    model = tiny_model().train()
    try:  # plain fully_shard refuses the MTA's 0-d gate_mix: what fully_shard_alter works around
        fully_shard(tiny_model())
    except ValueError as error:
        result["plain_fully_shard_error"] = str(error)
    fully_shard_alter(model)
    scalars = set(scalar_parameters(model))
    result["fsdp_unsharded"] = [name for name, p in model.named_parameters() if not hasattr(p, "full_tensor")]
    losses = train(model, batches, rank, world, lambda step: [batches[step][rank]], snapshot("fsdp", model))
    fsdp_state = full_state(model)
    save_file(fsdp_state, str(out / f"fsdp_rank{rank}.safetensors"))
    result["fsdp_losses"] = losses
    result["replicated_scalars"] = sorted(scalars)
    # A sharded checkpoint (torch.distributed.checkpoint), reloaded into a freshly built and sharded model.
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "fsdp_dcp"))
    fresh = fully_shard_alter(tiny_model(seed=123))
    fresh_state = get_model_state_dict(fresh)
    dcp.load(fresh_state, checkpoint_id=str(out / "fsdp_dcp"))
    set_model_state_dict(fresh, fresh_state)
    reloaded = full_state(fresh)
    result["dcp_reload_equal"] = all(torch.equal(reloaded[k], fsdp_state[k]) for k in fsdp_state)
    if rank == 0:  # the gathered weights as a Transformers folder: what a user publishes
        plain = tiny_model(seed=321)
        plain.load_state_dict(fsdp_state, strict=False)
        plain.set_stage(2)
        plain.save_pretrained(out / "fsdp_saved")
    dist.barrier()

    # ---- DDP -----------------------------------------------------------------------------------------------------
    model = tiny_model().train()
    names = model.trainable_parameter_names(1) | model.trainable_parameter_names(2)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    losses = train(ddp, batches, rank, world, lambda step: [batches[step][rank]], snapshot("ddp", ddp))
    save_file(full_state(ddp), str(out / f"ddp_rank{rank}.safetensors"))
    result["ddp_losses"] = losses
    dist.barrier()

    # ---- one process, the same global batches as accumulated micro-batches ----------------------------------------
    if rank == 0:
        model = tiny_model().train()
        noop = lambda: save_file(full_state(model), str(out / "single_switch_rank0.safetensors"))  # noqa: E731
        result["single_losses"] = train(model, batches, 0, 1, lambda step: batches[step], noop)
        save_file(full_state(model), str(out / "single_rank0.safetensors"))
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
