"""Decoder-only ALTER through the same data pipeline, AlterTrainer and StageSwitchCallback as the T5 family."""

import json

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LabelSmoother
from training_utils import TRAIN_TASKS, snapshot, stage_sets, tiny_args, tokenizer

from causal_utils import tiny_causal_lm
from modeling_alter import AlterForCausalLM
from modeling_alter.data import MultiTaskDataCollator, build_eval_datasets, build_multitask_dataset
from modeling_alter.synthetic_tasks import make_synthetic_tasks
from modeling_alter.trainer import AlterTrainer, causal_prompts, longest_first, mta_module_labels, trim_causal_batch


def causal_data(num_train_per_task=16, num_eval_per_task=4):
    tok = tokenizer()
    train, evaluation = make_synthetic_tasks(num_train_per_task, num_eval_per_task, seed=0, tasks=TRAIN_TASKS)
    kwargs = dict(max_source_length=32, max_target_length=32, decoder_only=True)
    return (build_multitask_dataset(train, tok, TRAIN_TASKS, seed=0, **kwargs),
            build_eval_datasets(evaluation, tok, TRAIN_TASKS, **kwargs))


def causal_model(model_type="qwen2"):
    model = AlterForCausalLM.from_causal_lm(tiny_causal_lm(model_type), task_names=TRAIN_TASKS, adapter_dim=8,
                                            num_shared_adapters=1, task_id_drop_rate=0.0)
    return model.train()


