"""Tiny models, data and helpers shared by the training tests (nothing is downloaded)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import ByT5Tokenizer

from modeling_alter import AlterConfig, AlterForConditionalGeneration
from modeling_alter.data import build_eval_datasets, build_multitask_dataset
from modeling_alter.synthetic_tasks import make_synthetic_tasks
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPT = REPO / "tests" / "scripts" / "two_stage_job.py"
TRAIN_TASKS = ["sentiment", "copy", "reverse"]


def tokenizer():
    return ByT5Tokenizer()


def tiny_model(seed=0, **overrides):
    """A tiny ALTER model over the byte vocabulary, freshly initialised from `seed`."""
    tok = tokenizer()
    kwargs = dict(
        task_names=TRAIN_TASKS, vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        adapter_dim=8, num_shared_adapters=1, dropout_rate=0.0, task_id_drop_rate=0.0, router_aux_loss_coef=0.01,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AlterForConditionalGeneration(AlterConfig(**kwargs))


def tiny_data(num_train_per_task=16, num_eval_per_task=4, tasks=TRAIN_TASKS, decoder_only=False):
    """(mixed training set, dict of per-task evaluation sets) of the synthetic tasks (prompt + answer rows for a
    decoder-only model with `decoder_only`)."""
    tok = tokenizer()
    train, evaluation = make_synthetic_tasks(num_train_per_task, num_eval_per_task, seed=0, tasks=tasks)
    lengths = dict(max_source_length=32, max_target_length=32, decoder_only=decoder_only)
    train_set = build_multitask_dataset(train, tok, TRAIN_TASKS, seed=0, **lengths)
    eval_sets = build_eval_datasets(evaluation, tok, TRAIN_TASKS, **lengths)
    return train_set, eval_sets


def tiny_args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2,
        stage2_learning_rate=2e-2, max_steps=6, stage1_steps=3, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=0, generation_max_length=24,
        save_routing_heatmap=False, eval_on_stage_switch=False,
    )
    kwargs.update(overrides)
    return AlterTrainingArguments(**kwargs)


def train_keeping_the_first_checkpoint(model, tmp_path, stage1_steps=None):
    """Trains `model` (an ALTER model, or a PEFT model around one) 4 steps (in stage 1, or switching after
    `stage1_steps`) with a checkpoint and an evaluation every 2 steps and `load_best_model_at_end`, the first (worse)
    checkpoint counting as best. Returns the trainer."""
    train_set, eval_sets = tiny_data()
    args = tiny_args(tmp_path, max_steps=4, stage1_steps=stage1_steps, eval_strategy="steps", eval_steps=2,
                     save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = AlterTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_sets,
                           processing_class=tokenizer())
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    return trainer


def stage_sets(model):
    """(stage-1 trainable names, stage-2 trainable names, names frozen in stage 2)."""
    stage1, stage2 = model.trainable_parameter_names(1), model.trainable_parameter_names(2)
    frozen2 = {name for name, _ in model.named_parameters()} - stage2
    return stage1, stage2, frozen2


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_job(output_dir, *args, launcher=None, env=None, timeout=240):
    """Runs `tests/scripts/two_stage_job.py` in a subprocess (optionally under a launcher command) and returns it."""
    command = list(launcher or [sys.executable]) + [str(JOB_SCRIPT), "--output_dir", str(output_dir), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def load_weights(path):
    return load_file(str(path))


def import_script(path, name: str):
    """Imports a script of the repository (an example or a benchmark) as a module called `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
