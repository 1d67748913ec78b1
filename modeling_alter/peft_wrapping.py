"""An ALTER model inside a PEFT wrapper: finding it, and saving and loading ALTER's own weights next to PEFT's.

`PeftModel.save_pretrained` (and so `Trainer.save_model` and every checkpoint of a PEFT-wrapped model) writes only
the weights PEFT injected (LoRA's `lora_A` / `lora_B`, ...). Under PEFT an ALTER model also trains weights of its
own, in every MTA module: the task adapters in stage 1; the gate, task embeddings and shared adapters in stage 2.
PEFT does not save them, so a PEFT folder alone reloads an ALTER model with untrained adapters and gate.
[`AlterStagesMixin`] (and so `AlterTrainer`) writes them beside PEFT's files as `alter_mta.safetensors`, with the
model's stage, and reads them back when it resumes or loads the best checkpoint. To reload a trained model:

```python
from peft import PeftModel
from modeling_alter import AlterForCausalLM, load_mta_weights

base = AlterForCausalLM.from_causal_lm("backbone-folder", task_names=[...], adapter_dim=...)  # as before training
model = PeftModel.from_pretrained(base, "out/checkpoint-500")
load_mta_weights(model, "out/checkpoint-500")  # the task adapters, gate, ... and the stage
```

Or keep one self-contained ALTER folder: `model.merge_and_unload().save_pretrained(folder)` merges LoRA into the
backbone's weights and saves every ALTER weight with the model's code.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_mta import MTA_SHAPE_FIELDS, differing_mta_settings

MTA_WEIGHTS_NAME = "alter_mta.safetensors"  # beside a PEFT adapter's files


def unwrap_alter_model(model):
    """The ALTER model inside `model` (itself, or the base model of a PEFT wrapper); `ValueError` if there is none."""
    inner = model
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        inner = model.get_base_model()
    if not (hasattr(inner, "set_stage") and hasattr(inner, "trainable_parameter_names")):
        raise ValueError(
            f"ALTER's stages train an AlterForConditionalGeneration or AlterForCausalLM (or a PEFT model around one), "
            f"got {type(model).__name__}."
        )
    return inner


def mta_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of the MTA modules of `model` (an ALTER model, or a PEFT model around one), by its name in the
    ALTER model's `state_dict()`: task adapters (their banks, also while split per task), gates, task embeddings,
    shared adapters."""
    alter = unwrap_alter_model(model)
    return {name: tensor for name, tensor in alter.state_dict().items() if ".mta." in f".{name}"}


def save_mta_weights(model, folder) -> str:
    """Writes `mta_state_dict(model)` and the model's stage to `folder/alter_mta.safetensors` (written to a temporary
    file first, then renamed: a failed save leaves an earlier file intact). Returns the file's path."""
    alter = unwrap_alter_model(model)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MTA_WEIGHTS_NAME)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in mta_state_dict(alter).items()}
    settings = json.dumps({key: getattr(alter.config, key) for key in MTA_SHAPE_FIELDS})
    partial = f"{path}.partial"
    save_file(weights, partial, metadata={"format": "pt", "stage": str(alter.config.stage), "mta_settings": settings})
    os.replace(partial, path)
    return path


def _mta_weights_file(folder, revision):
    """The local path of `folder`'s weight file: in the folder if it is one, else downloaded from the Hub repository
    of that id (cached by `huggingface_hub`)."""
    missing = (f"{os.path.join(folder, MTA_WEIGHTS_NAME)} does not exist: the folder holds no ALTER weights "
               "(AlterTrainer writes them beside a PEFT adapter; a folder saved by PeftModel.save_pretrained alone "
               "lacks them).")
    if os.path.isdir(folder) or os.path.isabs(folder) or folder.startswith("."):
        if not os.path.isfile(os.path.join(folder, MTA_WEIGHTS_NAME)):
            raise FileNotFoundError(missing)
        return os.path.join(folder, MTA_WEIGHTS_NAME)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

    try:
        return hf_hub_download(folder, MTA_WEIGHTS_NAME, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError) as error:
        raise FileNotFoundError(f"{missing} On the Hub: {type(error).__name__}.") from None


def mta_weights_stage(folder) -> int | None:
    """The stage (1 or 2) recorded in `folder`'s `alter_mta.safetensors`, or None if the folder has no such file (or
    it records none)."""
    path = os.path.join(folder, MTA_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as handle:
        stage = (handle.metadata() or {}).get("stage")
    return int(stage) if stage is not None else None


def load_mta_weights(model, folder, revision=None, set_stage=True) -> None:
    """Loads `alter_mta.safetensors` (written by `save_mta_weights`, as `AlterTrainer` does beside a PEFT adapter)
    from `folder`, a local folder or a Hub repository id as `PeftModel.from_pretrained` takes (at `revision`), into
    `model` (an ALTER model, or a PEFT model around one) and, with `set_stage`, sets the stage it records. A PEFT
    model is also made to pass `task_ids` on (`route_task_ids_through`).

    Raises `FileNotFoundError` if the folder (or repository) has no such file, and `ValueError` naming each
    difference if the model was built otherwise than the one that wrote it (`MTA_SHAPE_FIELDS`: tasks, adapter size,
    form, activation, ...) or, for a file without those settings, the weights that do not match."""
    alter = unwrap_alter_model(model)
    path = _mta_weights_file(str(folder), revision)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    differ = differing_mta_settings(json.loads(metadata.get("mta_settings", "{}")), alter.config)
    if differ:
        raise ValueError(f"{path} was written by an ALTER model built otherwise ({'; '.join(differ)}): build the model "
                         "with the settings it was trained with.")
    expected = mta_state_dict(alter)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    shapes = sorted(name for name in set(weights) & set(expected) if weights[name].shape != expected[name].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model's MTA modules: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {[(n, tuple(weights[n].shape), tuple(expected[n].shape)) for n in shapes[:3]]} (build "
            "the model with the task names and MTA settings it was trained with).")
    alter.load_state_dict(weights, strict=False)
    if set_stage and "stage" in metadata:
        alter.set_stage(int(metadata["stage"]))
    if model is not alter:
        alter.route_task_ids_through(model)


__all__ = ["MTA_WEIGHTS_NAME", "unwrap_alter_model", "mta_state_dict", "save_mta_weights", "mta_weights_stage",
           "load_mta_weights"]
