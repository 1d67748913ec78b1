"""The usual Transformers machinery: gradient checkpointing, autocast, attention implementations, torch.compile."""

import pytest
import torch

from conftest import random_batch, tiny_alter
from modeling_alter import AlterForConditionalGeneration

TASK_IDS = torch.tensor([0, 1, 2, 1])


def grads(model, batch):
    model.zero_grad()
    torch.manual_seed(0)
    loss = model(**batch, task_ids=TASK_IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(stage):
    model = tiny_alter(dropout_rate=0.1).train()
    model.set_stage(stage)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.gate_mix.fill_(0.5)
    batch = random_batch()
    loss, reference = grads(model, batch)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert all(stack.gradient_checkpointing for stack in (model.encoder, model.decoder))
    loss_ckpt, checkpointed = grads(model, batch)
    # stage 2 freezes the backbone, so gradients must reach the adapters although no block input requires grad
    assert set(checkpointed) == set(reference) == model.trainable_parameter_names(stage)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_trains_and_stays_close_to_fp32(stage):
    model = tiny_alter()
    model.set_stage(stage)
    batch = random_batch()
    with torch.no_grad():
        reference = model(**batch, task_ids=TASK_IDS).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, task_ids=TASK_IDS)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch, task_ids=TASK_IDS).logits.float()
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


def test_bf16_weights_generate():
    model = tiny_alter().to(torch.bfloat16)
    batch = random_batch()
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=TASK_IDS,
                         max_new_tokens=4)
    assert out.shape == (4, 5)


@pytest.mark.parametrize("stage", [1, 2])
def test_sdpa_and_eager_attention_agree(tmp_path, stage):
    model = tiny_alter()
    model.set_stage(stage)
    model.save_pretrained(tmp_path)
    batch = random_batch()
    outputs = {}
    for implementation in ("sdpa", "eager"):
        loaded = AlterForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = loaded(**batch, task_ids=TASK_IDS).logits
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-5)


def test_output_attentions_and_hidden_states():
    model = tiny_alter(attn_implementation="eager")
    batch = random_batch()
    with torch.no_grad():
        out = model(**batch, task_ids=TASK_IDS, output_attentions=True, output_hidden_states=True)
    assert len(out.encoder_attentions) == 2 and out.encoder_attentions[0].shape == (4, 4, 9, 9)
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (4, 4, 6, 9)
    assert len(out.decoder_hidden_states) == 3 and out.decoder_hidden_states[0].shape == (4, 6, 32)
    torch.testing.assert_close(out.encoder_attentions[0][0, :, :, -3:], torch.zeros(4, 9, 3))  # padding


def test_torch_compile_of_the_forward():
    model = tiny_alter()
    batch = random_batch()
    with torch.no_grad():
        eager = model(**batch, task_ids=TASK_IDS).logits
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(**batch, task_ids=TASK_IDS).logits, eager, atol=1e-5, rtol=1e-5)
