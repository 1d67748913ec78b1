"""ALTER: a T5 encoder-decoder whose blocks carry a Mixture-of-Task-Adapters (MTA) module (see `mta.py`).

Every sublayer in `config.mta_placement` adds its MTA module's output to its own, both reading the same normalised
input. Routing reaches every module through an explicit `TaskRouting` argument built once per forward of each stack;
no module keeps routing state between calls. Task and stage methods, add/keep tasks and prefix routing come from
`task_lifecycle.AlterTasksMixin`. This file imports only torch, transformers, `configuration_alter`, `mta` and
`task_lifecycle`.
"""

import copy
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerNorm
from transformers.utils import logging as hf_logging

from .configuration_alter import AlterConfig
from .mta import AlterMTA, build_routing, init_mta_weights
from .task_lifecycle import AlterTasksMixin

try:  # Transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init

# Transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


@dataclass
class AlterStackOutput(BaseModelOutput):
    """Output of the encoder or decoder: [`BaseModelOutput`] plus cross-attentions, MTA auxiliary loss and routing
    statistics (see [`AlterSeq2SeqLMOutput`])."""

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    routing_entropy: torch.FloatTensor | None = None


@dataclass
class AlterSeq2SeqLMOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] plus:

    aux_loss: the router's load-balancing loss summed over MTA modules (stage 2, training mode), already included in
        `loss` (times `router_aux_loss_coef`).
    routing_weights: `[batch, num_mta_modules, num_adapters]`, each example's mean mixture weight per adapter over
        its tokens (task adapters, then shared ones), encoder modules first in the order of `model.mta_modules()`.
        Only with `output_routing_weights=True`.
    routing_entropy: `[batch, num_mta_modules]`, the mean per-token entropy of the mixture weights.
    """

    aux_loss: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    routing_entropy: torch.FloatTensor | None = None


class AlterAttention(nn.Module):
    """T5 attention (no score scaling, relative position bias) with an eager and an SDPA path."""

    def __init__(self, config: AlterConfig, is_decoder: bool, has_relative_attention_bias: bool, layer_idx: int):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        self.layer_idx = layer_idx
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        self.dropout = config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def compute_bias(self, query_length: int, key_length: int, past_length: int = 0) -> torch.Tensor:
        """Relative position bias [1, heads, query_length, key_length] (T5's bucketing)."""
        device = self.relative_attention_bias.weight.device
        context = torch.arange(query_length, device=device)[:, None] + past_length
        memory = torch.arange(key_length, device=device)[None, :]
        buckets = _relative_position_bucket(
            memory - context,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def _split_heads(self, x):
        return x.view(x.shape[0], -1, self.n_heads, self.d_kv).transpose(1, 2)

    def _cross_key_values(self, key_value_states, cache):
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        key, value = self._split_heads(self.k(key_value_states)), self._split_heads(self.v(key_value_states))
        if cache is not None:
            key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
            cache.is_updated[self.layer_idx] = True
        return key, value

    def forward(self, hidden_states, bias, key_value_states=None, cache=None, output_attentions=False):
        """`bias` is the position bias plus the additive attention mask; `cache` an `EncoderDecoderCache`."""
        query = self._split_heads(self.q(hidden_states))
        if key_value_states is None:
            key, value = self._split_heads(self.k(hidden_states)), self._split_heads(self.v(hidden_states))
            if cache is not None:
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        else:
            key, value = self._cross_key_values(key_value_states, cache)

        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation != "sdpa":
            scores = query @ key.transpose(-1, -2)
            if bias is not None:
                scores = scores + bias
            weights = F.dropout(scores.float().softmax(-1).type_as(scores), p=dropout, training=self.training)
            out = weights @ value
        else:
            mask = None if bias is None else bias.to(query.dtype)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=1.0)
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, self.n_heads * self.d_kv)
        return self.o(out), weights


def _relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's mapping of relative positions to buckets: exact for small distances, logarithmic up to max_distance."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


