"""Half precision: ALTER guards fp16 where T5 does, so a converted model stays exactly as finite as its T5, in every
dtype (`.half()`, `dtype=` loading, bf16 weights, bf16 and fp16 autocast) and in both stages."""

import pytest
import torch
from conftest import random_batch, tiny_t5
from transformers import T5ForConditionalGeneration

from modeling_alter import AlterForConditionalGeneration

TASKS = ["a", "b"]
TASK_IDS = torch.tensor([0, 1, 0, 1])


def overflowing_t5(scale=1e5):
    """A tiny T5 whose feed-forward output exceeds the fp16 range (every `wo` weight times `scale`)."""
    t5 = tiny_t5("relu", True)
    with torch.no_grad():
        for name, parameter in t5.named_parameters():
            if name.endswith("wo.weight"):
                parameter.mul_(scale)
    return t5


def pair(mode, stage, tmp_path, scale=1e5):
    """(T5, converted ALTER, autocast dtype or None) in the precision `mode`."""
    t5 = overflowing_t5(scale)
    alter = AlterForConditionalGeneration.from_t5(t5, task_names=TASKS, adapter_dim=8, num_shared_adapters=1).eval()
    alter.set_stage(stage)
    if mode == "half":
        return t5.half(), alter.half(), None
    if mode == "bf16":
        return t5.to(torch.bfloat16), alter.to(torch.bfloat16), None
    if mode == "dtype_load":  # `wo` stays fp32 in both (`_keep_in_fp32_modules`)
        t5.save_pretrained(tmp_path / "t5")
        alter.save_pretrained(tmp_path / "alter")
        t5 = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16).eval()
        alter = AlterForConditionalGeneration.from_pretrained(tmp_path / "alter", dtype=torch.float16).eval()
        assert alter.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
        assert alter.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
        return t5, alter, None
    return t5, alter, {"autocast_bf16": torch.bfloat16, "autocast_fp16": torch.float16}[mode]


def run(model, batch, autocast, **kwargs):
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      **kwargs).last_hidden_state
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=6, do_sample=False, **kwargs)
    return encoded, generated


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", ["half", "dtype_load", "bf16", "autocast_bf16", "autocast_fp16"])
def test_converted_model_matches_t5_in_every_dtype(mode, stage, tmp_path):
    batch = random_batch()
    t5, alter, autocast = pair(mode, stage, tmp_path)
    t5_states, t5_tokens = run(t5, batch, autocast)
    states, tokens = run(alter, batch, autocast, task_ids=TASK_IDS)
    assert bool(states.isfinite().all()) == bool(t5_states.isfinite().all())
    assert torch.equal(tokens, t5_tokens), (tokens, t5_tokens)
    if mode in ("half", "dtype_load", "bf16"):
        # where T5 stays finite (it clamps fp16 after every sublayer), so does ALTER, with the same states
        assert states.isfinite().all()
        torch.testing.assert_close(states.float(), t5_states.float(), rtol=2e-2, atol=1e-2)


def test_half_overflow_gives_real_generations():
    """The reported instance: `.half()` of an overflowing T5 gave NaN encoder states and all-zero generations."""
    batch = random_batch()
    t5 = overflowing_t5()
    alter = AlterForConditionalGeneration.from_t5(t5, task_names=TASKS, adapter_dim=8).eval().half()
    states, tokens = run(alter, batch, None, task_ids=TASK_IDS)
    assert states.isfinite().all()
    assert (tokens[:, 1:] != 0).any()
    _, t5_tokens = run(t5.half(), batch, None)
    assert torch.equal(tokens, t5_tokens)


@pytest.mark.parametrize("stage", [1, 2])
def test_overflowing_adapters_stay_finite_in_half(stage):
    """An adapter whose output overflows fp16 (after the MTA sum) is clamped too, in both stages."""
    batch = random_batch()
    alter = AlterForConditionalGeneration.from_t5(tiny_t5("relu", True), task_names=TASKS, adapter_dim=8,
                                                  num_shared_adapters=1).eval()
    with torch.no_grad():
        for mta in alter.mta_modules().values():
            for up in (mta.task_up, mta.shared_up):  # relu(D u) >= 0: each output overflows to +inf or -inf
                up.fill_(1e4)
                up[..., ::2] *= -1
            mta.gate_mix.fill_(0.5)
    alter.set_stage(stage)
    alter.half()
    states, tokens = run(alter, batch, None, task_ids=TASK_IDS)
    assert states.isfinite().all()
    logits = alter(**{k: v for k, v in batch.items()}, task_ids=TASK_IDS).logits
    assert logits.isfinite().all()


def test_half_training_step_keeps_finite_loss():
    """A training step in fp16 weights on the overflowing model: the loss and every gradient are finite."""
    batch = random_batch()
    alter = AlterForConditionalGeneration.from_t5(overflowing_t5(), task_names=TASKS, adapter_dim=8).half().train()
    loss = alter(**batch, task_ids=TASK_IDS).loss
    loss.backward()
    assert loss.isfinite()
    t5 = overflowing_t5().half().train()
    t5_loss = t5(**batch).loss
    torch.testing.assert_close(loss.float(), t5_loss.float(), rtol=1e-2, atol=1e-2)
