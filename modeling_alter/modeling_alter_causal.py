"""ALTER for decoder-only backbones of the Llama family (Llama, Qwen2, Qwen3, Mistral): every decoder layer's MLP (and
optionally its self-attention) carries a Mixture-of-Task-Adapters module (see `mta.py`).

The attention (rotary, grouped-query heads, Qwen3's q/k norms, sliding windows), the MLP and the RMSNorms are
Transformers' own modules of the backbone family, built from the backbone's own decoder layer, so the parameter
names are those of `LlamaForCausalLM` / `Qwen2ForCausalLM` / ... and a converted checkpoint loads as is. This file
writes only the layer's residual wiring (the Llama pre-norm layout), where the MTA outputs are added. Routing reaches
every MTA module through an explicit `TaskRouting` argument built once per forward; no module keeps routing state
between calls. With `config.task_prefixes` set, `forward` and `generate` infer each example's task from its prompt's
prefix (`task_lifecycle.AlterTasksMixin`, shared with the T5 family). This file imports only torch, transformers,
`configuration_alter_causal`, `mta` and `task_lifecycle`.
"""

import copy
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .configuration_alter_causal import SUPPORTED_BACKBONES, AlterCausalConfig, backbone_field_names
from .mta import AlterMTA, build_routing, init_mta_weights
from .task_lifecycle import AlterTasksMixin

# Each family: its decoder layer (only its four sublayers are used), final norm and rotary embedding.
BACKBONE_MODULES = {
    "llama": (LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding),
    "qwen2": (Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding),
    "qwen3": (Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding),
    "mistral": (MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding),
}
LAYER_SUBLAYERS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}

# Transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# Releases before 5.24 index the mask and the cache by `cache_position` (the absolute positions of the new tokens).
_USES_CACHE_POSITION = "cache_position" in inspect.signature(create_causal_mask).parameters


@dataclass
class AlterCausalModelOutput(BaseModelOutputWithPast):
    """[`BaseModelOutputWithPast`] plus the MTA auxiliary loss and routing statistics (see [`AlterCausalLMOutput`])."""

    aux_loss: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    routing_entropy: torch.FloatTensor | None = None


@dataclass
class AlterCausalLMOutput(CausalLMOutputWithPast):
    """
    [`CausalLMOutputWithPast`] plus:

    aux_loss: the router's load-balancing loss summed over MTA modules (stage 2, training mode), already included in
        `loss` (times `router_aux_loss_coef`).
    routing_weights: `[batch, num_mta_modules, num_adapters]`, each example's mean mixture weight per adapter over
        its non-padding tokens (task adapters, then shared ones), in the order of `model.mta_modules()`. Only with
        `output_routing_weights=True`.
    routing_entropy: `[batch, num_mta_modules]`, the mean per-token entropy of the mixture weights.
    """

    aux_loss: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    routing_entropy: torch.FloatTensor | None = None