def _clamp_fp16(hidden_states):
    """T5's half-precision guard: in float16, clamps values to the finite range (a little below it when some
    overflowed to inf), so that an overflowing sublayer does not turn the next layer norm into NaN."""
    if hidden_states.dtype == torch.float16:
        finite_max = torch.finfo(torch.float16).max
        clamp_value = torch.where(torch.isinf(hidden_states).any(), finite_max - 1000, finite_max)
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


def _with_mta(mta, u, sublayer_out, routing):
    if mta is None:
        return sublayer_out, None
    adapter_out, stats = mta(u, routing)
    # An overflowing adapter must not meet an overflowing sublayer of the other sign (inf - inf = NaN); the sum
    # itself is clamped after the residual, where T5 clamps.
    return sublayer_out + _clamp_fp16(adapter_out), stats


class AlterLayerSelfAttention(nn.Module):
    def __init__(self, config, is_decoder, has_relative_attention_bias, layer_idx):
        super().__init__()
        self.SelfAttention = AlterAttention(config, is_decoder, has_relative_attention_bias, layer_idx)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.mta = AlterMTA(config) if "self_attention" in config.mta_placement else None

    def forward(self, hidden_states, bias, routing, cache=None, output_attentions=False):
        u = self.layer_norm(hidden_states)
        out, weights = self.SelfAttention(u, bias, cache=cache, output_attentions=output_attentions)
        out, stats = _with_mta(self.mta, u, out, routing)
        return hidden_states + self.dropout(out), weights, stats


class AlterLayerCrossAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.EncDecAttention = AlterAttention(config, True, False, layer_idx)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.mta = AlterMTA(config) if "cross_attention" in config.mta_placement else None

    def forward(self, hidden_states, key_value_states, bias, routing, cache=None, output_attentions=False):
        u = self.layer_norm(hidden_states)
        out, weights = self.EncDecAttention(u, bias, key_value_states, cache=cache, output_attentions=output_attentions)
        out, stats = _with_mta(self.mta, u, out, routing)
        return hidden_states + self.dropout(out), weights, stats


