"""Export one task of an ALTER model as a plain checkpoint of its backbone's own class (no remote code):
`T5ForConditionalGeneration` for the T5 family, `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` /
`MistralForCausalLM` for the decoder-only family (DESIGN.md section 6).

A stage-1 task adapter on the FFN computes `U act(D u)` next to the FFN `wo act(wi u)` from the same input `u`. When
the FFN is not gated and uses the adapter's activation, the sum is one wider FFN:

    wo act(wi u) + U act(D u) = [wo | U] act([wi ; D] u)        (d_ff -> d_ff + r)

so the task's adapter merges exactly: `D`'s rows are appended to `wi` and `U`'s columns to `wo` in every block. A
gated adapter (`adapter_form="gated"`, `U (act(D u) * L u)`) merges the same way into a gated FFN (Flan-T5):
`[wi_0; D]`, `[wi_1; L]`, `[wo | U]`. The Llama-family MLP is gated, `down_proj(act(gate_proj u) * up_proj u)`, so a
gated adapter with the MLP's activation (`hidden_act`, SiLU for all four families) merges as
`[gate_proj; D]`, `[up_proj; L]`, `[down_proj | U]` (`intermediate_size -> intermediate_size + r`).

The other cases are refused with the reason: a plain adapter on a gated FFN (every Llama-family MLP, Flan-T5) or the
reverse, an adapter activation other than the FFN's, adapters on attention sublayers, and stage 2 (a per-token gate
mixes several adapters by input-dependent weights, which no fixed weight matrix computes). There is no approximate
export.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import HubUploadError
from .families import family_of, peft_folder_hint

# Files of a model folder that belong to the tokenizer (copied to the exported folder when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


class ExportTaskError(HubUploadError, ValueError):
    """The task cannot be exported exactly; the message names the reason(s)."""


def merge_refusals(config) -> list[str]:
    """Reasons why a model with `config` (an `AlterConfig` or an `AlterCausalConfig`) cannot merge a task into a plain
    checkpoint of its backbone exactly ([]: it can)."""
    if getattr(config, "model_type", None) == "alter_causal":
        return causal_merge_refusals(config)
    reasons = []
    if config.stage != 1:
        reasons.append(
            f"the model is in stage {config.stage}: its per-token gate mixes every adapter with input-dependent "
            "weights, which no fixed T5 weight computes (export the task's stage-1 computation with stage=1 / "
            "--stage1)"
        )
    form = getattr(config, "adapter_form", "plain")
    if config.is_gated_act and form != "gated":
        reasons.append(
            f"the FFN is gated (feed_forward_proj={config.feed_forward_proj!r}): wo(act(wi_0 u) * wi_1 u) cannot "
            "absorb the plain adapter's U act(D u) (convert with adapter_form='gated' and adapter_activation="
            f"{config.dense_act_fn!r} for an adapter that merges)"
        )
    elif not config.is_gated_act and form == "gated":
        reasons.append(
            "the adapter is gated (adapter_form='gated') but the FFN is not: wo act(wi u) cannot absorb "
            "U (act(D u) * L u)"
        )
    elif config.adapter_activation != config.dense_act_fn:
        reasons.append(
            f"the adapter's activation {config.adapter_activation!r} differs from the FFN's {config.dense_act_fn!r}, "
            "so its hidden units cannot join the FFN's"
        )
    attention = [p for p in config.mta_placement if p != "ffn"]
    if attention:
        reasons.append(f"adapters sit on {attention}: T5's attention has no place for a parallel adapter")
    return reasons



def causal_merge_refusals(config) -> list[str]:
    """Reasons why a decoder-only ALTER model with `config` (an `AlterCausalConfig`) cannot merge a task into a plain
    `LlamaForCausalLM` / `Qwen2ForCausalLM` / ... exactly ([]: it can). The Llama-family MLP is
    `down_proj(act(gate_proj u) * up_proj u)` with `act = hidden_act`: only a gated adapter `U (act(D u) * L u)` with
    that activation is extra hidden units of it."""
    backbone, hidden_act = config.backbone_model_type, config.hidden_act
    reasons = []
    if config.stage != 1:
        reasons.append(
            f"the model is in stage {config.stage}: its per-token gate mixes every adapter with input-dependent "
            f"weights, which no fixed {backbone} weight computes (export the task's stage-1 computation with "
            "stage1=True / --stage1)"
        )
    if getattr(config, "adapter_form", "plain") != "gated":
        reasons.append(
            f"the {backbone} MLP is gated, down_proj(act(gate_proj u) * up_proj u), and cannot absorb the plain "
            f"adapter's U act(D u) (convert with adapter_form='gated' and adapter_activation={hidden_act!r} for an "
            "adapter that merges)"
        )
    elif config.adapter_activation != hidden_act:
        reasons.append(
            f"the adapter's activation {config.adapter_activation!r} differs from the MLP's hidden_act "
            f"{hidden_act!r}, so its hidden units cannot join the MLP's (convert with adapter_activation="
            f"{hidden_act!r})"
        )
    attention = [p for p in config.mta_placement if p != "ffn"]
    if attention:
        reasons.append(f"adapters sit on {attention}: {backbone}'s attention has no place for a parallel adapter")
    return reasons

def _load(model_or_folder):
    """(model, source folder or None) from an ALTER model of either family or its folder."""
    import modeling_alter
    from modeling_alter import AlterForCausalLM, AlterForConditionalGeneration

    if isinstance(model_or_folder, (AlterForConditionalGeneration, AlterForCausalLM)):
        return model_or_folder, None
    if not isinstance(model_or_folder, (str, os.PathLike)):
        raise ExportTaskError(
            f"model_or_folder={type(model_or_folder).__name__} is not valid: expected an AlterForConditionalGeneration"
            ", an AlterForCausalLM or the folder of one."
        )
    folder = Path(model_or_folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportTaskError(f"{folder} has no config.json: expected the folder of a saved ALTER model."
                              + peft_folder_hint(folder))
    family = family_of(json.loads(config_path.read_text(encoding="utf-8")).get("model_type"))
    if family is None:
        raise ExportTaskError(f"{config_path} is not an ALTER model's config: expected model_type 'alter' or "
                              "'alter_causal'.")
    return getattr(modeling_alter, family.model_class).from_pretrained(folder), folder


def _stage1_config(config, stage1):
    """`config`, or with `stage1` a copy in stage 1 (the stage-1 computation of a stage-2 model is exported)."""
    if stage1 and config.stage != 1:
        return type(config).from_dict({**config.to_dict(), "stage": 1})
    return config


def _check_task(config, task):
    if not isinstance(task, str) or task not in config.task_names:
        raise ExportTaskError(f"Unknown task {task!r}; this model has tasks {config.task_names}.")
    return config.task_names.index(task)


@torch.no_grad()
def task_to_t5(model, task: str, stage1: bool = False):
    """Returns a `T5ForConditionalGeneration` computing what `model` (an `AlterForConditionalGeneration`) computes for
    `task` in stage 1, with every FFN widened by the adapter dimension (`d_ff + adapter_dim`). `stage1=True` exports
    the stage-1 computation of a stage-2 model. Raises `ExportTaskError` naming why an exact merge is impossible."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = model.config
    t = _check_task(config, task)
    reasons = merge_refusals(_stage1_config(config, stage1))
    if reasons:
        raise ExportTaskError(f"cannot export task {task!r} exactly as a plain T5: " + "; ".join(reasons) + ".")
    r = config.adapter_dim
    keys = ("vocab_size", "d_model", "d_kv", "num_layers", "num_decoder_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
            "initializer_factor", "feed_forward_proj", "pad_token_id", "eos_token_id", "decoder_start_token_id",
            "tie_word_embeddings", "use_cache")
    t5_config = T5Config(d_ff=config.d_ff + r, **{key: getattr(config, key) for key in keys})
    state = {}
    for name, value in model.state_dict().items():
        if ".mta." in name:
            continue
        if name == "encoder.embed_tokens.weight":
            for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                state[key] = value
            continue
        state[name] = value
    state.setdefault("lm_head.weight", model.get_output_embeddings().weight)
    for name, mta in model.mta_modules().items():  # every FFN: "<stack>.block.<i>.layer.<j>.mta"
        ffn = name[: -len("mta")] + "DenseReluDense."
        down, up = mta.task_down[t], mta.task_up[t]  # [d, r], [r, d]
        # gated: wo (act(wi_0 u) * wi_1 u) + U (act(D u) * L u) = [wo | U] (act([wi_0; D] u) * [wi_1; L] u)
        inputs = [("wi_0", down), ("wi_1", mta.task_linear[t])] if config.is_gated_act else [("wi", down)]
        for key, rows in inputs:
            state[ffn + key + ".weight"] = torch.cat(
                [state[ffn + key + ".weight"], rows.t().to(state[ffn + key + ".weight"].dtype)])
        state[ffn + "wo.weight"] = torch.cat([state[ffn + "wo.weight"], up.t().to(state[ffn + "wo.weight"].dtype)], 1)
    t5 = T5ForConditionalGeneration(t5_config).to(model.dtype)
    missing, unexpected = t5.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    unexpected = [k for k in unexpected if k not in tied]
    missing = [k for k in missing if k not in tied and "EncDecAttention.relative_attention_bias" not in k]
    if missing or unexpected:
        raise ExportTaskError(f"the weights do not map onto T5's layout: missing {missing}, unexpected {unexpected}.")
    if not torch.equal(t5.get_output_embeddings().weight, model.get_output_embeddings().weight):
        raise ExportTaskError(
            "the model's LM head differs from its input embeddings, and this Transformers version's "
            "T5ForConditionalGeneration always ties them (config.tie_word_embeddings is forced to True)."
        )
    t5.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return t5.eval()


