from collections import Counter

import pytest
from transformers import ByT5Tokenizer

from modeling_alter.data import build_eval_datasets, build_multitask_dataset
from modeling_alter.metrics import METRICS
from modeling_alter.synthetic_tasks import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SYNTHETIC_TASK_NAMES,
    TASK_KINDS,
    default_metric_for_task,
    make_synthetic_tasks,
)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_tasks(num_train_per_task=300, num_eval_per_task=50, seed=0)


def test_shapes_and_records(data):
    train, eval_ = data
    assert len(SYNTHETIC_TASK_NAMES) >= 6
    assert list(train) == list(eval_) == list(SYNTHETIC_TASK_NAMES)
    assert len(set(TASK_KINDS.values())) >= 3
    for name in SYNTHETIC_TASK_NAMES:
        assert len(train[name]) == 300 and len(eval_[name]) == 50
        for record in train[name] + eval_[name]:
            assert set(record) == {"source", "target"}
            assert isinstance(record["source"], str) and isinstance(record["target"], str)
            assert 0 < len(record["source"].encode()) <= 40 and 0 < len(record["target"].encode()) <= 40
            assert record["source"] == record["source"].strip() and ":" not in record["source"]


def test_targets_follow_the_task_rules(data):
    train, _ = data
    for record in train["sentiment"]:
        words = record["source"].split()
        positives = sum(word in POSITIVE_WORDS for word in words)
        negatives = sum(word in NEGATIVE_WORDS for word in words)
        assert positives + negatives in (1, 3)
        assert record["target"] == ("positive" if positives > negatives else "negative")
    assert 0.35 < Counter(r["target"] for r in train["sentiment"])["positive"] / 300 < 0.65
    for record in train["reverse"]:
        assert record["target"].split() == record["source"].split()[::-1]
    for record in train["copy"]:
        assert record["target"] == record["source"]
    for record in train["uppercase_first"]:
        first, *rest = record["source"].split()
        assert record["target"].split() == [first.upper(), *rest]
    for record in train["sort_digits"]:
        digits = record["source"].split()
        assert 2 <= len(digits) <= 6 and record["target"].split() == sorted(digits, key=int)
    for record in train["add"]:
        a, b = map(int, record["source"].split())
        assert record["target"] == str(a + b)
    for record in train["extract_number"]:
        numbers = [token for token in record["source"].split() if token.isdigit()]
        assert numbers and record["target"] == numbers[0]


def test_tasks_conflict_on_identical_inputs(data):
    train, eval_ = data
    for split in (train, eval_):
        sources = [[r["source"] for r in split[name]] for name in ("copy", "reverse", "uppercase_first")]
        assert sources[0] == sources[1] == sources[2]
    # The same input asks for different outputs depending on the task.
    differing = sum(c["target"] != r["target"] for c, r in zip(train["copy"], train["reverse"]))
    assert differing > 250
    # Two one-digit numbers are a valid input of both sort_digits and add.
    sort_sources = {r["source"] for r in train["sort_digits"]}
    assert sort_sources & {r["source"] for r in train["add"]}


def test_reproducible_and_seed_dependent():
    first, _ = make_synthetic_tasks(20, 5, seed=7)
    again, _ = make_synthetic_tasks(20, 5, seed=7)
    other, _ = make_synthetic_tasks(20, 5, seed=8)
    assert first == again
    assert first["reverse"] != other["reverse"]
    # A task's data does not depend on which other tasks are made, and smaller sets are prefixes of larger ones.
    alone, _ = make_synthetic_tasks(10, 5, seed=7, tasks=["add"])
    assert alone == {"add": first["add"][:10]}


def test_with_prefix():
    plain, plain_eval = make_synthetic_tasks(5, 5, seed=1)
    prefixed, prefixed_eval = make_synthetic_tasks(5, 5, seed=1, with_prefix=True)
    for name in SYNTHETIC_TASK_NAMES:
        for a, b in zip(plain[name] + plain_eval[name], prefixed[name] + prefixed_eval[name]):
            assert b == {"source": f"{name}: {a['source']}", "target": a["target"]}


def test_default_metric_for_task():
    assert default_metric_for_task["sentiment"] == "accuracy"
    assert set(default_metric_for_task) == set(SYNTHETIC_TASK_NAMES)
    for name, metric in default_metric_for_task.items():
        assert metric in METRICS
        assert (metric == "accuracy") == (TASK_KINDS[name] == "classification")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ["sentiment", "translate"]}, r"Unknown synthetic task 'translate'; known tasks: \['sentiment'"),
        ({"num_train_per_task": 0}, "num_train_per_task must be a positive integer, got 0"),
        ({"num_eval_per_task": 2.5}, "num_eval_per_task must be a positive integer, got 2.5"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_tasks(**kwargs)


def test_synthetic_tasks_through_the_data_pipeline(data):
    train, eval_ = data
    tokenizer = ByT5Tokenizer()
    task_names = list(SYNTHETIC_TASK_NAMES)
    dataset = build_multitask_dataset(train, tokenizer, task_names, mixing="uniform", num_examples=700)
    assert set(dataset["task_ids"]) == set(range(len(task_names)))
    assert max(len(ids) for ids in dataset["input_ids"]) <= 41  # <= 40 bytes + EOS
    eval_sets = build_eval_datasets(eval_, tokenizer, task_names)
    assert eval_sets["add"]["target_text"] == [r["target"] for r in eval_["add"]]
    assert eval_sets["add"]["task_ids"] == [task_names.index("add")] * 50
