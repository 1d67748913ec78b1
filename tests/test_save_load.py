"""Saving and loading through the Auto classes, in this process and in a clean one that cannot import the project."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import modeling_alter
from conftest import random_batch, tiny_alter
from modeling_alter import AlterForConditionalGeneration

HUB_FILES = ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py", "task_lifecycle.py")


def test_save_writes_the_hub_layout(tmp_path):
    tiny_alter().save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"config.json", "generation_config.json", "model.safetensors", *HUB_FILES} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "alter"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_alter.AlterConfig",
        "AutoModelForSeq2SeqLM": "modeling_alter.AlterForConditionalGeneration",
    }


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_import_only_torch_transformers_and_each_other(name):
    tree = ast.parse((Path(modeling_alter.__file__).parent / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." + (node.module or "") if node.level else node.module.split(".")[0])
    allowed = {"torch", "transformers", ".configuration_alter", ".configuration_mta", ".mta", ".task_lifecycle", "copy", "math", "os", "shutil", "tempfile",
               "dataclasses", "typing"}
    assert imported <= allowed, imported - allowed


def test_auto_classes_round_trip_in_process(tmp_path):
    model = tiny_alter()
    model.set_stage(2)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert config.stage == 2 and loaded.config.task_names == model.config.task_names
    batch = random_batch()
    with torch.no_grad():
        for task_ids in (torch.tensor([0, 1, 2, 0]), None):
            torch.testing.assert_close(loaded(**batch, task_ids=task_ids).logits,
                                       model(**batch, task_ids=task_ids).logits, atol=0, rtol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == model.trainable_parameter_names(2)


CLEAN_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_alter", "hub_upload"):
                raise ImportError(f"{name} must not be importable here")

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    folder, out = sys.argv[1], sys.argv[2]
    try:
        import modeling_alter
        raise SystemExit("the project is importable")
    except ImportError:
        pass
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(sys.argv[3])
    with torch.no_grad():
        logits = model(**batch, task_ids=model.task_ids(["reverse", "topic", "sentiment", "topic"])).logits
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   task_ids=model.task_ids(["topic"] * 4), max_new_tokens=4, num_beams=2)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    torch.save({"logits": logits, "generated": generated, "model_type": config.model_type}, out)
    """
)


def test_clean_process_loads_the_folder_through_auto_classes(tmp_path):
    model = tiny_alter()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load.py"
    script.write_text(CLEAN_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(tmp_path / "out.pt"), str(tmp_path / "batch.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids(["reverse", "topic", "sentiment", "topic"])).logits
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   task_ids=model.task_ids(["topic"] * 4), max_new_tokens=4, num_beams=2)
    assert out["model_type"] == "alter"
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=0)  # a separate process may pick other CPU kernels (threads)
    assert torch.equal(out["generated"], generated)


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    first = tiny_alter(seed=0)
    first.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    import transformers.modeling_utils as modeling_utils

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modeling_utils, "safe_save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_alter(seed=1).save_pretrained(tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before
    assert not any(name.startswith(".alter-save-") for name in os.listdir(tmp_path.parent))


def test_saving_again_replaces_the_weights(tmp_path):
    tiny_alter(seed=0).save_pretrained(tmp_path)
    second = tiny_alter(seed=1)
    second.save_pretrained(tmp_path)
    loaded = AlterForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, task_ids=torch.tensor([0, 1, 2, 0])).logits,
                                   second(**batch, task_ids=torch.tensor([0, 1, 2, 0])).logits, atol=0, rtol=0)


def test_from_pretrained_with_loading_info_keeps_the_stage(tmp_path):
    model = tiny_alter()
    model.set_stage(2)
    model.save_pretrained(tmp_path)
    loaded, info = AlterForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == model.trainable_parameter_names(2)


PUBLISHED_CODE = Path(__file__).parent / "fixtures" / "hub_code_before_task_lifecycle"


def test_a_folder_published_before_task_lifecycle_py_still_loads(tmp_path):
    """Folders carry their own code: one published when `mta.py` still held `AlterTasksMixin` (four code files, no
    `task_lifecycle.py`) loads in a clean process and computes what this release computes from the same weights."""
    model = tiny_alter()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    (folder / "task_lifecycle.py").unlink()
    for name in ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py"):
        (folder / name).write_bytes((PUBLISHED_CODE / name).read_bytes())
    assert "class AlterTasksMixin" in (folder / "mta.py").read_text()
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load.py"
    script.write_text(CLEAN_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(tmp_path / "out.pt"), str(tmp_path / "batch.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids(["reverse", "topic", "sentiment", "topic"])).logits
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=0)  # another process: other CPU kernel choices
