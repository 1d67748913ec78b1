"""Multi-task data for ALTER: loading, validation, mixing, tokenization and collation.

A *task spec* is the text data of one task: a `datasets.Dataset`, a list of dicts, or a path to a `.jsonl`,
`.json` or `.csv` file, each example holding a source text and a target text. Several task specs become one
tokenized multi-task training set with a `task_ids` column (the position of the task's name in the model's
`config.task_names`), sampled according to a mixing strategy:

- `"proportional"`: rate of task k ∝ min(n_k, K) (examples-proportional mixing),
- `"temperature"`: rate ∝ min(n_k, K)^(1/T) (T5-style temperature-scaled mixing; T=1 is proportional, large T
  approaches uniform),
- `"uniform"`: equal rates,

where n_k is the task's number of examples and K the optional cap `max_examples_per_task` (Raffel et al., 2020).
"""

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Value, concatenate_datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase


TaskSpec = Dataset | Sequence[Mapping[str, Any]] | str | os.PathLike

MIXING_STRATEGIES = ("proportional", "temperature", "uniform")

_TEXT_FEATURES = Features({"source": Value("string"), "target": Value("string")})
_STRING_FEATURES = (Value("string"), Value("large_string"))


def _describe(task_name: str | None, path: Path | None) -> str:
    parts = []
    if task_name is not None:
        parts.append(f"task {task_name!r}")
    if path is not None:
        parts.append(f"file {str(path)!r}")
    return " ".join(parts) if parts else "task data"


def _check_columns(columns: Sequence[str], required: Sequence[str], where: str) -> None:
    missing = [column for column in required if column not in columns]
    if missing:
        raise ValueError(f"{where} has no column {missing[0]!r}; columns found: {sorted(columns)}.")


def _check_string(value: Any, index: int, column: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(
            f"{where}, row {index}: column {column!r} must hold a string, got {type(value).__name__} ({value!r})."
        )


def _json_has_no_records(path: Path) -> bool:
    head = ""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            head += "".join(line.split())
            if len(head) >= 2:
                break
    return head[:2] in ("", "[]")


def _read_json_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_file(path: Path, where: str) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"{where} has an unsupported extension {path.suffix!r}; expected .jsonl, .json or .csv.")
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            empty = not any(row for row in reader)
    else:
        empty = _json_has_no_records(path)
    if empty:
        raise ValueError(f"{where} is empty: every task needs at least one example.")
    if suffix == ".csv":
        # CSV has no types: read every column as text so that targets such as "42" stay strings.
        features = Features({column: Value("string") for column in header})
        return Dataset.from_csv(str(path), features=features, keep_default_na=False)
    return Dataset.from_json(str(path))


def load_task_data(
    spec: TaskSpec,
    source_column: str = "source",
    target_column: str = "target",
    *,
    task_name: str | None = None,
) -> Dataset:
    """Load and validate the text data of one task.

    Args:
        spec: a `datasets.Dataset`, a list of dicts, or a path to a `.jsonl`, `.json` or `.csv` file.
        source_column: name of the column holding the input text.
        target_column: name of the column holding the output text.
        task_name: used in error messages only.

    Returns:
        A `datasets.Dataset` with exactly the string columns `source` and `target`.

    Raises:
        ValueError: if a column is missing, the task has no example, or a source/target value is not a string.
    """
    if source_column == target_column:
        raise ValueError(f"source_column and target_column must differ, both are {source_column!r}.")
    required = (source_column, target_column)
    path = None
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        where = _describe(task_name, path)
        dataset = _read_file(path, where)
    elif isinstance(spec, Dataset):
        where = _describe(task_name, None)
        dataset = spec
    elif isinstance(spec, Sequence):
        # Validate before Arrow sees the rows: mixed value types would fail there without a row index.
        where = _describe(task_name, None)
        for index, row in enumerate(spec):
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}, row {index}: expected a dict, got {type(row).__name__}.")
            _check_columns(list(row), required, f"{where}, row {index},")
            for column in required:
                _check_string(row[column], index, column, where)
        dataset = Dataset.from_dict({column: [row[column] for row in spec] for column in required})
    else:
        raise TypeError(
            f"A task spec must be a datasets.Dataset, a list of dicts or a file path, got {type(spec).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty: every task needs at least one example.")
    _check_columns(dataset.column_names, required, where)
    for column in required:
        values = dataset[column]
        feature = dataset.features[column]
        if path is not None and feature not in _STRING_FEATURES:
            # A JSON file's non-string column; `datasets` decodes mixed types lossily ("4" becomes 4), so the
            # row to report is found in the raw file.
            values = [row.get(column) for row in _read_json_rows(path)]
        for index, value in enumerate(values):
            _check_string(value, index, column, where)
    dataset = dataset.select_columns(list(required))
    if required != ("source", "target"):
        dataset = dataset.rename_columns({source_column: "source", target_column: "target"})
    return dataset if dataset.features == _TEXT_FEATURES else dataset.cast(_TEXT_FEATURES)


