"""Configuration of decoder-only ALTER models: a Llama-family backbone's configuration plus the MTA fields."""

from transformers import AutoConfig, PretrainedConfig

from .configuration_mta import set_mta_fields

# Decoder-only backbones with the Llama layer layout (pre-norm RMSNorm, rotary grouped-query attention, gated MLP).
SUPPORTED_BACKBONES = ("llama", "qwen2", "qwen3", "mistral")
CAUSAL_MTA_PLACEMENTS = ("self_attention", "ffn")


def backbone_field_names(backbone_model_type):
    """The fields of the backbone's own configuration class beyond those every `PretrainedConfig` has."""
    generic = set(PretrainedConfig().to_dict())
    return set(AutoConfig.for_model(backbone_model_type).to_dict()) - generic


class AlterCausalConfig(PretrainedConfig):
    r"""
    Configuration of an [`AlterForCausalLM`]: every field of the backbone's configuration (`LlamaConfig`,
    `Qwen2Config`, `Qwen3Config` or `MistralConfig`, chosen by `backbone_model_type`) with the same name, meaning and
    default, plus the fields of the Mixture-of-Task-Adapters.

    Args:
        backbone_model_type (`str`, defaults to `"llama"`):
            `model_type` of the backbone: one of `"llama"`, `"qwen2"`, `"qwen3"`, `"mistral"`. The backbone's own
            configuration class fills in the defaults of its fields (e.g. `layer_types`, `rope_parameters`,
            `head_dim`) and normalises them.
        task_names, adapter_dim, adapter_activation, adapter_form, num_shared_adapters, router_top_k,
        router_aux_loss_coef, task_id_drop_rate, stage, stage1_train_backbone, visible_task_adapters, base_model:
            As in [`AlterConfig`], with the same defaults (`router_top_k="auto"`, `adapter_form="plain"`) and the same
            validation (`configuration_mta.set_mta_fields`).
        task_prefixes (`dict[str, str]`, *optional*), task_prefix_ids (`dict[str, list[int]]`, *optional*):
            As in [`AlterConfig`]: with `task_ids=None`, `forward` and `generate` infer each example's task from the
            token ids its prompt starts with; fill the ids with `model.set_task_prefixes(tokenizer=...)`. A leading
            `bos_token_id` (added by Llama-style tokenizers) is skipped before matching, so the ids never include it.
        mta_placement (`list[str]`, defaults to `["ffn"]`):
            Sublayers of every decoder layer that carry an MTA module: `"ffn"` (required; parallel to the MLP,
            reading the post-attention RMSNorm output) and optionally `"self_attention"` (parallel to the attention,
            reading the input RMSNorm output).
        kwargs:
            The backbone's fields (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
            `num_attention_heads`, `num_key_value_heads`, `rms_norm_eps`, `rope_parameters`, `tie_word_embeddings`,
            ...) and the generic `PretrainedConfig` arguments.
    """

    model_type = "alter_causal"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        task_names=("default",),
        adapter_dim=64,
        adapter_activation="relu",
        adapter_form="plain",
        num_shared_adapters=1,
        mta_placement=("ffn",),
        router_top_k="auto",
        router_aux_loss_coef=0.01,
        task_id_drop_rate=0.1,
        stage=1,
        stage1_train_backbone=True,
        task_prefixes=None,
        task_prefix_ids=None,
        visible_task_adapters=None,
        backbone_model_type="llama",
        **kwargs,
    ):
        set_mta_fields(
            self, task_names=task_names, adapter_dim=adapter_dim, adapter_activation=adapter_activation,
            adapter_form=adapter_form, num_shared_adapters=num_shared_adapters, mta_placement=mta_placement,
            allowed_placements=CAUSAL_MTA_PLACEMENTS, router_top_k=router_top_k,
            router_aux_loss_coef=router_aux_loss_coef, task_id_drop_rate=task_id_drop_rate, stage=stage,
            stage1_train_backbone=stage1_train_backbone, task_prefixes=task_prefixes, task_prefix_ids=task_prefix_ids,
            visible_task_adapters=visible_task_adapters,
        )
        if backbone_model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"backbone_model_type={backbone_model_type!r} is not supported; expected one of {list(SUPPORTED_BACKBONES)}."
            )
        self.backbone_model_type = backbone_model_type
        fields = backbone_field_names(backbone_model_type)
        backbone_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
        backbone = AutoConfig.for_model(backbone_model_type, **backbone_kwargs).to_dict()
        general = ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
        for key in general:
            if key in backbone:
                kwargs.setdefault(key, backbone[key])
        kwargs.setdefault("is_encoder_decoder", False)
        super().__init__(**kwargs)
        for key in sorted(fields):
            if key not in general:
                setattr(self, key, backbone[key])

    @property
    def num_tasks(self):
        return len(self.task_names)

    @property
    def num_adapters(self):
        """Task adapters plus shared adapters in every MTA module."""
        return len(self.task_names) + self.num_shared_adapters


__all__ = ["AlterCausalConfig"]
