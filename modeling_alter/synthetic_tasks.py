"""ALTER's embedded multi-task benchmark, generated from a seed (nothing is downloaded).

All tasks read short inputs (at most 29 bytes) of lowercase words and numbers, so they share a vocabulary and
skills, and several of them conflict: `copy`, `reverse` and `uppercase_first` get *identical* inputs (the same
source strings, not just the same distribution) and want different outputs, and a pair of one-digit numbers is
a valid input of both `sort_digits` and `add`. A task-agnostic model therefore cannot solve them all; the task
identity has to come from `task_ids` (sources carry no task prefix unless `with_prefix=True`, meant for a
prefix-conditioned baseline).

| task | kind | example source | target |
|---|---|---|---|
| `sentiment` | classification | `"cat good bad sky great"` | `"positive"`: majority vote of the 1 or 3 lexicon words |
| `copy` | transformation | `"lamp dog happy"` | `"lamp dog happy"`: the input unchanged |
| `reverse` | transformation | `"lamp dog happy"` | `"happy dog lamp"`: the word order reversed |
| `uppercase_first` | transformation | `"lamp dog happy"` | `"LAMP dog happy"`: the first word uppercased |
| `sort_digits` | transformation | `"7 3 9 1"` | `"1 3 7 9"`: 2 to 6 digits sorted ascending |
| `add` | arithmetic | `"12 7"` | `"19"`: sum of two numbers in 0..19 |
| `extract_number` | extraction | `"cat 42 sun 7"` | `"42"`: the first of 1 or 2 numbers (0..99) among 3 to 5 tokens |

`sentiment` inputs hold 3 to 5 words, 1 or 3 of them from the hidden lexicon (`POSITIVE_WORDS`, `NEGATIVE_WORDS`)
and the rest neutral (`NEUTRAL_WORDS`); the word-list inputs of `copy`, `reverse` and `uppercase_first` are 2 to 4
words drawn from all of them (`VOCABULARY`).

Every target is a function of its source. Train and eval examples are drawn independently from the same
distribution, so tasks with a small input space (`add` has 400 distinct inputs) share examples between splits.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


NEUTRAL_WORDS = (
    "cat", "dog", "sun", "sky", "tree", "road", "fish", "bird", "car", "book",
    "door", "lamp", "moon", "star", "rain", "hill", "lake", "box", "cup", "hat",
)  # fmt: skip
POSITIVE_WORDS = ("good", "great", "happy", "nice", "love", "fun", "kind", "best")
NEGATIVE_WORDS = ("bad", "sad", "awful", "hate", "poor", "worst", "ugly", "dull")
VOCABULARY = NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS


def _pick(rng: np.random.Generator, words: Sequence[str], count: int) -> list[str]:
    return [words[i] for i in rng.integers(0, len(words), size=count)]


def _sample_words(rng: np.random.Generator) -> str:
    return " ".join(_pick(rng, VOCABULARY, int(rng.integers(2, 5))))


def _sample_sentiment(rng: np.random.Generator) -> str:
    length = int(rng.integers(3, 6))
    num_polar = int(rng.choice([1, 3]))
    polar = [
        _pick(rng, POSITIVE_WORDS if positive else NEGATIVE_WORDS, 1)[0]
        for positive in rng.integers(0, 2, size=num_polar)
    ]
    words = polar + _pick(rng, NEUTRAL_WORDS, length - num_polar)
    return " ".join(words[i] for i in rng.permutation(length))


def _sample_digits(rng: np.random.Generator) -> str:
    return " ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 7))))


def _sample_addends(rng: np.random.Generator) -> str:
    return " ".join(str(n) for n in rng.integers(0, 20, size=2))


def _sample_words_and_numbers(rng: np.random.Generator) -> str:
    length = int(rng.integers(3, 6))
    num_numbers = int(rng.integers(1, 3))
    tokens = _pick(rng, NEUTRAL_WORDS, length - num_numbers) + [str(n) for n in rng.integers(0, 100, num_numbers)]
    return " ".join(tokens[i] for i in rng.permutation(length))


def _sentiment(source: str) -> str:
    words = source.split()
    score = sum(word in POSITIVE_WORDS for word in words) - sum(word in NEGATIVE_WORDS for word in words)
    return "positive" if score > 0 else "negative"


def _uppercase_first(source: str) -> str:
    first, _, rest = source.partition(" ")
    return f"{first.upper()} {rest}" if rest else first.upper()


def _first_number(source: str) -> str:
    return next(token for token in source.split() if token.isdigit())


@dataclass(frozen=True)
class _Task:
    kind: str
    family: str  # tasks of the same family get identical sources
    target: Callable[[str], str]


# Input families, in a fixed order: a family's position seeds its generator.
_FAMILIES: dict[str, Callable[[np.random.Generator], str]] = {
    "words": _sample_words,
    "sentiment": _sample_sentiment,
    "digits": _sample_digits,
    "addends": _sample_addends,
    "words_and_numbers": _sample_words_and_numbers,
}

_TASKS: dict[str, _Task] = {
    "sentiment": _Task("classification", "sentiment", _sentiment),
    "copy": _Task("transformation", "words", lambda source: source),
    "reverse": _Task("transformation", "words", lambda source: " ".join(reversed(source.split()))),
    "uppercase_first": _Task("transformation", "words", _uppercase_first),
    "sort_digits": _Task("transformation", "digits", lambda source: " ".join(sorted(source.split()))),
    "add": _Task("arithmetic", "addends", lambda source: str(sum(int(n) for n in source.split()))),
    "extract_number": _Task("extraction", "words_and_numbers", _first_number),
}

SYNTHETIC_TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
"""Names of the synthetic tasks, in their canonical order."""

TASK_KINDS: dict[str, str] = {name: task.kind for name, task in _TASKS.items()}
"""Task name -> kind (`classification`, `transformation`, `arithmetic` or `extraction`)."""

default_metric_for_task: dict[str, str] = {
    name: "accuracy" if task.kind == "classification" else "exact_match" for name, task in _TASKS.items()
}
"""Task name -> name of its metric in `modeling_alter.metrics.METRICS`."""


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def make_synthetic_tasks(
    num_train_per_task: int = 1000,
    num_eval_per_task: int = 100,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    with_prefix: bool = False,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, list[dict[str, str]]]]:
    """Generate the synthetic benchmark.

    Args:
        num_train_per_task: number of training examples of each task.
        num_eval_per_task: number of evaluation examples of each task.
        seed: non-negative seed. A task's data depends only on the seed and the split (not on the other tasks
            made), and a smaller split is a prefix of a larger one.
        tasks: names of the tasks to make (default: all of `SYNTHETIC_TASK_NAMES`, in that order).
        with_prefix: prepend `"<task>: "` to every source (for a task-agnostic, prefix-conditioned baseline).

    Returns:
        `(train, eval)`: two dicts task name -> list of `{"source": str, "target": str}` records.
    """
    _check_positive_int(num_train_per_task, "num_train_per_task")
    _check_positive_int(num_eval_per_task, "num_eval_per_task")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    names = SYNTHETIC_TASK_NAMES if tasks is None else list(tasks)
    for name in names:
        if name not in _TASKS:
            raise ValueError(f"Unknown synthetic task {name!r}; known tasks: {list(SYNTHETIC_TASK_NAMES)}.")

    family_ids = {family: index for index, family in enumerate(_FAMILIES)}
    splits = []
    for split_id, size in enumerate((num_train_per_task, num_eval_per_task)):
        split = {}
        for name in names:
            task = _TASKS[name]
            rng = np.random.default_rng([int(seed), family_ids[task.family], split_id])
            sources = [_FAMILIES[task.family](rng) for _ in range(size)]
            prefix = f"{name}: " if with_prefix else ""
            split[name] = [{"source": prefix + source, "target": task.target(source)} for source in sources]
        splits.append(split)
    return splits[0], splits[1]