def test_decoder_only_examples_are_prompt_plus_answer_with_loss_on_the_answer():
    tok = tokenizer()
    data = build_multitask_dataset({"copy": [{"source": "abc", "target": "xy"}]}, tok, TRAIN_TASKS, decoder_only=True,
                                   prompt_separator=" =")
    row = data[0]
    prompt = tok("abc =", add_special_tokens=False)["input_ids"]
    answer = tok("xy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == prompt + answer and row["attention_mask"] == [1] * len(prompt + answer)
    assert row["labels"] == [-100] * len(prompt) + answer and row["task_ids"] == TRAIN_TASKS.index("copy")
    truncated = build_multitask_dataset({"copy": [{"source": "abcdef", "target": "uvwxyz"}]}, tok, TRAIN_TASKS,
                                        decoder_only=True, max_source_length=3, max_target_length=4)[0]
    assert len(truncated["input_ids"]) == 7 and truncated["labels"][-1] == tok.eos_token_id
    evaluation = build_eval_datasets({"copy": [{"source": "abc", "target": "xy"}]}, tok, TRAIN_TASKS,
                                     decoder_only=True)["copy"]
    assert evaluation[0]["target_text"] == "xy" and evaluation[0]["labels"][-3:] == answer


def test_causal_prompts_left_pads_the_prompt_of_each_row():
    tok = tokenizer()
    data = build_multitask_dataset({"copy": [{"source": "abcd", "target": "x"}, {"source": "a", "target": "xyz"}]},
                                   tok, TRAIN_TASKS, decoder_only=True, prompt_separator="", mixing="uniform",
                                   num_examples=2, seed=1)
    batch = MultiTaskDataCollator(tok)([data[0], data[1]])  # right padding, as for training
    inputs, width = causal_prompts(batch, tok.pad_token_id)
    assert width == max(len(tok(s, add_special_tokens=False)["input_ids"]) for s in ("abcd", "a"))
    for i in range(2):
        n = int(inputs["attention_mask"][i].sum())
        source = tok.decode(inputs["input_ids"][i, width - n:])
        assert source in ("abcd", "a") and inputs["attention_mask"][i, :width - n].sum() == 0
    assert torch.equal(inputs["task_ids"], batch["task_ids"]) and "labels" not in inputs


def test_bos_and_answer_prefix_of_decoder_only_examples():
    from causal_utils import tiny_causal_lm  # noqa: F401  (the tokenizer below is what matters)
    from test_causal_prefix_routing import bos_tokenizer

    tok = bos_tokenizer()  # starts every input with BOS itself
    rows = {"copy": [{"source": "ab", "target": "xy"}]}
    prompt = tok("ab\nA:", add_special_tokens=False)["input_ids"]
    answer = tok(" xy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    default = build_multitask_dataset(rows, tok, TRAIN_TASKS, decoder_only=True, prompt_separator="\nA:")[0]
    assert default["input_ids"][0] == tok.bos_token_id  # None: the tokenizer's BOS when it has one (as before)
    without = build_multitask_dataset(rows, tok, TRAIN_TASKS, decoder_only=True, prompt_separator="\nA:",
                                      add_bos=False, answer_prefix=" ")[0]
    assert without["input_ids"] == prompt + answer and without["labels"] == [-100] * len(prompt) + answer
    evaluation = build_eval_datasets(rows, tok, TRAIN_TASKS, decoder_only=True, prompt_separator="\nA:",
                                     add_bos=True, answer_prefix=" ")["copy"][0]
    assert evaluation["input_ids"] == [tok.bos_token_id] + prompt + answer and evaluation["target_text"] == "xy"
    # the prompt is what the tokenizer itself gives (a pipeline's input), BOS included
    assert evaluation["input_ids"][: len(prompt) + 1] == tok("ab\nA:")["input_ids"]
    with pytest.raises(ValueError, match="add_bos=True"):
        build_multitask_dataset(rows, tokenizer(), TRAIN_TASKS, decoder_only=True, add_bos=True)  # ByT5: no BOS
    with pytest.raises(ValueError, match="add_bos='yes'"):
        build_multitask_dataset(rows, tok, TRAIN_TASKS, decoder_only=True, add_bos="yes")
    with pytest.raises(ValueError, match="decoder-only"):
        build_multitask_dataset(rows, tokenizer(), TRAIN_TASKS, answer_prefix=" ")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trimmed_head_gives_the_same_loss_and_gradients(padding_side):
    """`trim_causal_batch` keeps only the trailing positions that predict labels: same loss, same gradients."""
    tok = tokenizer()
    tok.padding_side = padding_side
    rows = {"copy": [{"source": "a" * n, "target": "xyz"[: 1 + n % 3]} for n in (3, 9, 5, 12)]}
    data = build_multitask_dataset(rows, tok, TRAIN_TASKS, decoder_only=True, mixing="uniform", num_examples=4)
    batch = MultiTaskDataCollator(tok)([data[i] for i in range(4)])
    model = causal_model("llama")
    with torch.no_grad():  # adapters that change the outputs
        for mta in model.mta_modules().values():
            mta.task_up.normal_(0, 0.3)
    trimmed = trim_causal_batch(batch)
    width = batch["input_ids"].shape[1]
    keep = trimmed["logits_to_keep"]
    first = int((batch["labels"] != -100).any(0).int().argmax())
    assert keep == width - first + 1 and trimmed["labels"].shape == (4, keep)
    if padding_side == "left":  # every answer ends at the last position: the longest answer + EOS, plus one
        assert keep == max(int((row != -100).sum()) for row in batch["labels"]) + 1
    positions = trimmed["position_ids"]
    for i in range(4):  # counted from each row's first token, as generate counts them
        n = int(batch["attention_mask"][i].sum())
        real = batch["attention_mask"][i].bool()
        assert positions[i][real].tolist() == list(range(n))
    losses, grads = [], []
    for inputs in (batch, trimmed):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model(**trimmed).logits.shape[1] == keep
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    # nothing to trim: labels from position 0, no labels, or logits_to_keep already chosen
    assert trim_causal_batch({**batch, "labels": batch["input_ids"]})["labels"] is batch["input_ids"]
    assert "logits_to_keep" not in trim_causal_batch({k: v for k, v in batch.items() if k != "labels"})
    assert trim_causal_batch({**batch, "logits_to_keep": 2})["logits_to_keep"] == 2


def test_trainer_trims_the_head_of_decoder_only_training_batches(tmp_path):
    train_set, _ = causal_data()
    model = causal_model()
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs.get("logits_to_keep"), kwargs["input_ids"].shape[1], module.training))

    model.register_forward_pre_hook(record, with_kwargs=True)
    AlterTrainer(model=model, args=tiny_args(tmp_path, max_steps=2, stage1_steps=1), train_dataset=train_set,
                 processing_class=tokenizer()).train()
    training = [(keep, width) for keep, width, is_training in seen if is_training]
    assert len(training) == 2 and all(0 < keep < width for keep, width in training), training


