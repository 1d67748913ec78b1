"""The quality benchmark (`benchmarks/quality.py`) end to end on a tiny configuration, and its data options."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_utils import import_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"
TINY_RUN = [
    "--tasks", "copy", "sentiment", "add",
    "--num_train_per_task", "40", "--num_eval_per_task", "6",
    "--max_steps", "5", "--batch_size", "4", "--eval_batch_size", "8",
    "--d_model", "16", "--d_ff", "32", "--d_kv", "4", "--num_layers", "1", "--num_heads", "2",
    "--adapter_dim", "2", "--seeds", "0", "1", "2",
]


def _load_benchmark():
    return import_script(SCRIPT, "quality_benchmark")


@pytest.fixture(scope="module")
def quality():
    return _load_benchmark()


def test_tiny_benchmark_end_to_end(tmp_path, quality):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), *TINY_RUN],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    record = json.loads((tmp_path / "results.json").read_text())
    assert set(quality.METHODS) <= set(record["methods"])
    tasks = record["task_names"]
    assert tasks == ["copy", "sentiment", "add"]
    for method, entry in record["methods"].items():
        assert set(entry["per_seed"]) == {"0", "1", "2"}, method
        for run_result in entry["per_seed"].values():
            assert set(run_result["scores"]) == set(tasks), method
            assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in run_result["scores"].values()), method
            assert run_result["train_examples"] > 0 and all(v > 0 for v in run_result["trainable_parameters"].values())
        assert math.isfinite(entry["overall_mean"]) and math.isfinite(entry["overall_std"]), method
        assert math.isfinite(entry["delta_vs_reference_mean"]), method

    # Same budget (steps x batch) for methods 1-6; 7's stage 2 sees a tenth of 5's (at least one step).
    examples = {m: record["methods"][m]["per_seed"]["0"]["train_examples"] for m in quality.METHODS}
    assert examples["single_task"] == examples["multitask_t5"] == examples["alter_two_stage"] == 5 * 4
    assert examples["alter_stage2_10pct"] == (4 + 1) * 4
    # The shared adapter of method 3 matches ALTER's extra parameters to within one adapter rank.
    alter_extra = record["methods"]["alter_two_stage"]["per_seed"]["0"]["extra_parameters"]
    shared_extra = record["methods"]["shared_adapter"]["per_seed"]["0"]["extra_parameters"]
    assert abs(shared_extra - alter_extra) <= 2 * 16 * 4  # 2 * d_model per rank, 4 MTA modules

    for label in quality.METHODS.values():
        assert label in run.stdout
    assert "| method | copy | sentiment | add | **overall** |" in run.stdout
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_user_tasks_from_folder_and_files(quality):
    # Relative paths, as a user in the repository root would type them.
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        args = quality.parse_arguments(["--tasks_dir", "tests/fixtures/real", "--max_train_per_task", "5",
                                        "--max_eval_per_task", "3", "--task_metrics", "sst2=accuracy"])
        train, evaluation, metrics = quality.load_benchmark_tasks(args)
        assert list(train) == ["agnews", "sst2"]
        assert [len(train[t]) for t in train] == [5, 5] and [len(evaluation[t]) for t in evaluation] == [3, 3]
        assert metrics == {"agnews": "exact_match", "sst2": "accuracy"}
        assert set(evaluation["agnews"][0]) == {"source", "target"}

        files = quality.parse_arguments([
            "--train_files", "sst2=tests/fixtures/real/sst2_train.jsonl",
            "--eval_files", "sst2=tests/fixtures/real/sst2_eval.jsonl", "--max_train_per_task", "4",
        ])
        train, evaluation, _ = quality.load_benchmark_tasks(files)
        assert list(train) == ["sst2"] and len(train["sst2"]) == 4 and len(evaluation["sst2"]) == 24
        assert quality.with_prefix(train)["sst2"][0]["source"].startswith("sst2: ")

        with pytest.raises(ValueError, match="need both training and evaluation"):
            quality.load_benchmark_tasks(quality.parse_arguments([
                "--train_files", "sst2=tests/fixtures/real/sst2_train.jsonl",
                "--eval_files", "agnews=tests/fixtures/real/agnews_eval.jsonl",
            ]))
    finally:
        os.chdir(cwd)


def test_quick_preset_keeps_explicit_flags(quality):
    args = quality.parse_arguments(["--quick", "--max_steps", "7"])
    assert args.max_steps == 7
    assert args.d_model == quality.QUICK_PRESET["d_model"]
    with pytest.raises(ValueError, match="Unknown method"):
        quality.parse_arguments(["--methods", "multitask_t5", "lora"])


def test_missing_data_folder_is_one_clear_error_line(tmp_path):
    """The full real sets live outside the repository: without them the benchmark names the missing folder in one
    `error:` line (exit code 2), not a traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing = tmp_path / "no-such-folder" / "real"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "out"), "--tasks_dir", str(missing)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert "Traceback" not in run.stderr
    assert lines[-1].startswith("quality.py: error: --tasks_dir") and str(missing) in lines[-1]