def mixing_rates(
    sizes: Mapping[str, int],
    mixing: str = "proportional",
    temperature: float = 2.0,
    max_examples_per_task: int | None = None,
) -> dict[str, float]:
    """Sampling rate of each task (summing to 1) under a mixing strategy.

    Args:
        sizes: number of examples of each task.
        mixing: `"proportional"` (∝ min(n, K)), `"temperature"` (∝ min(n, K)^(1/temperature)) or `"uniform"`.
        temperature: T of temperature mixing; must be > 0.
        max_examples_per_task: the cap K (None: no cap); ignored by uniform mixing.
    """
    if mixing not in MIXING_STRATEGIES:
        raise ValueError(f"Unknown mixing strategy {mixing!r}; expected one of {list(MIXING_STRATEGIES)}.")
    if not sizes:
        raise ValueError("mixing_rates needs at least one task.")
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"Task {name!r} has size {size!r}; expected a positive integer.")
    if mixing == "temperature" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if max_examples_per_task is not None and max_examples_per_task <= 0:
        raise ValueError(f"max_examples_per_task must be a positive integer or None, got {max_examples_per_task!r}.")

    names = list(sizes)
    if mixing == "uniform":
        weights = np.ones(len(names))
    else:
        counts = np.array([sizes[name] for name in names], dtype=np.float64)
        if max_examples_per_task is not None:
            counts = np.minimum(counts, max_examples_per_task)
        weights = counts ** (1.0 / temperature) if mixing == "temperature" else counts
    weights = weights / weights.sum()
    return {name: float(weight) for name, weight in zip(names, weights)}


def _task_id(name: str, task_names: Sequence[str]) -> int:
    if name not in task_names:
        raise ValueError(f"Unknown task {name!r}; known tasks: {list(task_names)}.")
    return list(task_names).index(name)


def _load_tasks(
    tasks: Mapping[str, TaskSpec], task_names: Sequence[str], source_column: str, target_column: str,
    task_prefixes: Mapping[str, str] | None = None,
) -> dict[str, Dataset]:
    if not tasks:
        raise ValueError("No task given: `tasks` must map at least one task name to its data.")
    loaded = {}
    for name, spec in tasks.items():
        task_id = _task_id(name, task_names)
        dataset = load_task_data(spec, source_column, target_column, task_name=name)
        prefix = (task_prefixes or {}).get(name)
        if prefix:  # the model's `config.task_prefixes`: each source starts with its task's prefix
            dataset = dataset.map(
                lambda row: {"source": row["source"] if row["source"].startswith(prefix) else prefix + row["source"]},
                desc=f"Adding the prefix of {name}",
            )
        loaded[name] = dataset.add_column("task_ids", [task_id] * len(dataset), feature=Value("int64"))
    return loaded


def _tokenize_function(tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int):
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        inputs = tokenizer(batch["source"], max_length=max_source_length, truncation=True)
        targets = tokenizer(text_target=batch["target"], max_length=max_target_length, truncation=True)
        return {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "labels": targets["input_ids"],
        }

    return tokenize