@pytest.mark.parametrize("model_type", ["qwen2"])  # Llama trains in the resume test
def test_two_stage_training_and_per_task_evaluation(tmp_path, model_type):
    train_set, eval_sets = causal_data()
    model = causal_model(model_type)
    stage1, stage2, frozen2 = stage_sets(model)
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path, max_steps=6, stage1_steps=3,
                                                       generation_max_length=8),
                           train_dataset=train_set, eval_dataset=eval_sets, processing_class=tokenizer())
    before = snapshot(model)
    switch = {}

    class AtSwitch(TrainerCallback):  # the parameters at the end of stage 1
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                switch.update(snapshot(model))

    trainer.add_callback(AtSwitch())
    trainer.train()
    after = snapshot(model)
    assert model.config.stage == 2 and trainer.stage_callback.switch_step == 3
    # stage 1 moved the backbone and the task adapters; stage 2 only its own set
    assert not torch.equal(switch["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(switch["model.layers.1.mta.ffn.task_up"], before["model.layers.1.mta.ffn.task_up"])
    assert all(torch.equal(after[n], switch[n]) for n in frozen2)
    assert any(not torch.equal(after[n], switch[n]) for n in stage2)

    metrics = trainer.evaluate(max_new_tokens=6)
    for task in TRAIN_TASKS:
        assert f"eval_{task}_loss" in metrics and f"eval_{task}_exact_match" in metrics
    assert "eval_mean_score" in metrics
    assert mta_module_labels(model) == ["dec0.ffn", "dec1.ffn"]
    assert trainer.routing_stats.mean_weights().shape[1:] == (2, len(TRAIN_TASKS) + 1)


def test_evaluation_generates_from_the_prompt_only(tmp_path):
    train_set, eval_sets = causal_data()
    model = causal_model().eval()
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path), train_dataset=train_set, eval_dataset=eval_sets,
                           processing_class=tokenizer())
    tok = tokenizer()
    dataset = eval_sets["copy"].remove_columns("target_text")
    batch = MultiTaskDataCollator(tok)([dataset[i] for i in range(3)])
    loss, generated, labels = trainer.prediction_step(model, batch, prediction_loss_only=False, max_new_tokens=5,
                                                      min_new_tokens=5)
    assert loss is not None and torch.equal(labels, batch["labels"])
    assert generated.shape == (3, 5)
    for i in range(3):  # each row: what generate gives for that row's prompt alone, without the prompt
        keep = batch["labels"][i] == -100
        keep &= batch["attention_mask"][i].bool()
        prompt = batch["input_ids"][i][keep][None]
        alone = model.generate(input_ids=prompt, task_ids=batch["task_ids"][i:i + 1], max_new_tokens=5,
                               min_new_tokens=5)
        assert torch.equal(generated[i], alone[0, prompt.shape[1]:])


def test_evaluation_loss_runs_the_head_only_where_labels_are_with_the_same_loss(tmp_path):
    train_set, eval_sets = causal_data()
    model = causal_model().eval()
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path), train_dataset=train_set, eval_dataset=eval_sets,
                           processing_class=tokenizer())
    batch = MultiTaskDataCollator(tokenizer())([eval_sets["reverse"][i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if k != "target_text"}
    kept = []
    model.register_forward_pre_hook(lambda module, args, kwargs: kept.append(kwargs.get("logits_to_keep")),
                                    with_kwargs=True)
    loss, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    with torch.no_grad():
        full = model(**batch).loss
    width = batch["input_ids"].shape[1]
    assert kept and 0 < kept[0] < width, (kept, width)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    trainer.args.predict_with_generate = False  # the logits are returned: the whole head runs
    kept.clear()
    loss, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    assert kept[0] in (None, 0) and logits.shape[1] == width
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    smoothing = LabelSmoother(epsilon=0.1)  # with label smoothing, the trimmed logits against the trimmed labels
    trainer.label_smoother, trainer.args.predict_with_generate = smoothing, True
    loss, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    with torch.no_grad():
        smoothed = smoothing(model(**batch), batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss, smoothed, rtol=1e-5, atol=1e-6)


def test_longest_first_orders_rows_by_decreasing_length_and_keeps_ties_in_order():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2], [4, 5, 6], [7]], "target_text": list("abcde")})
    ordered = longest_first(rows)
    assert ordered["target_text"] == ["b", "d", "c", "a", "e"]
    already = rows.select([1, 3, 2, 0, 4])
    assert longest_first(already) is already
    plain = [{"input_ids": [1]}]
    assert longest_first(plain) is plain and longest_first(rows.remove_columns("input_ids")).num_rows == 5


