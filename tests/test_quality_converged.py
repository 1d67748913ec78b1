"""The converged quality benchmark (`benchmarks/quality_converged.py`): early stopping on dev, and a tiny end-to-end
run of the synthetic configuration."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration, TrainerControl, TrainerState
from training_utils import import_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality_converged.py"


@pytest.fixture(scope="module")
def converged():
    return import_script(SCRIPT, "quality_converged")


def _tiny_t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2))


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience(converged):
    scores = iter([0.1, 0.3, 0.3005, 0.2, 0.25, 0.9])
    stopper = converged.DevEarlyStopping(lambda model: next(scores), every=2, patience=3, min_delta=0.001,
                                         batch_size=4, examples_offset=100)
    model, state, control = _tiny_t5(), TrainerState(max_steps=100), TrainerControl()
    weights = {}
    for step in range(1, 13):
        with torch.no_grad():
            model.lm_head.weight.fill_(step)
        state.global_step = step
        stopper.on_step_end(None, state, control, model=model)
        weights[step] = model.lm_head.weight.clone()
        if control.should_training_stop:
            break
    # evaluations at steps 2, 4, 6, 8, 10: 0.3 at step 4 is the best (0.3005 is within min_delta); the third miss
    # (step 10) stops training, so 0.9 is never seen.
    assert step == 10 and control.should_training_stop
    assert stopper.best_step == 4 and stopper.best_score == 0.3
    assert stopper.curve == [(108, 0.1), (116, 0.3), (124, 0.3005), (132, 0.2), (140, 0.25)]
    stopper.restore_best(model)
    torch.testing.assert_close(model.lm_head.weight, weights[4])
    with pytest.raises(ValueError, match="patience=0"):
        converged.DevEarlyStopping(lambda model: 0.0, every=1, patience=0, min_delta=0.0, batch_size=1)


def test_tiny_synthetic_run_end_to_end(tmp_path, converged):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [
        sys.executable, str(SCRIPT), "--config", "synthetic", "--output_dir", str(tmp_path),
        "--tasks", "sentiment", "add", "--num_train_per_task", "24", "--num_dev_per_task", "6",
        "--num_eval_per_task", "6", "--max_steps", "6", "--eval_every", "2", "--patience", "1", "--batch_size", "4",
        "--warmup_steps", "1", "--d_model", "16", "--d_ff", "32", "--d_kv", "4", "--num_layers", "1",
        "--num_heads", "2", "--adapter_dim", "4", "--seeds", "0", "1", "--workers", "1", "--stage2_budget", "0.5",
        "--methods", *converged.METHODS,
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["task_names"] == ["sentiment", "add"]
    assert set(record["summary"]) == set(converged.METHODS)
    for method, entry in record["summary"].items():
        assert all(math.isfinite(v) for v in entry["overall"]), method
    # The majority-label floor: each task's most frequent training target, scored on the eval rows.
    arguments = converged.parse_arguments(command[command.index("--config"):])
    train, _, evaluation, _ = converged.load_tasks(arguments)
    for seed in ("0", "1"):
        floor = record["per_seed"][seed].pop("majority_label")
        guess = Counter(row["target"] for row in train["sentiment"]).most_common(1)[0][0]
        expected = sum(row["target"] == guess for row in evaluation["sentiment"]) / len(evaluation["sentiment"])
        assert floor["scores"]["sentiment"]["accuracy"] == pytest.approx(expected)
        assert floor["steps_trained"] == 0 and floor["trainable_parameters"] == {}
    assert "| Majority label" in (tmp_path / "results.md").read_text()
    for seed in ("0", "1"):
        results = record["per_seed"][seed]
        for method, result in results.items():
            assert 0 < result["best_step"] <= result["steps_trained"], method
            assert set(result["scores"]) == {"sentiment", "add"}
            assert all(0.0 <= s <= 1.0 for scores in result["scores"].values() for s in scores.values())
        two_stage = results["alter_two_stage"]
        # stage 2 starts from stage 1's selected weights, at most stage2_budget of its steps
        assert two_stage["steps_trained"] <= max(2, math.floor(0.5 * two_stage["stage1_steps_trained"]))
        assert two_stage["stage1_best_step"] == results["alter_stage1"]["best_step"]
        assert two_stage["trainable_parameters"]["stage 2"] < two_stage["trainable_parameters"]["stage 1"]
        assert results["alter_no_task_ids"]["best_step"] == two_stage["best_step"]
        # without task ids, the sources' "<task>: " prefixes route every example exactly as its task id does
        assert results["alter_no_task_ids"]["scores"] == two_stage["scores"]
    gain = record["summary"]["alter_two_stage"]["stage2_gain"]
    assert gain["seeds"] == 2 and len(gain["deltas"]) == 2
    assert "Stage 2 over the very stage-1 weights" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every seed's results were kept as its methods finished; --resume trains nothing that is there and reports the
    # same numbers.
    record = json.loads((tmp_path / "results.json").read_text())
    for seed in ("0", "1"):
        kept = json.loads((tmp_path / "runs" / f"seed{seed}" / "results.json").read_text())
        assert kept == record["per_seed"][seed]
    rerun = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert " step 2: dev " not in rerun.stdout  # no early-stopping evaluation: nothing trained
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["per_seed"] == record["per_seed"]
    assert resumed["command"] == record["command"] and resumed["total_seconds"] > record["total_seconds"]
    assert resumed["resumed_with"] == [record["command"] + " --resume"]


def test_real_configuration_names_a_missing_data_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "real", "--data_dir", str(tmp_path / "nowhere"),
         "--backbone", str(tmp_path / "no-backbone"), "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode != 0
    assert "nowhere" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written or loaded
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "real", "--data_dir", str(tmp_path),
         "--backbone", str(tmp_path / "no-backbone"), "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode != 0
    assert "no-backbone" in run.stderr and "Traceback" not in run.stderr
