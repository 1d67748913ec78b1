import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from modeling_alter.data import (
    MultiTaskDataCollator,
    build_eval_datasets,
    build_multitask_dataset,
    load_task_data,
    mixing_rates,
)


REAL_DATA = Path(__file__).resolve().parent / "fixtures" / "real"  # committed sample
TASK_NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


def make_rows(prefix, n):
    return [{"source": f"{prefix} source {i}", "target": f"{prefix} target {i}"} for i in range(n)]


def write_text(path, text):
    path.write_text(text)
    return path


def write_jsonl(path, rows):
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------- mixing rates


def test_mixing_rates_proportional_uniform_and_temperature():
    sizes = {"a": 100, "b": 300, "c": 600}
    assert mixing_rates(sizes, "proportional") == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert mixing_rates(sizes, "uniform") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # T = 2: rate ∝ sqrt(n).
    roots = {name: size**0.5 for name, size in sizes.items()}
    expected = {name: root / sum(roots.values()) for name, root in roots.items()}
    assert mixing_rates(sizes, "temperature", temperature=2.0) == pytest.approx(expected)


def test_mixing_rates_temperature_limits():
    sizes = {"a": 10, "b": 1000}
    assert mixing_rates(sizes, "temperature", temperature=1.0) == pytest.approx(mixing_rates(sizes, "proportional"))
    hot = mixing_rates(sizes, "temperature", temperature=1e6)
    assert hot == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-4)
    # Rates flatten monotonically as the temperature rises.
    small_task_rates = [mixing_rates(sizes, "temperature", temperature=t)["a"] for t in (1, 2, 4, 8)]
    assert small_task_rates == sorted(small_task_rates)
    assert sum(mixing_rates(sizes, "temperature", temperature=3.0).values()) == pytest.approx(1.0)


def test_mixing_rates_cap():
    sizes = {"small": 100, "large": 10_000}
    capped_equal = mixing_rates(sizes, "proportional", max_examples_per_task=100)
    assert capped_equal == pytest.approx({"small": 0.5, "large": 0.5})
    capped = mixing_rates(sizes, "proportional", max_examples_per_task=300)
    assert capped == pytest.approx({"small": 0.25, "large": 0.75})
    capped_hot = mixing_rates(sizes, "temperature", temperature=2.0, max_examples_per_task=400)
    assert capped_hot == pytest.approx({"small": 10 / 30, "large": 20 / 30})
    # The cap does not affect uniform mixing, and a cap above every size changes nothing.
    assert mixing_rates(sizes, "uniform", max_examples_per_task=1) == pytest.approx({"small": 0.5, "large": 0.5})
    assert mixing_rates(sizes, max_examples_per_task=10**6) == pytest.approx(mixing_rates(sizes))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mixing": "random"}, "'random'"),
        ({"mixing": "temperature", "temperature": 0.0}, "temperature must be > 0"),
        ({"max_examples_per_task": 0}, "max_examples_per_task"),
    ],
)
def test_mixing_rates_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixing_rates({"a": 1, "b": 2}, **kwargs)


