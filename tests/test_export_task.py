"""`alter-hub export-task` / `export_task`: one task as a plain T5ForConditionalGeneration or Llama-family causal LM
(DESIGN.md §6)."""

import json

import pytest
import torch
from causal_utils import left_padded_batch, randomize_adapters, tiny_causal_alter, tiny_causal_lm
from conftest import TASKS, random_batch, tiny_t5
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer, GenerationConfig,
                          LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
                          T5ForConditionalGeneration)

from hub_upload.__main__ import main
from hub_upload.export_task import ExportTaskError, export_task, task_to_causal_lm, task_to_t5
from modeling_alter import AlterForCausalLM, AlterForConditionalGeneration


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


# ---- decoder-only: a task as a plain LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM / MistralForCausalLM ----

CAUSAL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM,
                  "mistral": MistralForCausalLM}


def gated_causal(model_type="llama", stage=1, **overrides):
    """A tiny decoder-only ALTER with gated SiLU adapters whose every weight is non-zero, as after training."""
    kwargs = dict(adapter_form="gated", adapter_activation="silu")
    kwargs.update(overrides)
    model = tiny_causal_alter(model_type, stage=stage, **kwargs)
    if model.config.adapter_form == "gated":
        torch.manual_seed(5)
        with torch.no_grad():
            for mta in model.mta_modules().values():
                mta.task_linear.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("model_type", list(CAUSAL_CLASSES))
def test_exported_causal_lm_matches_the_task_exactly(tmp_path, model_type):
    model = gated_causal(model_type)
    out = export_task(model, "topic", tmp_path / "topic")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(plain) is CAUSAL_CLASSES[model_type]
    assert plain.config.intermediate_size == model.config.intermediate_size + 8
    batch = left_padded_batch()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids(["topic"] * 4)).logits
        other = model(**batch, task_ids=model.task_ids(["sentiment"] * 4)).logits
        got = plain(**batch).logits
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
    assert (got - other)[mask].abs().max() > 1e-2  # the adapter that was merged is the task's own
    kwargs = dict(max_new_tokens=8, do_sample=False)
    generated = model.generate(**batch, task_ids=model.task_ids(["topic"] * 4), **kwargs)
    assert torch.equal(plain.generate(**batch, **kwargs), generated)
    assert json.loads((out / "alter_export.json").read_text())["architecture"] == CAUSAL_CLASSES[model_type].__name__


def test_causal_export_with_mlp_bias_and_from_a_stage2_model():
    # Llama's mlp_bias: the adapter's units get zero biases; the MLP's own (random) biases are kept.
    model = AlterForCausalLM.from_causal_lm(tiny_causal_lm("llama", mlp_bias=True), task_names=TASKS, adapter_dim=8,
                                            adapter_form="gated", adapter_activation="silu").eval()
    randomize_adapters(model)
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.bias.normal_(0, 0.5)
        for mta in model.mta_modules().values():
            mta.task_linear.normal_(0, 0.5)
    model.set_stage(2)
    with pytest.raises(ExportTaskError, match="stage 2: its per-token gate"):
        task_to_causal_lm(model, "reverse")
    plain = task_to_causal_lm(model, "reverse", stage1=True)
    model.set_stage(1)
    batch = left_padded_batch()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits[mask],
                                   model(**batch, task_ids=model.task_ids(["reverse"] * 4)).logits[mask],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "model_type, kwargs, reason",
    [
        ("qwen2", dict(adapter_form="plain"), r"qwen2 MLP is gated, down_proj\(act\(gate_proj u\) \* up_proj u\), "
                                              r"and cannot absorb the plain adapter's U act\(D u\) \(convert with "
                                              r"adapter_form='gated' and adapter_activation='silu'"),
        ("llama", dict(adapter_activation="gelu"), "activation 'gelu' differs from the MLP's hidden_act 'silu'"),
        ("mistral", dict(mta_placement=["ffn", "self_attention"]), r"adapters sit on \['self_attention'\]: mistral's "),
    ],
)
def test_causal_refusals_name_the_reason(model_type, kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        task_to_causal_lm(gated_causal(model_type, **kwargs), "topic")


def test_causal_cli_carries_tokenizer_chat_template_and_generation_config(tmp_path, capsys):
    model = gated_causal("qwen3")
    model.generation_config.max_new_tokens = 7
    tok = ByT5Tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model.save_pretrained(tmp_path / "alter")
    tok.save_pretrained(tmp_path / "alter")
    assert main(["export-task", str(tmp_path / "alter"), "reverse", str(tmp_path / "plain")]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert plain_tok.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "abc"}]
    assert plain_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert GenerationConfig.from_pretrained(tmp_path / "plain").max_new_tokens == 7
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and "auto_map" not in config
    # Transformers 4's RoPE field too, for tools that read Transformers-4 configs (their default base is 10000)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert not [p.name for p in (tmp_path / "plain").iterdir() if p.suffix == ".py"]  # no remote code
    # a refusal is one error line, exit 2, and writes nothing
    gated_causal("qwen3", adapter_form="plain").save_pretrained(tmp_path / "plainform")
    assert main(["export-task", str(tmp_path / "plainform"), "topic", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "export-task: error: cannot export task 'topic' exactly as a plain qwen3 model" in err
    assert not (tmp_path / "p2").exists()


def test_export_task_rejects_what_is_not_an_alter_model(tmp_path):
    with pytest.raises(ValueError, match="model_or_folder=LlamaForCausalLM is not valid"):
        export_task(tiny_causal_lm("llama"), "topic", tmp_path / "x")
    with pytest.raises(ValueError, match="has no config.json: expected the folder of a saved ALTER model.$"):
        export_task(tmp_path, "topic", tmp_path / "x")
    (tmp_path / "adapter_config.json").write_text("{}")  # what Trainer saves of a PEFT-wrapped ALTER model
    with pytest.raises(ValueError, match=r"It holds a PEFT adapter.*merge_and_unload\(\)"):
        export_task(tmp_path, "topic", tmp_path / "x")
    with pytest.raises(ValueError, match="tokenizer=str is not valid"):
        export_task(gated_causal(), "topic", tmp_path / "x", tokenizer="tok")


def test_serving_page_snippet_exports_exactly(tmp_path):
    """The first snippet of docs/serving.md runs and prints what it says."""
    import os
    import re
    import subprocess
    import sys

    from training_utils import REPO

    text = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    own, other = map(float, re.search(r"to the task: (\S+), to the other task: (\S+)", run.stdout).groups())
    assert own < 1e-5 < 1e-2 < other, run.stdout
    assert json.loads((tmp_path / "qa-llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_causal_export_keeps_a_scaled_rope(tmp_path):
    # Transformers 5 reads rope_parameters; the legacy rope_theta / rope_scaling written beside them change nothing.
    source = tiny_causal_lm("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    model = AlterForCausalLM.from_causal_lm(source, task_names=TASKS, adapter_dim=8, adapter_form="gated",
                                            adapter_activation="silu").eval()
    randomize_adapters(model)
    config = json.loads((export_task(model, "topic", tmp_path / "x") / "config.json").read_text())
    assert config["rope_theta"] == 5000.0 and config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    assert plain.config.rope_parameters == model.config.rope_parameters
    batch = left_padded_batch()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits[mask],
                                   model(**batch, task_ids=model.task_ids(["topic"] * 4)).logits[mask],
                                   rtol=0, atol=1e-5)
