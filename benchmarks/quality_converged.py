"""Converged quality benchmark: every method trains until its dev score stops improving, then is scored on eval.

This is the regime ALTER's users are in (DESIGN §7): a pretrained backbone, trained until dev scores plateau. Two
configurations:

- `--config synthetic`: the embedded synthetic tasks, every model from random weights, ByT5 byte tokenizer.
- `--config real`: real tasks from `../shared/data/real` and `../shared/data/tasks` (single-sentence and
  sentence-pair classification, noun-phrase chunking, dialogue summaries), fine-tuned from the small T5 that
  `benchmarks/pretrain_backbone.py` pretrained offline (`--backbone`, default `benchmarks/backbone`), with its own
  Unigram tokenizer.

Protocol (the same for every method and seed):
- A dev split is carved from each task's training data (`--num_dev_per_task` rows, a seeded shuffle); nothing is
  selected or tuned on the eval files.
- Training uses a constant learning rate after warm-up (so the schedule does not depend on the step cap), evaluates
  the dev mean score (greedy generation, mean over tasks of each task's metric) every `--eval_every` optimizer
  steps, keeps the best weights, and stops after `--patience` evaluations without an improvement of more than
  `--min_delta` (or at `--max_steps`). The best weights are then scored on the eval files.
- Methods: `multitask_t5` (plain T5, full fine-tuning on the prefixed mix), `alter_stage1` (ALTER stage 1: backbone
  + task adapters), `alter_two_stage` (stage 2 started from the best stage-1 weights and trained for at most
  `--stage2_budget` of stage 1's optimizer steps, its best dev checkpoint among stage-2 evaluations scored),
  `alter_no_task_ids` (the model of `alter_two_stage` scored with `task_ids=None`: each source's `"<task>: "` prefix
  routes it, `config.task_prefixes`), `alter_gate_only` (the same with prefix routing off: the stage-2 gate's
  unknown-task route, learned by dropping task ids), and optionally
  `shared_adapter` (one adapter per MTA position shared by all tasks, as many extra parameters as ALTER's task
  adapters). Every source carries its `"<task>: "` prefix, for every method.

Outputs in `--output_dir`: `results.json`, `results.md` (the table), `curves.png` (dev mean score against training
examples seen, one line per method and seed) and `quality.png` (bars). Seeds run in `--workers` processes with
`--num_threads` torch threads each.

```bash
python benchmarks/quality_converged.py --config synthetic
python benchmarks/quality_converged.py --config real
python benchmarks/quality_converged.py --config synthetic --quick      # < 5 min
```
"""

import json
import math
import os
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    set_seed,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import backbone_kwargs, mean_std  # noqa: E402  (the budget benchmark's backbone and summary)
from modeling_alter import AlterForConditionalGeneration  # noqa: E402
from modeling_alter.data import MultiTaskDataCollator, build_eval_datasets, build_multitask_dataset, load_task_data  # noqa: E402
from modeling_alter.metrics import compute_metric  # noqa: E402
from modeling_alter.synthetic_tasks import SYNTHETIC_TASK_NAMES, default_metric_for_task, make_synthetic_tasks  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments  # noqa: E402

METHODS = {
    "majority_label": "Majority label (no model: each task's most frequent training target)",
    "multitask_t5": "Multi-task T5, full fine-tuning",
    "shared_adapter": "Multi-task T5 + one shared adapter",
    "alter_stage1": "ALTER stage 1 (= two-stage at the switch)",
    "alter_two_stage": "ALTER two-stage",
    "alter_no_task_ids": "ALTER two-stage, no task ids (routed by prefix)",
    "alter_gate_only": "ALTER two-stage, no task ids, gate only",
}
REFERENCE = "multitask_t5"
DEFAULT_METHODS = ["majority_label", "multitask_t5", "alter_stage1", "alter_two_stage", "alter_no_task_ids",
                   "alter_gate_only"]

# Real tasks: folder (relative to ../shared/data), metrics (the first one counts in the overall mean).
REAL_TASKS = {
    "sst2": ("real", ["accuracy"]),
    "agnews": ("real", ["accuracy"]),
    "trec": ("tasks", ["accuracy"]),
    "cola": ("tasks", ["accuracy"]),
    "emotion": ("tasks", ["accuracy"]),
    "mrpc": ("tasks", ["accuracy"]),
    "conll2000_np_chunks": ("tasks", ["token_f1", "exact_match"]),
    "samsum": ("tasks", ["rouge_l"]),
}
SHARED_DATA = ROOT.parent / "shared" / "data"

