"""A tiny two-stage ALTER training job for the resume and distributed tests.

Runs alone, under `torchrun --nproc_per_node N` or under `accelerate launch`. Writes into `--output_dir`:
`final_rank{R}.safetensors` (every rank's final weights), `switch_rank{R}.safetensors` (the weights at the end of
stage 1) and, on the main process, `job_result.json` (switch step, stage, log history, and with
`--num_eval_per_task` the per-task evaluation at the switch and at the end, with routing statistics). `--kill_at_step K` ends the
process abruptly (`os._exit`) in the middle of optimizer step K+1, after its gradients are computed.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import HfArgumentParser, TrainerCallback, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_utils import TRAIN_TASKS, tiny_data, tiny_model, tokenizer  # noqa: E402

from modeling_alter.mta import task_parameter_of  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments  # noqa: E402


@dataclass
class JobArguments:
    kill_at_step: int | None = field(default=None, metadata={"help": "Exit abruptly during optimizer step K+1."})
    num_train_per_task: int = field(default=16, metadata={"help": "Training examples per task."})
    num_eval_per_task: int = field(
        default=0, metadata={"help": "Evaluation examples per task (0: no evaluation); evaluated at the switch and at the end."}
    )
    dropout_rate: float = field(default=0.0, metadata={"help": "Dropout of the model."})
    task_id_drop_rate: float = field(default=0.0, metadata={"help": "Stage-2 task-id drop rate."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the router auxiliary loss."})
    causal: bool = field(default=False, metadata={"help": "Train a decoder-only AlterForCausalLM (tiny Qwen2)."})


def parameters(model):
    """The model's parameters by name (a tied weight once), as contiguous CPU tensors; during training without the
    per-task views of the task-adapter banks (`split_task_adapters`), which the banks hold."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if task_parameter_of(name) is None}


class Snapshots(TrainerCallback):
    """Saves the weights at the end of stage 1 and kills the process at the requested step."""

    def __init__(self, trainer, job):
        self.trainer = trainer
        self.job = job

    def _rank(self):
        return self.trainer.args.process_index

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before the StageSwitchCallback (added last): these are the weights at the end of stage 1.
        planned = self.trainer.stage_callback.planned_switch_step
        if planned is not None and state.global_step == planned:
            path = os.path.join(args.output_dir, f"switch_rank{self._rank()}.safetensors")
            save_file(parameters(self.trainer.alter_model), path)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.job.kill_at_step is not None and state.global_step == self.job.kill_at_step:
            sys.stdout.flush()
            os._exit(3)


def main():
    job, args = HfArgumentParser((JobArguments, AlterTrainingArguments)).parse_args_into_dataclasses()
    torch.set_num_threads(1)
    set_seed(args.seed)
    if job.causal:  # the same job on a decoder-only model: prompt + answer data, AlterForCausalLM
        from causal_utils import tiny_causal_lm

        from modeling_alter import AlterForCausalLM

        model = AlterForCausalLM.from_causal_lm(
            tiny_causal_lm("qwen2", attention_dropout=job.dropout_rate), task_names=TRAIN_TASKS, adapter_dim=8,
            num_shared_adapters=1, task_id_drop_rate=job.task_id_drop_rate,
            router_aux_loss_coef=job.router_aux_loss_coef,
        )
    else:
        model = tiny_model(
            dropout_rate=job.dropout_rate,
            task_id_drop_rate=job.task_id_drop_rate,
            router_aux_loss_coef=job.router_aux_loss_coef,
        )
    train_set, eval_sets = tiny_data(
        num_train_per_task=job.num_train_per_task, num_eval_per_task=max(job.num_eval_per_task, 1),
        decoder_only=job.causal,
    )
    trainer = AlterTrainer(
        model=model, args=args, train_dataset=train_set, processing_class=tokenizer(),
        eval_dataset=eval_sets if job.num_eval_per_task else None,
    )
    trainer.add_callback(Snapshots(trainer, job))
    # Snapshots must run before the switch: move the StageSwitchCallback to the end.
    stage_callback = trainer.stage_callback
    trainer.callback_handler.remove_callback(stage_callback)
    trainer.callback_handler.add_callback(stage_callback)

    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    final_metrics = trainer.evaluate() if job.num_eval_per_task else None  # every process takes part
    rank = args.process_index
    save_file(parameters(trainer.alter_model), os.path.join(args.output_dir, f"final_rank{rank}.safetensors"))
    if trainer.is_world_process_zero():
        result = {
            "switch_step": trainer.stage_callback.switch_step,
            "stage": trainer.alter_model.config.stage,
            "global_step": trainer.state.global_step,
            "world_size": args.world_size,
            "log_history": trainer.state.log_history,
            "stage1_metrics": trainer.stage1_metrics,
            "final_metrics": final_metrics,
            "routing": trainer.routing_stats.to_dict() if final_metrics else None,
        }
        with open(os.path.join(args.output_dir, "job_result.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
