"""What a user sees: the log order at the switch, no pin_memory warning on CPU, the routing heatmap's labels, and the
example script's command line (one `error:` line and exit status 2 for every user mistake, a short `--help`)."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
from transformers import TrainerCallback
from training_utils import REPO, tiny_args, tiny_data, tiny_model, tokenizer, import_script

from modeling_alter.routing_report import readable_module_names
from modeling_alter.trainer import AlterTrainer, RoutingStatistics

EXAMPLE = REPO / "examples" / "train_two_stage.py"
FIXTURES = REPO / "tests" / "fixtures" / "real"


class Recorder(TrainerCallback, logging.Handler):
    """Records the training log lines and the switch message in the order a user sees them."""

    def __init__(self):
        TrainerCallback.__init__(self)
        logging.Handler.__init__(self)
        self.events = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.events.append(("loss", state.global_step, logs.get("stage")))

    def emit(self, record):
        if "switched to stage 2" in record.getMessage():
            self.events.append(("switch", None, None))


def test_switch_line_follows_the_last_stage1_loss_and_no_pin_memory_warning(tmp_path):
    train_set, _ = tiny_data()
    recorder = Recorder()
    callback_logger = logging.getLogger("modeling_alter.callback")
    callback_logger.addHandler(recorder)
    callback_logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = AlterTrainer(model=tiny_model(), args=tiny_args(tmp_path, max_steps=4, stage1_steps=2),
                                   train_dataset=train_set, processing_class=tokenizer(), callbacks=[recorder])
            trainer.train()
    finally:
        callback_logger.removeHandler(recorder)
    assert recorder.events == [("loss", 1, 1), ("loss", 2, 1), ("switch", None, None), ("loss", 3, 2),
                               ("loss", 4, 2)], recorder.events
    assert not [w for w in caught if "pin_memory" in str(w.message)], [str(w.message) for w in caught]


def test_heatmap_says_what_its_numbers_are():
    import matplotlib.pyplot as plt
    import torch

    stats = RoutingStatistics(["a", "b"], ["enc0.ffn", "dec0.ffn"], ["a", "b", "shared_0"])
    weights = torch.tensor([[[1.0, 0.0, 0.3]] * 2, [[0.0, 1.0, 0.1]] * 2])  # rows sum to more than 1
    stats.update(torch.tensor([0, 1]), weights, torch.zeros(2, 2))
    figure = stats.figure("routing")
    try:
        panels = {axis.get_title(): axis for axis in figure.axes if axis.get_title()}
        summary = panels["Adapter weights, mean over the 2 MTA modules"]
        assert summary.get_xlabel() == "adapter" and summary.get_ylabel() == "task"
        assert [text.get_text() for text in summary.get_xticklabels()] == ["a", "b", "shared_0"]
        # One number per cell that holds a weight (the zeros are left blank): the means over the two modules.
        assert sorted(text.get_text() for text in summary.texts) == ["0.10", "0.30", "1.00", "1.00"]
        entropy = panels["Routing entropy per module (nats; 0 = one adapter)"]
        assert [text.get_text() for text in entropy.get_xticklabels()] == ["encoder block 0 · FFN",
                                                                           "decoder block 0 · FFN"]
        assert [text.get_text() for text in entropy.texts] == ["0.00"] * 4  # its values, on its own scale
        beyond = panels["Weight beyond the task's own adapter (other tasks' + shared), per module"]
        assert sorted(text.get_text() for text in beyond.texts) == ["0.10", "0.10", "0.30", "0.30"]
        labels = [axis.get_ylabel() for axis in figure.axes]
        assert any("not a distribution" in label for label in labels), labels
        assert "sum to more than 1" in figure.get_supxlabel().replace("\n", " ")
        assert all(axis.has_data() or axis.get_label() == "<colorbar>" for axis in figure.axes)  # no empty panel
    finally:
        plt.close(figure)


def test_heatmap_module_names_read_as_a_reader_says_them():
    assert readable_module_names(["enc0.ffn", "enc0.self_attn", "dec1.cross_attn"]) == [
        "encoder block 0 · FFN", "encoder block 0 · self-attention", "decoder block 1 · cross-attention"]
    assert readable_module_names(["dec0.ffn", "dec12.self_attn"]) == ["decoder layer 0 · MLP",
                                                                    "decoder layer 12 · attention"]
    assert readable_module_names(["custom"]) == ["custom"]


# ---- the example script's command line -----------------------------------------------------------------------------


def run_example(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def load_example():
    return import_script(EXAMPLE, "train_two_stage_ux")


@pytest.fixture(scope="module")
def example():
    return load_example()


def user_mistakes(tmp_path):
    """(name, argv, what the error line must say) for each kind of user mistake."""
    (tmp_path / "models").mkdir(exist_ok=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_target = tmp_path / "no_target.jsonl"
    no_target.write_text('{"source": "a", "label": "b"}\n')
    train = f"sst2={FIXTURES / 'sst2_train.jsonl'}"
    out = ["--output_dir", tmp_path / "out", "--use_cpu", "true"]
    return [
        ("missing base model folder", ["--base_model", "./models/flan-t5-smal", *out], "does not exist"),
        ("missing folder without ./", ["--base_model", "models/flan-t5-smal", *out], "does not exist"),
        ("missing data file", ["--train_files", "sst2=nope.jsonl", *out], "nope.jsonl"),
        ("malformed task pair", ["--train_files", "sst2", *out], "TASK=VALUE"),
        ("eval task without training data", ["--train_files", train, "--eval_files", f"agnews={FIXTURES / 'agnews_eval.jsonl'}", *out], "agnews"),
        ("unknown metric", ["--train_files", train, "--task_metrics", "sst2=bleu", *out], "bleu"),
        ("metric of an unknown task", ["--task_metrics", "nosuchtask=accuracy", *out], "nosuchtask"),
        ("missing column", ["--train_files", f"sst2={no_target}", *out], "'target'"),
        ("empty file", ["--train_files", f"sst2={empty}", *out], "empty"),
        ("bad mixing", ["--train_files", train, "--mixing", "random", *out], "random"),
    ]


def test_every_user_mistake_is_one_error_line_with_exit_2(tmp_path, example, capsys):
    for name, argv, expected in user_mistakes(tmp_path):
        cwd = os.getcwd()
        os.chdir(tmp_path)  # relative paths as a user types them
        try:
            with pytest.raises(SystemExit) as exit_info:
                example.main([str(arg) for arg in argv])
        finally:
            os.chdir(cwd)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_info.value.code == 2, (name, err)
        # Progress bars may come before it; the run ends with exactly one error line and no traceback.
        errors = [line for line in lines if "error" in line.lower()]
        assert "Traceback" not in err and len(errors) == 1, (name, err)
        assert lines[-1].startswith("train_two_stage.py: error: "), (name, err)
        assert expected in lines[-1], (name, lines[-1])
    # --debug shows the traceback instead
    with pytest.raises(ValueError, match="TASK=VALUE"):
        example.main(["--train_files", "sst2", "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--debug"])


def test_missing_base_model_folder_fails_at_once_in_a_real_process(tmp_path):
    """The reported instance: a 73-line traceback ending in 'Repo id must be in the form ...'."""
    (tmp_path / "models").mkdir()
    run = run_example("--base_model", "./models/flan-t5-smal", "--output_dir", tmp_path / "out", cwd=tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines == [f"train_two_stage.py: error: --base_model ./models/flan-t5-smal: the folder "
                     f"{tmp_path / 'models' / 'flan-t5-smal'} does not exist."]


def test_short_help_puts_alter_options_first_and_names_base_model_defaults(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 200
    order = [text.index(f"\n  {option}\n") for option in ("--base_model", "--train_files", "--stage1_steps",
                                                            "--max_steps")]
    assert order == sorted(order)
    assert "--help-all" in text and "--adam_beta1" not in text
    assert "--stage1_steps\n        " in text
    text = " ".join(text.split())
    assert "default: 100; with --train_files: None; with --synthetic: 1100" in text  # --stage1_steps
    assert "default: 0.0001; with --train_files: 0.0003; with --synthetic: 0.002" in text  # --learning_rate
    assert "(default: 3.0)" in text  # --num_train_epochs: the same in every job
    with pytest.raises(SystemExit):
        example.parse_arguments(["--synthetic", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "here (with --synthetic): 0.002; default: 0.0001; with --train_files: 0.0003; with --synthetic: 0.002" in text
    with pytest.raises(SystemExit):
        example.parse_arguments(["--train_files", "a=b.jsonl", "--help"])
    assert "here (with --train_files): 0.0003; default: 0.0001" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        example.parse_arguments(["--help-all"])
    assert "--adam_beta1" in capsys.readouterr().out