def _causal_tokenize_function(tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int,
                              prompt_separator: str, chat_template: bool, add_bos: bool | None = None,
                              answer_prefix: str = ""):
    """Decoder-only examples: `input_ids` = prompt + answer + EOS, `labels` = -100 on the prompt, the answer's ids
    (and EOS) after it. The prompt is the source plus `prompt_separator` (after the tokenizer's BOS when `add_bos`,
    which `None` means when the tokenizer has one), or with `chat_template` the tokenizer's chat template over one
    user turn with the generation prompt. The answer is `answer_prefix` + the target."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id; a decoder-only target must end with EOS.")
    if add_bos not in (None, True, False):
        raise ValueError(f"add_bos={add_bos!r} is not valid: expected True, False or None.")
    if not isinstance(answer_prefix, str):
        raise ValueError(f"answer_prefix={answer_prefix!r} is not valid: expected a string.")
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError(f"add_bos=True but {type(tokenizer).__name__} has no bos_token_id.")
    if add_bos is None:
        add_bos = tokenizer.bos_token_id is not None
    bos = [tokenizer.bos_token_id] if add_bos and not chat_template else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        if chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": source}], tokenize=False,
                                                   add_generation_prompt=True) for source in batch["source"]]
        else:
            texts = [source + prompt_separator for source in batch["source"]]
        prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
        targets = [answer_prefix + target for target in batch["target"]]
        answers = tokenizer(targets, add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for prompt, answer in zip(prompts, answers):
            prompt = (bos + prompt)[:max_source_length]
            answer = (answer[: max_target_length - 1] + [tokenizer.eos_token_id])[:max_target_length]
            input_ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}

    return tokenize


def _tokenizer_for(decoder_only, tokenizer, max_source_length, max_target_length, prompt_separator, chat_template,
                   add_bos=None, answer_prefix=""):
    if decoder_only:
        return _causal_tokenize_function(tokenizer, max_source_length, max_target_length, prompt_separator,
                                         chat_template, add_bos, answer_prefix)
    if add_bos is not None or answer_prefix:
        raise ValueError("add_bos and answer_prefix apply to decoder-only data only (decoder_only=True).")
    return _tokenize_function(tokenizer, max_source_length, max_target_length)


def build_multitask_dataset(
    tasks: Mapping[str, TaskSpec],
    tokenizer: PreTrainedTokenizerBase,
    task_names: Sequence[str],
    *,
    decoder_only: bool = False,
    prompt_separator: str = "\n",
    chat_template: bool = False,
    add_bos: bool | None = None,
    answer_prefix: str = "",
    mixing: str = "proportional",
    temperature: float = 2.0,
    max_examples_per_task: int | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    max_source_length: int = 512,
    max_target_length: int = 128,
    source_column: str = "source",
    target_column: str = "target",
    task_prefixes: Mapping[str, str] | None = None,
) -> Dataset:
    """Build one shuffled, tokenized multi-task training set.

    Each of the `num_examples` rows (default: the total number of examples) first draws a task according to
    `mixing_rates`, then an example of that task uniformly with replacement; both draws come from a
    `numpy.random.Generator` seeded with `seed`, so the same arguments give the same dataset.

    Args:
        tasks: task name -> task spec (see `load_task_data`).
        tokenizer: the model's tokenizer; the labels are the target's token ids (with EOS).
        task_names: the model's `config.task_names`; a row's `task_ids` is its task's position in it.
        mixing, temperature, max_examples_per_task: see `mixing_rates`.
        num_examples: size of the mixed dataset.
        seed: seed of the sampling.
        max_source_length, max_target_length: truncation lengths in tokens.
        source_column, target_column: text columns of the task specs.
        task_prefixes: task name -> input prefix (e.g. the model's `config.task_prefixes`), added to every source of
            that task that does not already start with it, so the model can route by prefix without `task_ids`.
        decoder_only: tokenize for a decoder-only model (`AlterForCausalLM`, `model.config.is_encoder_decoder` is
            false): `input_ids` is the prompt (source + `prompt_separator`, or the tokenizer's chat template with
            `chat_template=True`) followed by the target and EOS, and `labels` is -100 on the prompt, so the loss is
            on the answer tokens only. `max_source_length` bounds the prompt, `max_target_length` the answer + EOS.
        add_bos: decoder-only: whether the prompt starts with the tokenizer's BOS (`None`: when it has one). To train
            on the tokens that `tokenizer(prompt)` and `pipeline("text-generation")` give, pass whether the tokenizer
            adds BOS itself (`tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]`).
        answer_prefix: decoder-only: text put before every target in the answer, e.g. `" "` so that byte-level BPE
            tokenizers (GPT-2, SmolLM2, Qwen) see the answer word as it follows `"Answer:"` in running text. The
            metrics strip it (`target_text` stays the raw target).

    Returns:
        A `datasets.Dataset` with columns `input_ids`, `attention_mask`, `labels` and `task_ids`.
    """
    loaded = _load_tasks(tasks, task_names, source_column, target_column, task_prefixes)
    sizes = {name: len(dataset) for name, dataset in loaded.items()}
    rates = mixing_rates(sizes, mixing, temperature, max_examples_per_task)
    if num_examples is None:
        num_examples = sum(sizes.values())
    if not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer or None, got {num_examples!r}.")

    rng = np.random.default_rng(seed)
    task_sizes = np.array(list(sizes.values()), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(task_sizes)[:-1]])
    task_choice = rng.choice(len(task_sizes), size=num_examples, p=np.array(list(rates.values())))
    local_indices = np.empty(num_examples, dtype=np.int64)
    for task_index, size in enumerate(task_sizes):
        rows = task_choice == task_index
        local_indices[rows] = rng.integers(0, size, size=int(rows.sum()))
    indices = offsets[task_choice] + local_indices

    mixed = concatenate_datasets(list(loaded.values())).select(indices)
    return mixed.map(
        _tokenizer_for(decoder_only, tokenizer, max_source_length, max_target_length, prompt_separator, chat_template,
                       add_bos, answer_prefix),
        batched=True,
        remove_columns=["source", "target"],
        desc="Tokenizing multi-task data",
    )


def build_eval_datasets(
    tasks: Mapping[str, TaskSpec],
    tokenizer: PreTrainedTokenizerBase,
    task_names: Sequence[str],
    *,
    max_examples_per_task: int | None = None,
    max_source_length: int = 512,
    max_target_length: int = 128,
    source_column: str = "source",
    target_column: str = "target",
    task_prefixes: Mapping[str, str] | None = None,
    decoder_only: bool = False,
    prompt_separator: str = "\n",
    chat_template: bool = False,
    add_bos: bool | None = None,
    answer_prefix: str = "",
) -> dict[str, Dataset]:
    """Tokenize each task's evaluation data separately, in its original order (no mixing).

    Args:
        tasks, tokenizer, task_names, max_source_length, max_target_length, source_column, target_column,
        task_prefixes:
            as in `build_multitask_dataset`.
        decoder_only, prompt_separator, chat_template, add_bos, answer_prefix: as in `build_multitask_dataset`
            (prompt + answer; the trainer generates from the prompt, the tokens whose label is -100).
        max_examples_per_task: keep only the first this many examples of each task (None: all).

    Returns:
        Task name -> `datasets.Dataset` with columns `input_ids`, `attention_mask`, `labels`, `task_ids` and
        `target_text` (the raw target string, for generation metrics).
    """
    if max_examples_per_task is not None and max_examples_per_task <= 0:
        raise ValueError(f"max_examples_per_task must be a positive integer or None, got {max_examples_per_task!r}.")
    tokenize = _tokenizer_for(decoder_only, tokenizer, max_source_length, max_target_length, prompt_separator,
                              chat_template, add_bos, answer_prefix)
    eval_datasets = {}
    for name, dataset in _load_tasks(tasks, task_names, source_column, target_column, task_prefixes).items():
        if max_examples_per_task is not None:
            dataset = dataset.select(range(min(max_examples_per_task, len(dataset))))
        dataset = dataset.map(tokenize, batched=True, remove_columns=["source"], desc=f"Tokenizing {name}")
        eval_datasets[name] = dataset.rename_column("target", "target_text")
    return eval_datasets


@dataclass
class MultiTaskDataCollator:
    """Pad a batch of multi-task features and keep their task ids.

    Padding of `input_ids`/`attention_mask` and of `labels` (with `label_pad_token_id`), and the
    `decoder_input_ids` made from the labels when `model` is given, are done by
    `transformers.DataCollatorForSeq2Seq`. `task_ids` becomes a LongTensor of shape [batch]; string-valued
    features (such as `target_text`) are dropped, and so are keys without a value (`labels` of features that have
    none). Returns PyTorch tensors. `AlterTrainer` passes the model, as `DataCollatorForSeq2Seq(tok, model=...)` users
    do, so that the decoder inputs exist even when Trainer takes the labels out of the batch (label smoothing).
    """

    tokenizer: PreTrainedTokenizerBase
    model: Any | None = None
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    _seq2seq_collator: DataCollatorForSeq2Seq = field(init=False, repr=False)

    def __post_init__(self):
        self._seq2seq_collator = DataCollatorForSeq2Seq(
            self.tokenizer,
            model=self.model,
            padding=self.padding,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            label_pad_token_id=self.label_pad_token_id,
            return_tensors="pt",
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        has_task_ids = ["task_ids" in feature for feature in features]
        if any(has_task_ids) and not all(has_task_ids):
            missing = has_task_ids.index(False)
            raise ValueError(f"Feature {missing} of the batch has no 'task_ids' while others do.")
        model_features = [
            {key: value for key, value in feature.items() if key != "task_ids" and not isinstance(value, str)}
            for feature in features
        ]
        # `DataCollatorForSeq2Seq` returns `"labels": None` for features without labels; Seq2SeqTrainer would then
        # run a loss forward with nothing to compute it on, so keys without a value are left out.
        batch = {key: value for key, value in self._seq2seq_collator(model_features).items() if value is not None}
        if all(has_task_ids):
            batch["task_ids"] = torch.tensor([int(feature["task_ids"]) for feature in features], dtype=torch.long)
        return batch


TASK_COLUMNS = ("task_ids", "task")


class TaskIdsCollator:
    """Wraps any data collator so that each example's task reaches the model as `task_ids` (a LongTensor [batch]).

    Each feature may carry `task_ids` (an int) or `task` (a task name of `task_names`), or neither; both columns are
    taken out of the features before `collator` (e.g. TRL's `DataCollatorForLanguageModeling`, which builds the batch
    from `input_ids`/`labels` only and would drop them) pads them, and `task_ids` is added to its batch. A batch whose
    features carry no task column is the collator's batch unchanged (prefix routing: the model infers the tasks).
    [`AlterStagesMixin`] wraps a trainer's collator with it.

    Raises `ValueError` for a batch where some features carry a task and others do not, an unknown task name, an id
    out of range, or a feature whose `task_ids` and `task` disagree.
    """

    def __init__(self, collator, task_names: Sequence[str]):
        if not callable(collator):
            raise ValueError(f"collator={collator!r} is not valid: expected a callable data collator.")
        self.collator = collator
        self.task_names = list(task_names)

    def __getattr__(self, name):  # the wrapped collator's settings (e.g. TRL's `padding_free`) stay readable
        if name in ("collator", "task_names"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def _task_id(self, feature: Mapping[str, Any], index: int) -> int | None:
        task_id = feature.get("task_ids")
        name = feature.get("task")
        if name is not None:
            from_name = _task_id(name, self.task_names)
            if task_id is not None and int(task_id) != from_name:
                raise ValueError(f"Feature {index} has task_ids={task_id} but task={name!r} (id {from_name}).")
            task_id = from_name
        if task_id is None:
            return None
        task_id = int(task_id)
        if not 0 <= task_id < len(self.task_names):
            raise ValueError(f"Feature {index} has task_ids={task_id}: expected 0..{len(self.task_names) - 1} for tasks "
                             f"{self.task_names}.")
        return task_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features or not isinstance(features[0], Mapping):
            return self.collator(features)
        ids = [self._task_id(feature, i) for i, feature in enumerate(features)]
        if all(task_id is None for task_id in ids):
            return self.collator([{k: v for k, v in f.items() if k not in TASK_COLUMNS} for f in features])
        if any(task_id is None for task_id in ids):
            missing = ids.index(None)
            raise ValueError(f"Feature {missing} of the batch has no task (a 'task_ids' or 'task' column) while others "
                             "do.")
        batch = self.collator([{k: v for k, v in f.items() if k not in TASK_COLUMNS} for f in features])
        batch["task_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


_PROBE = "\u2063ALTERPROBE"


def chat_task_prefixes(tokenizer, prefixes: Mapping[str, str], system: str | None = None) -> dict[str, str]:
    """Task prefixes for chat data: for each task, the text that `tokenizer.apply_chat_template` renders before a
    conversation whose first user message starts with that task's prefix (optionally after a fixed `system` message),
    for `model.set_task_prefixes(chat_task_prefixes(tok, {"sentiment": "sentiment: "}), tok)`.

    A chat prompt starts with the template's own tokens (`<|im_start|>system ...`), not with the user's text, so the
    plain prefix would never match; the rendered start does, for training data formatted by TRL and for prompts
    rendered with `add_generation_prompt=True`, as long as every conversation of a task starts the same way (the same
    system message, or none). A leading BOS that the template writes is left out (prefix matching skips it).

    Raises `ValueError` if the tokenizer has no chat template or a prefix is not a non-empty string.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_task_prefixes needs a tokenizer with a chat template (tokenizer.chat_template is None).")
    rendered = {}
    for name, prefix in prefixes.items():
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"The prefix of task {name!r} is {prefix!r}; expected a non-empty string.")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prefix + _PROBE}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        start = text.index(_PROBE)
        head = text[:start]
        bos = getattr(tokenizer, "bos_token", None)
        if bos and head.startswith(bos):
            head = head[len(bos):]
        rendered[name] = head
    return rendered
