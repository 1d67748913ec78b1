#!/usr/bin/env python
"""Two-stage multi-task training of an ALTER model (Mixture-of-Task-Adapters) with `AlterTrainer`.

With no arguments, runs the embedded default end to end on CPU in a few minutes: it generates ALTER's synthetic
multi-task benchmark (7 tasks: classification, transformation, arithmetic, extraction), builds a small ALTER model
from scratch with a byte-level tokenizer that needs no download, trains stage 1 then stage 2 in one `train()` call,
prints a per-task table after each stage, saves the model folder (model, tokenizer, `eval_results.json`, routing
heatmap) to `outputs/alter-synthetic`, reloads it with `AutoModelForSeq2SeqLM.from_pretrained(...,
trust_remote_code=True)` and prints one generation per task:

    python examples/train_two_stage.py

On your own data, from a T5 / Flan-T5 checkpoint or a Llama-family decoder-only LM (Llama, Qwen2, Qwen3, Mistral;
the model class is picked from the checkpoint's config), a local folder or a Hub id, with JSON Lines / JSON / CSV files of
`source`/`target` pairs, one file per task:

    python examples/train_two_stage.py \\
        --base_model google/flan-t5-small \\
        --train_files sst2=data/sst2_train.jsonl agnews=data/agnews_train.jsonl \\
        --eval_files sst2=data/sst2_eval.jsonl agnews=data/agnews_eval.jsonl \\
        --task_metrics sst2=accuracy agnews=accuracy \\
        --output_dir outputs/alter-news --num_train_epochs 3 --stage1_epochs 2

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
from modeling_alter.metrics import METRICS  # noqa: E402
from modeling_alter.synthetic_tasks import default_metric_for_task, make_synthetic_tasks  # noqa: E402
from modeling_alter.trainer import AlterTrainer, AlterTrainingArguments  # noqa: E402


logger = logging.getLogger("train_two_stage")

# Defaults of the embedded job (a small model trained from scratch on the synthetic benchmark, ~3-5 min on 2 cores).
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
# Defaults when fine-tuning a pretrained T5 / Flan-T5 (`--base_model`).
BASE_MODEL_DEFAULTS = {
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
}


@dataclass
class ModelArguments:
    """Which model to train: a T5 / Flan-T5 checkpoint to convert, or a small ALTER built from scratch."""

    base_model: str | None = field(
        default=None,
        metadata={"help": "T5 / Flan-T5 checkpoint (folder or Hub id) to convert with from_t5, or a Llama / Qwen2 / "
                  "Qwen3 / Mistral causal LM to convert with AlterForCausalLM.from_causal_lm. Default: a small ALTER "
                  "from scratch with a byte-level tokenizer."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id (default: base_model, or ByT5 bytes from scratch)."}
    )
    adapter_dim: int = field(default=32, metadata={"help": "Bottleneck size of every adapter."})
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
    """Which data to train and evaluate on: your files (`task=path`), or the embedded synthetic benchmark."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Training data, one `task=path` per task (.jsonl, .json or .csv). Default: synthetic."},
    )
    eval_files: list[str] = field(
        default_factory=list, metadata={"help": "Evaluation data, one `task=path` per task."}
    )
    task_metrics: list[str] = field(
        default_factory=list,
        metadata={"help": f"Generation metric per task, `task=metric` with metric in {sorted(METRICS)} "
                  "(default: exact_match; the synthetic tasks have their own)."},
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


def _default_text(name, field_default, base_model_given):
    """`default: X`, with the other job's default when `--base_model` changes it."""
    synthetic = SYNTHETIC_DEFAULTS.get(name, field_default)
    finetune = BASE_MODEL_DEFAULTS.get(name, field_default)
    if synthetic == finetune:
        return f"default: {synthetic}"
    if base_model_given:
        return f"default with --base_model: {finetune}; without: {synthetic}"
    return f"default: {synthetic}; with --base_model: {finetune}"


def short_help(argv: list[str]) -> str:
    """ALTER's own options first (model, data, stages), then the Trainer options most runs set."""
    import textwrap

    base_model_given = any(arg == "--base_model" or arg.startswith("--base_model=") for arg in argv)
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
        "Two-stage multi-task training of an ALTER model. With no option: the embedded synthetic benchmark, from "
        "scratch. --base_model converts a T5 / Flan-T5 checkpoint and changes the defaults marked 'with --base_model'.",
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
            text = f"{help_text} ({_default_text(f.name, default, base_model_given)})"
            lines.append(f"  --{f.name}")
            lines += textwrap.wrap(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str]):
    """Parses the command line into (ModelArguments, DataArguments, AlterTrainingArguments) with the defaults of
    the job (`SYNTHETIC_DEFAULTS`, or `BASE_MODEL_DEFAULTS` with `--base_model`). `-h`/`--help` prints ALTER's
    options and exits; `--help-all` prints every option."""
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

    defaults = dict(BASE_MODEL_DEFAULTS if given("--base_model") else SYNTHETIC_DEFAULTS)
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


