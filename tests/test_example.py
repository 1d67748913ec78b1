"""Smoke tests of examples/train_two_stage.py: the embedded default job and fine-tuning a T5 checkpoint on real data."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration
from training_utils import REPO, import_script

from modeling_alter.synthetic_tasks import SYNTHETIC_TASK_NAMES

EXAMPLE = REPO / "examples" / "train_two_stage.py"
REAL_DATA = REPO / "tests" / "fixtures" / "real"  # committed sample
TINY_RUN = [
    "--max_steps", "6", "--stage1_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "3",
    "--adapter_dim", "8", "--generation_max_length", "16", "--use_cpu", "true",
]


def start_example(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(EXAMPLE), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout


def check_model_folder(folder, tasks):
    names = {path.name for path in folder.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                     "configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py", "task_lifecycle.py",
                     "eval_results.json", "routing_heatmap.png",
                     "routing_stats.json", "training_args.json"):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))], sorted(names)
    config = json.loads((folder / "config.json").read_text())
    assert config["stage"] == 2 and config["task_names"] == list(tasks)
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_alter.AlterForConditionalGeneration"
    results = json.loads((folder / "eval_results.json").read_text())
    assert set(results["stages"]) == {"1", "2"}
    for stage in ("1", "2"):
        assert set(results["stages"][stage]["tasks"]) == set(tasks)
        assert 0.0 <= results["stages"][stage]["mean_score"] <= 1.0
    assert (folder / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_default_job_and_base_model_job(tmp_path):
    # A tiny random T5 with a byte-level tokenizer, saved like a downloaded checkpoint.
    base = tmp_path / "tiny-t5"
    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    t5.save_pretrained(base)
    tokenizer.save_pretrained(base)

    default_dir, finetuned_dir = tmp_path / "synthetic", tmp_path / "finetuned"
    default_job = start_example(
        *TINY_RUN, "--output_dir", default_dir, "--num_train_per_task", "8", "--num_eval_per_task", "3",
        "--d_model", "32", "--d_ff", "64", "--d_kv", "8", "--num_layers", "1",
    )
    base_job = start_example(
        *TINY_RUN, "--output_dir", finetuned_dir, "--base_model", base,
        "--train_files", f"sst2={REAL_DATA / 'sst2_train.jsonl'}", f"agnews={REAL_DATA / 'agnews_train.jsonl'}",
        "--eval_files", f"sst2={REAL_DATA / 'sst2_eval.jsonl'}", f"agnews={REAL_DATA / 'agnews_eval.jsonl'}",
        "--task_metrics", "sst2=accuracy", "agnews=accuracy", "--max_train_samples", "64",
        "--max_eval_samples_per_task", "4", "--max_source_length", "64", "--max_target_length", "8",
    )

    stdout = finish(default_job)
    assert "### Stage 1 (step 3" in stdout and "### Stage 2 (step 6" in stdout
    assert "### Per-task scores after each stage" in stdout
    for task in SYNTHETIC_TASK_NAMES:
        # The stage-1 table (at the switch), the stage-2 table, the comparison, one generation after reloading.
        assert stdout.count(f"| {task} |") == 4
    assert "Reloaded AlterForConditionalGeneration from" in stdout and "through AutoModelForSeq2SeqLM" in stdout
    assert "Wall time" in stdout
    # The summary line says what stage 2 changed, with the numbers of eval_results.json.
    changed = re.search(r"Stage 2 changed the mean eval score from ([0-9.]+) to ([0-9.]+) \(([-+][0-9.]+); "
                        r"(\d+) task\(s\) up, (\d+) down, (\d+) unchanged\)", stdout)
    assert changed is not None, stdout[-2000:]
    stages = json.loads((default_dir / "eval_results.json").read_text())["stages"]
    assert float(changed[1]) == pytest.approx(stages["1"]["mean_score"], abs=5e-4)
    assert float(changed[2]) == pytest.approx(stages["2"]["mean_score"], abs=5e-4)
    assert sum(int(changed[i]) for i in (4, 5, 6)) == len(SYNTHETIC_TASK_NAMES)
    check_model_folder(default_dir, SYNTHETIC_TASK_NAMES)

    stdout = finish(base_job)
    assert "| sst2 | accuracy |" in stdout and "| agnews | accuracy |" in stdout
    assert "Reloaded AlterForConditionalGeneration" in stdout
    check_model_folder(finetuned_dir, ["sst2", "agnews"])
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert config["d_model"] == 32 and config["feed_forward_proj"] == "gated-gelu"


def load_example_module():
    return import_script(EXAMPLE, "train_two_stage")


def test_example_argument_errors(tmp_path):
    example = load_example_module()
    with pytest.raises(ValueError, match="'sst2'"):
        example.parse_task_pairs(["sst2"], "--train_files")
    with pytest.raises(ValueError, match="twice"):
        example.parse_task_pairs(["a=x.jsonl", "a=y.jsonl"], "--train_files")
    model_args, data_args, training_args = example.parse_arguments(
        ["--output_dir", str(tmp_path), "--train_files", "a=missing.jsonl", "--use_cpu", "true"]
    )
    with pytest.raises(ValueError, match="missing.jsonl"):
        example.load_data(data_args)
    _, data_args, _ = example.parse_arguments(
        ["--output_dir", str(tmp_path), "--train_files", f"a={REAL_DATA / 'sst2_eval.jsonl'}", "--eval_files",
         f"b={REAL_DATA / 'sst2_eval.jsonl'}", "--use_cpu", "true"]
    )
    with pytest.raises(ValueError, match=r"\['b'\]"):
        example.load_data(data_args)
    # Defaults of the embedded job, and an option that replaces a conflicting default.
    _, _, training_args = example.parse_arguments(["--use_cpu", "true"])
    assert training_args.stage1_steps == example.SYNTHETIC_DEFAULTS["stage1_steps"]
    assert training_args.max_steps == example.SYNTHETIC_DEFAULTS["max_steps"]
    _, _, training_args = example.parse_arguments(["--use_cpu", "true", "--stage1_epochs", "1"])
    assert training_args.stage1_steps is None and training_args.stage1_epochs == 1
