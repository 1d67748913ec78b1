"""Reads a training run's evaluation output into per-stage, per-task metric values for the model card.

Which files: `--results FILE` (any number) when given, otherwise every top-level `*results*.json` of the model
directory (what `Trainer.save_metrics` writes: `all_results.json`, `eval_results.json`, and per-stage files such as
`stage1_eval_results.json`), read in name order; a later file overrides an earlier one.

What is read: each file is a JSON object; nested objects are flattened by joining keys with `_` (`/` counts as `_`),
and an object `{"metric": NAME, "score": VALUE}` stands for the key `NAME` with that value. A key names a task and a
metric, `[eval_|tasks_]<task>_<metric>`, where `<task>` is one of the model's task names (the longest that matches,
so task and metric names may contain `_`). The stage is given by a `stage1`/`stage_2`/`stages_1` marker anywhere in
the key, or by such a marker in the file name; keys without one belong to the model's own stage (`config.stage`), and
a marked key wins over an unmarked one. All of these give stage 1, task `copy`, metric `exact_match`:

    {"stage1_eval_copy_exact_match": 0.9}          # Trainer-style keys (`eval_copy_exact_match` in a stage-1 file)
    {"stage1": {"copy": {"exact_match": 0.9}}}     # nested by hand
    {"stages": {"1": {"tasks": {"copy": {"metric": "exact_match", "score": 0.9}}}}}  # examples/train_two_stage.py

Ignored: keys that name no task (`eval_loss`, `epoch`, `eval_mean_score`), bookkeeping metrics (`loss`, `runtime`,
`samples_per_second`, `steps_per_second`), keys with another prefix (`train_`, `test_`), and values that are not
finite numbers.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PrepareError


IGNORED_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second", "samples", "num_samples")
STAGE_MARKER = re.compile(r"(?i)(?:^|_)stages?_?([12])(?=_|$)")
CONTAINER_PREFIXES = ("eval_", "tasks_")
OTHER_PREFIXES = ("train_", "test_", "predict_")


@dataclass
class EvalResults:
    """Metric values by stage, then task, then metric (`scores[2]["copy"]["exact_match"] == 0.93`)."""

    scores: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def __bool__(self):
        return any(self.scores.values())

    def stages(self) -> list[int]:
        return sorted(stage for stage, tasks in self.scores.items() if tasks)

    def rows(self, task_names) -> list[tuple[str, str]]:
        """(task, metric) pairs with a value in some stage, in task order then metric name."""
        pairs = {
            (task, metric) for tasks in self.scores.values() for task, metrics in tasks.items() for metric in metrics
        }
        order = {name: index for index, name in enumerate(task_names)}
        return sorted(pairs, key=lambda pair: (order.get(pair[0], len(order)), pair[1]))

    def get(self, stage, task, metric):
        return self.scores.get(stage, {}).get(task, {}).get(metric)


def find_result_files(model_dir) -> list[Path]:
    """The top-level `*results*.json` files of a training output directory, in name order."""
    return sorted(path for path in Path(model_dir).glob("*results*.json") if path.is_file())


def read_eval_results(paths, task_names, default_stage) -> EvalResults:
    """Reads `paths` (JSON files) as described in the module docstring; raises `PrepareError` on unreadable files."""
    results = EvalResults()
    tasks_longest_first = sorted(task_names, key=len, reverse=True)
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrepareError(f"results file {path} does not exist") from None
        except (OSError, ValueError) as error:
            raise PrepareError(f"results file {path} is not readable JSON: {error}") from None
        if not isinstance(data, dict):
            raise PrepareError(f"results file {path} must hold a JSON object, got {type(data).__name__}")
        file_stage = _stage_of(path.stem)
        marked, unmarked = {}, {}
        for key, value in _flatten(data):
            parsed = _parse_key(key, tasks_longest_first)
            if parsed is None or not _is_number(value):
                continue
            stage, task, metric = parsed
            target = marked if stage is not None else unmarked
            target[(stage or file_stage or default_stage, task, metric)] = float(value)
        for (stage, task, metric), value in {**unmarked, **marked}.items():
            results.scores.setdefault(stage, {}).setdefault(task, {})[metric] = value
        results.sources.append(path.name)
    return results


def _flatten(data, prefix=""):
    if isinstance(data.get("metric"), str) and "score" in data:
        yield (f"{prefix}_{data['metric']}" if prefix else data["metric"]), data["score"]
        data = {key: value for key, value in data.items() if key not in ("metric", "score")}
    for key, value in data.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value


def _stage_of(text):
    markers = {int(match.group(1)) for match in STAGE_MARKER.finditer(text.replace("-", "_"))}
    return markers.pop() if len(markers) == 1 else None


def _parse_key(key, tasks_longest_first):
    """(stage or None, task, metric) for a result key, or None when it names no task's metric."""
    key = key.replace("/", "_")
    markers = list(STAGE_MARKER.finditer(key))
    if len(markers) > 1:
        return None
    stage = None
    if markers:
        stage = int(markers[0].group(1))
        start, end = markers[0].span()
        key = (key[:start] + key[end:]).lstrip("_")
    if key.startswith(OTHER_PREFIXES):
        return None
    while key.startswith(CONTAINER_PREFIXES):
        key = key.split("_", 1)[1]
    for task in tasks_longest_first:
        if key.startswith(task + "_"):
            metric = key[len(task) + 1 :]
            if metric and metric not in IGNORED_METRICS:
                return stage, task, metric
            return None
    return None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["EvalResults", "find_result_files", "read_eval_results"]