def test_evaluation_runs_rows_longest_first_and_scores_each_generation_against_its_own_reference(tmp_path,
                                                                                              monkeypatch):
    import modeling_alter.trainer as trainer_module

    tok = tokenizer()
    rows = [{"source": "a" * n, "target": f"t{n}"} for n in (2, 9, 4, 12, 6, 3)]
    eval_sets = build_eval_datasets({"copy": rows}, tok, TRAIN_TASKS, decoder_only=True)
    model = causal_model().eval()
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path, per_device_eval_batch_size=2),
                           eval_dataset=eval_sets, processing_class=tok)
    widths, scored = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1])
                                    if kwargs.get("labels") is not None else None, with_kwargs=True)
    real_metric = trainer_module.compute_metric
    monkeypatch.setattr(trainer_module, "compute_metric",
                        lambda metric, predictions, references: scored.append((predictions, references))
                        or real_metric(metric, predictions, references))
    trainer.evaluate(max_new_tokens=3, min_new_tokens=3)
    assert widths == sorted(widths, reverse=True) and len(widths) == 3
    predictions, references = scored[0]
    assert sorted(references) == sorted(row["target"] for row in rows) and references[0] == "t12"
    by_target = {row["target_text"]: row for row in eval_sets["copy"]}
    for prediction, reference in zip(predictions, references):  # each generation is its own row's
        row = by_target[reference]
        prompt = torch.tensor([[t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]])
        alone = model.generate(input_ids=prompt, task_ids=torch.tensor([row["task_ids"]]), max_new_tokens=3,
                               min_new_tokens=3)
        assert prediction == tok.decode(alone[0, prompt.shape[1]:], skip_special_tokens=True)


def test_example_script_trains_a_causal_base_model(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from training_utils import REPO

    base = tmp_path / "tiny-qwen2"
    tiny_causal_lm("qwen2").save_pretrained(base)
    tokenizer().save_pretrained(tmp_path / "tokenizer")  # apart: AutoTokenizer would read model_type qwen2 in base
    real = REPO / "tests" / "fixtures" / "real"  # the committed sample of the real data (see its README)
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "examples" / "train_two_stage.py"), "--base_model", str(base), "--output_dir", str(out),
        "--tokenizer_name", str(tmp_path / "tokenizer"),
        "--train_files", f"sst2={real / 'sst2_train.jsonl'}", f"agnews={real / 'agnews_train.jsonl'}",
        "--eval_files", f"sst2={real / 'sst2_eval.jsonl'}", f"agnews={real / 'agnews_eval.jsonl'}",
        "--task_metrics", "sst2=accuracy", "agnews=accuracy", "--max_train_samples", "32",
        "--max_eval_samples_per_task", "3", "--max_source_length", "48", "--max_target_length", "8",
        "--max_steps", "4", "--stage1_steps", "2", "--per_device_train_batch_size", "8", "--logging_steps", "2",
        "--adapter_dim", "8", "--generation_max_length", "8", "--use_cpu", "true",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    assert "Reloaded AlterForCausalLM" in process.stdout and "| sst2 | accuracy |" in process.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "alter_causal" and config["backbone_model_type"] == "qwen2"
    assert config["stage"] == 2 and config["task_names"] == ["sst2", "agnews"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_alter_causal.AlterForCausalLM"
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["stages"]) == {"0", "1", "2"}  # zero-shot, stage 1, stage 2


