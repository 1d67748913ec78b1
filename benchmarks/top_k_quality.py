"""Quality of stage 2's `router_top_k="auto"` (top-2 past 16 adapters) against dense routing at T = 32 tasks.

32 tasks: the 7 embedded synthetic tasks, each in up to 5 variants (`copy_0` .. `copy_4`, each with its own data
drawn with its own seed; sources prefixed with the base task's name), so that tasks are many and related, as in a
domain team's task mix. Per seed: one stage-1 training (task adapters + backbone), then from the very same stage-1
weights two stage-2 trainings that differ only in the gate (dense, or `"auto"`, which is top-2 here), with the same
data order, steps and learning rate; each is evaluated per task (accuracy for sentiment variants, exact match
otherwise). Prints mean scores, the paired difference (auto - dense) per seed and its mean, and writes JSON.

    python benchmarks/top_k_quality.py                # 3 seeds, about 10 min on 2 shared CPU cores
    python benchmarks/top_k_quality.py --seeds 0 --stage1-steps 100 --stage2-steps 40   # a smoke run
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, set_seed
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_alter import AlterConfig, AlterForConditionalGeneration  # noqa: E402
from modeling_alter.data import build_eval_datasets, build_multitask_dataset  # noqa: E402
from modeling_alter.synthetic_tasks import SYNTHETIC_TASK_NAMES, default_metric_for_task, make_synthetic_tasks  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments  # noqa: E402

hf_logging.set_verbosity_error()


def many_tasks(num_tasks, num_train, num_eval):
    """{name: (train rows, eval rows, metric)} for `num_tasks` variants of the synthetic tasks."""
    out = {}
    variant = 0
    while len(out) < num_tasks:
        for base in SYNTHETIC_TASK_NAMES:
            if len(out) == num_tasks:
                break
            train, evaluation = make_synthetic_tasks(num_train, num_eval, seed=100 + variant, tasks=[base],
                                                     with_prefix=True)
            out[f"{base}_{variant}"] = (Dataset.from_list(train[base]), Dataset.from_list(evaluation[base]),
                                        default_metric_for_task[base])
        variant += 1
    return out


def arguments(out_dir, seed, steps, lr, **extra):
    return AlterTrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.0, seed=seed, save_strategy="no",
        eval_strategy="no", report_to="none", logging_steps=max(1, steps // 2), disable_tqdm=True, use_cpu=True,
        generation_max_length=48, generation_num_beams=1, save_routing_heatmap=False, eval_on_stage_switch=False,
        dataloader_pin_memory=False, **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--train-per-task", type=int, default=200)
    parser.add_argument("--eval-per-task", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "many_tasks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    tok = ByT5Tokenizer()
    tasks = many_tasks(args.tasks, args.train_per_task, args.eval_per_task)
    names = list(tasks)
    train_set = build_multitask_dataset({n: t[0] for n, t in tasks.items()}, tok, names, mixing="uniform", seed=0,
                                        max_source_length=64, max_target_length=48)
    eval_sets = build_eval_datasets({n: t[1] for n, t in tasks.items()}, tok, names, max_source_length=64,
                                    max_target_length=48)
    metrics = {n: t[2] for n, t in tasks.items()}
    base = dict(task_names=names, vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                adapter_dim=16, num_shared_adapters=1, dropout_rate=0.0, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    results = {"setup": {**vars(args), "output": str(args.output), "adapters": args.tasks + 1}, "seeds": {}}
    for seed in args.seeds:
        set_seed(seed)
        stage1 = AlterForConditionalGeneration(AlterConfig(**base, router_top_k=None))
        AlterTrainer(model=stage1, args=arguments(args.output / "run", seed, args.stage1_steps, 2e-3),
                     train_dataset=train_set, processing_class=tok, task_metrics=metrics).train()
        state = copy.deepcopy(stage1.state_dict())
        seed_scores = {}
        for variant, top_k in (("dense", None), ("auto", "auto")):
            model = AlterForConditionalGeneration(AlterConfig(**base, router_top_k=top_k))
            model.load_state_dict(state)
            model.set_stage(2)
            print(f"seed {seed} {variant}: top-k per module {sorted({m.top_k for m in model.mta_modules().values()}, key=str)}",
                  file=sys.stderr)
            trainer = AlterTrainer(model=model, args=arguments(args.output / "run", seed, args.stage2_steps, 1e-2),
                                   train_dataset=train_set, eval_dataset=eval_sets, processing_class=tok,
                                   task_metrics=metrics)
            trainer.train()
            evaluation = trainer.evaluate()
            seed_scores[variant] = {n: float(evaluation[f"eval_{n}_{metrics[n]}"]) for n in names}
        results["seeds"][seed] = {v: {"mean": statistics.mean(s.values()), "per_task": s}
                                  for v, s in seed_scores.items()}
        print(f"seed {seed}: dense {results['seeds'][seed]['dense']['mean']:.4f}, auto (top-2) "
              f"{results['seeds'][seed]['auto']['mean']:.4f}", file=sys.stderr)
    diffs = [r["auto"]["mean"] - r["dense"]["mean"] for r in results["seeds"].values()]
    results["paired_difference_auto_minus_dense"] = {"per_seed": diffs, "mean": statistics.mean(diffs),
                                                     "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    results["seconds"] = round(time.time() - started)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "top_k_quality.json").write_text(json.dumps(results, indent=1))
    dense = [r["dense"]["mean"] for r in results["seeds"].values()]
    auto = [r["auto"]["mean"] for r in results["seeds"].values()]
    print(f"| T | stage 2 dense | stage 2 auto (top-2) | paired difference (auto - dense) |\n|---|---|---|---|\n"
          f"| {args.tasks} | {100 * statistics.mean(dense):.1f} | {100 * statistics.mean(auto):.1f} | "
          f"{100 * statistics.mean(diffs):+.1f} ± {100 * results['paired_difference_auto_minus_dense']['std']:.1f} "
          f"({sum(d > 0 for d in diffs)}/{len(diffs)} seeds better) |")
    print(f"{len(args.seeds)} seed(s), {results['seconds']} s")


if __name__ == "__main__":
    main()