class AlterLayerFF(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.mta = AlterMTA(config)

    def forward(self, hidden_states, routing):
        u = self.layer_norm(hidden_states)
        out, stats = _with_mta(self.mta, u, self.DenseReluDense(u), routing)
        return hidden_states + self.dropout(out), stats


class AlterBlock(nn.Module):
    """A T5 block (self-attention, cross-attention in the decoder, feed-forward) whose sublayers carry MTA."""

    def __init__(self, config: AlterConfig, is_decoder: bool, has_relative_attention_bias: bool, layer_idx: int):
        super().__init__()
        self.is_decoder = is_decoder
        layers = [AlterLayerSelfAttention(config, is_decoder, has_relative_attention_bias, layer_idx)]
        if is_decoder:
            layers.append(AlterLayerCrossAttention(config, layer_idx))
        layers.append(AlterLayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden_states, self_bias, routing, encoder_hidden_states=None, cross_bias=None, cache=None,
                output_attentions=False):
        hidden_states, self_weights, self_stats = self.layer[0](hidden_states, self_bias, routing, cache, output_attentions)
        hidden_states = _clamp_fp16(hidden_states)  # after every sublayer, where T5 clamps
        cross_weights, cross_stats = None, None
        if self.is_decoder:
            hidden_states, cross_weights, cross_stats = self.layer[1](
                hidden_states, encoder_hidden_states, cross_bias, routing, cache, output_attentions
            )
            hidden_states = _clamp_fp16(hidden_states)
        hidden_states, ff_stats = self.layer[-1](hidden_states, routing)
        hidden_states = _clamp_fp16(hidden_states)
        stats = tuple(s for s in (self_stats, cross_stats, ff_stats) if s is not None)
        return hidden_states, self_weights, cross_weights, stats


def _additive_mask(mask, dtype):
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class AlterStack(nn.Module):
    """The encoder or the decoder: embeddings (encoder only; the decoder takes `inputs_embeds`), blocks, final norm."""

    main_input_name = "input_ids"

    def __init__(self, config: AlterConfig, is_decoder: bool):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        if not is_decoder:
            # The only copy of the shared input embeddings (`model.shared`); the decoder receives embeddings.
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        n_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([AlterBlock(config, is_decoder, i == 0, i) for i in range(n_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
        routing_token_mask: torch.Tensor | None = None,
    ):
        r"""
        task_ids (`torch.LongTensor` of shape `(batch_size,)`):
            Each example's task (index into `config.task_names`). Required in stage 1; optional in stage 2, where
            `None` routes from the hidden states alone. The value `num_tasks` stands for "unknown task".
        routing_token_mask (`torch.Tensor` of shape `(batch_size, length)`, *optional*):
            The tokens counted in the routing statistics and the load-balancing loss; defaults to `attention_mask` in
            the encoder and to every token in the decoder.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            if self.is_decoder:
                raise ValueError("The ALTER decoder takes `inputs_embeds` (embedded with `model.shared`).")
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if routing_token_mask is not None and routing_token_mask.shape != (batch, length):
            raise ValueError(
                f"routing_token_mask has shape {tuple(routing_token_mask.shape)}; expected ({batch}, {length})."
            )
        if routing_token_mask is None and not self.is_decoder:
            routing_token_mask = attention_mask  # its shape is checked below
        routing = build_routing(self.config, task_ids, batch, routing_token_mask,
                                 output_routing_weights, unknown_allowed=True, device=inputs_embeds.device)
        hidden_states = self.dropout(inputs_embeds)
        dtype = hidden_states.dtype

        past_length = cache.self_attention_cache.get_seq_length() if cache is not None else 0
        key_length = past_length + length
        self_bias = self.block[0].layer[0].SelfAttention.compute_bias(length, key_length, past_length).to(dtype)
        if self.is_decoder:
            causal = torch.arange(key_length, device=self_bias.device)[None, :] <= (
                torch.arange(length, device=self_bias.device)[:, None] + past_length
            )
            self_bias = self_bias + _additive_mask(causal, dtype)[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (batch, key_length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {key_length})."
                )
            self_bias = self_bias + _additive_mask(attention_mask, dtype)[:, None, None, :]
        cross_bias = None
        if self.is_decoder and encoder_attention_mask is not None:
            cross_bias = _additive_mask(encoder_attention_mask, dtype)[:, None, None, :]

        all_hidden, all_self, all_cross, all_stats = [], [], [], []
        for block in self.block:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            args = (hidden_states, self_bias, routing, encoder_hidden_states, cross_bias, cache, bool(output_attentions))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, self_w, cross_w, stats = _checkpointed(self, block, args)
            else:
                hidden_states, self_w, cross_w, stats = block(*args)
            all_self.append(self_w)
            all_cross.append(cross_w)
            all_stats.extend(stats)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if output_hidden_states:
            all_hidden.append(hidden_states)

        aux_losses = [s.aux_loss for s in all_stats if s.aux_loss is not None]
        output = AlterStackOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            routing_weights=torch.stack([s.weights for s in all_stats], 1) if output_routing_weights else None,
            routing_entropy=torch.stack([s.entropy for s in all_stats], 1) if output_routing_weights else None,
            cross_attentions=tuple(all_cross) if output_attentions and self.is_decoder else None,
        )
        return output


def _checkpointed(stack, block, args):
    """Runs `block(*args)` through the checkpoint function that `gradient_checkpointing_enable` set (with the user's
    `gradient_checkpointing_kwargs`), non-reentrant so that gradients reach adapters behind a frozen backbone."""
    function = getattr(stack, "_gradient_checkpointing_func", None)
    if function is None:
        return checkpoint(block, *args, use_reentrant=False)
    keywords = getattr(function, "keywords", None) or {}
    if keywords.get("use_reentrant"):
        # Transformers < 5 asks for it by default, so it is overridden (with a warning) rather than refused here;
        # AlterTrainer refuses it when the training arguments ask for it explicitly.
        hf_logging.get_logger(__name__).warning_once(
            "gradient_checkpointing_kwargs={'use_reentrant': True} is not supported by ALTER (reentrant checkpointing "
            "loses the gradient of the router's load-balancing loss): checkpointing runs with use_reentrant=False."
        )
    return function(block, *args, use_reentrant=False)


class AlterPreTrainedModel(PreTrainedModel):
    config_class = AlterConfig
    config: AlterConfig
    base_model_prefix = "alter"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["AlterBlock"]
    _keep_in_fp32_modules = ["wo"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with the saved stage's trainable set, and an error naming what differs
        when the checkpoint's adapters or tasks do not fit the configuration asked for."""
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except RuntimeError as error:
            if "mismatch" not in str(error):
                raise
            raise ValueError(_describe_mismatch(pretrained_model_name_or_path, kwargs)) from error
        loaded = model[0] if isinstance(model, tuple) else model  # `output_loading_info=True` returns a pair
        loaded.set_stage(loaded.config.stage)
        return model

    def save_pretrained(self, save_directory, *args, push_to_hub=False, **kwargs):
        """`PreTrainedModel.save_pretrained`, written to a temporary folder first so that a failed save leaves the
        files already in `save_directory` intact."""
        if push_to_hub or not isinstance(save_directory, (str, os.PathLike)):
            return super().save_pretrained(save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        save_directory = os.path.abspath(save_directory)
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".alter-save-", dir=parent)
        try:
            super().save_pretrained(staging, *args, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            written = set(os.listdir(staging))
            for name in os.listdir(save_directory):  # weights of an earlier save that this one does not replace
                if name not in written and name.startswith("model") and name.endswith((".safetensors", ".json")):
                    os.remove(os.path.join(save_directory, name))
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _mta_init_std(self) -> float:
        return self.config.initializer_factor * self.config.d_model**-0.5

    def _init_weights(self, module):
        factor = self.config.initializer_factor
        d_model, d_ff = self.config.d_model, self.config.d_ff
        if isinstance(module, T5LayerNorm):
            init.constant_(module.weight, factor)
        elif isinstance(module, AlterForConditionalGeneration):
            init.normal_(module.shared.weight, mean=0.0, std=factor)
            if not self.config.tie_word_embeddings:
                init.normal_(module.lm_head.weight, mean=0.0, std=factor)
        elif isinstance(module, (T5DenseActDense, T5DenseGatedActDense)):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * d_ff**-0.5)
        elif isinstance(module, AlterAttention):
            inner = self.config.num_heads * self.config.d_kv
            init.normal_(module.q.weight, mean=0.0, std=factor * (d_model * self.config.d_kv) ** -0.5)
            init.normal_(module.k.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.v.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.o.weight, mean=0.0, std=factor * inner**-0.5)
            if module.has_relative_attention_bias:
                init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * d_model**-0.5)
        elif isinstance(module, AlterMTA):
            init_mta_weights(module, std=self._mta_init_std())


class AlterForConditionalGeneration(AlterTasksMixin, AlterPreTrainedModel, GenerationMixin):
    r"""
    T5 encoder-decoder with a Mixture-of-Task-Adapters in every block, trained in two stages (see `set_stage`).

    Pass `task_ids` (a LongTensor `[batch]`, see `task_ids(names)`) to `forward` and `generate`.
    """

    accepts_loss_kwargs = True
    # Transformers applies this only when `config.tie_word_embeddings` is true (T5 v1.0); Flan-T5 keeps its own head.
    _tied_weights_keys = {"lm_head.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: AlterConfig):
        super().__init__(config)
        self.encoder = AlterStack(config, is_decoder=False)
        self.decoder = AlterStack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()
        self.set_stage(config.stage)

    @property
    def shared(self) -> nn.Embedding:
        """The input embeddings shared by encoder and decoder (T5's `shared`)."""
        return self.encoder.embed_tokens

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    def set_input_embeddings(self, new_embeddings):
        self.encoder.embed_tokens = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_encoder(self, *args, **kwargs):
        return self.encoder

    def get_decoder(self, *args, **kwargs):
        return self.decoder

    # ---- conversion ---------------------------------------------------------------------------------------------

    @classmethod
    def from_t5(cls, t5_model_or_path, task_names, **mta_kwargs) -> "AlterForConditionalGeneration":
        """
        Converts a T5 / Flan-T5 checkpoint (a `T5ForConditionalGeneration` or a path/id loadable by it) into an ALTER
        model with `task_names` and the MTA fields of `AlterConfig` in `mta_kwargs`. The up-projections start at
        zero, so the converted model computes exactly what the T5 did.
        """
        from transformers import T5ForConditionalGeneration

        t5 = t5_model_or_path
        if not isinstance(t5, nn.Module):
            t5 = T5ForConditionalGeneration.from_pretrained(t5_model_or_path)
        source = str(getattr(t5.config, "_name_or_path", "") or "")
        if source and not os.path.exists(source):  # a Hub id, recorded for the model card (never a local path)
            mta_kwargs.setdefault("base_model", source)
        if getattr(t5.config, "model_type", None) not in ("t5", "mt5"):
            raise ValueError(f"from_t5 expects a T5-family model, got model_type={t5.config.model_type!r}.")
        t5_config = t5.config
        keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
                "layer_norm_epsilon", "initializer_factor", "feed_forward_proj", "pad_token_id", "eos_token_id")
        t5_kwargs = {key: getattr(t5_config, key) for key in keys}
        # T5's decoder starts from the pad token unless its config (or generation config) says otherwise.
        start = getattr(t5_config, "decoder_start_token_id", None)
        start = start if start is not None else getattr(t5.generation_config, "decoder_start_token_id", None)
        t5_kwargs["decoder_start_token_id"] = start if start is not None else t5_config.pad_token_id
        # Transformers >= 5.24 keeps embeddings tied and records T5 v1.0's output rescaling separately.
        tied = getattr(t5_config, "scale_decoder_outputs", t5_config.tie_word_embeddings)
        config = AlterConfig(task_names=task_names, tie_word_embeddings=tied, **t5_kwargs, **mta_kwargs)
        if t5_config._attn_implementation in ("eager", "sdpa"):
            config._attn_implementation = t5_config._attn_implementation  # same attention kernel as the source
        model = cls(config).to(t5.dtype).train(t5.training)
        state = {k: v for k, v in t5.state_dict().items() if not k.startswith(("shared.", "decoder.embed_tokens."))}
        state["encoder.embed_tokens.weight"] = t5.get_input_embeddings().weight
        state["lm_head.weight"] = t5.get_output_embeddings().weight
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if "EncDecAttention.relative_attention_bias" not in k]
        not_mta = [k for k in missing if ".mta." not in k and not (tied and k == "lm_head.weight")]
        if not_mta or unexpected:
            raise ValueError(f"The checkpoint does not match a T5 layout: missing {not_mta}, unexpected {unexpected}.")
        model.generation_config = copy.deepcopy(t5.generation_config)
        if model.generation_config.decoder_start_token_id is None:
            model.generation_config.decoder_start_token_id = config.decoder_start_token_id
        return model

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: EncoderDecoderCache | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> AlterSeq2SeqLMOutput:
        r"""
        task_ids (`torch.LongTensor` of shape `(batch_size,)`):
            Each example's task id (`model.task_ids(names)`). Required in stage 1; in stage 2 `None` routes without.
        cache / past_key_values (`EncoderDecoderCache`, *optional*):
            The KV cache (Transformers >= 5.24 calls it `cache`, older releases `past_key_values`).
        output_routing_weights (`bool`):
            Also return per-example routing weights and entropy per MTA module.
        num_items_in_batch (`int`, *optional*):
            Passed by `Trainer`: number of label tokens in the whole accumulated batch, so the loss is a sum divided
            by it and gradient accumulation keeps the same loss scale.
        kwargs:
            Only `cache_position`, which `generate()` of Transformers < 5.24 passes; ignored, since positions follow
            from the cache's length.
        """
        kwargs.pop("cache_position", None)
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for AlterForConditionalGeneration.forward.")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if labels is not None:
            use_cache = False
        if task_ids is None:
            self._check_task_ids_reach_the_model()
        if encoder_outputs is None and task_ids is None and input_ids is not None and self.config.task_prefixes:
            task_ids = self.infer_task_ids(input_ids, attention_mask)
        if self.config.stage == 2 and self.training and task_ids is not None and self.config.task_id_drop_rate > 0:
            drop = torch.rand(task_ids.shape, device=task_ids.device) < self.config.task_id_drop_rate
            task_ids = task_ids.masked_fill(drop, self.config.num_tasks)

        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                task_ids=task_ids,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                output_routing_weights=output_routing_weights,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = AlterStackOutput(last_hidden_state=encoder_outputs[0])

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if decoder_inputs_embeds is None and decoder_input_ids is None:
            raise ValueError(
                "AlterForConditionalGeneration.forward got no decoder inputs: pass `labels` (the decoder inputs are "
                "made from them), `decoder_input_ids` or `decoder_inputs_embeds`; to predict without targets, use "
                "`generate()` (with Seq2SeqTrainer: predict_with_generate=True and no `labels` key in the batch)."
            )
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.shared(decoder_input_ids)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if not use_cache:
            cache = None

        decoder_outputs = self.decoder(
            inputs_embeds=decoder_inputs_embeds,
            attention_mask=decoder_attention_mask,
            task_ids=task_ids,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing_weights=output_routing_weights,
            routing_token_mask=None if labels is None else (labels != -100).to(decoder_inputs_embeds.device),
        )

        sequence_output = decoder_outputs.last_hidden_state
        if self.config.tie_word_embeddings:
            sequence_output = sequence_output * (self.config.d_model**-0.5)
        logits = self.lm_head(sequence_output)

        aux_losses = [out.aux_loss for out in (encoder_outputs, decoder_outputs) if getattr(out, "aux_loss", None) is not None]
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            else:
                token_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
                loss = token_loss / num_items_in_batch
            if aux_loss is not None and self.config.router_aux_loss_coef > 0:
                weight = 1.0 if num_items_in_batch is None else (labels != -100).sum() / num_items_in_batch
                loss = loss + self.config.router_aux_loss_coef * aux_loss * weight

        routing_weights = routing_entropy = None
        if output_routing_weights and getattr(encoder_outputs, "routing_weights", None) is not None:
            routing_weights = torch.cat([encoder_outputs.routing_weights, decoder_outputs.routing_weights], 1)
            routing_entropy = torch.cat([encoder_outputs.routing_entropy, decoder_outputs.routing_entropy], 1)
        return AlterSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            aux_loss=aux_loss,
            routing_weights=routing_weights,
            routing_entropy=routing_entropy,
            **{CACHE_FIELD: cache},
        )

    def _shift_right(self, input_ids):
        start = self.config.decoder_start_token_id
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[..., 1:] = input_ids[..., :-1].clone()
        shifted[..., 0] = start
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return self._shift_right(labels)


def _describe_mismatch(path, kwargs):
    fields = ("task_names", "num_shared_adapters", "adapter_dim", "mta_placement", "d_model", "num_layers",
              "num_decoder_layers", "vocab_size")
    config_kwargs = {k: v for k, v in kwargs.items() if k not in ("config", "dtype", "device_map")}
    saved = AlterConfig.from_pretrained(path, **{k: v for k, v in config_kwargs.items() if k not in fields})
    wanted = kwargs.get("config")
    if wanted is None:
        wanted = AlterConfig.from_pretrained(path, **config_kwargs)
    diffs = [f"{f}: checkpoint has {getattr(saved, f)!r}, config asks for {getattr(wanted, f)!r}"
             for f in fields if getattr(saved, f) != getattr(wanted, f)]
    if not diffs:
        return (f"The weights in {path} do not match its own config.json (task_names={saved.task_names}, "
                f"adapter_dim={saved.adapter_dim}, num_shared_adapters={saved.num_shared_adapters}): the checkpoint "
                "is corrupt or was edited; see the load report above.")
    return f"The checkpoint in {path} does not match the requested ALTER configuration: " + "; ".join(diffs) + "."



__all__ = ["AlterForConditionalGeneration", "AlterPreTrainedModel", "AlterMTA"]