def test_quality_benchmark_runs_with_causal_backbones(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from training_utils import REPO

    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--backbone", "causal",
               "--output_dir", str(tmp_path), "--tasks", "copy", "sentiment", "--num_train_per_task", "20",
               "--num_eval_per_task", "4", "--max_steps", "3", "--batch_size", "4", "--eval_batch_size", "8",
               "--d_model", "16", "--d_ff", "32", "--d_kv", "4", "--num_layers", "1", "--num_heads", "2",
               "--adapter_dim", "2", "--seeds", "0", "--methods", "multitask_t5", "alter_two_stage"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["arguments"]["backbone"] == "causal"
    assert {"multitask_t5", "alter_two_stage"} <= set(record["methods"])
    for entry in record["methods"].values():
        assert set(entry["per_seed"]["0"]["scores"]) == {"copy", "sentiment"}
    assert "decoder-only Llama" in (tmp_path / "results.md").read_text()


def test_resume_in_stage1_and_in_stage2_matches_the_uninterrupted_run(tmp_path):
    train_set, _ = causal_data()

    def trainer_for(output_dir):
        model = AlterForCausalLM.from_causal_lm(tiny_causal_lm("llama"), task_names=TRAIN_TASKS, adapter_dim=8,
                                                num_shared_adapters=1, task_id_drop_rate=0.3)
        args = tiny_args(output_dir, max_steps=6, stage1_steps=3, save_strategy="steps", save_steps=1,
                         stage2_warmup_steps=1)
        return AlterTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer())

    reference = trainer_for(tmp_path / "reference")
    reference.train()
    expected = snapshot(reference.alter_model)
    for step, stage in ((2, 1), (4, 2)):
        checkpoint = tmp_path / "reference" / f"checkpoint-{step}"
        assert json.loads((checkpoint / "config.json").read_text())["stage"] == stage
        resumed = trainer_for(tmp_path / f"resumed{step}")
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.alter_model.config.stage == 2 and resumed.stage_callback.switch_step == 3
        actual = snapshot(resumed.alter_model)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[n], actual[n]) for n in expected), [n for n in expected
                                                                            if not torch.equal(expected[n], actual[n])]


def test_two_processes_match_one_process_for_a_causal_model(tmp_path):
    import sys

    from test_distributed import COMMON, finish, free_port, scores, start
    from training_utils import load_weights, run_job

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    process = start(tmp_path / "torchrun", torchrun, "--causal", "true")
    # One process, two accumulated micro-batches of 4: the same global batch of 8 as 2 processes x 4.
    single_run = run_job(tmp_path / "single", *COMMON, "--gradient_accumulation_steps", "2", "--causal", "true")
    assert single_run.returncode == 0, single_run.stdout[-2000:] + single_run.stderr[-4000:]
    finish(process)

    single = load_weights(tmp_path / "single" / "final_rank0.safetensors")
    single_result = json.loads((tmp_path / "single" / "job_result.json").read_text())
    result = json.loads((tmp_path / "torchrun" / "job_result.json").read_text())
    assert result["world_size"] == 2 and result["switch_step"] == 4 and result["global_step"] == 8
    for key in ("stage1_metrics", "final_metrics"):  # distributed per-task evaluation: same generations and scores
        assert scores(result[key]) == scores(single_result[key]) and len(scores(result[key])) == 4
    tasks = result["routing"]["tasks"]
    assert {task: stats["num_examples"] for task, stats in tasks.items()} == {"sentiment": 5, "copy": 5, "reverse": 5}
    ranks = [load_weights(tmp_path / "torchrun" / f"final_rank{rank}.safetensors") for rank in (0, 1)]
    switch = load_weights(tmp_path / "torchrun" / "switch_rank0.safetensors")
    stage2 = causal_model().trainable_parameter_names(2)
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ in {name}"
        torch.testing.assert_close(ranks[0][name], single[name], rtol=0, atol=1e-5)
        if name not in stage2:  # frozen in stage 2: bit-identical to the end of stage 1
            assert torch.equal(ranks[0][name], switch[name]), name
    assert all(not torch.equal(ranks[0][name], switch[name]) for name in stage2), "stage 2 did not train"


def test_chat_template_prompts_and_unsupported_label_smoothing(tmp_path):
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = build_multitask_dataset({"copy": [{"source": "abc", "target": "xy"}]}, tok, TRAIN_TASKS, decoder_only=True,
                                  chat_template=True)[0]
    prompt = tok("<user>abc<assistant>", add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:len(prompt)] == prompt and row["labels"][:len(prompt)] == [-100] * len(prompt)
    assert tok.decode(row["labels"][len(prompt):], skip_special_tokens=True) == "xy"
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        AlterTrainer(model=causal_model(), args=tiny_args(tmp_path, label_smoothing_factor=0.1),
                     processing_class=tok)
