"""Smoke tests of examples/train_two_stage.py: the main job (a pretrained decoder-only LM on the committed real
samples; here a tiny random Llama, and the real SmolLM2 in a short run), the synthetic job and fine-tuning a T5
checkpoint on your files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5ForConditionalGeneration
from training_utils import REPO, import_script

from causal_utils import tiny_causal_lm

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


def check_model_folder(folder, tasks, stages=("1", "2"), auto_class="AutoModelForSeq2SeqLM"):
    names = {path.name for path in folder.iterdir()}
    code = (["configuration_alter_causal.py", "modeling_alter_causal.py"] if auto_class == "AutoModelForCausalLM"
            else ["configuration_alter.py", "modeling_alter.py"])
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", *code,
                     "configuration_mta.py", "mta.py", "task_lifecycle.py", "eval_results.json", "routing_heatmap.png",
                     "routing_stats.json", "training_args.json"):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))], sorted(names)
    config = json.loads((folder / "config.json").read_text())
    assert config["stage"] == 2 and config["task_names"] == list(tasks)
    assert config["auto_map"][auto_class] in ("modeling_alter.AlterForConditionalGeneration",
                                              "modeling_alter_causal.AlterForCausalLM")
    results = json.loads((folder / "eval_results.json").read_text())
    assert set(results["stages"]) == set(stages)
    for stage in stages:
        assert set(results["stages"][stage]["tasks"]) == set(tasks)
        assert 0.0 <= results["stages"][stage]["mean_score"] <= 1.0
    assert (folder / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_job_and_t5_on_your_files(tmp_path):
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
        *TINY_RUN, "--synthetic", "--output_dir", default_dir, "--num_train_per_task", "8", "--num_eval_per_task", "3",
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

    assert "Zero-shot" not in stdout and "| majority |" not in stdout  # from scratch: nothing to score before

    stdout = finish(base_job)
    assert "| sst2 | accuracy |" in stdout and "| agnews | accuracy |" in stdout
    assert "| task | metric | majority | zero-shot | stage 1 | stage 2 |" in stdout
    assert "Reloaded AlterForConditionalGeneration" in stdout
    check_model_folder(finetuned_dir, ["sst2", "agnews"], stages=("0", "1", "2"))
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert config["d_model"] == 32 and config["feed_forward_proj"] == "gated-gelu"
    assert config["task_prefixes"] == {"sst2": "sst2: ", "agnews": "agnews: "}


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
    with pytest.raises(ValueError, match="--synthetic generates its own data"):
        example.load_data(example.parse_arguments(["--synthetic", "--train_files", "a=x.jsonl"])[1])
    # Defaults of each job, and an option that replaces a conflicting default.
    model_args, data_args, training_args = example.parse_arguments([])
    assert model_args.base_model is None and not data_args.synthetic and data_args.task_prefixes  # -> SmolLM2
    assert training_args.stage1_steps == example.MAIN_DEFAULTS["stage1_steps"] < training_args.max_steps
    assert training_args.train_sampling_strategy == "group_by_length" and training_args.bf16 == example.BF16
    assert data_args.prompt_separator == "\nAnswer:" and data_args.answer_prefix == " "
    train, evaluation, metrics = example.load_data(data_args)
    assert list(train) == list(evaluation) == ["sst2", "agnews", "trec", "emotion"]
    assert set(metrics.values()) == {"accuracy"}
    for path in [*train.values(), *evaluation.values()]:  # the committed samples
        assert Path(path).parent == REPO / "examples" / "data" and Path(path).is_file()
    _, data_args, training_args = example.parse_arguments(["--synthetic", "--use_cpu", "true"])
    assert data_args.synthetic and not data_args.task_prefixes and data_args.prompt_separator == "\n"
    assert training_args.stage1_steps == example.SYNTHETIC_DEFAULTS["stage1_steps"]
    assert training_args.max_steps == example.SYNTHETIC_DEFAULTS["max_steps"]
    assert "synthetic" in training_args.output_dir and not training_args.bf16
    _, _, training_args = example.parse_arguments(["--synthetic", "--use_cpu", "true", "--stage1_epochs", "1"])
    assert training_args.stage1_steps is None and training_args.stage1_epochs == 1
    _, _, training_args = example.parse_arguments(["--train_files", "a=x.jsonl"])
    assert training_args.num_train_epochs == example.FINETUNE_DEFAULTS["num_train_epochs"]
    assert example.parse_arguments(["--synthetic", "false"])[1].synthetic is False


def test_main_job_with_a_tiny_llama(tmp_path):
    """The main job's path (committed samples, zero-shot -> stage 1 -> stage 2 table, save, reload, pipeline with
    prefix routing) on a tiny random Llama with a byte-level tokenizer."""
    tiny_causal_lm("llama").save_pretrained(tmp_path / "tiny-llama")
    ByT5Tokenizer().save_pretrained(tmp_path / "tokenizer")  # apart: AutoTokenizer would read model_type llama
    out = tmp_path / "out"
    stdout = finish(start_example(
        "--base_model", tmp_path / "tiny-llama", "--tokenizer_name", tmp_path / "tokenizer", "--output_dir", out,
        "--max_steps", "4", "--stage1_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "32",
        "--max_eval_samples_per_task", "4", "--adapter_dim", "8", "--logging_steps", "2",
    ))
    tasks = ["sst2", "agnews", "trec", "emotion"]
    check_model_folder(out, tasks, stages=("0", "1", "2"), auto_class="AutoModelForCausalLM")
    results = json.loads((out / "eval_results.json").read_text())
    # The majority-label floor: the most frequent training label of each task, scored on its first 4 eval rows.
    for task in tasks:
        rows = [json.loads(line) for line in (REPO / "examples" / "data" / f"{task}_train.jsonl").open()]
        labels = [row["target"] for row in rows]
        majority = max(set(labels), key=labels.count)
        references = [json.loads(line)["target"] for line in (REPO / "examples" / "data" / f"{task}_eval.jsonl").open()][:4]
        assert results["majority_floor"]["tasks"][task] == pytest.approx(references.count(majority) / 4)
    # One table: majority, zero-shot, stage 1, stage 2 per task; then a summary line with the same means.
    assert "### Zero-shot (the pretrained model" in stdout
    assert "| task | metric | majority | zero-shot | stage 1 | stage 2 |" in stdout
    means = re.search(r"Mean eval score: zero-shot ([0-9.]+) -> stage 1 ([0-9.]+) -> stage 2 ([0-9.]+) "
                      r"\(majority-label floor ([0-9.]+)\)\.", stdout)
    assert means is not None, stdout[-2000:]
    expected = [results["stages"][stage]["mean_score"] for stage in ("0", "1", "2")]
    expected.append(results["majority_floor"]["mean_score"])
    assert [float(value) for value in means.groups()] == pytest.approx(expected, abs=5.01e-4)  # 3 decimals
    # Saved for prefix routing, reloaded, and answered through pipeline("text-generation") without task ids.
    config = json.loads((out / "config.json").read_text())
    assert config["task_prefixes"] == {task: f"{task}: " for task in tasks}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == "left"
    assert config["task_prefix_ids"]["sst2"] == tokenizer("sst2: ", add_special_tokens=False)["input_ids"]
    assert 'through AutoModelForCausalLM (trust_remote_code=True). One answer per task from pipeline("text-generation")' in stdout
    assert "Prompt: the input, then '\\nAnswer:'" in stdout
    answers = re.findall(r"^\| (\w+) \| \1: .* \| .* \| .* \|$", stdout, flags=re.M)
    assert answers == tasks, stdout[-3000:]
    generation = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in generation  # evaluation left the model's generation config as it was


def test_main_job_with_gated_adapters_exports_a_task_as_a_plain_llama(tmp_path):
    """`--adapter_form gated --adapter_activation silu` trains adapters that mirror the Llama MLP, so a task of the
    job's output exports (`alter-hub export-task --stage1`) as a plain LlamaForCausalLM computing it exactly."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hub_upload.__main__ import main as alter_hub

    tiny_causal_lm("llama").save_pretrained(tmp_path / "tiny-llama")
    ByT5Tokenizer().save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "out"
    finish(start_example(
        "--base_model", tmp_path / "tiny-llama", "--tokenizer_name", tmp_path / "tokenizer", "--output_dir", out,
        "--max_steps", "4", "--stage1_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "32",
        "--max_eval_samples_per_task", "2", "--adapter_dim", "8", "--eval_zero_shot", "false",
        "--adapter_form", "gated", "--adapter_activation", "silu",
    ))
    config = json.loads((out / "config.json").read_text())
    assert (config["adapter_form"], config["adapter_activation"], config["stage"]) == ("gated", "silu", 2)
    assert alter_hub(["export-task", str(out), "trec", str(tmp_path / "trec"), "--stage1"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "trec")
    assert type(plain) is LlamaForCausalLM
    assert plain.config.intermediate_size == tiny_causal_lm("llama").config.intermediate_size + 8
    alter = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    alter.set_stage(1)
    ids = AutoTokenizer.from_pretrained(out)(["trec: Who wrote Hamlet?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, alter(ids, task_ids=alter.task_ids(["trec"])).logits,
                                   rtol=0, atol=1e-5)


def test_main_job_with_the_real_smollm2_in_a_short_run(tmp_path):
    """The main job as the README runs it (no --base_model: the packaged SmolLM2-135M-Instruct, made once into
    $ALTER_CACHE from PyPI; nothing from the Hub), cut to 2 steps on 8 rows and 2 evaluation rows per task."""
    from modeling_alter.packaged_models import packaged_model_path

    folder = packaged_model_path("smollm2-135m-instruct")  # returns at once when cached
    example = load_example_module()
    out = tmp_path / "out"
    stdout = finish(start_example(
        "--output_dir", out, "--max_steps", "2", "--stage1_steps", "1", "--per_device_train_batch_size", "4",
        "--max_train_samples", "8", "--max_eval_samples_per_task", "2", "--logging_steps", "1",
    ))
    assert "from smollm2-135m-instruct" in stdout and "| task | metric | majority | zero-shot | stage 1 | stage 2 |" in stdout
    assert 'One answer per task from pipeline("text-generation")' in stdout and "Mean eval score: zero-shot" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["task_prefixes"] == {task: f"{task}: " for task in example.MAIN_TASKS}
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["bf16"] == example.BF16
    # Trained on exactly the tokens the pipeline feeds the model: SmolLM2's tokenizer adds no BOS, and the answer is
    # the word after "Answer:" with its leading space (one token for "positive").
    from modeling_alter.data import build_eval_datasets

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]
    row = {"source": "a gripping , funny film", "target": "positive"}
    encoded = build_eval_datasets({"sst2": [row]}, tokenizer, ["sst2"], decoder_only=True, task_prefixes={"sst2": "sst2: "},
                                  prompt_separator="\nAnswer:", answer_prefix=" ", add_bos=False)["sst2"][0]
    prompt = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label == -100]
    assert prompt == tokenizer("sst2: a gripping , funny film\nAnswer:")["input_ids"]
    assert encoded["input_ids"][len(prompt):] == tokenizer(" positive")["input_ids"] + [tokenizer.eos_token_id]
    assert len(tokenizer(" positive")["input_ids"]) == 1
