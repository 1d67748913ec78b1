"""Checkpoints record the stage; a run killed in stage 1 or stage 2 and resumed ends bitwise like the uninterrupted one."""

import json
import os
import subprocess
import sys

import torch
from training_utils import JOB_SCRIPT, REPO, load_weights, snapshot, tiny_args, tiny_data, tiny_model, tokenizer

from modeling_alter.trainer import AlterTrainer

# Dropout and stage-2 task-id dropping make the run depend on the RNG state, which the checkpoints must restore.
JOB_ARGS = [
    "--max_steps", "12", "--stage1_steps", "6", "--save_steps", "4", "--per_device_train_batch_size", "8",
    "--learning_rate", "1e-2", "--stage2_learning_rate", "2e-2", "--stage2_warmup_steps", "2",
    "--dropout_rate", "0.1", "--task_id_drop_rate", "0.3", "--use_cpu", "true", "--report_to", "none",
    "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--save_routing_heatmap", "false",
]


def start_job(output_dir, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(JOB_SCRIPT), "--output_dir", str(output_dir), *JOB_ARGS, *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, expected_returncode=0):
    output, _ = process.communicate(timeout=240)
    assert process.returncode == expected_returncode, output[-3000:]
    return output


def assert_bitwise_equal(expected, actual):
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_killed_in_stage1_and_in_stage2_then_resumed_matches_uninterrupted(tmp_path):
    reference_dir, stage1_dir, stage2_dir = tmp_path / "reference", tmp_path / "killed1", tmp_path / "killed2"
    # Killed in the middle of step 6 (stage 1, last checkpoint 4) and of step 11 (stage 2, last checkpoint 8).
    jobs = [start_job(reference_dir), start_job(stage1_dir, "--kill_at_step", "5"),
            start_job(stage2_dir, "--kill_at_step", "10")]
    finish(jobs[0])
    finish(jobs[1], expected_returncode=3)
    finish(jobs[2], expected_returncode=3)

    for directory, checkpoints, stage in ((stage1_dir, ["checkpoint-4"], 1), (stage2_dir, ["checkpoint-4", "checkpoint-8"], 2)):
        assert sorted(p.name for p in directory.glob("checkpoint-*")) == checkpoints
        assert not (directory / "final_rank0.safetensors").exists()
        last = directory / checkpoints[-1]
        assert json.loads((last / "config.json").read_text())["stage"] == stage
        attributes = json.loads((last / "trainer_state.json").read_text())["stateful_callbacks"]["StageSwitchCallback"]
        assert attributes["attributes"]["stage"] == stage

    resumed = [
        start_job(stage1_dir, "--resume_from_checkpoint", str(stage1_dir / "checkpoint-4")),
        start_job(stage2_dir, "--resume_from_checkpoint", str(stage2_dir / "checkpoint-8")),
    ]
    for process in resumed:
        finish(process)

    reference = load_weights(reference_dir / "final_rank0.safetensors")
    reference_result = json.loads((reference_dir / "job_result.json").read_text())
    assert reference_result["switch_step"] == 6 and reference_result["stage"] == 2
    for directory in (stage1_dir, stage2_dir):
        assert_bitwise_equal(reference, load_weights(directory / "final_rank0.safetensors"))
        result = json.loads((directory / "job_result.json").read_text())
        assert result["switch_step"] == 6 and result["stage"] == 2 and result["global_step"] == 12
    # The run resumed in stage 1 switched itself, at the same step.
    switch_logs = [log for log in json.loads((stage1_dir / "job_result.json").read_text())["log_history"]
                   if "stage2_trainable_parameters" in log]
    assert [log["step"] for log in switch_logs] == [6]
    # Same training losses after the resume point as in the uninterrupted run.
    reference_losses = {log["step"]: log["loss"] for log in reference_result["log_history"] if "loss" in log}
    for directory, first in ((stage1_dir, 5), (stage2_dir, 9)):
        history = json.loads((directory / "job_result.json").read_text())["log_history"]
        losses = {log["step"]: log["loss"] for log in history if "loss" in log and log["step"] >= first}
        assert losses == {step: reference_losses[step] for step in losses} and max(losses) == 12


def test_resume_in_process_at_the_switch_and_with_restored_callback_states(tmp_path):
    """
    The checkpoint written at the switch step holds the fresh stage-2 optimizer and schedule; and resuming in stage 1
    also works when Trainer recreates the callbacks from the checkpoint (`restore_callback_states_from_checkpoint`).
    """

    def trainer_for(output_dir, **overrides):
        model = tiny_model(dropout_rate=0.1, task_id_drop_rate=0.3)
        train_set, _ = tiny_data()
        args = tiny_args(output_dir, max_steps=6, stage1_steps=3, save_strategy="steps", save_steps=1,
                         stage2_warmup_steps=1, **overrides)
        return AlterTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer())

    reference = trainer_for(tmp_path / "reference")
    reference.train()
    expected = snapshot(reference.alter_model)
    assert json.loads((tmp_path / "reference" / "checkpoint-2" / "config.json").read_text())["stage"] == 1
    assert json.loads((tmp_path / "reference" / "checkpoint-3" / "config.json").read_text())["stage"] == 2

    for step, overrides in ((3, {}), (2, {"restore_callback_states_from_checkpoint": True})):
        resumed = trainer_for(tmp_path / f"resumed{step}", **overrides)
        assert resumed.alter_model.config.stage == 1
        resumed.train(resume_from_checkpoint=str(tmp_path / "reference" / f"checkpoint-{step}"))
        assert resumed.alter_model.config.stage == 2 and resumed.stage_callback.switch_step == 3
        assert_bitwise_equal(expected, snapshot(resumed.alter_model))
        assert resumed.lr_scheduler.get_last_lr() == reference.lr_scheduler.get_last_lr()