def test_mixing_rates_bad_sizes():
    with pytest.raises(ValueError, match="'b' has size 0"):
        mixing_rates({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="at least one task"):
        mixing_rates({})


# ---------------------------------------------------------------------------------------------- loading


def test_load_task_data_from_list_dataset_jsonl_json_and_csv(tmp_path):
    rows = [{"source": "a b", "target": "7", "extra": 1}, {"source": "c", "target": "42"}]
    from_list = load_task_data(rows)
    assert from_list.column_names == ["source", "target"]
    assert from_list["target"] == ["7", "42"]

    jsonl = write_jsonl(tmp_path / "task.jsonl", rows)
    assert load_task_data(jsonl)[:] == from_list[:]
    assert load_task_data(str(jsonl))[:] == from_list[:]

    assert load_task_data(write_text(tmp_path / "task.json", json.dumps(rows)))[:] == from_list[:]
    # CSV has no types: numeric-looking targets stay text.
    as_csv = write_text(tmp_path / "task.csv", 'source,target\n"a b",7\nc,42\n')
    assert load_task_data(as_csv)[:] == from_list[:]

    dataset = Dataset.from_dict({"text": ["x", "y"], "label": ["p", "q"]})
    renamed = load_task_data(dataset, source_column="text", target_column="label")
    assert renamed[:] == {"source": ["x", "y"], "target": ["p", "q"]}


def test_load_task_data_missing_column_names_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "broken_task.jsonl", [{"source": "a", "label": "b"}])
    with pytest.raises(ValueError, match="broken_task.jsonl") as error:
        load_task_data(path, task_name="qa")
    message = str(error.value)
    assert "'target'" in message and "['label', 'source']" in message and "'qa'" in message

    with pytest.raises(ValueError, match=r"task 'nli', row 1, has no column 'target'"):
        load_task_data([{"source": "a", "target": "b"}, {"source": "c"}], task_name="nli")
    with pytest.raises(ValueError, match="no column 'question'"):
        load_task_data(Dataset.from_dict({"source": ["a"], "target": ["b"]}), source_column="question")


def test_load_task_data_empty_task(tmp_path):
    with pytest.raises(ValueError, match="task 'qa' is empty"):
        load_task_data([], task_name="qa")
    with pytest.raises(ValueError, match="empty.jsonl.*is empty"):
        load_task_data(write_text(tmp_path / "empty.jsonl", ""))
    header_only = write_text(tmp_path / "header.csv", "source,target\n")
    with pytest.raises(ValueError, match="header.csv.*is empty"):
        load_task_data(header_only)
    for name, text in (("blank.jsonl", "\n  \n"), ("array.json", "[\n ]\n")):
        with pytest.raises(ValueError, match=f"{name}.*is empty"):
            load_task_data(write_text(tmp_path / name, text))


def test_load_task_data_non_string_values(tmp_path):
    path = write_jsonl(
        tmp_path / "numbers.jsonl",
        [{"source": "1 plus 1", "target": "2"}, {"source": "2 plus 2", "target": "4"}, {"source": "x", "target": 5}],
    )
    # Mixed string/int columns: the reported row is the first bad one, not where `datasets` decoded "2" as 2.
    with pytest.raises(ValueError, match=r"numbers.jsonl.*row 2: column 'target' must hold a string, got int"):
        load_task_data(path)
    as_array = write_text(tmp_path / "numbers.json", json.dumps([{"source": 1, "target": "1"}]))
    with pytest.raises(ValueError, match=r"numbers.json', row 0: column 'source' must hold a string, got int"):
        load_task_data(as_array)
    with pytest.raises(ValueError, match=r"row 1: column 'source' must hold a string, got NoneType"):
        load_task_data([{"source": "a", "target": "b"}, {"source": None, "target": "c"}])
    with pytest.raises(ValueError, match=r"row 0: column 'target' must hold a string, got float"):
        load_task_data(Dataset.from_dict({"source": ["a"], "target": [0.5]}))


def test_load_task_data_bad_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_task_data(tmp_path / "missing.jsonl")
    parquet = tmp_path / "task.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"unsupported extension '.parquet'"):
        load_task_data(parquet)
    with pytest.raises(TypeError, match="got int"):
        load_task_data(3)
    with pytest.raises(ValueError, match="row 0: expected a dict, got str"):
        load_task_data(["a"])


# ---------------------------------------------------------------------------------------------- multi-task dataset


@pytest.fixture(scope="module")
def tasks():
    return {"alpha": make_rows("a", 10), "gamma": make_rows("g", 30)}


