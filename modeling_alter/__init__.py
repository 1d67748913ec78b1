"""ALTER: Mixture-of-Task-Adapters for small multi-task learners: T5-family encoder-decoders
(`AlterForConditionalGeneration`) and Llama-family decoder-only LMs (`AlterForCausalLM`).

The model classes import only torch and transformers; the training side (trainer, callback, data, metrics) is
imported on first use, so the model runs wherever the Hub files run.
"""

__version__ = "0.4.0"  # keep equal to setup.cfg's version and CHANGELOG.md's newest release (tests/test_docs.py)

import importlib

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .configuration_alter import AlterConfig
from .configuration_alter_causal import AlterCausalConfig
from .modeling_alter import AlterForConditionalGeneration, AlterMTA
from .modeling_alter_causal import AlterForCausalLM

AlterConfig.register_for_auto_class()
AlterForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
AutoConfig.register("alter", AlterConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(AlterConfig, AlterForConditionalGeneration, exist_ok=True)
AlterCausalConfig.register_for_auto_class()
AlterForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register("alter_causal", AlterCausalConfig, exist_ok=True)
AutoModelForCausalLM.register(AlterCausalConfig, AlterForCausalLM, exist_ok=True)

_LAZY = {
    "AlterTrainer": ".trainer",
    "AlterTrainingArguments": ".trainer",
    "StageSwitchCallback": ".callback",
    "AlterStagesMixin": ".stages",
    "TaskIdsCollator": ".data",
    "chat_task_prefixes": ".data",
    "MultiTaskDataCollator": ".data",
    "build_eval_datasets": ".data",
    "build_multitask_dataset": ".data",
    "load_task_data": ".data",
    "mixing_rates": ".data",
    "compute_metric": ".metrics",
    "make_synthetic_tasks": ".synthetic_tasks",
    "load_mta_weights": ".peft_wrapping",
    "save_mta_weights": ".peft_wrapping",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "AlterConfig", "AlterForConditionalGeneration", "AlterMTA", "AlterCausalConfig", "AlterForCausalLM",
    *_LAZY,
]
