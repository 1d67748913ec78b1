"""Tests of `hub_upload`: prepare and check for real on a tiny model, every refusal, and push against a recorder.

No test contacts the Hub: `HfApi`'s network methods are replaced by a recorder (or by functions that fail the test),
except `test_real_push_round_trip`, which runs only when `HF_TOKEN` is set and huggingface.co is reachable.
"""

import json
import os
import shutil
import socket
import struct
import uuid
import zlib
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import ByT5Tokenizer

import hub_upload
from hub_upload.errors import HubConnectionError
from hub_upload import (
    EvalResults,
    FolderCheckError,
    PrepareError,
    PushError,
    UnsafeFolderError,
    check_folder,
    count_parameters,
    prepare_folder,
    push_folder,
    push_model,
    read_eval_results,
    scan_folder,
)
from hub_upload.__main__ import main
from hub_upload.check import check_structure, compare_load_report
from hub_upload.isolated_load import ProjectImportBlocker
from modeling_alter import AlterConfig, AlterForConditionalGeneration


TASKS = ["copy", "sort_digits"]
REPO_ID = "test-org/alter-tiny"
FAKE_TOKEN = "hf_" + "Q" * 34
SHA = "0123456789abcdef0123456789abcdef01234567"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {
    "README.md",
    "added_tokens.json",
    "config.json",
    "configuration_alter.py",
    "configuration_mta.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_alter.py",
    "mta.py",
    "routing_heatmap.png",
    "task_lifecycle.py",
    "tokenizer_config.json",
}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = AlterConfig(
        task_names=TASKS,
        vocab_size=384,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        adapter_dim=8,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    model = AlterForConditionalGeneration(config).eval()
    with torch.no_grad():
        for mta in model.mta_modules().values():
            for parameter in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                parameter.normal_(0, 0.5)
    model.set_stage(2)
    return model


def tiny_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([200, 30, 30] * 2) for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


STAGE_RESULTS = {
    "stage1_eval_copy_exact_match": 0.5,
    "stage1_eval_sort_digits_exact_match": 0.25,
    "eval_copy_exact_match": 0.75,
    "eval_sort_digits_exact_match": 0.625,
    "eval_copy_loss": 1.5,
    "eval_loss": 1.2,
    "eval_mean_score": 0.6875,
    "eval_runtime": 3.1,
    "epoch": 3.0,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """What a training run leaves in its output directory, junk included."""
    path = tmp_path_factory.mktemp("training-run") / "alter-synthetic"
    tiny_model().save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    (path / "all_results.json").write_text(json.dumps(STAGE_RESULTS))
    (path / "routing_heatmap.png").write_bytes(tiny_png())
    (path / "routing_stats.json").write_text(json.dumps({"stage": 2}))
    (path / "trainer_state.json").write_text(json.dumps({"log_history": [], "best_model_checkpoint": str(path)}))
    torch.save({"learning_rate": 1e-3}, path / "training_args.bin")
    (path / "checkpoint-10").mkdir()
    torch.save({"step": 10}, path / "checkpoint-10" / "optimizer.pt")
    return path


@pytest.fixture(scope="module")
def prepared(run_dir, tmp_path_factory):
    return prepare_folder(
        run_dir,
        tmp_path_factory.mktemp("prepared") / "hub",
        repo_id=REPO_ID,
        domain="Synthetic tasks",
        datasets=["test-org/synthetic-tasks"],
        base_model="google/flan-t5-small",
    )


@pytest.fixture(scope="module")
def checked(prepared):
    return check_folder(prepared.path)


@pytest.fixture
def folder_copy(prepared, tmp_path):
    destination = tmp_path / "hub"
    shutil.copytree(prepared.path, destination)
    return destination


# ---- prepare and the card ------------------------------------------------------------------------------------------


def test_prepare_writes_exactly_the_hub_files(prepared):
    assert set(prepared.files) == EXPECTED_FILES
    assert sorted(p.name for p in prepared.path.iterdir()) == sorted(EXPECTED_FILES)
    config = json.loads((prepared.path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_alter.AlterConfig",
        "AutoModelForSeq2SeqLM": "modeling_alter.AlterForConditionalGeneration",
    }
    assert config["task_names"] == TASKS and config["stage"] == 2
    for name in ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py", "task_lifecycle.py"):
        assert (prepared.path / name).read_bytes() == (PROJECT_ROOT / "modeling_alter" / name).read_bytes()
    assert (prepared.path / "routing_heatmap.png").read_bytes() == tiny_png()
    assert prepared.results.sources == ["all_results.json"]


def test_card_metadata_and_body(prepared):
    card = ModelCard((prepared.path / "README.md").read_text())
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text2text-generation"
    assert data.tags == ["alter", "mixture-of-task-adapters", "custom_code", "synthetic-tasks"]
    assert data.base_model == "google/flan-t5-small"
    assert data.datasets == ["test-org/synthetic-tasks"]
    assert data.license == "apache-2.0"
    results = {(r.task_name, r.metric_type): (r.metric_value, r.dataset_type) for r in data.eval_results}
    assert results == {
        ("copy", "exact_match"): (0.75, "test-org/synthetic-tasks"),
        ("sort_digits", "exact_match"): (0.625, "test-org/synthetic-tasks"),
    }
    counts = count_parameters(tiny_model())
    assert counts["total"] > counts["stage1_trainable"] > counts["stage2_trainable"] > 0
    assert data.to_dict()["alter"] == {
        "task_names": TASKS,
        "stage": 2,
        "domain": "synthetic-tasks",
        "parameters": counts,
        "revision_pin": "main",
    }
    body = card.text
    assert "| 0 | `copy` |" in body and "| 1 | `sort_digits` |" in body
    assert "| 0 | `copy` | exact_match | 0.5000 | 0.7500 |" in body
    assert "| 1 | `sort_digits` | exact_match | 0.2500 | 0.6250 |" in body
    assert f'AutoModelForSeq2SeqLM.from_pretrained("{REPO_ID}", trust_remote_code=True, revision=revision)' in body
    assert 'revision = "main"' in body
    assert "![Routing heatmap of the stage-2 gate](routing_heatmap.png)" in body
    assert f"| total | {counts['total']:,} |" in body
    assert f"{counts['stage2_trainable']:,} |" in body


def test_prepare_pins_a_given_revision_and_shards(run_dir, tmp_path):
    result = prepare_folder(
        run_dir,
        tmp_path / "hub",
        repo_id=REPO_ID,
        domain="synthetic",
        revision_pin=SHA,
        max_shard_size="100KB",
    )
    assert "model.safetensors.index.json" in result.files and "model.safetensors" not in result.files
    assert len([f for f in result.files if f.startswith("model-0")]) >= 2
    assert check_structure(result.path, result.files)[0] == []
    body = (result.path / "README.md").read_text()
    assert f'revision = "{SHA}"\n' in body


def test_prepare_errors_name_the_problem(run_dir, tmp_path):
    with pytest.raises(PrepareError, match="not valid: expected 'namespace/name'"):
        prepare_folder(run_dir, tmp_path / "a", repo_id="no-namespace", domain="x")
    with pytest.raises(PrepareError, match="no per-task evaluation results"):
        prepare_folder(
            run_dir,
            tmp_path / "b",
            repo_id=REPO_ID,
            domain="x",
            results_files=[_write(tmp_path / "r.json", {"eval_loss": 1.0})],
        )
    with pytest.raises(PrepareError, match=r"missing\.json does not exist"):
        prepare_folder(run_dir, tmp_path / "c", repo_id=REPO_ID, domain="x", results_files=[tmp_path / "missing.json"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(PrepareError, match="not empty; pass --overwrite"):
        prepare_folder(run_dir, tmp_path / "d", repo_id=REPO_ID, domain="x")
    with pytest.raises(PrepareError, match="is \\(or contains\\) the model directory"):
        prepare_folder(run_dir, run_dir, repo_id=REPO_ID, domain="x", overwrite=True)
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    (t5_dir / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(PrepareError, match="model_type 't5', not 'alter'"):
        prepare_folder(t5_dir, tmp_path / "e", repo_id=REPO_ID, domain="x")
    with pytest.raises(PrepareError, match="max_shard_size 'lots'"):
        prepare_folder(run_dir, tmp_path / "f", repo_id=REPO_ID, domain="x", max_shard_size="lots")
    without = prepare_folder(
        run_dir,
        tmp_path / "g",
        repo_id=REPO_ID,
        domain="x",
        allow_missing_results=True,
        results_files=[tmp_path / "r.json"],
    )
    assert "No evaluation results were recorded" in (without.path / "README.md").read_text()
    assert without.warnings == ["README.md has no model-index: the card reports no evaluation results"]


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_results_reader_accepts_the_documented_formats(tmp_path):
    tasks = ["copy", "sort_digits", "sort"]
    flat = _write(
        tmp_path / "all_results.json",
        {
            "eval_copy_exact_match": 0.9,  # unmarked: the model's own stage (2)
            "eval_stage1_copy_exact_match": 0.4,
            "eval_sort_digits_token_f1": 0.8,  # the longest task name wins over "sort"
            "eval_sort_rouge_l": 0.7,
            "stage2/eval_sort_rouge_l": 0.75,  # a marked key wins over an unmarked one
            "eval_copy_loss": 2.0,
            "eval_copy_runtime": 1.0,
            "eval_mean_score": 0.5,
            "train_copy_exact_match": 0.1,
            "test_copy_exact_match": 0.2,
            "eval_unknown_exact_match": 1.0,
            "eval_copy_accuracy": "n/a",
            "epoch": 2,
        },
    )
    nested = _write(
        tmp_path / "stage1_eval_results.json", {"eval_sort_rouge_l": 0.3, "stage2": {"copy": {"accuracy": 1}}}
    )
    results = read_eval_results([flat, nested], tasks, default_stage=2)
    assert results.scores == {
        1: {"copy": {"exact_match": 0.4}, "sort": {"rouge_l": 0.3}},
        2: {
            "copy": {"exact_match": 0.9, "accuracy": 1.0},
            "sort_digits": {"token_f1": 0.8},
            "sort": {"rouge_l": 0.75},
        },
    }
    assert results.sources == ["all_results.json", "stage1_eval_results.json"]
    assert results.rows(tasks) == [
        ("copy", "accuracy"),
        ("copy", "exact_match"),
        ("sort_digits", "token_f1"),
        ("sort", "rouge_l"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PrepareError, match=r"bad\.json is not readable JSON"):
        read_eval_results([bad], tasks, 2)
    with pytest.raises(PrepareError, match=r"list\.json must hold a JSON object"):
        read_eval_results([_write(tmp_path / "list.json", [1])], tasks, 2)


def test_results_reader_reads_the_example_scripts_eval_results(tmp_path):
    """The `eval_results.json` that examples/train_two_stage.py writes."""
    metrics = {"copy": "exact_match", "sort_digits": "token_f1"}

    def stage(scores):
        return {
            "mean_score": sum(scores.values()) / 2,
            "mean_loss": 1.0,
            "tasks": {t: {"metric": metrics[t], "score": s, "loss": 0.5} for t, s in scores.items()},
        }

    path = _write(
        tmp_path / "eval_results.json",
        {
            "task_metrics": metrics,
            "train": {"train_loss": 1.0, "train_runtime": 9.0, "epoch": 3.0},
            "stages": {"1": stage({"copy": 0.5, "sort_digits": 0.25}), "2": stage({"copy": 0.75, "sort_digits": 0.5})},
            "wall_time_s": 12.0,
        },
    )
    results = read_eval_results([path], TASKS, default_stage=2)
    assert results.scores == {
        1: {"copy": {"exact_match": 0.5}, "sort_digits": {"token_f1": 0.25}},
        2: {"copy": {"exact_match": 0.75}, "sort_digits": {"token_f1": 0.5}},
    }


# ---- check ---------------------------------------------------------------------------------------------------------


def test_check_loads_the_folder_in_an_isolated_python(checked, prepared):
    load = checked.load
    assert load["config_class"].startswith("transformers_modules.") and load["config_class"].endswith(".AlterConfig")
    assert load["model_class"].startswith("transformers_modules.")
    assert load["model_class"].endswith(".AlterForConditionalGeneration")
    assert load["tokenizer_class"] == "ByT5Tokenizer"
    assert load["loaded_project_modules"] == []
    assert "weight_problems" in load and load["weight_problems"] == {}
    assert set(load["generations"]) == set(TASKS)
    assert load["parameters"] == prepared.parameters
    assert {path for path, _ in checked.files} == EXPECTED_FILES
    assert "passed every check" in checked.summary()


def test_check_cli_passes_and_fails_with_clear_messages(checked, folder_copy, capsys, monkeypatch):
    monkeypatch.setattr("hub_upload.__main__.check_folder", lambda folder, **kwargs: checked)
    assert main(["check", str(folder_copy)]) == 0
    assert "passed every check" in capsys.readouterr().out
    monkeypatch.undo()
    (folder_copy / "model.safetensors").unlink()
    (folder_copy / "generation_config.json").write_text("{not json")
    assert main(["check", str(folder_copy)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors (or sharded model-*.safetensors with model.safetensors.index.json): missing" in err
    assert "generation_config.json: not valid JSON" in err


def test_check_fails_when_the_folder_does_not_load_in_a_clean_python(folder_copy):
    with open(folder_copy / "configuration_alter.py", "a") as file:
        file.write('\nraise RuntimeError("broken on purpose")\n')
    with pytest.raises(FolderCheckError, match="failed while loading the config with AutoConfig.*broken on purpose"):
        check_folder(folder_copy)


def test_check_refuses_code_that_needs_the_project_or_other_packages(folder_copy):
    code = (folder_copy / "modeling_alter.py").read_text()
    (folder_copy / "modeling_alter.py").write_text("import modeling_alter\nimport numpy as np\n" + code)
    problems = check_structure(folder_copy, scan_folder(folder_copy))[0]
    assert any(p.startswith("modeling_alter.py:1: imports 'modeling_alter'") for p in problems)
    assert any(p.startswith("modeling_alter.py:2: imports 'numpy'") for p in problems)


def test_check_names_a_missing_sibling_code_file(folder_copy):
    """A folder without `task_lifecycle.py` (which `modeling_alter.py` imports) fails the structure check with the
    file's name; a folder published before that file existed carries the mixin in its own `mta.py` and passes."""
    (folder_copy / "task_lifecycle.py").unlink()
    problems = check_structure(folder_copy, scan_folder(folder_copy))[0]
    assert any(p.startswith("modeling_alter.py:") and "task_lifecycle.py is not in the folder" in p for p in problems)
    published = Path(__file__).parent / "fixtures" / "hub_code_before_task_lifecycle"
    for name in ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py"):
        shutil.copyfile(published / name, folder_copy / name)
    assert check_structure(folder_copy, scan_folder(folder_copy))[0] == []


def test_isolated_load_blocks_the_project_but_not_the_folder_code():
    blocker = ProjectImportBlocker()
    for name in ("modeling_alter", "modeling_alter.modeling_alter", "hub_upload"):
        with pytest.raises(ModuleNotFoundError, match="blocked"):
            blocker.find_spec(name)
    assert blocker.find_spec("transformers_modules.hub.abc.modeling_alter") is None


def test_isolated_load_compares_every_weight_with_the_files(prepared):
    from hub_upload.isolated_load import compare_weights

    model = AlterForConditionalGeneration.from_pretrained(prepared.path)
    assert compare_weights(model, prepared.path) == {}
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.q.weight.add_(1.0)
    assert compare_weights(model, prepared.path) == {
        "different values": ["encoder.block.0.layer.0.SelfAttention.q.weight"]
    }


def test_check_compares_the_card_with_the_loaded_model(checked, prepared):
    config = json.loads((prepared.path / "config.json").read_text())
    alter = ModelCard((prepared.path / "README.md").read_text()).data.to_dict()["alter"]
    assert compare_load_report(checked.load, config, alter) == []
    wrong = {**alter, "parameters": {**alter["parameters"], "total": 1}, "stage": 1}
    problems = compare_load_report({**checked.load, "weight_problems": {"missing": ["lm_head.weight"]}}, config, wrong)
    assert any("alter.parameters" in p for p in problems)
    assert any("alter.stage 1 differs" in p for p in problems)
    assert any("weights do not match" in p and "lm_head.weight" in p for p in problems)


def test_check_verifies_the_card_metadata(folder_copy):
    readme = folder_copy / "README.md"
    text = readme.read_text().replace("library_name: transformers", "library_name: timm")
    text = text.replace("- custom_code\n", "").replace("trust_remote_code=True", "trust_remote_code=False")
    readme.write_text(text.replace("| 1 | `sort_digits` |\n", ""))
    with pytest.raises(FolderCheckError) as error:
        check_folder(folder_copy)
    message = str(error.value)
    assert "library_name is 'timm', expected 'transformers'" in message
    assert "lack ['custom_code']" in message
    assert "trust_remote_code=True is missing" in message
    assert "task 'sort_digits' with id 1 is missing" in message


# ---- refusals ------------------------------------------------------------------------------------------------------


def _refusal(folder):
    with pytest.raises(UnsafeFolderError) as error:
        scan_folder(folder)
    return str(error.value)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "state.pkl"])
def test_refuses_pickles(folder_copy, name):
    torch.save({"w": torch.zeros(2)}, folder_copy / name)
    message = _refusal(folder_copy)
    assert f"{name}: pickle-based file refused" in message


def test_refuses_a_pickle_disguised_as_safetensors(folder_copy):
    torch.save({"w": torch.zeros(2)}, folder_copy / "model.safetensors")
    assert "model.safetensors: the content is a zip archive" in _refusal(folder_copy)


def test_refuses_a_hugging_face_token_with_file_and_line(folder_copy, capsys):
    (folder_copy / "vocab.txt").write_text(f"a\nb\nmy token is {FAKE_TOKEN}\n")
    message = _refusal(folder_copy)
    assert "vocab.txt:3: contains a Hugging Face token (hf_QQQ…)" in message
    assert FAKE_TOKEN not in message
    assert main(["check", str(folder_copy)]) == 1
    err = capsys.readouterr().err
    assert "vocab.txt:3: contains a Hugging Face token" in err and FAKE_TOKEN not in err


def test_refuses_aws_keys(folder_copy):
    config = json.loads((folder_copy / "generation_config.json").read_text())
    config["note"] = "AKIAIOSFODNN7EXAMPLE"
    (folder_copy / "generation_config.json").write_text(json.dumps(config, indent=2))
    with open(folder_copy / "README.md", "a") as file:
        file.write("\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    lines = (folder_copy / "README.md").read_text().splitlines()
    message = _refusal(folder_copy)
    assert "generation_config.json:" in message and "contains an AWS access key id (AKIAIO…)" in message
    assert f"README.md:{len(lines)}: contains a secret key" in message
    assert "wJalrXUtnFEMI" not in message


def test_refuses_env_files(folder_copy):
    (folder_copy / ".env").write_text("HF_TOKEN=nothing\n")
    assert ".env: environment file (.env) refused" in _refusal(folder_copy)


def test_refuses_symlinks_pointing_outside(folder_copy, tmp_path):
    outside = tmp_path / "secret-notes.txt"
    outside.write_text("private")
    os.symlink(outside, folder_copy / "vocab.txt")
    os.symlink(tmp_path, folder_copy / "assets")
    message = _refusal(folder_copy)
    assert f"vocab.txt: symbolic link pointing outside the folder (-> {outside.resolve()})" in message
    assert "assets: symbolic link pointing outside the folder" in message


def test_refuses_absolute_paths_of_this_machine(folder_copy, run_dir):
    with open(folder_copy / "README.md", "a") as file:
        file.write(f"\nTrained from {run_dir}.\n")
    config = json.loads((folder_copy / "config.json").read_text())
    config["_name_or_path"] = "/home/alice/models/alter"
    (folder_copy / "config.json").write_text(json.dumps(config, indent=2))
    message = _refusal(folder_copy)
    last_line = len((folder_copy / "README.md").read_text().splitlines())
    assert f"README.md:{last_line}: contains an absolute path of this machine ('{run_dir}')" in message
    assert "config.json:" in message and "('/home/alice/models/alter')" in message


@pytest.mark.parametrize("name", ["trainer_state.json", "train.py", "notes.docx", "checkpoint-10/config.json"])
def test_refuses_stray_files(folder_copy, name):
    (folder_copy / name).parent.mkdir(exist_ok=True)
    (folder_copy / name).write_text("{}")
    message = _refusal(folder_copy)
    assert f"{name}: stray" in message


# ---- push ----------------------------------------------------------------------------------------------------------


class HubRecorder:
    """Stands in for the Hub: records `create_repo`, `create_branch` and `create_commit`; every other call fails."""

    def __init__(self, monkeypatch):
        self.calls = []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(("create_repo", repo_id, kwargs, api.token))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kwargs):
            recorder.calls.append(("create_branch", repo_id, kwargs))

        def create_commit(api, repo_id, operations, **kwargs):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            recorder.calls.append(("create_commit", repo_id, files, kwargs))
            pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{SHA}",
                commit_message=kwargs["commit_message"],
                commit_description="",
                oid=SHA,
                pr_url=pr_url,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        for name in (
            "upload_folder",
            "upload_file",
            "preupload_lfs_files",
            "create_pull_request",
            "whoami",
            "repo_info",
        ):
            monkeypatch.setattr(HfApi, name, _forbidden(name))

    def names(self):
        return [call[0] for call in self.calls]


def _forbidden(name):
    def call(*args, **kwargs):
        raise AssertionError(f"HfApi.{name} must not be called")

    return call


def test_push_makes_one_commit_with_exactly_the_checked_files(prepared, checked, capsys, monkeypatch):
    recorder = HubRecorder(monkeypatch)
    checks = []
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checks.append(folder) or checked)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    argv = ["push", str(prepared.path), REPO_ID, "--private", "--revision", "dev", "--commit-message", "Release v1"]
    assert main(argv) == 0
    assert checks == [str(prepared.path)]
    assert recorder.names() == ["create_repo", "create_branch", "create_commit"]
    _, repo_id, kwargs, token = recorder.calls[0]
    assert repo_id == REPO_ID and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert token == FAKE_TOKEN
    assert recorder.calls[1][1:] == (REPO_ID, {"branch": "dev", "exist_ok": True, "repo_type": "model"})
    _, repo_id, files, kwargs = recorder.calls[2]
    assert repo_id == REPO_ID
    assert set(files) == EXPECTED_FILES
    assert all(files[name] == (prepared.path / name).read_bytes() for name in files)
    assert kwargs == {
        "commit_message": "Release v1",
        "commit_description": None,
        "repo_type": "model",
        "revision": "dev",
        "create_pr": False,
    }
    out, err = capsys.readouterr()
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True, revision="{SHA}")' in out
    assert "token: HF_TOKEN" in out
    assert FAKE_TOKEN not in out + err


def test_push_as_pull_request(prepared, checked, monkeypatch):
    recorder = HubRecorder(monkeypatch)
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checked)
    result = push_folder(prepared.path, REPO_ID, create_pr=True, token=FAKE_TOKEN)
    assert recorder.names() == ["create_repo", "create_commit"]
    assert recorder.calls[0][2]["private"] is None  # the namespace's default visibility
    kwargs = recorder.calls[1][3]
    assert kwargs["create_pr"] is True and kwargs["revision"] is None
    assert kwargs["commit_message"] == "Upload ALTER model (2 tasks: copy, sort_digits)"
    assert result.pr_url.endswith("/discussions/1") and result.commit_sha == SHA


def test_dry_run_runs_every_check_without_network(prepared, capsys, monkeypatch):
    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "whoami", "repo_info"):
        monkeypatch.setattr(HfApi, name, _forbidden(name))
    monkeypatch.setattr("hub_upload.push.resolve_token", _forbidden("resolve_token"))

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["push", str(prepared.path), REPO_ID, "--dry-run", "--private"]) == 0
    out, err = capsys.readouterr()
    assert f"DRY RUN: would upload {len(EXPECTED_FILES)} files" in out and "(private if new)" in out
    assert all(name in out for name in EXPECTED_FILES)
    assert FAKE_TOKEN not in out + err


def test_push_refuses_when_the_check_fails(folder_copy, capsys, monkeypatch):
    recorder = HubRecorder(monkeypatch)
    (folder_copy / "vocab.txt").write_text(FAKE_TOKEN)
    with pytest.raises(UnsafeFolderError, match="vocab.txt:1"):
        push_folder(folder_copy, REPO_ID, token=FAKE_TOKEN)
    (folder_copy / "vocab.txt").unlink()
    (folder_copy / "model.safetensors").unlink()
    assert main(["push", str(folder_copy), REPO_ID, "--token", FAKE_TOKEN]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert recorder.calls == []


def test_push_refuses_another_repository_bad_options_and_no_token(prepared, checked, monkeypatch, tmp_path):
    recorder = HubRecorder(monkeypatch)
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checked)
    with pytest.raises(PushError, match="loads 'test-org/alter-tiny', not 'other/alter'; prepare the folder again"):
        push_folder(prepared.path, "other/alter", token=FAKE_TOKEN)
    with pytest.raises(PushError, match="not valid: expected 'namespace/name'"):
        push_folder(prepared.path, "alter-tiny", token=FAKE_TOKEN)
    with pytest.raises(PushError, match="revision 'refs/pr/1' is not valid here"):
        push_folder(prepared.path, REPO_ID, revision="refs/pr/1", create_pr=True, token=FAKE_TOKEN)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN"):
        push_folder(prepared.path, REPO_ID)
    assert recorder.calls == []


def test_push_model_pushes_model_tokenizer_and_card_in_one_commit(monkeypatch):
    recorder = HubRecorder(monkeypatch)
    results = EvalResults({1: {"copy": {"exact_match": 0.5}}, 2: {"copy": {"exact_match": 0.8}}}, ["manual"])
    result = push_model(
        tiny_model(),
        ByT5Tokenizer(),
        REPO_ID,
        domain="synthetic",
        results=results,
        max_shard_size="100KB",
        private=True,
        token=FAKE_TOKEN,
    )
    assert recorder.names() == ["create_repo", "create_commit"]
    files = recorder.calls[1][2]
    shards = [name for name in files if name.startswith("model-0")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    assert {"README.md", "config.json", "configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py",
            "task_lifecycle.py", "tokenizer_config.json"} <= set(
        files
    )
    assert b"| 0 | `copy` | exact_match | 0.5000 | 0.8000 |" in files["README.md"]
    assert result.commit_sha == SHA and result.private


def test_model_push_to_hub_uploads_the_code_files(monkeypatch):
    """The known pitfall: `model.push_to_hub` must carry the code files (configuration_alter.py and the sibling
    configuration_mta.py it imports, modeling_alter.py, mta.py, task_lifecycle.py) along."""
    recorder = HubRecorder(monkeypatch)
    monkeypatch.setattr(
        "transformers.utils.hub.create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard("generic card"),
    )
    tiny_model().push_to_hub(REPO_ID, private=True, commit_message="Upload model", token=FAKE_TOKEN)
    assert recorder.names() == ["create_repo", "create_commit"]
    files = recorder.calls[1][2]
    for name in ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py", "task_lifecycle.py"):
        assert files[name] == (PROJECT_ROOT / "modeling_alter" / name).read_bytes()
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map["AutoModelForSeq2SeqLM"] == "modeling_alter.AlterForConditionalGeneration"
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    assert recorder.calls[1][3]["commit_message"] == "Upload model"


def test_package_exports_and_console_script():
    assert hub_upload.__all__ == sorted(hub_upload.__all__)
    setup = (PROJECT_ROOT / "setup.cfg").read_text()
    assert "alter-hub = hub_upload.__main__:main" in setup


# ---- the real Hub (only with HF_TOKEN and network) -----------------------------------------------------------------


def _hub_reachable():
    if not os.environ.get("HF_TOKEN"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _hub_reachable(), reason="needs HF_TOKEN and network access to huggingface.co")
def test_real_push_round_trip():
    from transformers import AutoModelForSeq2SeqLM

    api = HfApi(token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/alter-hub-test-{uuid.uuid4().hex[:8]}"
    model, tokenizer = tiny_model(), ByT5Tokenizer()
    try:
        result = push_model(model, tokenizer, repo_id, domain="test", private=True)
        loaded = AutoModelForSeq2SeqLM.from_pretrained(repo_id, trust_remote_code=True, revision=result.commit_sha)
        assert type(loaded).__module__.startswith("transformers_modules.")
        batch = tokenizer(["hello"], return_tensors="pt")
        expected = model.generate(**batch, task_ids=model.task_ids(["copy"]), max_new_tokens=5)
        assert torch.equal(loaded.generate(**batch, task_ids=loaded.task_ids(["copy"]), max_new_tokens=5), expected)
        assert api.model_info(repo_id).private
    finally:
        api.delete_repo(repo_id, missing_ok=True)


# ---- failures of the network, the token, the permissions; user mistakes --------------------------------------------


def test_push_without_network_is_one_line(prepared, checked, capsys, monkeypatch):
    """The reported instance: `push ... --token hf_...` with no network gave a 74-line traceback (ConnectError)."""
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checked)
    commits = []
    monkeypatch.setattr(HfApi, "create_commit", lambda *args, **kwargs: commits.append(args))

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert main(["push", str(prepared.path), REPO_ID, "--token", FAKE_TOKEN]) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("alter-hub push: error: creating the repository: could not reach the Hub")
    assert "check the network" in lines[0] and "nothing was created or uploaded" in lines[0]
    assert commits == [] and FAKE_TOKEN not in out + err


def _http_error(status):
    import types

    from huggingface_hub.errors import HfHubHTTPError

    response = types.SimpleNamespace(status_code=status, headers={}, url="https://huggingface.co/api/repos/create",
                                     request=None, text="", json=lambda: {})
    error = HfHubHTTPError.__new__(HfHubHTTPError)
    Exception.__init__(error, f"{status} Client Error")
    error.response = response
    return error


@pytest.mark.parametrize("status,step,expected", [
    (401, "create_repo", "refused the token (HTTP 401)"),
    (403, "create_repo", "permission denied for test-org/alter-tiny (HTTP 403)"),
    (403, "create_commit", "the repository exists but nothing was committed"),
])
def test_push_auth_and_permission_failures_are_one_line(status, step, expected, prepared, checked, capsys,
                                                        monkeypatch):
    recorder = HubRecorder(monkeypatch)
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checked)

    def fail(*args, **kwargs):
        raise _http_error(status)

    monkeypatch.setattr(HfApi, step, fail)
    assert main(["push", str(prepared.path), REPO_ID, "--token", FAKE_TOKEN]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert "create_commit" not in recorder.names()
    with pytest.raises(HubConnectionError):
        push_folder(prepared.path, REPO_ID, token=FAKE_TOKEN)
    # --debug shows the traceback instead
    with pytest.raises(HubConnectionError):
        main(["--debug", "push", str(prepared.path), REPO_ID, "--token", FAKE_TOKEN])


@pytest.mark.parametrize("argv", [
    ["check", "{missing}"],
    ["push", "{missing}", REPO_ID, "--dry-run"],
    ["prepare", "{missing}", "{tmp}/out", "--repo-id", REPO_ID, "--domain", "x"],
    ["push", "{prepared}", "not-a-repo-id", "--dry-run"],
])
def test_user_mistakes_are_one_error_line_and_exit_2(argv, prepared, checked, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: checked)
    values = {"missing": str(tmp_path / "no-such-folder"), "tmp": str(tmp_path), "prepared": str(prepared.path)}
    assert main([arg.format(**values) for arg in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"alter-hub {argv[0]}: error: "), err