def _layer_type(config, layer_idx):
    """`"full_attention"` or `"sliding_attention"`: from `layer_types` (Qwen2/Qwen3), else from `sliding_window`
    (Mistral: every layer), else full attention (Llama)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


class AlterCausalDecoderLayer(nn.Module):
    """A Llama-layout decoder layer (`x + Attn(norm1(x))`, then `x + MLP(norm2(x))`) built from the backbone family's
    own sublayers, with an MTA module parallel to the MLP (`self.mta["ffn"]`) and optionally to the attention
    (`self.mta["self_attention"]`)."""

    def __init__(self, config: AlterCausalConfig, layer_idx: int):
        super().__init__()
        layer_class = BACKBONE_MODULES[config.backbone_model_type][0]
        base = layer_class(config, layer_idx)
        children = {name for name, _ in base.named_children()}
        if children != LAYER_SUBLAYERS:  # a layout this file's residual wiring does not reproduce
            raise ValueError(
                f"{layer_class.__name__} has sublayers {sorted(children)}; AlterForCausalLM supports the Llama layout "
                f"{sorted(LAYER_SUBLAYERS)} only."
            )
        self.self_attn = base.self_attn
        self.mlp = base.mlp
        self.input_layernorm = base.input_layernorm
        self.post_attention_layernorm = base.post_attention_layernorm
        self.attention_type = _layer_type(config, layer_idx)
        # Attention first: the order of the routing statistics. The name `mta` marks MTA parameters (stage sets).
        self.mta = nn.ModuleDict({place: AlterMTA(config) for place in config.mta_placement})
        self._cache_arg = "cache" if "cache" in inspect.signature(self.self_attn.forward).parameters else "past_key_values"

    def forward(self, hidden_states, routing, attention_mask=None, position_embeddings=None, position_ids=None,
                cache=None, use_cache=False, **kwargs):
        """`hidden_states` `[batch, length, hidden]` -> (`hidden_states`, attention weights or None, MTA stats)."""
        stats = []
        u = self.input_layernorm(hidden_states)
        out, attn_weights = self.self_attn(
            hidden_states=u, attention_mask=attention_mask, position_ids=position_ids,
            position_embeddings=position_embeddings, use_cache=use_cache, **{self._cache_arg: cache}, **kwargs,
        )
        if "self_attention" in self.mta:
            out, attn_stats = self.mta["self_attention"](u, routing, sublayer_out=out)  # attention(u) + MTA(u)
            stats = [attn_stats]
        hidden_states = hidden_states + out
        u = self.post_attention_layernorm(hidden_states)
        out, ffn_stats = self.mta["ffn"](u, routing, sublayer_out=self.mlp(u))  # MLP(u) + MTA(u)
        hidden_states = hidden_states + out
        return hidden_states, attn_weights, (*stats, ffn_stats)


class AlterCausalPreTrainedModel(PreTrainedModel):
    config_class = AlterCausalConfig
    config: AlterCausalConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["AlterCausalDecoderLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with the saved stage's trainable set."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # `output_loading_info=True` returns a pair
        loaded.set_stage(loaded.config.stage)
        return model

    def _mta_init_std(self) -> float:
        return self.config.initializer_range

    def _init_weights(self, module):
        if isinstance(module, AlterMTA):
            init_mta_weights(module, std=self._mta_init_std())
        else:  # the backbone's linears, embeddings, RMSNorms and rotary buffers, as Transformers initialises them
            super()._init_weights(module)


class AlterCausalModel(AlterCausalPreTrainedModel):
    """The decoder stack: token embeddings, ALTER decoder layers, final RMSNorm (parameter names of `LlamaModel`)."""

    def __init__(self, config: AlterCausalConfig):
        super().__init__(config)
        _, norm_class, rotary_class = BACKBONE_MODULES[config.backbone_model_type]
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([AlterCausalDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        task_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        **kwargs,
    ) -> AlterCausalModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, length)`): token ids (or `inputs_embeds`
            `(batch_size, length, hidden_size)`).
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + length)`, *optional*): 1 for tokens, 0
            for padding (left padding for generation). Padding is also left out of the routing statistics and the
            load-balancing loss.
        task_ids (`torch.LongTensor` of shape `(batch_size,)`): each example's task (index into
            `config.task_names`). Required in stage 1; optional in stage 2, where `None` (or the value `num_tasks`)
            routes from the hidden states alone.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past)[None]
        if _USES_CACHE_POSITION:
            kwargs.setdefault("cache_position", torch.arange(past, past + length, device=inputs_embeds.device))

        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, past_length + {length})."
                )
            token_mask = attention_mask[:, -length:]
        routing = build_routing(self.config, task_ids, batch, token_mask, output_routing_weights,
                                unknown_allowed=True, device=inputs_embeds.device)

        if isinstance(attention_mask, dict):  # already prepared (e.g. by `generate` with a static cache)
            masks = attention_mask
        else:
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           _MASK_CACHE_ARG: cache, "position_ids": position_ids}
            if _USES_CACHE_POSITION:
                mask_kwargs["cache_position"] = kwargs["cache_position"]
            layer_types = {layer.attention_type for layer in self.layers}
            masks = {}
            if "full_attention" in layer_types:
                masks["full_attention"] = create_causal_mask(**mask_kwargs)
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attentions, all_stats = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            args = (hidden_states, routing, masks[layer.attention_type], position_embeddings, position_ids, cache,
                    bool(use_cache))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant, so gradients reach adapters even when the frozen backbone's inputs need none.
                hidden_states, weights, stats = checkpoint(layer, *args, use_reentrant=False, **kwargs)
            else:
                hidden_states, weights, stats = layer(*args, **kwargs)
            all_attentions.append(weights)
            all_stats.extend(stats)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        aux_losses = [s.aux_loss for s in all_stats if s.aux_loss is not None]
        return AlterCausalModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            # as the backbone's own model: no entry for a layer whose attention returns no weights (sdpa, flash)
            attentions=tuple(a for a in all_attentions if a is not None) if output_attentions else None,
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            routing_weights=torch.stack([s.weights for s in all_stats], 1) if output_routing_weights else None,
            routing_entropy=torch.stack([s.entropy for s in all_stats], 1) if output_routing_weights else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )


class AlterForCausalLM(AlterTasksMixin, AlterCausalPreTrainedModel, GenerationMixin):
    r"""
    A Llama-family decoder-only LM (Llama, Qwen2, Qwen3, Mistral) with a Mixture-of-Task-Adapters in every decoder
    layer, trained in two stages (see `set_stage`). Convert a checkpoint with `from_causal_lm`.

    Pass `task_ids` (a LongTensor `[batch]`, see `task_ids(names)`) to `forward` and `generate`; `generate` expands
    it for beams and `num_return_sequences` and hands it to every decoding step. Or route by prompt prefix: after
    `model.set_task_prefixes({"sentiment": "sst2: "}, tokenizer=tok)`, `task_ids=None` infers each example's task from
    the token ids its prompt starts with (a leading `config.bos_token_id` skipped), so `pipeline("text-generation")`
    routes with no extra arguments.
    """

    prefix_skip_bos = True  # Llama-style tokenizers put BOS before the prompt; matching starts after it

    accepts_loss_kwargs = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AlterCausalConfig):
        super().__init__(config)
        self.model = AlterCausalModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._prefix_matcher = None  # ((task names, task_prefix_ids) at build time, PrefixMatcher), see the mixin
        self.post_init()
        self.set_stage(config.stage)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    # ---- conversion ---------------------------------------------------------------------------------------------

    @classmethod
    def from_causal_lm(cls, model_or_path, task_names, **mta_kwargs) -> "AlterForCausalLM":
        """
        Converts a `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` / `MistralForCausalLM` (a model, or a
        path/id loadable by `AutoModelForCausalLM`) into an ALTER model with `task_names` and the MTA fields of
        `AlterCausalConfig` in `mta_kwargs`. The up-projections start at zero, so the converted model computes
        exactly what the source model did, in both stages and with the source's attention implementation.
        """
        from transformers import AutoModelForCausalLM

        source = model_or_path
        if not isinstance(source, nn.Module):
            source = AutoModelForCausalLM.from_pretrained(model_or_path)
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        if model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"from_causal_lm expects a Llama-family causal LM with model_type in {list(SUPPORTED_BACKBONES)}, got "
                f"model_type={model_type!r}."
            )
        name = str(getattr(source.config, "_name_or_path", "") or "")
        if name and not os.path.exists(name):  # a Hub id, recorded for the model card (never a local path)
            mta_kwargs.setdefault("base_model", name)
        if "backbone_model_type" in mta_kwargs:
            raise ValueError(
                f"from_causal_lm takes backbone_model_type from the source model ({model_type!r}); do not pass "
                f"backbone_model_type={mta_kwargs['backbone_model_type']!r}."
            )
        source_config = source.config.to_dict()
        fields = backbone_field_names(model_type)
        backbone_kwargs = {key: source_config[key] for key in fields if key in source_config}
        config = cls.config_class(task_names=task_names, backbone_model_type=model_type, **backbone_kwargs, **mta_kwargs)
        if source.config._attn_implementation in ("eager", "sdpa"):
            config._attn_implementation = source.config._attn_implementation  # same attention kernel as the source
        model = cls(config).to(source.dtype).train(source.training)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        not_mta = [k for k in missing if ".mta." not in k and not (config.tie_word_embeddings and k == "lm_head.weight")]
        if not_mta or unexpected:
            raise ValueError(
                f"The checkpoint does not match the {model_type} layout: missing {not_mta}, unexpected {unexpected}."
            )
        model.generation_config = copy.deepcopy(source.generation_config)
        return model

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        task_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> AlterCausalLMOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, length)`): the tokens (prompt and answer when training).
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + length)`): 1 for tokens, 0 for padding.
        task_ids (`torch.LongTensor` of shape `(batch_size,)`):
            Each example's task id (`model.task_ids(names)`). Required in stage 1; in stage 2 `None` routes without.
            With `config.task_prefixes` set, `None` on a fresh prompt (`input_ids` and an empty cache) infers them
            from the prompts' prefixes (`infer_task_ids`); `generate` does this once and passes them to every step.
        cache / past_key_values (`Cache`, *optional*):
            The KV cache (Transformers >= 5.24 calls it `cache`, older releases `past_key_values`).
        labels (`torch.LongTensor` of shape `(batch_size, length)`, *optional*):
            Next-token targets aligned with `input_ids` (shifted inside); -100 (prompt, padding) is ignored.
        output_routing_weights (`bool`):
            Also return per-example routing weights and entropy per MTA module.
        logits_to_keep (`int`): compute logits only for the last `logits_to_keep` positions (0: all).
        num_items_in_batch (`int`, *optional*):
            Passed by `Trainer`: number of label tokens in the whole accumulated batch, so the loss is a sum divided
            by it and gradient accumulation keeps the same loss scale.
        kwargs: attention keyword arguments of Transformers (e.g. flash-attention's), passed to the attention; and
            `cache_position` on Transformers < 5.24 (computed from the cache when not given).

        Returns an [`AlterCausalLMOutput`] with `logits` `(batch_size, length or logits_to_keep, vocab_size)`.
        """
        if not _USES_CACHE_POSITION:  # passed by `generate()` of older releases; 5.24 needs none
            kwargs.pop("cache_position", None)
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if labels is not None:
            use_cache = False
        if task_ids is None:
            self._check_task_ids_reach_the_model()
        if task_ids is None and input_ids is not None and self.config.task_prefixes:
            if cache is None or cache.get_seq_length() == 0:  # later steps see only new tokens: pass task_ids
                task_ids = self.infer_task_ids(input_ids, attention_mask if isinstance(attention_mask, torch.Tensor)
                                               and attention_mask.dim() == 2 else None)
        if self.config.stage == 2 and self.training and task_ids is not None and self.config.task_id_drop_rate > 0:
            drop = torch.rand(task_ids.shape, device=task_ids.device) < self.config.task_id_drop_rate
            task_ids = task_ids.masked_fill(drop, self.config.num_tasks)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            task_ids=task_ids,
            cache=cache if use_cache else None,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing_weights=output_routing_weights,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        # Contiguous, so the head is one GEMM: a strided [batch, k, hidden] slice of a longer sequence would make
        # `matmul` broadcast the [vocab, hidden] weight into a batched GEMM when the weight needs no gradient (a
        # frozen backbone), at several times the cost of the plain model's head.
        logits = self.lm_head(hidden_states.contiguous())

        loss = None
        if labels is not None:
            shift_labels = labels[:, 1:].to(logits.device)
            shift_logits = logits[:, :-1].flatten(0, 1).float()
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels.flatten(), ignore_index=-100)
            else:
                loss = F.cross_entropy(shift_logits, shift_labels.flatten(), ignore_index=-100, reduction="sum")
                loss = loss / num_items_in_batch
            if outputs.aux_loss is not None and self.config.router_aux_loss_coef > 0:
                weight = 1.0 if num_items_in_batch is None else (shift_labels != -100).sum() / num_items_in_batch
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss * weight

        return AlterCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
            routing_weights=outputs.routing_weights,
            routing_entropy=outputs.routing_entropy,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["AlterForCausalLM", "AlterCausalModel", "AlterCausalPreTrainedModel", "AlterCausalDecoderLayer"]
