"""The ALTER model families a Hub folder can hold, keyed by `config.json`'s `model_type`: which class loads it, which
Auto class the folder maps, which code files it ships, and how the card describes and loads it."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str  # in `modeling_alter`
    auto_class: str  # the `transformers` Auto class of the card's snippet and of the isolated load
    code_files: tuple[str, ...]
    pipeline_tag: str

    def architecture(self, config) -> str:
        """A phrase of the card: the backbone's shape, from `config` (an object or a dict)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        if self.model_type == "alter_causal":
            return (f"a decoder-only {get('backbone_model_type')} LM ({get('num_hidden_layers')} layers, hidden size "
                    f"{get('hidden_size')})")
        return (f"a T5-style encoder-decoder ({get('num_layers')} encoder and {get('num_decoder_layers')} decoder "
                f"blocks, d_model {get('d_model')})")


FAMILIES = {
    "alter": Family("alter", "AlterForConditionalGeneration", "AutoModelForSeq2SeqLM",
                    ("configuration_alter.py", "configuration_mta.py", "modeling_alter.py", "mta.py", "task_lifecycle.py"),
                    "text2text-generation"),
    "alter_causal": Family("alter_causal", "AlterForCausalLM", "AutoModelForCausalLM",
                           ("configuration_alter_causal.py", "configuration_mta.py", "modeling_alter_causal.py",
                            "mta.py", "task_lifecycle.py"), "text-generation"),
}


def family_of(model_type) -> Family | None:
    """The family of a `model_type`, or None if it is not an ALTER model."""
    return FAMILIES.get(model_type)


def peft_folder_hint(folder) -> str:
    """For a folder without `config.json`: if it holds a PEFT adapter (`adapter_config.json`, as `Trainer` saves a
    PEFT-wrapped ALTER model), a sentence saying how to make a whole ALTER folder of it; else ""."""
    if not (Path(folder) / "adapter_config.json").is_file():
        return ""
    return (" It holds a PEFT adapter, not a whole model: load it onto its ALTER model (PeftModel.from_pretrained, then "
            "modeling_alter.load_mta_weights), save model.merge_and_unload().save_pretrained(DIR) and pass DIR.")


__all__ = ["FAMILIES", "Family", "family_of", "peft_folder_hint"]
