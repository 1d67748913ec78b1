"""A decoder-only ALTER folder loads in a clean Python (project blocked) through AutoModelForCausalLM and runs in
pipeline("text-generation"), giving what the model gives in this process."""

import json

import pytest
import torch
from transformers import ByT5Tokenizer, pipeline

from causal_utils import TASKS, tiny_causal_alter
from hub_upload.isolated_load import PROMPT

CODE_FILES = {"configuration_alter_causal.py", "configuration_mta.py", "modeling_alter_causal.py", "mta.py",
              "task_lifecycle.py"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal-folder")
    model = tiny_causal_alter("llama", stage=2, router_top_k=2)
    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return model, folder


def test_saved_folder_ships_the_causal_code_files(saved):
    _, folder = saved
    names = {path.name for path in folder.iterdir()}
    assert CODE_FILES <= names and "model.safetensors" in names
    assert not {"modeling_alter.py", "configuration_alter.py"} & names  # the T5 family's files are not needed
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "alter_causal" and config["backbone_model_type"] == "llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_alter_causal.AlterCausalConfig",
                                  "AutoModelForCausalLM": "modeling_alter_causal.AlterForCausalLM"}


def test_folder_loads_in_a_clean_python_and_runs_in_the_text_generation_pipeline(saved, checked_causal):
    model, _ = saved
    report = checked_causal.load  # `load_in_clean_python` of the prepared folder, run by `check_folder`
    assert report["ok"] and report["auto_class"] == "AutoModelForCausalLM"
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("modeling_alter_causal.AlterForCausalLM")
    assert report["loaded_project_modules"] == [] and report["weight_problems"] == {}
    assert report["stage"] == 2 and report["task_names"] == TASKS

    tokenizer = ByT5Tokenizer()
    batch = tokenizer([PROMPT], return_tensors="pt")
    for name in TASKS:  # the clean process generated what this process generates
        with torch.no_grad():
            out = model.generate(**batch, task_ids=model.task_ids([name]), max_new_tokens=8, num_beams=2)
        assert report["generations"][name] == tokenizer.decode(out[0, batch["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)
    name = TASKS[0]
    out = model.generate(**batch, task_ids=model.task_ids([name]), max_new_tokens=8, do_sample=False)
    assert report["pipeline"][name] == tokenizer.decode(out[0], skip_special_tokens=True)


def test_pipeline_in_process_routes_by_the_task_ids_kwarg(saved):
    model, folder = saved
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    texts = {name: generator(PROMPT, task_ids=generator.model.task_ids([name]), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False)[0]["generated_text"] for name in TASKS}
    assert all(text.startswith(PROMPT) for text in texts.values())
    assert len(set(texts.values())) > 1  # the task changes what is generated


# ---- hub_upload: prepare, check and push a decoder-only folder -----------------------------------------------------

REPO_ID = "test-org/alter-causal-tiny"


@pytest.fixture(scope="module")
def prepared_causal(saved, tmp_path_factory):
    from hub_upload.folder import prepare_folder

    _, folder = saved
    results = {f"eval_{task}_exact_match": 0.5 for task in TASKS}
    (folder / "all_results.json").write_text(json.dumps(results))
    return prepare_folder(folder, tmp_path_factory.mktemp("prepared") / "hub", repo_id=REPO_ID,
                          domain="Synthetic tasks", base_model="Qwen/Qwen2.5-0.5B")


@pytest.fixture(scope="module")
def checked_causal(prepared_causal):
    from hub_upload.check import check_folder

    return check_folder(prepared_causal.path, timeout=300)


def test_prepare_check_and_dry_run_push_a_causal_folder(prepared_causal, checked_causal, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    from hub_upload.__main__ import main
    from hub_upload.card import card_repo_id

    path = prepared_causal.path
    names = {p.name for p in path.iterdir()}
    assert CODE_FILES <= names and "README.md" in names and "modeling_alter.py" not in names
    card = (path / "README.md").read_text()
    data = ModelCard(card).data
    assert data.pipeline_tag == "text-generation" and data.base_model == "Qwen/Qwen2.5-0.5B"
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}"' in card and "AutoModelForSeq2SeqLM" not in card
    assert "decoder-only llama LM (2 layers, hidden size 32)" in card
    assert card_repo_id(card) == REPO_ID

    report = checked_causal
    assert report.load["auto_class"] == "AutoModelForCausalLM" and report.load["loaded_project_modules"] == []
    assert report.load["parameters"] == prepared_causal.parameters

    monkeypatch.setattr("hub_upload.push.check_folder", lambda folder, **kwargs: report)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "Q" * 34)
    assert main(["push", str(path), REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN: would upload" in out and "modeling_alter_causal.py" in out


def test_check_refuses_a_causal_folder_without_its_auto_class(prepared_causal, tmp_path):
    import shutil

    from hub_upload.check import check_structure

    folder = tmp_path / "hub"
    shutil.copytree(prepared_causal.path, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]["AutoModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    problems = check_structure(folder, sorted(p.name for p in folder.iterdir()))[0]
    assert any("auto_map['AutoModelForCausalLM'] is None" in p for p in problems)
