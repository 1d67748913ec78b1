"""Quality benchmark: does ALTER's two-stage Mixture-of-Task-Adapters beat plain multi-task fine-tuning?

Every method trains a model of the same backbone size from scratch (nothing is downloaded), with the ByT5 byte
tokenizer, on the same data and with the same training budget (optimizer steps x batch size), for several seeds:

1. `single_task`: one plain T5 per task. The `max_steps` steps are split over the tasks in proportion to the
   multi-task mixing rates (`split_steps`: largest remainders, at least one step each), with the same batch size:
   each task sees as many examples as it does in the multi-task mix, and the models together take exactly the budget.
2. `multitask_t5`: one plain `T5ForConditionalGeneration`, all parameters fine-tuned on the mix, sources prefixed
   with `"<task>: "` (`Seq2SeqTrainer`).
3. `shared_adapter`: the same backbone, fine-tuned on the prefixed mix together with ONE adapter per MTA position that
   all tasks share, as wide as needed to have the same extra parameter count as ALTER. It is an ALTER model with a
   single task name (and no shared adapter) trained in stage 1, so adapter form, placement, initialisation and
   trainer are exactly ALTER's and only the task-specific routing differs.
4. `alter_stage1`: ALTER trained in stage 1 only (task adapters + backbone) for the whole budget.
5. `alter_two_stage`: ALTER's default recipe: stage 1, then stage 2 (gate, task embeddings, shared adapters) for the
   last `stage2_fraction` of the steps, with its own learning rate, in one `AlterTrainer.train()`.
6. `alter_no_task_ids`: the model of 5, evaluated with `task_ids=None` (routing from the hidden states alone).
7. `alter_stage2_10pct`: the stage-1 weights of 5 at the switch, then a stage 2 that sees only `stage2_data_fraction`
   (10%) of the examples and steps that 5's stage 2 sees (ALTER's "small computational cost" claim).

ALTER methods receive the same prefixed sources as the baselines (so that all methods see identical data, and 6 can
tell tasks apart at all) plus `task_ids`; `--no_alter_task_prefix` gives them raw sources. The row "ALTER at the
switch" is 5's model evaluated just before stage 2 starts (fewer stage-1 steps than 4): the difference between it and
5 is what stage 2 adds to the very same weights.

Examples (from the repository root):

```bash
python benchmarks/quality.py                       # embedded synthetic benchmark, 3 seeds (< 60 min on 2 CPU cores)
python benchmarks/quality.py --quick               # < 5 min
python benchmarks/quality.py --quick --backbone causal   # the same methods on Llama-shaped decoder-only backbones
python benchmarks/quality.py --tasks_dir ../shared/data/real --task_metrics sst2=accuracy agnews=accuracy --quick
python benchmarks/quality.py --train_files sst2=a.jsonl agnews=b.jsonl --eval_files sst2=c.jsonl agnews=d.jsonl
```

Prints a Markdown table (mean ± std over seeds per task and overall, paired difference to method 2, trainable
parameters per phase, examples seen, wall time), and writes `results.json`, `results.md` and `quality.png` (bars
with standard-deviation error bars) to `--output_dir`.
"""

import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    ByT5Tokenizer,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    set_seed,
)

# Make `modeling_alter` importable when the script is run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_alter import (  # noqa: E402
    AlterCausalConfig,
    AlterConfig,
    AlterForCausalLM,
    AlterForConditionalGeneration,
    AlterMTA,
)
from modeling_alter.data import (  # noqa: E402
    MultiTaskDataCollator,
    build_eval_datasets,
    build_multitask_dataset,
    load_task_data,
    mixing_rates,
)
from modeling_alter.metrics import METRICS, compute_metric  # noqa: E402
from modeling_alter.synthetic_tasks import SYNTHETIC_TASK_NAMES, default_metric_for_task, make_synthetic_tasks  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments  # noqa: E402


METHODS = {
    "single_task": "1. Single-task T5 (one model per task)",
    "multitask_t5": "2. Multi-task T5, full fine-tuning",
    "shared_adapter": "3. Multi-task T5 + one shared adapter",
    "alter_stage1": "4. ALTER stage 1 only",
    "alter_two_stage": "5. ALTER two-stage",
    "alter_no_task_ids": "6. ALTER two-stage, no task ids",
    "alter_stage2_10pct": "7. ALTER, stage 2 on 10% of the data",
}
AT_SWITCH = "alter_at_switch"
AT_SWITCH_LABEL = "(5 before stage 2: ALTER at the switch)"
ROW_ORDER = ["single_task", "multitask_t5", "shared_adapter", "alter_stage1", AT_SWITCH, "alter_two_stage",
             "alter_no_task_ids", "alter_stage2_10pct"]
REFERENCE = "multitask_t5"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv")

QUICK_PRESET = {
    "max_steps": 200,
    "num_train_per_task": 500,
    "num_eval_per_task": 50,
    "max_train_per_task": 1000,
    "max_eval_per_task": 50,
    "d_model": 64,
    "d_ff": 128,
    "d_kv": 16,
    "adapter_dim": 16,
    "learning_rate": 2e-3,
    "max_source_length": 64,
}