def test_build_multitask_dataset_columns_task_ids_and_tokens(tasks, tokenizer):
    dataset = build_multitask_dataset(tasks, tokenizer, TASK_NAMES, num_examples=200, seed=1)
    assert sorted(dataset.column_names) == ["attention_mask", "input_ids", "labels", "task_ids"]
    assert len(dataset) == 200
    # task_ids are positions in task_names ("beta", id 1, has no data), and every row matches its task's text.
    assert set(dataset["task_ids"]) == {0, 2}
    for row in dataset:
        source = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        target = tokenizer.decode(row["labels"], skip_special_tokens=True)
        prefix = {0: "a", 2: "g"}[row["task_ids"]]
        assert source.startswith(f"{prefix} source ") and target == source.replace("source", "target")
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_build_multitask_dataset_follows_mixing_rates(tasks, tokenizer):
    proportional = build_multitask_dataset(tasks, tokenizer, TASK_NAMES, num_examples=2000)
    counts = Counter(proportional["task_ids"])
    assert counts[0] / 2000 == pytest.approx(0.25, abs=0.03)
    uniform = build_multitask_dataset(tasks, tokenizer, TASK_NAMES, num_examples=2000, mixing="uniform")
    assert Counter(uniform["task_ids"])[0] / 2000 == pytest.approx(0.5, abs=0.03)
    # Sampling is with replacement: the 10 examples of "alpha" all appear, many times.
    alpha_sources = {tuple(row["input_ids"]) for row in uniform if row["task_ids"] == 0}
    assert len(alpha_sources) == 10
    # Default size: the total number of examples.
    assert len(build_multitask_dataset(tasks, tokenizer, TASK_NAMES)) == 40


def test_build_multitask_dataset_is_reproducible_from_seed(tasks, tokenizer):
    def build(seed):
        return build_multitask_dataset(tasks, tokenizer, TASK_NAMES, num_examples=50, seed=seed)

    first, again, other = build(0), build(0), build(1)
    assert first["input_ids"] == again["input_ids"] and first["task_ids"] == again["task_ids"]
    assert first["input_ids"] != other["input_ids"]


def test_build_multitask_dataset_truncates(tasks, tokenizer):
    dataset = build_multitask_dataset(
        tasks, tokenizer, TASK_NAMES, num_examples=20, max_source_length=4, max_target_length=3
    )
    assert max(len(ids) for ids in dataset["input_ids"]) == 4
    assert all(len(labels) == 3 and labels[-1] == tokenizer.eos_token_id for labels in dataset["labels"])


def test_build_multitask_dataset_errors(tasks, tokenizer):
    with pytest.raises(ValueError, match=r"Unknown task 'delta'; known tasks: \['alpha', 'beta', 'gamma'\]"):
        build_multitask_dataset({"delta": make_rows("d", 3)}, tokenizer, TASK_NAMES)
    with pytest.raises(ValueError, match="task 'beta' is empty"):
        build_multitask_dataset({"alpha": make_rows("a", 3), "beta": []}, tokenizer, TASK_NAMES)
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        build_multitask_dataset(tasks, tokenizer, TASK_NAMES, num_examples=0)
    with pytest.raises(ValueError, match="at least one task"):
        build_multitask_dataset({}, tokenizer, TASK_NAMES)


def test_build_eval_datasets(tasks, tokenizer):
    eval_sets = build_eval_datasets(tasks, tokenizer, TASK_NAMES, max_examples_per_task=5)
    assert list(eval_sets) == ["alpha", "gamma"]
    gamma = eval_sets["gamma"]
    assert sorted(gamma.column_names) == ["attention_mask", "input_ids", "labels", "target_text", "task_ids"]
    assert gamma["task_ids"] == [2] * 5
    assert gamma["target_text"] == [f"g target {i}" for i in range(5)]
    decoded = [tokenizer.decode(labels, skip_special_tokens=True) for labels in gamma["labels"]]
    assert decoded == gamma["target_text"]
    assert len(build_eval_datasets(tasks, tokenizer, TASK_NAMES)["gamma"]) == 30


# ---------------------------------------------------------------------------------------------- collator