PRESETS = {
    "synthetic": dict(num_train_per_task=1000, num_dev_per_task=100, num_eval_per_task=200, max_source_length=64,
                      max_target_length=32, learning_rate=1e-3, batch_size=32, eval_every=250, patience=3,
                      max_steps=12000),  # plain T5 from scratch still improves at 6,000 steps
    "real": dict(num_train_per_task=1000, num_dev_per_task=100, num_eval_per_task=300, max_source_length=64,
                 max_target_length=32, learning_rate=5e-4, batch_size=16, eval_every=100, patience=3,
                 max_steps=2500),
}
QUICK = {
    "synthetic": dict(num_train_per_task=200, num_dev_per_task=20, num_eval_per_task=30, eval_every=30, patience=2,
                      max_steps=90, seeds=[0, 1], warmup_steps=10),
    "real": dict(num_train_per_task=100, num_dev_per_task=10, num_eval_per_task=20, max_source_length=48,
                 max_target_length=24, batch_size=8, eval_every=20, patience=2, max_steps=60, seeds=[0, 1],
                 warmup_steps=10),
}


@dataclass
class ConvergedArguments:
    """Arguments of the converged benchmark (`python benchmarks/quality_converged.py --help`)."""

    config: str = field(default="synthetic", metadata={"help": "synthetic (from scratch) or real (pretrained)."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: quality_converged_<config>."})
    quick: bool = field(default=False, metadata={"help": f"Small smoke-test presets (< 5 min): {QUICK}."})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata={"help": f"Among {list(METHODS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds (>= 3)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Only these tasks."})
    backbone: str = field(default=str(ROOT / "benchmarks" / "backbone"),
                          metadata={"help": "real: the pretrained T5 folder (model + tokenizer)."})
    data_dir: str = field(default=str(SHARED_DATA), metadata={"help": "real: the folder holding real/ and tasks/."})
    num_train_per_task: int | None = field(default=None, metadata={"help": "Training rows per task (after dev)."})
    num_dev_per_task: int | None = field(default=None, metadata={"help": "Dev rows per task, carved from train."})
    num_eval_per_task: int | None = field(default=None, metadata={"help": "Eval rows per task (first N)."})
    max_source_length: int | None = field(default=None, metadata={"help": "Source truncation (tokens)."})
    max_target_length: int | None = field(default=None, metadata={"help": "Target truncation (tokens)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the data (dev carving, synthetic generation)."})
    # synthetic backbone (random T5, every method)
    d_model: int = field(default=128, metadata={"help": "synthetic: backbone width."})
    d_ff: int = field(default=256, metadata={"help": "synthetic: feed-forward width."})
    d_kv: int = field(default=32, metadata={"help": "synthetic: attention head size."})
    num_layers: int = field(default=2, metadata={"help": "synthetic: encoder and decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "synthetic: attention heads."})
    dropout_rate: float = field(default=0.0, metadata={"help": "synthetic: dropout rate."})
    feed_forward_proj: str = field(default="relu", metadata={"help": "synthetic: T5 feed-forward form."})
    # ALTER
    adapter_dim: int = field(default=32, metadata={"help": "ALTER adapter bottleneck r."})
    num_shared_adapters: int = field(default=1, metadata={"help": "ALTER shared adapters S."})
    mta_placement: list[str] = field(default_factory=lambda: ["ffn"], metadata={"help": "Sublayers with MTA."})
    task_id_drop_rate: float = field(default=0.1, metadata={"help": "Stage-2 task-id drop rate."})
    # optimisation
    learning_rate: float | None = field(default=None, metadata={"help": "Peak lr of every method (stage 1)."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps, then constant lr."})
    eval_every: int | None = field(default=None, metadata={"help": "Dev evaluation every N optimizer steps."})
    patience: int | None = field(default=None, metadata={"help": "Stop after N dev evaluations without a gain."})
    min_delta: float = field(default=0.001, metadata={"help": "Smallest dev gain that counts (score in [0, 1])."})
    max_steps: int | None = field(default=None, metadata={"help": "Step cap of every stage-1 / baseline run."})
    stage2_budget: float = field(default=0.1, metadata={"help": "Stage-2 steps at most this share of stage 1's."})
    stage2_learning_rate: float = field(default=3e-3, metadata={"help": "Stage-2 lr (constant after warm-up)."})
    stage2_eval_every: int | None = field(default=None, metadata={"help": "Stage-2 dev evaluation every N steps."})
    stage2_task_adapter_lr_ratio: float = field(
        default=0.0, metadata={"help": "Stage 2: task adapters keep training at this fraction of the stage-2 lr."})
    reuse_stage1: str | None = field(
        default=None,
        metadata={"help": "A previous run's output_dir: reuse its baselines' results and its saved best stage-1 models "
                          "(runs/seed*/stage1_best) and train only stage 2 (for stage-2 experiments)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Keep the methods an earlier run with the same arguments in the same --output_dir finished "
                          "(runs/seed*/results.json, runs/seed*/stage1_best) and train only the missing ones."})
    eval_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})
    workers: int = field(default=2, metadata={"help": "Seeds trained in parallel processes."})
    num_threads: int = field(default=1, metadata={"help": "torch threads per worker."})

    def __post_init__(self):
        if self.config not in PRESETS:
            raise ValueError(f"--config {self.config!r}: expected one of {list(PRESETS)}.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; expected a subset of {list(METHODS)}.")
        if not 0 < self.stage2_budget <= 1:
            raise ValueError(f"stage2_budget={self.stage2_budget} must be in (0, 1].")


def parse_arguments(argv=None) -> ConvergedArguments:
    """Parses the command line and fills the unset fields from the configuration's preset (and `--quick`'s)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = HfArgumentParser(ConvergedArguments).parse_args_into_dataclasses(args=argv)
    given = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")}
    values = asdict(args)
    for key, value in {**PRESETS[args.config], **(QUICK[args.config] if args.quick else {})}.items():
        if key not in given and (values.get(key) is None or args.quick):
            values[key] = value
    values["stage2_eval_every"] = values["stage2_eval_every"] or max(1, values["eval_every"] // 5)
    values["output_dir"] = values["output_dir"] or f"quality_converged_{args.config}"
    return ConvergedArguments(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def _carve(rows, num_dev, num_train, seed):
    order = np.random.default_rng(seed).permutation(len(rows))
    dev = [rows[i] for i in order[:num_dev]]
    train = [rows[i] for i in order[num_dev: num_dev + num_train]]
    return train, dev


def load_tasks(args: ConvergedArguments):
    """Returns `(train, dev, eval, metrics)`: task -> list of `{"source", "target"}` (sources prefixed with
    `"<task>: "`), and task -> list of metric names (the first counts in the overall mean)."""
    if args.config == "synthetic":
        names = list(args.tasks or SYNTHETIC_TASK_NAMES)
        train_all, evaluation = make_synthetic_tasks(args.num_train_per_task + args.num_dev_per_task,
                                                     args.num_eval_per_task, seed=args.data_seed, tasks=names,
                                                     with_prefix=True)
        metrics = {name: [default_metric_for_task[name]] for name in names}
        split = {name: _carve(list(rows), args.num_dev_per_task, args.num_train_per_task, args.data_seed)
                 for name, rows in train_all.items()}
        return ({n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()},
                {n: list(rows) for n, rows in evaluation.items()}, metrics)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"error: the real-task data folder {data_dir} does not exist; this benchmark reads "
                         "../shared/data/real and ../shared/data/tasks beside the repository (or --data_dir).")
    names = list(args.tasks or REAL_TASKS)
    train, dev, evaluation, metrics = {}, {}, {}, {}
    for name in names:
        if name not in REAL_TASKS:
            raise SystemExit(f"error: unknown real task {name!r}; expected some of {list(REAL_TASKS)}.")
        folder, metrics[name] = REAL_TASKS[name]
        rows = {split: [{"source": f"{name}: {r['source']}", "target": r["target"]}
                        for r in load_task_data(str(data_dir / folder / f"{name}_{split}.jsonl"), task_name=name)]
                for split in ("train", "eval")}
        train[name], dev[name] = _carve(rows["train"], args.num_dev_per_task, args.num_train_per_task, args.data_seed)
        evaluation[name] = rows["eval"][: args.num_eval_per_task]
    return train, dev, evaluation, metrics


class TaskData:
    """Tokenized train mix, dev and eval sets, references and generation lengths of one benchmark run."""

    def __init__(self, args: ConvergedArguments, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.train, self.dev, self.eval, self.metrics = load_tasks(args)
        self.task_names = list(self.train)
        self.lengths = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length)
        self.dev_sets = build_eval_datasets(self.dev, tokenizer, self.task_names, **self.lengths)
        self.eval_sets = build_eval_datasets(self.eval, tokenizer, self.task_names, **self.lengths)
        # Generation length from dev targets only (twice the longest, within the target truncation).
        self.max_new_tokens = {
            task: 1 + min(args.max_target_length, 2 * max(len(x) for x in self.dev_sets[task]["labels"]))
            for task in self.task_names
        }

    def train_mix(self, seed):
        """One epoch: every training row once, shuffled (proportional mixing); the Trainer reshuffles each epoch."""
        size = sum(len(rows) for rows in self.train.values())
        return build_multitask_dataset(self.train, self.tokenizer, self.task_names, mixing="proportional",
                                       num_examples=size, seed=seed, **self.lengths)


@torch.no_grad()
def generate_scores(model, data: TaskData, split: str, routing: str = "task_ids") -> dict:
    """Greedy generation on every task of `split` ("dev" or "eval"); returns task -> {metric: score} plus "mean"
    (the mean over tasks of each task's first metric). ALTER models get `routing`: "task_ids" (each task's id),
    "none" (`task_ids=None`: the task comes from the source's prefix, `config.task_prefixes`), "gate" (`task_ids=None`
    with prefix routing off: the stage-2 gate's unknown-task route) or "single" (id 0 for every task: the
    one-adapter baseline)."""
    sets = data.dev_sets if split == "dev" else data.eval_sets
    was_training = model.training
    model.eval()
    alter = isinstance(model, AlterForConditionalGeneration)
    prefixes = (model.config.task_prefixes, model.config.task_prefix_ids) if alter else None
    if routing == "gate":
        model.config.task_prefixes = model.config.task_prefix_ids = None
    scores = {}
    for task_id, task in enumerate(data.task_names):
        dataset, predictions = sets[task], []
        for start in range(0, len(dataset), data.args.eval_batch_size):
            rows = dataset[start: start + data.args.eval_batch_size]
            batch = data.tokenizer.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                                       return_tensors="pt")
            kwargs = {}
            if alter:
                ids = {"task_ids": task_id, "single": 0, "none": None, "gate": None}[routing]
                kwargs["task_ids"] = None if ids is None else torch.full((len(rows["input_ids"]),), ids)
            out = model.generate(**batch, **kwargs, max_new_tokens=data.max_new_tokens[task], num_beams=1,
                                 do_sample=False)
            predictions += data.tokenizer.batch_decode(out, skip_special_tokens=True)
        references = dataset["target_text"]
        scores[task] = {metric: compute_metric(metric, predictions, references) for metric in data.metrics[task]}
    scores["mean"] = float(np.mean([scores[t][data.metrics[t][0]] for t in data.task_names]))
    model.train(was_training)
    if alter:
        model.config.task_prefixes, model.config.task_prefix_ids = prefixes
    return scores


class DevEarlyStopping(TrainerCallback):
    """Every `every` optimizer steps (and at the last step): scores the model with `score_fn(model) -> float` (the dev
    mean score), keeps a copy of the best weights, records the learning curve as `(examples seen, score)` pairs, and
    stops training after `patience` evaluations without a gain larger than `min_delta`.

    Transformers' `EarlyStoppingCallback` needs checkpoints on disk and `load_best_model_at_end`; this keeps the best
    weights in memory (small models) and scores by generation outside `evaluate()`, the same way for every method."""

    def __init__(self, score_fn, every: int, patience: int, min_delta: float, batch_size: int,
                 examples_offset: int = 0, label: str | None = None):
        if every < 1 or patience < 1:
            raise ValueError(f"every={every} and patience={patience} must be >= 1.")
        self.score_fn, self.every, self.patience, self.min_delta = score_fn, every, patience, min_delta
        self.batch_size, self.examples_offset, self.label = batch_size, examples_offset, label
        self.best_score, self.best_step, self.best_state, self.bad, self.curve = -1.0, 0, None, 0, []
        self.eval_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return
        start = time.perf_counter()
        score = self.score_fn(model)
        self.eval_seconds += time.perf_counter() - start
        self.curve.append((self.examples_offset + state.global_step * self.batch_size, score))
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.bad = score, state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True
        if self.label:
            print(f"[converged] {self.label} step {state.global_step}: dev {100 * score:.1f} (best "
                  f"{100 * self.best_score:.1f} at step {self.best_step})" + (", stopping" if self.bad >= self.patience
                                                                              else ""), flush=True)

    def restore_best(self, model):
        model.load_state_dict(self.best_state)


# ---------------------------------------------------------------------------------------------------------------------
# Models and runs


def synthetic_backbone(args: ConvergedArguments, seed) -> T5ForConditionalGeneration:
    """The synthetic configuration's backbone: a small random T5 (by default the budget benchmark's shape)."""
    set_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**backbone_kwargs(args)))
    model.generation_config.decoder_start_token_id = 0
    return model


def backbone(args: ConvergedArguments, seed) -> T5ForConditionalGeneration:
    if args.config == "synthetic":
        return synthetic_backbone(args, seed)
    set_seed(seed)
    return T5ForConditionalGeneration.from_pretrained(args.backbone)


def alter_model(args, task_names, seed, tokenizer, **overrides) -> AlterForConditionalGeneration:
    """ALTER converted from the method's backbone, routing sources by their `"<task>: "` prefix when no task ids are
    given (the prefixes every benchmark source carries)."""
    kwargs = dict(adapter_dim=args.adapter_dim, num_shared_adapters=args.num_shared_adapters,
                  mta_placement=args.mta_placement, task_id_drop_rate=args.task_id_drop_rate)
    kwargs.update(overrides)
    t5 = backbone(args, seed)
    set_seed(seed)
    model = AlterForConditionalGeneration.from_t5(t5, task_names=task_names, **kwargs)
    with_prefixes(model, tokenizer)
    return model


def with_prefixes(model, tokenizer):
    if model.config.num_tasks > 1:
        model.set_task_prefixes({name: f"{name}: " for name in model.config.task_names}, tokenizer=tokenizer)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _training_args(args, output_dir, seed, max_steps, learning_rate, alter, **extra):
    kwargs = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=learning_rate, warmup_steps=args.warmup_steps, lr_scheduler_type="constant_with_warmup",
                  weight_decay=0.0, optim="adamw_torch", seed=seed, save_strategy="no", eval_strategy="no",
                  report_to="none", logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=False)
    if alter:
        kwargs.update(save_routing_heatmap=False, eval_on_stage_switch=False)
    kwargs.update(extra)
    return (AlterTrainingArguments if alter else Seq2SeqTrainingArguments)(**kwargs)


def train_to_plateau(args, data, model, train_set, seed, output_dir, alter, *, max_steps, learning_rate, every,
                     examples_offset=0, optimizer=None, routing="task_ids"):
    """Trains until the dev score plateaus and restores the best weights; returns the early-stopping record. ALTER
    models train with `AlterTrainer` unless an `optimizer` is given (an experiment outside the library's stages),
    which `Seq2SeqTrainer` then uses with the same schedule."""
    stopper = DevEarlyStopping(lambda m: generate_scores(m, data, "dev", routing)["mean"], every, args.patience,
                               args.min_delta, args.batch_size, examples_offset, label=f"{output_dir.parent.name} "
                               f"{output_dir.name}")
    use_alter_trainer = alter and optimizer is None
    targs = _training_args(args, output_dir, seed, max_steps, learning_rate, use_alter_trainer)
    cls = AlterTrainer if use_alter_trainer else Seq2SeqTrainer
    trainer = cls(model=model, args=targs, train_dataset=train_set, data_collator=MultiTaskDataCollator(data.tokenizer),
                  processing_class=data.tokenizer, callbacks=[stopper],
                  **({} if optimizer is None else {"optimizers": (optimizer, None)}))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    stopper.restore_best(model)
    return dict(best_step=stopper.best_step, steps_trained=trainer.state.global_step, best_dev=stopper.best_score,
                curve=stopper.curve, train_seconds=seconds - stopper.eval_seconds, dev_eval_seconds=stopper.eval_seconds)


def _result(model, data, record, params, routing="task_ids", **extra):
    start = time.perf_counter()
    scores = generate_scores(model, data, "eval", routing)
    return dict(record, scores={t: scores[t] for t in data.task_names}, overall=scores["mean"],
                eval_seconds=time.perf_counter() - start, trainable_parameters=params, **extra)


def majority_result(data: TaskData) -> dict:
    """The floor every method must clear: each task's most frequent training target predicted for every eval row
    (for a label task, the majority-class accuracy of its eval rows)."""
    scores = {}
    for task in data.task_names:
        guess = Counter(row["target"] for row in data.train[task]).most_common(1)[0][0]
        references = data.eval_sets[task]["target_text"]
        scores[task] = {metric: compute_metric(metric, [guess] * len(references), references)
                        for metric in data.metrics[task]}
    overall = float(np.mean([scores[t][data.metrics[t][0]] for t in data.task_names]))
    return dict(best_step=0, steps_trained=0, best_dev=None, curve=[], train_seconds=0.0, dev_eval_seconds=0.0,
                scores=scores, overall=overall, eval_seconds=0.0, trainable_parameters={})


def stage2_task_adapter_optimizer(model, lr, task_adapter_ratio):
    """Experiment: AdamW over stage 2's parameters at `lr` plus the task adapters at `task_adapter_ratio * lr`."""
    adapters = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("task_down", "task_up")]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    for p in adapters:
        p.requires_grad_(True)
    groups.append({"params": adapters, "lr": lr * task_adapter_ratio})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def run_seed(args: ConvergedArguments, seed: int) -> dict:
    """Every method for one seed; returns method -> result."""
    torch.set_num_threads(args.num_threads)
    import datasets

    datasets.disable_progress_bars()
    tokenizer = ByT5Tokenizer() if args.config == "synthetic" else AutoTokenizer.from_pretrained(args.backbone)
    data = TaskData(args, tokenizer)
    names = data.task_names
    run_dir = Path(args.output_dir) / "runs" / f"seed{seed}"
    train_set = data.train_mix(seed)
    plain_set = train_set.remove_columns("task_ids")
    results = SeedResults(run_dir / "results.json", resume=args.resume)
    plateau = dict(max_steps=args.max_steps, learning_rate=args.learning_rate, every=args.eval_every)
    stage2_methods = {"alter_two_stage", "alter_no_task_ids", "alter_gate_only"} & set(args.methods)
    if stage2_methods or args.reuse_stage1 is not None:
        stage2_methods.add("alter_two_stage")  # the others are scored on its model
    if args.reuse_stage1 is not None:
        previous = json.loads((Path(args.reuse_stage1) / "results.json").read_text())["per_seed"][str(seed)]
        for method in ("multitask_t5", "shared_adapter", "alter_stage1"):
            if method in previous:
                results[method] = previous[method]
        if stage2_methods <= set(results):
            return dict(results)
        model = AlterForConditionalGeneration.from_pretrained(Path(args.reuse_stage1) / "runs" / f"seed{seed}"
                                                              / "stage1_best")
        with_prefixes(model, tokenizer)
        return _stage2(args, data, model, train_set, seed, run_dir, results)

    if "majority_label" in args.methods and "majority_label" not in results:
        results["majority_label"] = majority_result(data)

    if "multitask_t5" in args.methods and "multitask_t5" not in results:
        model = backbone(args, seed)
        record = train_to_plateau(args, data, model, plain_set, seed, run_dir / "t5", False, **plateau)
        results["multitask_t5"] = _result(model, data, record, {"all": trainable(model)})

    if "shared_adapter" in args.methods and "shared_adapter" not in results:
        alter = alter_model(args, names, seed, tokenizer)
        extra = sum(p.numel() for m in alter.mta_modules().values() for p in (m.task_down, m.task_up))
        dim = max(1, round(extra / (2 * alter.config.d_model * len(alter.mta_modules()))))
        model = alter_model(args, ["shared"], seed, tokenizer, adapter_dim=dim, num_shared_adapters=0)
        shared_set = train_set.remove_columns("task_ids").add_column("task_ids", [0] * len(train_set))
        record = train_to_plateau(args, data, model, shared_set, seed, run_dir / "shared", True, **plateau,
                                  routing="single")
        results["shared_adapter"] = _result(model, data, record, {"all": trainable(model)}, "single", adapter_dim=dim)

    if not ({"alter_stage1"} & set(args.methods) | stage2_methods) - set(results):
        return dict(results)
    if "alter_stage1" in results and (run_dir / "stage1_best" / "config.json").is_file():
        model = AlterForConditionalGeneration.from_pretrained(run_dir / "stage1_best")
        with_prefixes(model, tokenizer)
    else:
        model = alter_model(args, names, seed, tokenizer)
        record = train_to_plateau(args, data, model, train_set, seed, run_dir / "stage1", True, **plateau)
        model.save_pretrained(run_dir / "stage1_best")
        results["alter_stage1"] = _result(model, data, record, {"stage 1": trainable(model)})
    if not stage2_methods:
        return dict(results)
    return _stage2(args, data, model, train_set, seed, run_dir, results)


class SeedResults(dict):
    """One seed's method -> result, written to `path` (atomically) after every method, so that an interrupted run
    keeps what it finished and `--resume` trains only what is missing."""

    def __init__(self, path: Path, resume: bool):
        super().__init__(json.loads(path.read_text()) if resume and path.is_file() else {})
        self.path = path

    def __setitem__(self, method, result):
        super().__setitem__(method, result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(dict(self), indent=1))
        os.replace(partial, self.path)


def _stage2(args, data, model, train_set, seed, run_dir, results):
    """Stage 2 from the best stage-1 weights in `model`, at most `stage2_budget` of stage 1's steps."""
    record = results["alter_stage1"]
    params1 = record["trainable_parameters"]["stage 1"]
    model.set_stage(2)
    stage2_steps = max(args.stage2_eval_every, math.floor(args.stage2_budget * record["steps_trained"]))
    optimizer = None
    if args.stage2_task_adapter_lr_ratio > 0:
        optimizer = stage2_task_adapter_optimizer(model, args.stage2_learning_rate, args.stage2_task_adapter_lr_ratio)
    params2 = trainable(model)
    record2 = train_to_plateau(
        args, data, model, train_set, seed + 1000, run_dir / "stage2", True, max_steps=stage2_steps,
        learning_rate=args.stage2_learning_rate, every=args.stage2_eval_every,
        examples_offset=record["steps_trained"] * args.batch_size,
        optimizer=optimizer,
    )
    params = {"stage 1": params1, "stage 2": params2}
    two_stage = dict(record2, stage1_best_step=record["best_step"], stage1_steps_trained=record["steps_trained"],
                     stage2_steps_cap=stage2_steps, stage2_train_seconds=record2["train_seconds"],
                     train_seconds=record["train_seconds"] + record2["train_seconds"])
    results["alter_two_stage"] = _result(model, data, two_stage, params)
    if "alter_no_task_ids" in args.methods:
        results["alter_no_task_ids"] = _result(model, data, two_stage, params, "none")
    if "alter_gate_only" in args.methods:
        results["alter_gate_only"] = _result(model, data, two_stage, params, "gate")
    return dict(results)


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def summarize(per_seed: dict, task_names, metrics) -> dict:
    """Per method: mean ± std per task and overall, paired differences to multi-task T5, and two paired ALTER
    figures: stage 2's gain over its own start, and no-task-ids minus task ids."""
    seeds = list(per_seed)
    methods = [m for m in METHODS if all(m in per_seed[s] for s in seeds)]
    summary = {}
    for method in methods:
        runs = [per_seed[s][method] for s in seeds]
        entry = {"per_task": {}, "overall_per_seed": [r["overall"] for r in runs]}
        for task in task_names:
            for metric in metrics[task]:
                entry["per_task"][f"{task}/{metric}"] = mean_std([r["scores"][task][metric] for r in runs])
        entry["overall"] = mean_std(entry["overall_per_seed"])
        entry["examples_to_best"] = mean_std([_best_examples(r) for r in runs])
        entry["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
        summary[method] = entry

    def paired(a, b):
        deltas = [x - y for x, y in zip(summary[a]["overall_per_seed"], summary[b]["overall_per_seed"])]
        mean, std = mean_std(deltas)
        return dict(mean=mean, std=std, better=sum(d > 0 for d in deltas), seeds=len(deltas), deltas=deltas)

    if REFERENCE in summary:
        for method in summary:
            if method != REFERENCE:
                summary[method]["vs_reference"] = paired(method, REFERENCE)
    if {"alter_two_stage", "alter_stage1"} <= set(summary):
        summary["alter_two_stage"]["stage2_gain"] = paired("alter_two_stage", "alter_stage1")
    for method in ("alter_no_task_ids", "alter_gate_only"):
        if {"alter_two_stage", method} <= set(summary):
            summary[method]["vs_task_ids"] = paired(method, "alter_two_stage")
    return summary


def _best_examples(result):
    """Training examples seen until the selected checkpoint (for stage 2: stage 1's run, then stage 2's steps)."""
    if not result["curve"]:
        return 0
    for examples, score in result["curve"]:
        if abs(score - result["best_dev"]) < 1e-12:
            return examples
    return result["curve"][-1][0]


def _pct(mean_std):
    return f"{100 * mean_std[0]:.1f} ± {100 * mean_std[1]:.1f}"


def render_table(summary, per_seed, task_names, metrics, batch_size) -> str:
    first = per_seed[next(iter(per_seed))]
    columns = [f"{t}/{m}" for t in task_names for m in metrics[t]]
    header = ["method", *columns, "**overall**", "Δ vs multi-task T5 (paired)", "trainable params",
              "steps × batch to best (trained)", "train time (per seed)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in summary.items():
        result = first[method]
        cells = [METHODS[method], *(_pct(entry["per_task"][c]) for c in columns), f"**{_pct(entry['overall'])}**"]
        if "vs_reference" in entry:
            d = entry["vs_reference"]
            cells.append(f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['better']}/{d['seeds']} seeds better)")
        else:
            cells.append("—")
        cells.append("; ".join(f"{k}: {v:,}" for k, v in result["trainable_parameters"].items()) or "—")
        runs = [per_seed[s][method] for s in per_seed]
        if method == "majority_label":
            lines.append("| " + " | ".join(cells + ["—", "—"]) + " |")
            continue
        if method in ("alter_two_stage", "alter_no_task_ids", "alter_gate_only"):
            steps = " / ".join(f"{r['stage1_best_step']}+{r['best_step']} ({r['stage1_steps_trained']}+"
                               f"{r['steps_trained']})" for r in runs)
        else:
            steps = " / ".join(f"{r['best_step']} ({r['steps_trained']})" for r in runs)
        cells.append(f"{steps} × {batch_size}")
        mean, std = entry["train_seconds"]
        cells.append("(two-stage model)" if method in ("alter_no_task_ids", "alter_gate_only") else f"{mean / 60:.1f} ± {std / 60:.1f} min")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if "stage2_gain" in summary.get("alter_two_stage", {}):
        d = summary["alter_two_stage"]["stage2_gain"]
        notes.append(f"- Stage 2 over the very stage-1 weights it starts from: {100 * d['mean']:+.2f} ± "
                     f"{100 * d['std']:.2f} points ({d['better']}/{d['seeds']} seeds better; per seed "
                     + ", ".join(f"{100 * x:+.2f}" for x in d["deltas"]) + ").")
    for method, how in (("alter_no_task_ids", "routed by the sources' prefixes"),
                        ("alter_gate_only", "the gate's unknown-task route")):
        if "vs_task_ids" in summary.get(method, {}):
            d = summary[method]["vs_task_ids"]
            notes.append(f"- Without task ids ({how}) minus with task ids, same model: {100 * d['mean']:+.2f} ± "
                         f"{100 * d['std']:.2f} points.")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def plot_curves(per_seed, path, title):
    """Dev mean score against training examples seen: one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for seed_index, (seed, results) in enumerate(per_seed.items()):
        for method, result in results.items():
            if method in ("alter_no_task_ids", "alter_gate_only") or not result["curve"]:
                continue
            xs, ys = zip(*result["curve"])
            axis.plot(xs, 100 * np.asarray(ys), color=colors[method], alpha=0.8, linewidth=1.2,
                      linestyle=("-", "--", ":", "-.")[seed_index % 4],
                      label=f"{METHODS[method]} (seed {seed})")
            best = _best_examples(result)
            axis.plot([best], [100 * result["best_dev"]], marker="o", color=colors[method], markersize=4)
    axis.set_xlabel("training examples seen (optimizer steps × batch)")
    axis.set_ylabel("dev mean score (%)")
    axis.set_title(title + "\n(dots: the selected checkpoints; stage 2 starts from stage 1's best weights, drawn after stage 1's last step)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_arguments(argv)
    if args.config == "real" and not Path(args.data_dir).is_dir():
        raise SystemExit(f"error: the real-task data folder {args.data_dir} does not exist; this benchmark reads "
                         "../shared/data/real and ../shared/data/tasks beside the repository (or --data_dir).")
    if args.config == "real" and not Path(args.backbone, "config.json").is_file():
        raise SystemExit(f"error: no pretrained backbone in {args.backbone}; run benchmarks/pretrain_backbone.py "
                         "or pass --backbone FOLDER.")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed = {}
    if args.workers > 1 and len(args.seeds) > 1:
        with ProcessPoolExecutor(min(args.workers, len(args.seeds)), mp_context=get_context("spawn")) as pool:
            futures = {seed: pool.submit(run_seed, args, seed) for seed in args.seeds}
            for seed, future in futures.items():
                per_seed[seed] = future.result()
                print(f"[converged] seed {seed} done", flush=True)
    else:
        for seed in args.seeds:
            per_seed[seed] = run_seed(args, seed)
            print(f"[converged] seed {seed} done", flush=True)
    total = time.perf_counter() - start
    command = ("python benchmarks/quality_converged.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    resumed_with = []
    previous = output_dir / "results.json"
    if args.resume and previous.is_file():  # report the whole run: the first command, every resume, all wall time
        earlier = json.loads(previous.read_text())
        total += earlier["total_seconds"]
        resumed_with = [*earlier.get("resumed_with", []), command]
        command = earlier["command"]
    # Tasks and their metrics (first: the one in the overall mean) as the runs scored them; no second data load.
    first_result = next(iter(per_seed[args.seeds[0]].values()))
    metrics = {task: list(scores) for task, scores in first_result["scores"].items()}
    task_names = list(metrics)
    summary = summarize(per_seed, task_names, metrics)
    table = render_table(summary, per_seed, task_names, metrics, args.batch_size)
    setup = (f"- Configuration `{args.config}`; tasks {task_names}; {args.num_train_per_task} train / "
             f"{args.num_dev_per_task} dev (carved from train) / ≤ {args.num_eval_per_task} eval rows per task; "
             f"seeds {args.seeds}.\n"
             f"- Early stopping on the dev mean score every {args.eval_every} steps, patience {args.patience} "
             f"evaluations, min gain {args.min_delta}; cap {args.max_steps} steps; lr {args.learning_rate:g} constant "
             f"after {args.warmup_steps} warm-up steps; batch {args.batch_size}.\n"
             f"- ALTER: r={args.adapter_dim}, S={args.num_shared_adapters}, placement {args.mta_placement}; stage 2 "
             f"≤ {args.stage2_budget:g} of stage 1's steps at lr {args.stage2_learning_rate:g}, dev every "
             f"{args.stage2_eval_every} steps; task adapters in stage 2 at lr ratio "
             f"{args.stage2_task_adapter_lr_ratio:g}.\n"
             f"- Total wall time {total / 60:.1f} min ({args.workers} worker processes × {args.num_threads} "
             f"thread). Command: `{command}`" + "".join(f"; resumed with `{c}`" for c in resumed_with) + ".")
    report = f"{table}\n\n{setup}\n"
    print("\n" + report, flush=True)
    record = dict(command=command, resumed_with=resumed_with, arguments=asdict(args), task_names=task_names, metrics=metrics,
                  summary=summary, per_seed={str(s): r for s, r in per_seed.items()}, total_seconds=total,
                  environment=dict(python=platform.python_version(), torch=torch.__version__,
                                   transformers=__import__("transformers").__version__, cpu_count=os.cpu_count()))
    (output_dir / "results.json").write_text(json.dumps(record, indent=1))
    (output_dir / "results.md").write_text(report)
    plot_curves(per_seed, output_dir / "curves.png", f"{args.config}: dev mean score while training")
    print(f"[converged] wrote {output_dir}/results.json, results.md, curves.png", flush=True)
    return record


if __name__ == "__main__":
    main()
