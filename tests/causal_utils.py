"""Tiny random Llama-family causal LMs and decoder-only ALTER models built in-process (nothing is downloaded)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_alter import AlterForCausalLM

TASKS = ["sentiment", "topic", "reverse"]
VOCAB = 384  # ByT5Tokenizer(): 3 special tokens, 256 bytes, 125 extra ids
PAD, EOS = 0, 1


def tiny_causal_lm(model_type="qwen2", attn_implementation="sdpa", seed=0, **overrides):
    """A random `{Llama,Qwen2,Qwen3,Mistral}ForCausalLM`: hidden 32, 2 layers, 4 query heads over 2 KV heads."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=None,
                  eos_token_id=EOS, tie_word_embeddings=model_type == "qwen2")
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def randomize_adapters(model, gate_mix=None, scale=0.5, seed=1):
    """Non-zero up-projections, router and task embeddings, as after training (and `gate_mix` if given)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            for p in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                p.normal_(0, scale)
            if gate_mix is not None:
                mta.gate_mix.fill_(gate_mix)
    return model


def tiny_causal_alter(model_type="qwen2", stage=1, randomize=True, gate_mix=0.7, **mta_kwargs):
    """A converted tiny ALTER causal model (eval mode); with `randomize` its adapters change the outputs."""
    kwargs = dict(task_names=TASKS, adapter_dim=8, num_shared_adapters=1)
    kwargs.update(mta_kwargs)
    model = AlterForCausalLM.from_causal_lm(tiny_causal_lm(model_type), **kwargs).eval()
    if randomize:
        randomize_adapters(model, gate_mix=gate_mix)
    model.set_stage(stage)
    return model


def left_padded_batch(lengths=(7, 4, 6, 5), seed=3):
    """Random prompts of the given lengths, left-padded: `input_ids`, `attention_mask` `[batch, max(lengths)]`."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, width - n:] = torch.randint(3, 259, (n,), generator=g)
        attention_mask[i, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def row(batch, i):
    """Example i alone, without its padding."""
    keep = batch["attention_mask"][i].bool()
    return {k: v[i:i + 1, keep] for k, v in batch.items()}