@dataclass
class BenchmarkArguments:
    """Arguments of the quality benchmark (`python benchmarks/quality.py --help`)."""

    output_dir: str = field(
        default="quality_results", metadata={"help": "Folder for results.json, results.md and quality.png."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": f"Smaller preset (< 5 min on CPU); explicit flags still win. Preset: {QUICK_PRESET}."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": f"Methods to run, among {list(METHODS)}."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds (use >= 3)."})
    # ---- data
    tasks_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of user tasks: <task>_train.jsonl and <task>_eval.jsonl (or .json / .csv) per task."},
    )
    train_files: list[str] | None = field(default=None, metadata={"help": "User tasks as task=file (training data)."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "User tasks as task=file (evaluation data)."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Only these tasks (default: all that were found)."})
    task_metrics: list[str] | None = field(
        default=None,
        metadata={"help": f"task=metric for user tasks (default exact_match), metric among {sorted(METRICS)}."},
    )
    source_column: str = field(default="source", metadata={"help": "Input-text column of user files."})
    target_column: str = field(default="target", metadata={"help": "Target-text column of user files."})
    num_train_per_task: int = field(default=1000, metadata={"help": "Synthetic benchmark: training examples per task."})
    num_eval_per_task: int = field(default=200, metadata={"help": "Synthetic benchmark: evaluation examples per task."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the synthetic data (fixed across training seeds)."})
    max_train_per_task: int | None = field(default=None, metadata={"help": "User data: first N training rows only."})
    max_eval_per_task: int | None = field(default=None, metadata={"help": "User data: first N evaluation rows only."})
    mixing: str = field(default="proportional", metadata={"help": "Task mixing: proportional, temperature or uniform."})
    max_source_length: int = field(default=128, metadata={"help": "Truncation of sources, in bytes (ByT5 tokens)."})
    max_target_length: int = field(default=64, metadata={"help": "Truncation of targets, in bytes (ByT5 tokens)."})
    alter_task_prefix: bool = field(
        default=True, metadata={"help": "Give ALTER methods the same '<task>: ' prefixed sources as the baselines."}
    )
    # ---- backbone (identical for every method)
    backbone: str = field(
        default="t5",
        metadata={"help": "t5: T5 encoder-decoders (AlterForConditionalGeneration); causal: Llama-shaped decoder-only "
                  "LMs of the same width (AlterForCausalLM; sources become prompts, loss on the answer)."},
    )
    d_model: int = field(default=128, metadata={"help": "Backbone width."})
    d_ff: int = field(default=256, metadata={"help": "Backbone feed-forward width."})
    d_kv: int = field(default=32, metadata={"help": "Attention head size."})
    num_layers: int = field(default=2, metadata={"help": "Encoder and decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    dropout_rate: float = field(default=0.0, metadata={"help": "Dropout of the backbone."})
    feed_forward_proj: str = field(default="relu", metadata={"help": "Backbone FFN: relu (T5 v1.0) or gated-gelu "
                                                              "(T5 v1.1 / Flan-T5)."})
    # ---- ALTER
    adapter_form: str = field(default="plain", metadata={"help": "ALTER adapter form: plain or gated (mirrors a gated "
                                                         "FFN, exactly exportable into it)."})
    adapter_activation: str = field(default="relu", metadata={"help": "ALTER adapter activation (gelu_new matches "
                                                              "gated-gelu)."})
    adapter_dim: int = field(default=32, metadata={"help": "ALTER adapter bottleneck r."})
    num_shared_adapters: int = field(default=1, metadata={"help": "ALTER shared adapters S."})
    router_top_k: int | None = field(default=None, metadata={"help": "ALTER stage-2 top-k routing (None: dense)."})
    task_id_drop_rate: float = field(default=0.1, metadata={"help": "ALTER stage 2: task-id drop rate."})
    # ---- budget and optimisation (identical for every method unless said otherwise)
    max_steps: int = field(default=1200, metadata={"help": "Optimizer steps of every method (budget = steps x batch)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=100, metadata={"help": "Evaluation (generation) batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (all methods; ALTER stage 1)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (>= 1) or fraction of the steps (< 1)."})
    stage2_fraction: float = field(default=0.25, metadata={"help": "ALTER two-stage: fraction of steps in stage 2."})
    stage2_learning_rate: float = field(default=1e-2, metadata={"help": "ALTER stage-2 peak learning rate."})
    stage2_warmup_steps: float = field(default=0.05, metadata={"help": "ALTER stage-2 warm-up (steps or fraction)."})
    stage2_data_fraction: float = field(
        default=0.1, metadata={"help": "Method 7: fraction of 5's stage-2 examples (and steps) that its stage 2 sees."}
    )
    num_threads: int = field(default=1, metadata={"help": "torch.set_num_threads (1: fastest on a shared 2-core CPU)."})
    progress_bars: bool = field(default=False, metadata={"help": "Show the Trainer's progress bars."})

    def __post_init__(self):
        if self.backbone not in ("t5", "causal"):
            raise ValueError(f"--backbone {self.backbone!r} is not valid: expected 't5' or 'causal'.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; expected a subset of {list(METHODS)}.")
        if not self.seeds:
            raise ValueError("Give at least one seed.")
        if (self.train_files is None) != (self.eval_files is None):
            raise ValueError("--train_files and --eval_files go together: give both, as task=file pairs.")
        if self.tasks_dir is not None and self.train_files is not None:
            raise ValueError("Give either --tasks_dir or --train_files/--eval_files, not both.")
        if not 0 < self.stage2_fraction < 1:
            raise ValueError(f"stage2_fraction={self.stage2_fraction} must be in (0, 1).")
        if not 0 < self.stage2_data_fraction <= 1:
            raise ValueError(f"stage2_data_fraction={self.stage2_data_fraction} must be in (0, 1].")
        if self.max_steps < 2:
            raise ValueError(f"max_steps={self.max_steps} must be >= 2 (both ALTER stages need a step).")


def parse_arguments(argv=None) -> BenchmarkArguments:
    """Parses the command line; `--quick` replaces the defaults of the fields that were not given explicitly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.quick:
        given = {item[2:].split("=", 1)[0].replace("-", "_") for item in argv if item.startswith("--")}
        preset = {k: v for k, v in QUICK_PRESET.items() if k not in given}
        args = BenchmarkArguments(**{**asdict(args), **preset})
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data


def _parse_pairs(pairs, what):
    mapping = {}
    for pair in pairs or []:
        task, sep, value = pair.partition("=")
        if not sep or not task or not value:
            raise ValueError(f"{what} entry {pair!r} is not of the form task=value.")
        if task in mapping:
            raise ValueError(f"{what} names task {task!r} twice.")
        mapping[task] = value
    return mapping


def _files_in(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--tasks_dir {str(folder)!r} is not a folder (looked for {str(folder.resolve())!r}). The full real task "
            "sets are not part of the repository: point --tasks_dir at your copy of them (in this project's workspace "
            "`../shared/data/real` or `../shared/data/tasks`), or at `tests/fixtures/real` for the small sample."
        )
    train, evaluation = {}, {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in DATA_FILE_SUFFIXES:
            continue
        for split, files in (("_train", train), ("_eval", evaluation)):
            if path.stem.endswith(split):
                task = path.stem[: -len(split)]
                if task in files:
                    raise ValueError(f"Task {task!r} has two {split[1:]} files in {str(folder)!r}.")
                files[task] = str(path)
    if not train:
        raise ValueError(f"No <task>_train{{.jsonl,.json,.csv}} file in {str(folder)!r}.")
    return train, evaluation


def load_benchmark_tasks(args: BenchmarkArguments):
    """
    Returns `(train, evaluation, metrics)`: task -> list of `{"source", "target"}` records (raw, without prefix) for
    both splits, and task -> metric name.
    """
    if args.tasks_dir is None and args.train_files is None:
        names = list(args.tasks) if args.tasks else list(SYNTHETIC_TASK_NAMES)
        train, evaluation = make_synthetic_tasks(
            args.num_train_per_task, args.num_eval_per_task, seed=args.data_seed, tasks=names
        )
        metrics = {name: default_metric_for_task[name] for name in names}
        metrics.update(_parse_pairs(args.task_metrics, "--task_metrics"))
        return train, evaluation, metrics

    if args.tasks_dir is not None:
        train_files, eval_files = _files_in(args.tasks_dir)
    else:
        train_files = _parse_pairs(args.train_files, "--train_files")
        eval_files = _parse_pairs(args.eval_files, "--eval_files")
    missing = sorted(set(train_files) ^ set(eval_files))
    if missing:
        raise ValueError(f"Task(s) {missing} need both training and evaluation data.")
    names = list(args.tasks) if args.tasks else list(train_files)
    unknown = [name for name in names if name not in train_files]
    if unknown:
        raise ValueError(f"--tasks names unknown task(s) {unknown}; the data has {sorted(train_files)}.")

    def load(path, task, limit):
        data = load_task_data(path, args.source_column, args.target_column, task_name=task)
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        return data.to_list()

    train = {name: load(train_files[name], name, args.max_train_per_task) for name in names}
    evaluation = {name: load(eval_files[name], name, args.max_eval_per_task) for name in names}
    metrics = {name: "exact_match" for name in names}
    given = _parse_pairs(args.task_metrics, "--task_metrics")
    for task, metric in given.items():
        if task not in metrics:
            raise ValueError(f"--task_metrics names unknown task {task!r}; tasks: {names}.")
        if metric not in METRICS:
            raise ValueError(f"--task_metrics {task}={metric!r}: unknown metric; expected one of {sorted(METRICS)}.")
        metrics[task] = metric
    return train, evaluation, metrics


def with_prefix(tasks):
    """Prepends `"<task>: "` to every source (the format of `make_synthetic_tasks(with_prefix=True)`)."""
    return {
        name: [{"source": f"{name}: {row['source']}", "target": row["target"]} for row in rows]
        for name, rows in tasks.items()
    }


def _set_task_ids(dataset, task_id):
    """Drops the `task_ids` column, or (with an id) replaces it by that id for every row."""
    dataset = dataset.remove_columns("task_ids")
    if task_id is None:
        return dataset
    return dataset.add_column("task_ids", [task_id] * len(dataset))


class BenchmarkData:
    """Text and tokenized data shared by all methods of one benchmark run."""

    def __init__(self, args: BenchmarkArguments, tokenizer):
        self.args = args
        self.tokenizer = tokenizer
        raw_train, raw_eval, self.metrics = load_benchmark_tasks(args)
        self.task_names = list(raw_train)
        self.prefixed_train, self.prefixed_eval = with_prefix(raw_train), with_prefix(raw_eval)
        self.alter_train = self.prefixed_train if args.alter_task_prefix else raw_train
        self.alter_eval = self.prefixed_eval if args.alter_task_prefix else raw_eval
        self.references = {name: [r["target"] for r in rows] for name, rows in raw_eval.items()}
        sizes = {name: len(rows) for name, rows in raw_train.items()}
        self.rates = mixing_rates(sizes, args.mixing)
        lengths = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length)
        if args.backbone == "causal":
            lengths["decoder_only"] = True
        self.lengths = lengths
        self.eval_prefixed = build_eval_datasets(self.prefixed_eval, tokenizer, self.task_names, **lengths)
        self.eval_alter = build_eval_datasets(self.alter_eval, tokenizer, self.task_names, **lengths)
        longest = max(
            len(tokenizer(text_target=r["target"], max_length=args.max_target_length, truncation=True)["input_ids"])
            for rows in list(raw_train.values()) + list(raw_eval.values())
            for r in rows
        )
        self.generation_max_length = longest + 1  # the decoder start token counts

    def mixture(self, tasks, task_names, num_examples, seed):
        """A tokenized training mix of exactly `num_examples` rows (one pass = the budget)."""
        return build_multitask_dataset(
            tasks, self.tokenizer, task_names, mixing=self.args.mixing, num_examples=num_examples, seed=seed,
            **self.lengths,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Models


def backbone_kwargs(args: BenchmarkArguments) -> dict:
    return dict(
        vocab_size=384,  # ByT5: 256 bytes + 3 special tokens, padded as in google/byt5
        d_model=args.d_model,
        d_ff=args.d_ff,
        d_kv=args.d_kv,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        dropout_rate=args.dropout_rate,
        feed_forward_proj=args.feed_forward_proj,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def causal_backbone_kwargs(args: BenchmarkArguments) -> dict:
    """The Llama-shaped decoder-only backbone of `--backbone causal`: as wide as the T5 one, `num_layers` layers."""
    return dict(vocab_size=384, hidden_size=args.d_model, intermediate_size=args.d_ff, head_dim=args.d_kv,
                num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                num_key_value_heads=args.num_heads, max_position_embeddings=512, pad_token_id=0, bos_token_id=None,
                eos_token_id=1, tie_word_embeddings=False)


def new_t5(args: BenchmarkArguments, seed: int):
    """A fresh plain backbone: `T5ForConditionalGeneration`, or `LlamaForCausalLM` with `--backbone causal`."""
    set_seed(seed)
    if args.backbone == "causal":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**causal_backbone_kwargs(args)))
        model.generation_config.pad_token_id = 0
        return model
    model = T5ForConditionalGeneration(T5Config(**backbone_kwargs(args)))
    model.generation_config.decoder_start_token_id = 0
    return model


def alter_config(args: BenchmarkArguments, task_names, adapter_dim, num_shared_adapters):
    if args.backbone == "causal":
        return AlterCausalConfig(
            task_names=list(task_names), adapter_dim=adapter_dim, num_shared_adapters=num_shared_adapters,
            router_top_k=args.router_top_k, task_id_drop_rate=args.task_id_drop_rate, backbone_model_type="llama",
            **causal_backbone_kwargs(args),
        )
    return AlterConfig(
        task_names=list(task_names),
        adapter_dim=adapter_dim,
        num_shared_adapters=num_shared_adapters,
        router_top_k=args.router_top_k,
        task_id_drop_rate=args.task_id_drop_rate,
        adapter_form=args.adapter_form,
        adapter_activation=args.adapter_activation,
        **backbone_kwargs(args),
    )


def alter_class(config):
    return AlterForCausalLM if isinstance(config, AlterCausalConfig) else AlterForConditionalGeneration


def new_alter(config, seed: int):
    set_seed(seed)
    model = alter_class(config)(copy.deepcopy(config))
    if isinstance(config, AlterCausalConfig):
        model.generation_config.pad_token_id = 0
    return model


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def mta_extra_parameters(config: AlterConfig) -> int:
    """Parameters that the MTA modules add to the backbone."""
    model = alter_class(config)(config)
    return sum(count(m.parameters()) for m in model.mta_modules().values())


def matched_shared_adapter_dim(args: BenchmarkArguments, alter_extra: int, num_modules: int) -> int:
    """Bottleneck of one shared adapter per MTA position whose extra parameters best match ALTER's."""
    single = alter_config(args, ["shared"], adapter_dim=1, num_shared_adapters=0)
    fixed = count(AlterMTA(single).parameters()) - 2 * args.d_model  # router, task embedding, gate mix
    return max(1, round((alter_extra / num_modules - fixed) / (2 * args.d_model)))


def stage_parameters(model: AlterForConditionalGeneration, stage: int) -> int:
    names = model.trainable_parameter_names(stage)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def training_arguments(
    args: BenchmarkArguments, data: BenchmarkData, output_dir, seed, max_steps, alter=False, **extra
) -> Seq2SeqTrainingArguments:
    """The training arguments shared by every method (no checkpoints, greedy generation for evaluation)."""
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        optim="adamw_torch",
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=max(1, max_steps // 4),
        disable_tqdm=not args.progress_bars,
        dataloader_pin_memory=False,
        predict_with_generate=True,
        generation_max_length=data.generation_max_length,
        generation_num_beams=1,
    )
    if alter:
        kwargs.update(save_routing_heatmap=False, eval_on_stage_switch=False)
    kwargs.update(extra)
    return (AlterTrainingArguments if alter else Seq2SeqTrainingArguments)(**kwargs)


def _decode(tokenizer, token_ids):
    token_ids = np.asarray(token_ids)
    token_ids = np.where(token_ids < 0, tokenizer.pad_token_id, token_ids)
    return tokenizer.batch_decode(token_ids.tolist(), skip_special_tokens=True)


def evaluate_with_predict(trainer, eval_sets, data: BenchmarkData, tasks=None) -> dict[str, float]:
    """Scores of `trainer`'s model on each task by `trainer.predict` (generation) and the task's metric."""
    scores = {}
    for task in tasks or eval_sets:
        output = trainer.predict(eval_sets[task], metric_key_prefix=f"test_{task}")
        predictions = _decode(data.tokenizer, output.predictions)
        scores[task] = compute_metric(data.metrics[task], predictions, data.references[task])
    return scores


def evaluate_plain_causal(model, eval_sets, data: BenchmarkData, tasks=None) -> dict[str, float]:
    """`--backbone causal` plain baselines: greedy generation from each example's prompt (its tokens with label
    -100), the prompt stripped, scored with the task's metric."""
    from modeling_alter.trainer import causal_prompts

    collator = MultiTaskDataCollator(data.tokenizer)
    model.eval()
    scores = {}
    for task in tasks or eval_sets:
        dataset = eval_sets[task].remove_columns([c for c in ("target_text", "task_ids") if c in eval_sets[task].column_names])
        predictions = []
        for start in range(0, len(dataset), data.args.eval_batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + data.args.eval_batch_size, len(dataset)))])
            inputs, width = causal_prompts(batch, data.tokenizer.pad_token_id)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=data.generation_max_length, do_sample=False,
                                     num_beams=1, pad_token_id=data.tokenizer.pad_token_id)
            predictions += _decode(data.tokenizer, out[:, width:])
        scores[task] = compute_metric(data.metrics[task], predictions, data.references[task])
    return scores


def scores_from_metrics(metrics: dict, data: BenchmarkData, prefix="eval") -> dict[str, float]:
    """Per-task scores from `AlterTrainer.evaluate()` metrics (`{prefix}_{task}_{metric}`)."""
    return {task: float(metrics[f"{prefix}_{task}_{data.metrics[task]}"]) for task in data.task_names}


def routing_summary(metrics: dict, data: BenchmarkData, prefix="eval") -> dict:
    """Per task: mean gate weight of its own adapter, of the shared adapters, and the routing entropy."""
    summary = {}
    for task in data.task_names:
        keys = {k: f"{prefix}_{task}_routing_{k}" for k in ("own_adapter", "shared_adapters", "entropy")}
        values = {k: float(metrics[v]) for k, v in keys.items() if v in metrics}
        if values:
            summary[task] = values
    return summary


class StageOneSnapshot(TrainerCallback):
    """
    Keeps a copy of the model weights at the end of optimizer step `step` (the last stage-1 step, seen before
    `StageSwitchCallback` switches), the training seconds until then, and how long the evaluation at the switch took.
    """

    def __init__(self, step: int):
        self.step = step
        self.state_dict = None
        self.seconds = None
        self.switch_eval_seconds = 0.0
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and self.state_dict is None:
            model = getattr(model, "module", model)
            self.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.seconds = time.perf_counter() - self._start

    def on_evaluate(self, args, state, control, **kwargs):
        if self.seconds is not None and state.global_step == self.step:
            self.switch_eval_seconds = time.perf_counter() - self._start - self.seconds


def split_steps(total_steps: int, rates: dict[str, float]) -> dict[str, int]:
    """Splits `total_steps` over tasks in proportion to `rates` (largest remainders), at least one step each, so that
    the single-task models together take exactly `total_steps` steps."""
    if total_steps < len(rates):
        raise ValueError(f"max_steps={total_steps} is smaller than the number of tasks ({len(rates)}).")
    spare = total_steps - len(rates)
    exact = {task: spare * rate for task, rate in rates.items()}
    steps = {task: 1 + math.floor(value) for task, value in exact.items()}
    by_remainder = sorted(rates, key=lambda task: exact[task] - math.floor(exact[task]), reverse=True)
    for task in by_remainder[: total_steps - sum(steps.values())]:
        steps[task] += 1
    return steps


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_seed(args: BenchmarkArguments, data: BenchmarkData, seed: int, methods) -> dict:
    """Trains and evaluates every method in `methods` with one seed; returns method -> result."""
    results = {}
    tokenizer = data.tokenizer
    collator = MultiTaskDataCollator(tokenizer)
    names = data.task_names
    steps, batch = args.max_steps, args.batch_size
    run_dir = Path(args.output_dir) / "runs" / f"seed{seed}"
    plain = {task: _set_task_ids(ds, None) for task, ds in data.eval_prefixed.items()}

    def t5_run(key, model, train_set, max_steps, eval_tasks):
        targs = training_arguments(args, data, run_dir / key, seed, max_steps)
        trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=train_set, data_collator=collator,
                                 processing_class=tokenizer)
        _, train_seconds = _timed(trainer.train)
        if args.backbone == "causal":  # Seq2SeqTrainer.predict would generate from prompt + answer
            scores, eval_seconds = _timed(lambda: evaluate_plain_causal(model, plain, data, eval_tasks))
        else:
            scores, eval_seconds = _timed(lambda: evaluate_with_predict(trainer, plain, data, eval_tasks))
        return scores, train_seconds, eval_seconds

    if "single_task" in methods:
        scores, train_seconds, eval_seconds, examples = {}, 0.0, 0.0, 0
        per_task_steps = split_steps(steps, data.rates)
        for task in names:
            task_steps = per_task_steps[task]
            task_mix = data.mixture({task: data.prefixed_train[task]}, [task], task_steps * batch, seed)
            train_set = _set_task_ids(task_mix, None)
            model = new_t5(args, seed)
            task_scores, t, e = t5_run(f"single_task/{task}", model, train_set, task_steps, [task])
            scores.update(task_scores)
            train_seconds, eval_seconds, examples = train_seconds + t, eval_seconds + e, examples + task_steps * batch
        params = count(p for p in model.parameters() if p.requires_grad)
        results["single_task"] = dict(
            scores=scores, train_seconds=train_seconds, eval_seconds=eval_seconds, train_examples=examples,
            trainable_parameters={"per model": params, f"all {len(names)} models": params * len(names)},
            steps_per_task=per_task_steps,
        )

    mixture_prefixed = data.mixture(data.prefixed_train, names, steps * batch, seed)

    if "multitask_t5" in methods:
        model = new_t5(args, seed)
        scores, t, e = t5_run("multitask_t5", model, _set_task_ids(mixture_prefixed, None), steps, None)
        results["multitask_t5"] = dict(
            scores=scores, train_seconds=t, eval_seconds=e, train_examples=steps * batch,
            trainable_parameters={"all": count(p for p in model.parameters() if p.requires_grad)},
        )

    config = alter_config(args, names, args.adapter_dim, args.num_shared_adapters)
    alter_extra = mta_extra_parameters(config)
    num_modules = len(alter_class(config)(config).mta_modules())

    if "shared_adapter" in methods:
        adapter_dim = matched_shared_adapter_dim(args, alter_extra, num_modules)
        shared_config = alter_config(args, ["shared"], adapter_dim, num_shared_adapters=0)
        model = new_alter(shared_config, seed)
        targs = training_arguments(args, data, run_dir / "shared_adapter", seed, steps, alter=True)
        trainer = AlterTrainer(model=model, args=targs, train_dataset=_set_task_ids(mixture_prefixed, 0),
                               data_collator=collator, processing_class=tokenizer)
        _, t = _timed(trainer.train)
        eval_sets = {task: _set_task_ids(ds, 0) for task, ds in data.eval_prefixed.items()}
        scores, e = _timed(lambda: evaluate_with_predict(trainer, eval_sets, data))
        results["shared_adapter"] = dict(
            scores=scores, train_seconds=t, eval_seconds=e, train_examples=steps * batch,
            trainable_parameters={"all": stage_parameters(model, 1)}, adapter_dim=adapter_dim,
            extra_parameters=mta_extra_parameters(shared_config),
        )

    mixture_alter = mixture_prefixed
    if not args.alter_task_prefix:
        mixture_alter = data.mixture(data.alter_train, names, steps * batch, seed)
    task_metrics = dict(data.metrics)

    if "alter_stage1" in methods:
        model = new_alter(config, seed)
        targs = training_arguments(args, data, run_dir / "alter_stage1", seed, steps, alter=True)
        trainer = AlterTrainer(model=model, args=targs, train_dataset=mixture_alter, data_collator=collator,
                               processing_class=tokenizer, task_metrics=task_metrics)
        _, t = _timed(trainer.train)
        metrics, e = _timed(lambda: trainer.evaluate(data.eval_alter))
        results["alter_stage1"] = dict(
            scores=scores_from_metrics(metrics, data), train_seconds=t, eval_seconds=e, train_examples=steps * batch,
            trainable_parameters={"stage 1": stage_parameters(model, 1)}, extra_parameters=alter_extra,
        )

    if not {"alter_two_stage", "alter_no_task_ids", "alter_stage2_10pct"} & set(methods):
        return results

    stage2_steps = max(1, round(steps * args.stage2_fraction))
    stage1_steps = steps - stage2_steps
    model = new_alter(config, seed)
    snapshot = StageOneSnapshot(stage1_steps)
    targs = training_arguments(
        args, data, run_dir / "alter_two_stage", seed, steps, alter=True, stage1_steps=stage1_steps,
        stage2_learning_rate=args.stage2_learning_rate, stage2_warmup_steps=args.stage2_warmup_steps,
        eval_on_stage_switch=True,
    )
    trainer = AlterTrainer(model=model, args=targs, train_dataset=mixture_alter, eval_dataset=data.eval_alter,
                           data_collator=collator, processing_class=tokenizer, task_metrics=task_metrics,
                           callbacks=[snapshot])
    _, t = _timed(trainer.train)
    train_seconds = t - snapshot.switch_eval_seconds
    metrics, e = _timed(lambda: trainer.evaluate(data.eval_alter))
    trainer.save_routing_report(run_dir / "alter_two_stage")
    params = {"stage 1": stage_parameters(model, 1), "stage 2": stage_parameters(model, 2)}
    results["alter_two_stage"] = dict(
        scores=scores_from_metrics(metrics, data), train_seconds=train_seconds, eval_seconds=e,
        train_examples=steps * batch, trainable_parameters=params, extra_parameters=alter_extra,
        stage_steps=[stage1_steps, stage2_steps], routing=routing_summary(metrics, data),
    )
    results[AT_SWITCH] = dict(
        scores=scores_from_metrics(trainer.stage1_metrics, data), train_seconds=snapshot.seconds,
        eval_seconds=snapshot.switch_eval_seconds, train_examples=stage1_steps * batch,
        trainable_parameters={"stage 1": params["stage 1"]}, extra_parameters=alter_extra,
    )

    if "alter_no_task_ids" in methods:
        eval_sets = {task: _set_task_ids(ds, None) for task, ds in data.eval_alter.items()}
        metrics, e = _timed(lambda: trainer.evaluate(eval_sets))
        results["alter_no_task_ids"] = dict(
            results["alter_two_stage"], scores=scores_from_metrics(metrics, data), eval_seconds=e, routing={},
            note="the model of method 5, evaluated with task_ids=None",
        )

    if "alter_stage2_10pct" in methods:
        small_steps = max(1, math.ceil(stage2_steps * args.stage2_data_fraction))
        model = new_alter(config, seed)
        model.load_state_dict(snapshot.state_dict)
        model.set_stage(2)
        small_set = data.mixture(data.alter_train, names, small_steps * batch, seed + 10_000)
        targs = training_arguments(
            args, data, run_dir / "alter_stage2_10pct", seed, small_steps, alter=True,
            learning_rate=args.stage2_learning_rate, stage2_learning_rate=args.stage2_learning_rate,
            warmup_steps=args.stage2_warmup_steps,
        )
        small_trainer = AlterTrainer(model=model, args=targs, train_dataset=small_set, data_collator=collator,
                                     processing_class=tokenizer, task_metrics=task_metrics)
        _, t = _timed(small_trainer.train)
        metrics, e = _timed(lambda: small_trainer.evaluate(data.eval_alter))
        results["alter_stage2_10pct"] = dict(
            scores=scores_from_metrics(metrics, data), train_seconds=snapshot.seconds + t, eval_seconds=e,
            train_examples=(stage1_steps + small_steps) * batch, trainable_parameters=params,
            extra_parameters=alter_extra, stage_steps=[stage1_steps, small_steps],
            note="stage 1 shared with method 5 (its weights at the switch)",
        )
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Summary, table and chart


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def summarize(per_seed: dict, task_names) -> dict:
    """Mean and std over seeds per method and task, overall (mean over tasks, then over seeds), and paired
    differences of the overall score to the reference method."""
    methods = [m for m in ROW_ORDER if all(m in r for r in per_seed.values())]
    summary = {}
    for method in methods:
        runs = [per_seed[seed][method] for seed in per_seed]
        entry = {"mean": {}, "std": {}}
        for task in task_names:
            entry["mean"][task], entry["std"][task] = mean_std([r["scores"][task] for r in runs])
        overall = [float(np.mean([r["scores"][t] for t in task_names])) for r in runs]
        entry["overall_per_seed"] = overall
        entry["overall_mean"], entry["overall_std"] = mean_std(overall)
        entry["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in runs]))
        entry["eval_seconds_mean"] = float(np.mean([r["eval_seconds"] for r in runs]))
        summary[method] = entry
    if REFERENCE in summary:
        reference = summary[REFERENCE]["overall_per_seed"]
        for method, entry in summary.items():
            deltas = [a - b for a, b in zip(entry["overall_per_seed"], reference)]
            entry["delta_vs_reference_mean"], entry["delta_vs_reference_std"] = mean_std(deltas)
            entry["seeds_better_than_reference"] = sum(d > 0 for d in deltas)
    return summary


def _pct(mean, std):
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _params(entry):
    return "; ".join(f"{k}: {v:,}" for k, v in entry["trainable_parameters"].items())


def _seconds(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def render_table(summary: dict, first_seed_results: dict, task_names, num_seeds: int) -> str:
    """The Markdown results table."""
    header = ["method", *task_names, "**overall**", "Δ overall vs 2 (paired)", "trainable params (per phase)",
              "train examples", "wall time train + eval (per seed)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in summary.items():
        result = first_seed_results[method]
        label = METHODS.get(method, AT_SWITCH_LABEL)
        cells = [label, *(_pct(entry["mean"][t], entry["std"][t]) for t in task_names)]
        cells.append(f"**{_pct(entry['overall_mean'], entry['overall_std'])}**")
        if "delta_vs_reference_mean" in entry and method != REFERENCE:
            cells.append(f"{100 * entry['delta_vs_reference_mean']:+.1f} ± {100 * entry['delta_vs_reference_std']:.1f} "
                         f"({entry['seeds_better_than_reference']}/{num_seeds} seeds better)")
        else:
            cells.append("—")
        cells.append(_params(result))
        cells.append(f"{result['train_examples']:,}")
        train = entry["train_seconds_mean"]
        if method == "alter_no_task_ids":
            cells.append(f"(training of 5) + {_seconds(entry['eval_seconds_mean'])}")
        else:
            cells.append(f"{_seconds(train)} + {_seconds(entry['eval_seconds_mean'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, task_names, path, title):
    """Grouped bar chart: one group per task and overall, one bar per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(task_names) + ["overall"]
    methods = list(summary)
    width = 0.8 / len(methods)
    figure, axis = plt.subplots(figsize=(min(16.0, max(8.0, 0.2 * len(groups) * len(methods) + 2)), 5.2))
    colors = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        entry = summary[method]
        means = [entry["mean"][t] for t in task_names] + [entry["overall_mean"]]
        stds = [entry["std"][t] for t in task_names] + [entry["overall_std"]]
        positions = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        axis.bar(positions, 100 * np.asarray(means), width, yerr=100 * np.asarray(stds), capsize=2,
                 label=METHODS.get(method, AT_SWITCH_LABEL), color=colors(i % 10))
    axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axis.set_ylabel("score (%), mean ± std over seeds")
    axis.set_ylim(0, 105)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _describe_setup(args: BenchmarkArguments, data: BenchmarkData, alter_extra: int, shared_dim: int) -> str:
    source = ("embedded synthetic benchmark" if args.tasks_dir is None and args.train_files is None
              else "user tasks")
    lines = [
        f"- Tasks ({source}): " + ", ".join(f"{t} ({data.metrics[t]})" for t in data.task_names),
        (
            (f"- Backbone (every method): T5 d_model={args.d_model}, d_ff={args.d_ff}, {args.num_layers}+"
             f"{args.num_layers} layers" if args.backbone == "t5" else
             f"- Backbone (every method): decoder-only Llama hidden={args.d_model}, intermediate={args.d_ff}, "
             f"{args.num_layers} layers")
            + f", {args.num_heads} heads, ByT5 byte tokenizer, trained from scratch; ALTER adds "
            f"r={args.adapter_dim}, S={args.num_shared_adapters} ({alter_extra:,} extra parameters); the shared "
            f"adapter of 3 has r={shared_dim}."
        ),
        (
            f"- Budget (every method): {args.max_steps} steps × batch {args.batch_size} = "
            f"{args.max_steps * args.batch_size:,} examples, lr {args.learning_rate:g} (linear, warm-up "
            f"{args.warmup_steps:g}); ALTER two-stage: last {args.stage2_fraction:g} of the steps in stage 2 at lr "
            f"{args.stage2_learning_rate:g}; method 7's stage 2 sees {args.stage2_data_fraction:g} of that."
        ),
        f"- Seeds {args.seeds}; {args.num_threads} torch thread(s); scores in %; overall = mean over tasks.",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.num_threads)
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(args.methods))

    start = time.perf_counter()
    tokenizer = ByT5Tokenizer()
    try:
        data = BenchmarkData(args, tokenizer)
    except (FileNotFoundError, ValueError) as error:  # missing folder or file, bad data: one line, as argparse does
        print(f"quality.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    config = alter_config(args, data.task_names, args.adapter_dim, args.num_shared_adapters)
    alter_extra = mta_extra_parameters(config)
    num_modules = len(alter_class(config)(config).mta_modules())
    shared_dim = matched_shared_adapter_dim(args, alter_extra, num_modules)

    per_seed = {}
    for seed in args.seeds:
        seed_start = time.perf_counter()
        per_seed[seed] = run_seed(args, data, seed, methods)
        print(f"[quality] seed {seed} done in {_seconds(time.perf_counter() - seed_start)}: " + ", ".join(
            f"{m} {100 * np.mean(list(r['scores'].values())):.1f}" for m, r in per_seed[seed].items()), flush=True)
    kept = set(methods) | {AT_SWITCH}  # 5 is trained for 6 and 7 even when not asked for; report only what was asked
    per_seed = {seed: {m: r[m] for m in ROW_ORDER if m in kept and m in r} for seed, r in per_seed.items()}
    summary = summarize(per_seed, data.task_names)
    total_seconds = time.perf_counter() - start

    first = per_seed[args.seeds[0]]
    table = render_table(summary, first, data.task_names, len(args.seeds))
    setup = _describe_setup(args, data, alter_extra, shared_dim)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = f"{table}\n\n{setup}\n- Total wall time: {_seconds(total_seconds)}. Command: `{command.strip()}`\n"
    print("\n" + report, flush=True)

    record = {
        "command": command.strip(),
        "arguments": asdict(args),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "task_names": data.task_names,
        "task_metrics": data.metrics,
        "methods": {
            method: {
                "label": METHODS.get(method, AT_SWITCH_LABEL),
                **summary[method],
                "per_seed": {str(seed): per_seed[seed][method] for seed in args.seeds},
            }
            for method in summary
        },
        "total_seconds": total_seconds,
        "table_markdown": table,
    }
    (output_dir / "results.json").write_text(json.dumps(record, indent=2))
    (output_dir / "results.md").write_text(report)
    title = f"{args.max_steps} steps × {args.batch_size}, seeds {args.seeds}, d_model {args.d_model}"
    plot(summary, data.task_names, output_dir / "quality.png", title)
    print(f"[quality] wrote {output_dir / 'results.json'}, {output_dir / 'results.md'}, {output_dir / 'quality.png'}")
    return record


if __name__ == "__main__":
    main()
