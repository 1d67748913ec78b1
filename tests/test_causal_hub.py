"""A decoder-only ALTER folder loads in a clean Python (project blocked) through AutoModelForCausalLM and runs in
pipeline("text-generation"), giving what the model gives in this process."""

import json

import pytest
import torch
from transformers import ByT5Tokenizer, pipeline

from causal_utils import TASKS, tiny_causal_alter
from hub_upload.check import load_in_clean_python
from hub_upload.isolated_load import PROMPT

CODE_FILES = {"configuration_alter_causal.py", "configuration_mta.py", "modeling_alter_causal.py", "mta.py"}


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


def test_folder_loads_in_a_clean_python_and_runs_in_the_text_generation_pipeline(saved):
    model, folder = saved
    report = load_in_clean_python(folder, timeout=300)
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