def comparison_table(stage1: dict, stage2: dict, task_metrics: dict[str, str], wall_time: float) -> str:
    """Formats the per-task scores after stage 1 and after stage 2 side by side, with the wall time."""
    lines = [f"### Per-task scores after each stage (wall time {wall_time:.0f} s)", "",
             "| task | metric | stage 1 | stage 2 |", "|---|---|---:|---:|"]

    def cell(metrics, key):
        value = metrics.get(key)
        return f"{value:.3f}" if value is not None else "-"

    for task, metric in task_metrics.items():
        lines.append(f"| {task} | {metric} | {cell(stage1, f'eval_{task}_{metric}')} | "
                     f"{cell(stage2, f'eval_{task}_{metric}')} |")
    lines.append(f"| **mean** | | {cell(stage1, 'eval_mean_score')} | {cell(stage2, 'eval_mean_score')} |")
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
    """Returns (train specs, eval specs, task metrics): the user's files, or the synthetic benchmark."""
    if not data_args.train_files:
        if data_args.eval_files:
            raise ValueError("--eval_files needs --train_files (without them the synthetic benchmark is used).")
        train, evaluation = make_synthetic_tasks(
            data_args.num_train_per_task, data_args.num_eval_per_task, seed=data_args.synthetic_seed
        )
        metrics = {task: default_metric_for_task[task] for task in train}
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


def build_model_and_tokenizer(model_args: ModelArguments, task_names: list[str]):
    mta_kwargs = {
        "adapter_dim": model_args.adapter_dim,
        "num_shared_adapters": model_args.num_shared_adapters,
        "router_top_k": model_args.router_top_k,
        "router_aux_loss_coef": model_args.router_aux_loss_coef,
        "task_id_drop_rate": model_args.task_id_drop_rate,
        "stage1_train_backbone": model_args.stage1_train_backbone,
    }
    if model_args.base_model is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.base_model)
        # The family comes from the checkpoint's config: a Llama-family decoder-only LM, or a T5-family model.
        if AutoConfig.from_pretrained(model_args.base_model).model_type in CAUSAL_BACKBONES:
            if tokenizer.pad_token_id is None:  # most decoder-only tokenizers have no pad token
                tokenizer.pad_token = tokenizer.eos_token
            model = AlterForCausalLM.from_causal_lm(model_args.base_model, task_names=task_names, **mta_kwargs)
            if model.generation_config.pad_token_id is None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
        else:
            model = AlterForConditionalGeneration.from_t5(model_args.base_model, task_names=task_names, **mta_kwargs)
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
    return AlterForConditionalGeneration(config), tokenizer


