"""`alter-hub export-task` / `export_task`: one task as a plain T5ForConditionalGeneration (DESIGN.md §6)."""

import pytest
import torch
from conftest import TASKS, random_batch, tiny_t5
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from hub_upload.__main__ import main
from hub_upload.export_task import ExportTaskError, export_task, task_to_t5
from modeling_alter import AlterForConditionalGeneration


pytestmark = pytest.mark.usefixtures("one_thread")



def converted(ffn="relu", tied=True, **mta_kwargs):
    """An ALTER model converted from a tiny T5, with trained-looking (non-zero) adapters."""
    mta_kwargs.setdefault("adapter_activation", "relu")
    model = AlterForConditionalGeneration.from_t5(tiny_t5(ffn, tied), task_names=TASKS, adapter_dim=8,
                                                  **mta_kwargs).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            for p in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_exported_t5_matches_the_task_exactly(tmp_path, tied):
    model = converted(tied=tied)
    batch = random_batch(batch=3)
    out = export_task(model, "topic", tmp_path / "topic")
    t5 = AutoModelForSeq2SeqLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(t5) is T5ForConditionalGeneration and t5.config.d_ff == model.config.d_ff + 8
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids(["topic"] * 3)).logits
        other = model(**batch, task_ids=model.task_ids(["sentiment"] * 3)).logits
        got = t5(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - other).abs().max() > 1e-3  # the adapter that was merged is the task's own
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False)
    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               task_ids=model.task_ids(["topic"] * 3), **kwargs)
    assert torch.equal(t5.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs),
                       generated)


def test_stage2_model_exports_its_stage1_computation_only_when_asked():
    model = converted()
    model.set_stage(2)
    with pytest.raises(ExportTaskError, match="stage 2: its per-token gate"):
        task_to_t5(model, "reverse")
    t5 = task_to_t5(model, "reverse", stage1=True)
    batch = random_batch(batch=2)
    model.set_stage(1)
    with torch.no_grad():
        torch.testing.assert_close(t5(**batch).logits, model(**batch, task_ids=model.task_ids(["reverse"] * 2)).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(ffn="gated-gelu", tied=False), "the FFN is gated"),
        (dict(adapter_activation="gelu"), "activation 'gelu' differs from the FFN's 'relu'"),
        (dict(mta_placement=["ffn", "self_attention"]), r"adapters sit on \['self_attention'\]"),
    ],
)
def test_refusals_name_the_reason(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        task_to_t5(converted(**kwargs), "topic")


def test_unknown_task_and_cli(tmp_path, capsys):
    model = converted()
    with pytest.raises(ValueError, match=r"Unknown task 'nope'; this model has tasks \['sentiment', 'topic', "):
        task_to_t5(model, "nope")
    model.save_pretrained(tmp_path / "alter")
    assert main(["export-task", str(tmp_path / "alter"), "sentiment", str(tmp_path / "plain")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    assert main(["export-task", str(tmp_path / "alter"), "sentiment", str(tmp_path / "plain")]) == 2  # a user mistake: exit 2
    assert "not empty" in capsys.readouterr().err
    gated = converted(ffn="gated-gelu", tied=False)
    gated.save_pretrained(tmp_path / "gated")
    assert main(["export-task", str(tmp_path / "gated"), "topic", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "export-task: error: cannot export task 'topic' exactly" in err and "gated" in err
    assert not (tmp_path / "g").exists()