@torch.no_grad()
def task_to_causal_lm(model, task: str, stage1: bool = False):
    """Returns the backbone's own causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or
    `MistralForCausalLM`, by `config.backbone_model_type`) computing what `model` (an `AlterForCausalLM`) computes
    for `task` in stage 1: every MLP gets the task's gated adapter as `adapter_dim` extra hidden units,

        down_proj(act(gate_proj u) * up_proj u) + U (act(D u) * L u)
            = [down_proj | U] (act([gate_proj; D] u) * [up_proj; L] u)

    (`gate_proj`/`up_proj` weights `[intermediate_size + r, hidden]`, `down_proj` `[hidden, intermediate_size + r]`;
    with `mlp_bias` the new units get zero biases). Every other weight, the attention implementation, the dtype and
    the generation config are the model's. `stage1=True` exports the stage-1 computation of a stage-2 model. Raises
    `ExportTaskError` naming why an exact merge is impossible (see `causal_merge_refusals`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from modeling_alter.configuration_alter_causal import backbone_field_names

    config = model.config
    t = _check_task(config, task)
    backbone = config.backbone_model_type
    reasons = merge_refusals(_stage1_config(config, stage1))
    if reasons:
        raise ExportTaskError(f"cannot export task {task!r} exactly as a plain {backbone} model: "
                              + "; ".join(reasons) + ".")
    r = config.adapter_dim
    fields = backbone_field_names(backbone) | {"pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings"}
    kwargs = {key: getattr(config, key) for key in fields if hasattr(config, key)}
    kwargs["intermediate_size"] = config.intermediate_size + r
    plain_config = AutoConfig.for_model(backbone, **kwargs)
    plain_config._attn_implementation = config._attn_implementation
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=model.dtype)
    state = {name: value for name, value in model.state_dict().items() if ".mta." not in name}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if {name for name, _ in mlp.named_children()} != {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            raise ExportTaskError(f"layer {i}'s MLP ({type(mlp).__name__}) is not the gate/up/down layout this "
                                  "export merges into.")
        mta = layer.mta["ffn"]
        prefix = f"model.layers.{i}.mlp."
        # [gate_proj; D], [up_proj; L]: weights [intermediate, hidden] get r rows; [down_proj | U]: r columns
        for key, rows in (("gate_proj", mta.task_down[t]), ("up_proj", mta.task_linear[t])):
            weight = state[prefix + key + ".weight"]
            state[prefix + key + ".weight"] = torch.cat([weight, rows.t().to(weight.dtype)])
            if prefix + key + ".bias" in state:
                bias = state[prefix + key + ".bias"]
                state[prefix + key + ".bias"] = torch.cat([bias, bias.new_zeros(r)])
        weight = state[prefix + "down_proj.weight"]
        state[prefix + "down_proj.weight"] = torch.cat([weight, mta.task_up[t].t().to(weight.dtype)], 1)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and plain_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportTaskError(f"the weights do not map onto {type(plain).__name__}'s layout: missing {missing}, "
                              f"unexpected {unexpected}.")
    plain.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return plain.eval()


def task_to_plain(model, task: str, stage1: bool = False):
    """`task_to_t5` for an `AlterForConditionalGeneration`, `task_to_causal_lm` for an `AlterForCausalLM`."""
    if getattr(model.config, "model_type", None) == "alter_causal":
        return task_to_causal_lm(model, task, stage1=stage1)
    return task_to_t5(model, task, stage1=stage1)


def _add_legacy_rope_fields(config_path: Path) -> None:
    """Writes the RoPE settings also as Transformers 4's `rope_theta` (and `rope_scaling` for a non-default RoPE) next
    to Transformers 5's `rope_parameters`, so that engines and exporters reading Transformers-4 configs (Optimum's ONNX
    exporter, which pins Transformers < 4.58, older serving engines) use the model's RoPE base instead of their
    default of 10000. Transformers 5 reads `rope_parameters` and ignores them. A per-layer-type `rope_parameters` (no
    single base) is left alone."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {key: value for key, value in rope.items() if key != "rope_theta"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_task(model_or_folder, task: str, out_dir, stage1: bool = False, overwrite: bool = False,
                tokenizer=None) -> Path:
    """Writes task `task` of an ALTER model to `out_dir` as a plain checkpoint of the backbone's own class, which
    loads without `trust_remote_code` and computes the task's stage-1 outputs:

    - an `AlterForConditionalGeneration` (or its folder) becomes a `T5ForConditionalGeneration`
      (`AutoModelForSeq2SeqLM.from_pretrained(out_dir)`), see `task_to_t5`;
    - an `AlterForCausalLM` (or its folder) becomes a `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` /
      `MistralForCausalLM` (`AutoModelForCausalLM.from_pretrained(out_dir)`), see `task_to_causal_lm`.

    The generation config goes along; so does the tokenizer: `tokenizer` (any object with `save_pretrained`) if given,
    else the tokenizer files of a source folder (tokenizer, special tokens, chat template). `alter_export.json`
    records the task, the widening and, when the model routes by prompt prefix, the task's prefix, which the plain
    model does not need (it always computes the task). Returns the folder. Raises `ExportTaskError` (a `ValueError`)
    for an unknown task, a non-empty `out_dir` without `overwrite`, or a model that cannot be merged exactly (the
    message names each reason); nothing is written then."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportTaskError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ExportTaskError(f"tokenizer={type(tokenizer).__name__} is not valid: expected a tokenizer or processor "
                              "with save_pretrained, or None.")
    model, folder = _load(model_or_folder)
    plain = task_to_plain(model, task, stage1=stage1)
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    plain.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    elif folder is not None:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
    config = model.config
    causal = config.model_type == "alter_causal"
    source = {"task": task, "architecture": type(plain).__name__, "adapter_dim": config.adapter_dim,
              "adapter_form": getattr(config, "adapter_form", "plain")}
    if causal:
        source["alter_intermediate_size"] = config.intermediate_size
        source["merge"] = ("the task's gated adapter appended to every MLP (gate_proj and up_proj rows, down_proj "
                           "columns): exact")
        _add_legacy_rope_fields(out_dir / "config.json")
    else:
        source["alter_d_ff"] = config.d_ff
        source["merge"] = "the task's adapter appended to every FFN (wi rows, wo columns): exact"
    if config.task_prefixes and task in config.task_prefixes:
        source["task_prefix"] = config.task_prefixes[task]
    (out_dir / "alter_export.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


__all__ = ["ExportTaskError", "causal_merge_refusals", "export_task", "merge_refusals", "task_to_causal_lm",
           "task_to_plain", "task_to_t5"]
