"""Export one task of an ALTER model as a plain `T5ForConditionalGeneration` folder (no remote code).

A stage-1 task adapter on the FFN computes `U act(D u)` next to the FFN `wo act(wi u)` from the same input `u`. When
the FFN is not gated and uses the adapter's activation, the sum is one wider FFN:

    wo act(wi u) + U act(D u) = [wo | U] act([wi ; D] u)        (d_ff -> d_ff + r)

so the task's adapter merges exactly: `D`'s rows are appended to `wi` and `U`'s columns to `wo` in every block. A
gated adapter (`adapter_form="gated"`, `U (act(D u) * L u)`) merges the same way into a gated FFN (Flan-T5):
`[wi_0; D]`, `[wi_1; L]`, `[wo | U]`. The other cases are refused with the reason: a plain adapter on a gated FFN (or
the reverse), an adapter activation other than the FFN's, adapters on attention sublayers, and stage 2 (a per-token
gate mixes several adapters by input-dependent weights, which no fixed weight matrix computes).
"""

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import HubUploadError

# Files of a model folder that belong to the tokenizer (copied to the exported folder when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "added_tokens.json", "vocab.json", "merges.txt")


class ExportTaskError(HubUploadError, ValueError):
    """The task cannot be exported exactly; the message names the reason(s)."""


def merge_refusals(config) -> list[str]:
    """Reasons why a model with `config` (an `AlterConfig`) cannot merge a task into a plain T5 exactly ([]: it can)."""
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


def _load(model_or_folder):
    from modeling_alter import AlterForConditionalGeneration

    if isinstance(model_or_folder, (str, os.PathLike)):
        return AlterForConditionalGeneration.from_pretrained(model_or_folder), Path(model_or_folder)
    return model_or_folder, None


@torch.no_grad()
def task_to_t5(model, task: str, stage1: bool = False):
    """Returns a `T5ForConditionalGeneration` computing what `model` (an `AlterForConditionalGeneration`) computes for
    `task` in stage 1, with every FFN widened by the adapter dimension (`d_ff + adapter_dim`). `stage1=True` exports
    the stage-1 computation of a stage-2 model. Raises `ExportTaskError` naming why an exact merge is impossible."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = model.config
    if task not in config.task_names:
        raise ExportTaskError(f"Unknown task {task!r}; this model has tasks {config.task_names}.")
    check = config
    if stage1 and config.stage != 1:
        check = type(config).from_dict({**config.to_dict(), "stage": 1})
    reasons = merge_refusals(check)
    if reasons:
        raise ExportTaskError(f"cannot export task {task!r} exactly as a plain T5: " + "; ".join(reasons) + ".")
    t = config.task_names.index(task)
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


def export_task(model_or_folder, task: str, out_dir, stage1: bool = False, overwrite: bool = False) -> Path:
    """Writes task `task` of an ALTER model (an `AlterForConditionalGeneration` or its folder) to `out_dir` as a
    `T5ForConditionalGeneration` folder that loads with `AutoModelForSeq2SeqLM.from_pretrained(out_dir)`, no
    `trust_remote_code`, and computes the task's stage-1 outputs (see `task_to_t5`). The tokenizer files of a source
    folder are copied along. Returns the folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportTaskError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    model, folder = _load(model_or_folder)
    t5 = task_to_t5(model, task, stage1=stage1)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t5.save_pretrained(out_dir)
    if folder is not None:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
    source = {"task": task, "alter_d_ff": model.config.d_ff, "adapter_dim": model.config.adapter_dim,
              "merge": "the task's adapter appended to every FFN (wi rows, wo columns): exact"}
    (out_dir / "alter_export.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


__all__ = ["ExportTaskError", "export_task", "merge_refusals", "task_to_t5"]