def test_collator_pads_and_keeps_task_ids(tasks, tokenizer):
    features = list(build_eval_datasets(tasks, tokenizer, TASK_NAMES)["gamma"].select([3, 12]))
    features[0] = {**features[0], "task_ids": 1}
    lengths = [len(feature["input_ids"]) for feature in features]
    label_lengths = [len(feature["labels"]) for feature in features]
    assert lengths[0] < lengths[1]

    batch = MultiTaskDataCollator(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [1, 2]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["input_ids"][0, lengths[0] :].tolist() == [tokenizer.pad_token_id] * (lengths[1] - lengths[0])
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["labels"].shape == (2, max(label_lengths))
    assert batch["labels"][0, label_lengths[0] :].tolist() == [-100] * (label_lengths[1] - label_lengths[0])
    assert batch["labels"][1].tolist() == features[1]["labels"]


def test_collator_with_model_builds_decoder_input_ids(tasks, tokenizer):
    config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(config)
    features = list(build_eval_datasets(tasks, tokenizer, TASK_NAMES)["gamma"].select([0, 15]))
    batch = MultiTaskDataCollator(tokenizer, model=model, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape[1] % 8 == 0
    assert batch["decoder_input_ids"].shape == batch["labels"].shape
    assert batch["decoder_input_ids"][:, 0].tolist() == [0, 0]
    # Shifted right, with -100 replaced by the pad id.
    expected = batch["labels"][:, :-1].masked_fill(batch["labels"][:, :-1] == -100, tokenizer.pad_token_id)
    assert torch.equal(batch["decoder_input_ids"][:, 1:], expected)
    loss = model(**{k: v for k, v in batch.items() if k != "task_ids"}).loss
    assert torch.isfinite(loss)


def test_collator_without_task_ids_and_mixed_batches(tokenizer):
    collator = MultiTaskDataCollator(tokenizer)
    plain = [{"input_ids": [5, 6, 1], "attention_mask": [1, 1, 1], "labels": [7, 1]}]
    assert "task_ids" not in collator(plain)
    with pytest.raises(ValueError, match="Feature 1 of the batch has no 'task_ids'"):
        collator([{**plain[0], "task_ids": 0}, plain[0]])


# ---------------------------------------------------------------------------------------------- real data


def test_real_sst2_and_agnews_through_the_pipeline(tokenizer):
    sst2 = load_task_data(REAL_DATA / "sst2_train.jsonl", task_name="sst2")
    agnews = load_task_data(REAL_DATA / "agnews_train.jsonl", task_name="agnews")
    assert len(sst2) == 48 and len(agnews) == 48
    assert set(sst2["target"]) == {"positive", "negative"}
    assert set(agnews["target"]) == {"World", "Sports", "Business", "Sci/Tech"}

    task_names = ["sst2", "agnews"]
    dataset = build_multitask_dataset(
        {"sst2": sst2, "agnews": REAL_DATA / "agnews_train.jsonl"},
        tokenizer,
        task_names,
        mixing="temperature",
        temperature=2.0,
        max_examples_per_task=40,
        num_examples=400,
        max_source_length=128,
        max_target_length=16,
        seed=3,
    )
    assert len(dataset) == 400 and set(dataset["task_ids"]) == {0, 1}
    assert max(len(ids) for ids in dataset["input_ids"]) <= 128
    labels_by_task = {0: set(), 1: set()}
    for row in dataset:
        labels_by_task[row["task_ids"]].add(tokenizer.decode(row["labels"], skip_special_tokens=True))
    assert labels_by_task[0] <= {"positive", "negative"}
    assert labels_by_task[1] <= {"World", "Sports", "Business", "Sci/Tech"}

    batch = MultiTaskDataCollator(tokenizer)([dataset[i] for i in range(8)])
    assert batch["input_ids"].shape[0] == 8 and batch["task_ids"].tolist() == dataset["task_ids"][:8]
