"""ALTER: Mixture-of-Task-Adapters for small encoder-decoder multi-task learners."""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from .configuration_alter import AlterConfig
from .modeling_alter import AlterForConditionalGeneration, AlterMTA

AlterConfig.register_for_auto_class()
AlterForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
AutoConfig.register("alter", AlterConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(AlterConfig, AlterForConditionalGeneration, exist_ok=True)

__all__ = ["AlterConfig", "AlterForConditionalGeneration", "AlterMTA"]
