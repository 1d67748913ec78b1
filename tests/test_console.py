"""What AlterTrainer prints: bars, step lines, per-task tables and one summary line; no metric dictionaries."""

import os
import subprocess
import sys
import textwrap

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers import TrainerState
from training_utils import REPO

from modeling_alter.console import AlterProgressCallback, per_task_table

SCRIPT = textwrap.dedent("""
    import sys
    from transformers import ByT5Tokenizer, set_seed
    from modeling_alter import AlterConfig, AlterForConditionalGeneration, AlterTrainer, AlterTrainingArguments
    from modeling_alter.data import build_eval_datasets, build_multitask_dataset
    from modeling_alter.synthetic_tasks import make_synthetic_tasks

    set_seed(0)
    tok = ByT5Tokenizer()
    train, evaluation = make_synthetic_tasks(16, 4, seed=0, tasks=["sentiment", "add"])
    tasks = list(train)
    model = AlterForConditionalGeneration(AlterConfig(
        task_names=tasks, vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
        adapter_dim=8, decoder_start_token_id=tok.pad_token_id))
    args = AlterTrainingArguments(
        "out", max_steps=6, stage1_steps=4, logging_steps=2, per_device_train_batch_size=8, generation_max_length=8,
        report_to="none", save_strategy="steps", save_steps=3, disable_tqdm=sys.argv[1] == "no-bars")
    trainer = AlterTrainer(model=model, args=args, processing_class=tok,
                           train_dataset=build_multitask_dataset(train, tok, tasks),
                           eval_dataset=build_eval_datasets(evaluation, tok, tasks),
                           task_metrics={"sentiment": "accuracy", "add": "exact_match"})
    trainer.train()
    print("history", any("eval_sentiment_loss" in entry for entry in trainer.state.log_history))
""")


def run_script(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, run.stderr


@pytest.mark.parametrize("mode", ["bars", "no-bars"])
def test_training_prints_lines_tables_and_one_summary_not_dicts(tmp_path, mode):
    stdout, stderr = run_script(tmp_path, mode)
    both = stdout + stderr
    assert "{'" not in both, both[-3000:]  # no metric dictionary, training or evaluation
    assert "\x1b[A" not in both, "a nested bar's cursor movements in a log file"
    assert "Writing model shards" not in both  # the checkpoints at steps 3 and 6 save without a bar of their own
    lines = stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"], steps
    assert "stage 1 · loss" in steps[0] and "stage 2 · loss" in steps[2] and "aux_loss" in steps[2]
    table = lines.index("### Stage 1 (step 4)")
    assert lines[table + 1] == "| task | metric | score | loss |"
    assert lines[table + 3].startswith("| sentiment | accuracy | ")
    assert lines[table + 4].startswith("| add | exact_match |")
    assert lines[table + 5].startswith("| **mean** | | ")
    assert sum(line.startswith("Switched to stage 2 at step 4: ") for line in lines) == 1
    assert lines.count("Stage 1 until step 4, then stage 2 until step 6.") == 1
    summary = [line for line in lines if line.startswith("Training done: ")]
    assert len(summary) == 1 and "6 steps in" in summary[0] and "mean training loss" in summary[0], summary
    assert "history" in stdout and stdout.rstrip().endswith("True")  # the metrics still reach the log history
    if mode == "bars":
        assert "6/6" in stderr  # the training bar


def test_trainer_replaces_exactly_the_default_console_callbacks(tmp_path):
    from transformers import ByT5Tokenizer

    from modeling_alter import AlterConfig, AlterForConditionalGeneration, AlterTrainer, AlterTrainingArguments

    tok = ByT5Tokenizer()
    model = AlterForConditionalGeneration(AlterConfig(task_names=["a", "b"], vocab_size=len(tok), d_model=16, d_ff=32,
                                                      d_kv=8, num_layers=1, num_heads=2, adapter_dim=4))

    class MyBar(ProgressCallback):
        pass

    def console(**kwargs):
        args = AlterTrainingArguments(str(tmp_path), report_to="none", **kwargs.pop("args", {}))
        trainer = AlterTrainer(model=model, args=args, processing_class=tok, **kwargs)
        return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, (ProgressCallback, PrinterCallback))]

    (bars,) = console()
    assert type(bars) is AlterProgressCallback and bars.bars and bars.task_metrics == {"a": "exact_match",
                                                                                      "b": "exact_match"}
    (printer,) = console(args={"disable_tqdm": True}, task_metrics={"b": "accuracy"})
    assert type(printer) is AlterProgressCallback and not printer.bars and printer.task_metrics["b"] == "accuracy"
    mine = console(args={"disable_tqdm": True}, callbacks=[MyBar()])
    assert sorted(type(cb).__name__ for cb in mine) == ["AlterProgressCallback", "MyBar"]


def test_format_of_each_kind_of_log():
    callback = AlterProgressCallback({"sentiment": "accuracy", "add_numbers": "exact_match"})
    state = TrainerState()
    state.global_step, state.max_steps = 10, 20
    line = callback.format({"loss": 2.30123, "learning_rate": 0.0019, "stage": 1, "epoch": 0.5}, state)
    assert line == "step 10/20 · stage 1 · loss 2.301 · learning_rate 0.0019 · epoch 0.5"
    text = callback.format({"eval_sentiment_loss": 0.5, "eval_sentiment_accuracy": 0.75, "eval_loss": 0.5,
                            "eval_mean_score": 0.75, "eval_runtime": 1.0}, state)
    assert "| sentiment | accuracy | 0.750 | 0.500 |" in text and "add_numbers" not in text
    assert callback.format({"train_runtime": 150.0, "train_steps_per_second": 0.133, "train_loss": 0.5},
                           state) == "Training done: 10 steps in 2 min 30 s (0.13 steps/s), mean training loss 0.5000."
    assert callback.format({"eval_loss": 0.25, "eval_runtime": 1.5, "epoch": 1.0}, state) == "eval_loss 0.25 · epoch 1"
    with pytest.raises(ValueError, match="task_metrics must be a dict"):
        AlterProgressCallback(["sentiment"])
    table = per_task_table("T", {"eval_a_loss": 1.0}, {"a": "accuracy"})
    assert table.splitlines()[3] == "| a | accuracy | – | 1.000 |"
    assert ProgressCallback in AlterProgressCallback.__mro__ and PrinterCallback not in AlterProgressCallback.__mro__