def check_base_model(name: str) -> None:
    """Raises `UsageError` at once when `--base_model` names a folder that does not exist (or is not a model), or is
    neither a folder nor a valid Hub id, instead of letting the Hub client try (and wait for) the network."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

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
    except (ValueError, OSError) as error:
        if debug or progress["training"]:
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str], progress: dict | None = None) -> dict:
    """The job itself; `progress["training"]` becomes true once the trainer is built (for `main`'s error lines)."""
    progress = {} if progress is None else progress
    start = time.time()
    model_args, data_args, training_args = parse_arguments(argv)
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
    model, tokenizer = build_model_and_tokenizer(model_args, task_names)
    decoder_only = not model.config.is_encoder_decoder  # prompt + answer examples, loss on the answer
    logger.info(
        f"ALTER model: {model.num_parameters():,} parameters, tasks {task_names}, "
        f"{'from ' + model_args.base_model if model_args.base_model else 'from scratch'}."
    )

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
            max_source_length=data_args.max_source_length,
            max_target_length=data_args.max_target_length,
            source_column=data_args.source_column,
            target_column=data_args.target_column,
            decoder_only=decoder_only,
        )
        eval_datasets = None
        if eval_specs:
            eval_datasets = build_eval_datasets(
                eval_specs,
                tokenizer,
                task_names,
                max_examples_per_task=data_args.max_eval_samples_per_task,
                max_source_length=data_args.max_source_length,
                max_target_length=data_args.max_target_length,
                source_column=data_args.source_column,
                target_column=data_args.target_column,
                decoder_only=decoder_only,
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
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    results = {"task_metrics": evaluated_metrics, "train": train_result.metrics}
    summary = ""
    if eval_datasets:
        final = trainer.evaluate()
        stage1 = trainer.stage1_metrics
        if trainer.is_world_process_zero():
            title = f"Stage {trainer.alter_model.config.stage} (step {trainer.state.global_step}, {time.time() - start:.0f} s)"
            print("\n" + per_task_table(title, final, evaluated_metrics) + "\n")
            if stage1:
                print(comparison_table(stage1, final, evaluated_metrics, time.time() - start) + "\n")
                summary = stage2_change(stage1, final, evaluated_metrics)
        results["stages"] = {}
        for stage, metrics in (("1", stage1), (str(trainer.alter_model.config.stage), final)):
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

        auto_class = AutoModelForCausalLM if decoder_only else AutoModelForSeq2SeqLM
        reloaded = auto_class.from_pretrained(output_dir, trust_remote_code=True).eval()
        print(f"Reloaded {type(reloaded).__name__} from {output_dir} through {auto_class.__name__} "
              "(trust_remote_code=True). One generation per task:\n")
        print("| task | input | generation | reference |\n|---|---|---|---|")
        samples = eval_specs or train_specs
        for task in task_names:
            if task not in samples:
                continue
            example = load_task_data(
                samples[task], data_args.source_column, data_args.target_column, task_name=task
            )[0]
            if decoder_only:  # the training prompt: the source and the default separator; the answer follows it
                prompt = build_eval_datasets({task: [example]}, tokenizer, task_names, decoder_only=True)[task][0]
                prompt_ids = [t for t, label in zip(prompt["input_ids"], prompt["labels"]) if label == -100]
                batch = {"input_ids": torch.tensor([prompt_ids], device=reloaded.device)}
            else:
                batch = tokenizer([example["source"]], return_tensors="pt").to(reloaded.device)
            length = {"max_new_tokens" if decoder_only else "max_length": training_args.generation_max_length or 64}
            generated = reloaded.generate(**batch, task_ids=reloaded.task_ids([task]), **length)
            if decoder_only:
                generated = generated[:, batch["input_ids"].shape[1]:]
            text = tokenizer.decode(generated[0], skip_special_tokens=True)
            cells = [markdown_cell(value) for value in (example["source"], text, example["target"])]
            print(f"| {task} | " + " | ".join(cells) + " |")
        print(f"\nSaved to {output_dir}. Wall time: {time.time() - start:.0f} s. {summary}".rstrip())
    return results


if __name__ == "__main__":
    main()
