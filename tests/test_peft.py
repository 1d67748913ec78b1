"""PEFT (LoRA) around an ALTER model routes by task ids as the unwrapped model does: forward, generate and training
(AlterTrainer, TRL's SFTTrainer with `peft_config`), for both families; where PEFT drops the ids, a clear error."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from causal_utils import TASKS as CAUSAL_TASKS
from causal_utils import left_padded_batch, tiny_causal_alter, tiny_causal_lm
from conftest import random_batch, tiny_alter
from training_utils import (snapshot, tiny_args, tiny_data, tiny_model, tokenizer,
                            train_keeping_the_first_checkpoint)
from modeling_alter.trainer import AlterTrainer

CAUSAL_LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
T5_LORA = dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v"])


def randomize_lora(model, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)


def family(kind, stage):
    if kind == "causal":
        model, batch, ids = tiny_causal_alter("llama", stage=stage), left_padded_batch(), torch.tensor([0, 1, 2, 0])
        return model, batch, ids, CAUSAL_LORA
    model = tiny_alter()
    model.set_stage(stage)
    return model, random_batch(), torch.tensor([0, 1, 2, 1]), T5_LORA


@pytest.mark.parametrize("kind", ["causal", "t5"])
@pytest.mark.parametrize("stage", [1, 2])
def test_lora_wrapped_forward_routes_like_the_unwrapped_model(kind, stage):
    model, batch, ids, lora = family(kind, stage)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    randomize_lora(peft_model)
    reference = copy.deepcopy(peft_model).merge_and_unload()  # the same weights, as a plain ALTER model
    with pytest.raises(ValueError, match="wrapped by PEFT.*route_task_ids_through"):
        peft_model(**batch, task_ids=ids)  # PEFT's forward dropped them
    model.route_task_ids_through(peft_model)
    with torch.no_grad():
        wrapped = peft_model(**batch, task_ids=ids).logits
        expected = reference(**batch, task_ids=ids).logits
    torch.testing.assert_close(wrapped, expected, rtol=1e-5, atol=1e-5)
    if stage == 2:  # the ids matter: routing without them differs
        with torch.no_grad():
            without = peft_model(**batch).logits
        torch.testing.assert_close(without, reference(**batch).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(without, wrapped)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_lora_wrapped_generate_matches_the_unwrapped_model(kind):
    model, batch, _, lora = family(kind, 1)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    randomize_lora(peft_model)
    reference = copy.deepcopy(peft_model).merge_and_unload()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    ids = torch.tensor([2, 1, 0, 2])
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(peft_model.generate(**batch, task_ids=ids, **kwargs),
                           reference.generate(**batch, task_ids=ids, **kwargs))


def test_peft_without_task_type_passes_task_ids_on():
    model, batch, ids, lora = family("causal", 1)
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in lora.items() if k != "task_type"}))
    reference = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch, task_ids=ids).logits, reference(**batch, task_ids=ids).logits)


def test_lora_inside_an_mta_module_is_refused():
    model = tiny_causal_alter("llama", stage=1)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="PEFT put an adapter on .*mta.*target only the backbone"):
        model.set_stage(1)
    assert peft_model is not None


def test_alter_trainer_trains_a_lora_wrapped_t5_in_two_stages(tmp_path):
    """Stage 1 trains LoRA and the task adapters (the backbone's own weights stay frozen); stage 2 trains the
    gate side only."""
    train_set, _ = tiny_data()
    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(**T5_LORA))
    stage1, stage2 = model.trainable_parameter_names(1), model.trainable_parameter_names(2)
    assert any("lora_" in n for n in stage1) and not any("base_layer" in n or n.startswith("shared") for n in stage1)
    before = snapshot(model)
    trainer = AlterTrainer(model=peft_model, args=tiny_args(tmp_path), train_dataset=train_set,
                           processing_class=tokenizer())
    trainer.train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert model.config.stage == 2 and changed <= stage1 | stage2
    assert any("lora_" in n for n in changed) and changed & stage2
    assert not any("base_layer" in n for n in changed)


def test_checkpoints_of_a_lora_wrapped_alter_keep_alters_own_weights_for_reload_and_resume(tmp_path, monkeypatch):
    """PEFT saves only LoRA; AlterTrainer also writes the task adapters, gate, ... and the stage
    (`alter_mta.safetensors`): the folder reloads into the trained model, and a run resumed in stage 2 from a
    checkpoint ends with the weights of the uninterrupted run."""
    from peft import PeftModel
    from modeling_alter import load_mta_weights

    train_set, _ = tiny_data()

    def run(output_dir, resume=None):
        peft_model = get_peft_model(tiny_model(), LoraConfig(**T5_LORA))
        trainer = AlterTrainer(model=peft_model, args=tiny_args(output_dir, save_strategy="steps", save_steps=2),
                               train_dataset=train_set, processing_class=tokenizer())
        trainer.train(resume_from_checkpoint=resume)
        return peft_model

    trained = run(tmp_path / "run")
    final = tmp_path / "run" / "checkpoint-6"
    assert set(load_file(final / "adapter_model.safetensors")) and all(
        "lora_" in name for name in load_file(final / "adapter_model.safetensors"))  # PEFT's file: LoRA only
    mta = load_file(final / "alter_mta.safetensors")
    assert mta and all(".mta." in name for name in mta)
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 6

    reloaded = PeftModel.from_pretrained(tiny_model(), final)  # the backbone as the run started it
    reloaded.get_base_model().route_task_ids_through(reloaded)
    with pytest.raises(AssertionError):  # PEFT's folder alone: untrained task adapters and gate, stage 1
        assert_same_outputs(trained, reloaded)
    load_mta_weights(reloaded, final)
    assert reloaded.get_base_model().config.stage == 2
    assert_same_outputs(trained, reloaded)

    resumed = run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-4"))  # stage 2, fresh weights
    assert resumed.get_base_model().config.stage == 2
    assert_same_outputs(trained, resumed)

    # One self-contained ALTER folder instead: LoRA merged into the backbone, every ALTER weight saved.
    from transformers import AutoModelForSeq2SeqLM

    merged_dir = tmp_path / "merged"
    expected = outputs(trained)
    reloaded.merge_and_unload().save_pretrained(merged_dir)
    standalone = AutoModelForSeq2SeqLM.from_pretrained(merged_dir, trust_remote_code=True)
    torch.testing.assert_close(outputs(standalone), expected, rtol=0, atol=1e-5)

    with pytest.raises(FileNotFoundError, match="alter_mta.safetensors does not exist"):
        load_mta_weights(reloaded, tmp_path)
    # A Hub repository id, as PeftModel.from_pretrained takes (the download is stubbed: nothing leaves the machine).
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, revision=None: asked.append((repo, name, revision)) or str(final / name))
    from_hub = PeftModel.from_pretrained(tiny_model(), final)
    load_mta_weights(from_hub, "someone/alter-lora", revision="abc123")
    assert asked == [("someone/alter-lora", "alter_mta.safetensors", "abc123")]
    assert_same_outputs(trained, from_hub)
    for changed, said in ((dict(adapter_dim=4), "adapter_dim=8 there, 4 here"),
                          (dict(adapter_activation="gelu"), "adapter_activation='relu' there, 'gelu' here")):
        wrong = get_peft_model(tiny_model(**changed), LoraConfig(**T5_LORA))
        with pytest.raises(ValueError, match=f"was written by an ALTER model built otherwise \\({said}\\)"):
            load_mta_weights(wrong, final)
    from safetensors.torch import save_file  # a file without the settings: its weights are checked

    save_file({"encoder.mta.unknown": torch.zeros(1)}, tmp_path / "alter_mta.safetensors", metadata={"stage": "1"})
    with pytest.raises(ValueError, match=r"does not match the model's MTA modules: missing \[.*unexpected "
                                         r"\['encoder.mta.unknown'\]"):
        load_mta_weights(reloaded, tmp_path)


def test_load_best_model_at_end_under_peft_loads_alters_own_weights_too(tmp_path):
    """The best checkpoint (here the first, in stage 1) comes back whole: LoRA from PEFT's file, the task adapters
    from ALTER's, while the run keeps the stage it ended in (2)."""
    model = tiny_model()
    trainer = train_keeping_the_first_checkpoint(get_peft_model(model, LoraConfig(**T5_LORA)), tmp_path,
                                                 stage1_steps=3)
    best = load_file(f"{trainer.state.best_model_checkpoint}/alter_mta.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "alter_mta.safetensors")
    state = model.state_dict()
    assert any(not torch.equal(best[name], last[name]) for name in best)  # trained after step 2
    assert all(torch.equal(state[name], tensor) for name, tensor in best.items())
    assert model.config.stage == 2


def test_peft_checkpoints_without_alters_weights_and_prompt_learning_are_refused(tmp_path):
    import shutil

    from peft import PromptTuningConfig

    train_set, _ = tiny_data()
    peft_model = get_peft_model(tiny_model(), LoraConfig(**T5_LORA))
    AlterTrainer(model=peft_model, args=tiny_args(tmp_path, save_strategy="steps", save_steps=4),
                 train_dataset=train_set, processing_class=tokenizer()).train()
    (tmp_path / "checkpoint-4" / "alter_mta.safetensors").unlink()
    again = AlterTrainer(model=get_peft_model(tiny_model(), LoraConfig(**T5_LORA)), args=tiny_args(tmp_path),
                         train_dataset=train_set, processing_class=tokenizer())
    with pytest.raises(ValueError, match="holds PEFT's adapter but not ALTER's own weights"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    shutil.rmtree(tmp_path / "checkpoint-4")

    prompt = get_peft_model(tiny_model(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="PROMPT_TUNING is a prompt-learning method, which ALTER does not support"):
        AlterTrainer(model=prompt, args=tiny_args(tmp_path), train_dataset=train_set,
                     processing_class=tokenizer()).train()


@pytest.mark.parametrize("peft", [False, True])
def test_pushes_during_training_carry_the_code_files_and_alters_weights(tmp_path, monkeypatch, peft):
    """Trainer uploads `output_dir` after copying a fixed list of files from the checkpoint into it: the model's code
    files (named by `auto_map`) and, under PEFT, ALTER's weight file are copied too (the upload itself is stubbed:
    nothing leaves the machine)."""
    import transformers.trainer

    uploads = []

    class Api:
        def upload_folder(self, folder_path, **kwargs):
            uploads.append(sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: Api())
    monkeypatch.setattr(transformers.trainer, "PushInProgress", lambda jobs: None)
    train_set, _ = tiny_data()
    model = get_peft_model(tiny_model(), LoraConfig(**T5_LORA)) if peft else tiny_model()
    trainer = AlterTrainer(model=model, args=tiny_args(tmp_path / "out", save_strategy="steps", save_steps=6),
                           train_dataset=train_set, processing_class=tokenizer())
    trainer.train()
    trainer.hub_model_id, trainer.push_in_progress = "someone/alter", None  # as push_to_hub=True would set
    trainer._push_from_checkpoint(str(tmp_path / "out" / "checkpoint-6"))
    expected = {"adapter_model.safetensors", "alter_mta.safetensors"} if peft else {
        "config.json", "model.safetensors", "modeling_alter.py", "mta.py", "configuration_alter.py"}
    assert uploads and expected <= set(uploads[0])
    if peft:
        copied = load_file(tmp_path / "out" / "alter_mta.safetensors")
        in_checkpoint = load_file(tmp_path / "out" / "checkpoint-6" / "alter_mta.safetensors")
        assert all(torch.equal(t, in_checkpoint[n]) for n, t in copied.items())


def outputs(model):
    model.eval()
    with torch.no_grad():
        return model(**random_batch(), task_ids=torch.tensor([0, 1, 2, 1])).logits


def assert_same_outputs(a, b):
    torch.testing.assert_close(outputs(a), outputs(b), rtol=0, atol=1e-6)


def test_sft_trainer_with_peft_config_trains_both_stages(tmp_path):
    from datasets import Dataset
    from transformers import ByT5Tokenizer
    from trl import SFTConfig, SFTTrainer

    from modeling_alter import AlterForCausalLM, AlterStagesMixin, StageSwitchCallback

    class AlterSFTTrainer(AlterStagesMixin, SFTTrainer):
        pass

    model = AlterForCausalLM.from_causal_lm(tiny_causal_lm("llama"), task_names=CAUSAL_TASKS, adapter_dim=8,
                                            num_shared_adapters=1)
    data = Dataset.from_dict({"prompt": ["sentiment: good", "topic: ball", "reverse: abc", "sentiment: bad"] * 4,
                              "completion": [" pos", " sport", " cba", " neg"] * 4, "task_ids": [0, 1, 2, 0] * 4})
    before = snapshot(model)
    trainer = AlterSFTTrainer(
        model=model, args=SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                    report_to=[], use_cpu=True, save_strategy="no", dataset_num_proc=None),
        train_dataset=data, processing_class=ByT5Tokenizer(), peft_config=LoraConfig(**CAUSAL_LORA),
        callbacks=[StageSwitchCallback(stage1_steps=2, stage2_learning_rate=1e-3)])
    trainer.train()
    after = snapshot(model)  # LoRA wrapped q_proj/v_proj: their weights are now `...base_layer.weight`
    changed = {n for n, p in after.items() if "lora_" not in n and not torch.equal(before[n.replace(".base_layer", "")], p)}
    assert model.config.stage == 2
    assert not any("base_layer" in n for n in changed)  # the backbone is frozen under LoRA
    assert changed and changed <= model.trainable_parameter_names(1) | model.trainable_parameter_names(2)
    assert any(float(p.abs().sum()) > 0 for n, p in after.items() if "lora_B" in n)  # LoRA trained (B starts at 0)


def test_sft_trainer_with_peft_config_checkpoints_reload_whole():
    """TRL's SFTTrainer(peft_config=...) with the mixin writes ALTER's weight file too: the checkpoint reloads into
    the trained model."""
    import tempfile

    from datasets import Dataset
    from peft import PeftModel
    from transformers import ByT5Tokenizer
    from trl import SFTConfig, SFTTrainer

    from modeling_alter import AlterForCausalLM, AlterStagesMixin, StageSwitchCallback, load_mta_weights

    class AlterSFTTrainer(AlterStagesMixin, SFTTrainer):
        pass

    def build():
        return AlterForCausalLM.from_causal_lm(tiny_causal_lm("llama"), task_names=CAUSAL_TASKS, adapter_dim=8,
                                               num_shared_adapters=1)

    data = Dataset.from_dict({"prompt": ["sentiment: good", "topic: ball", "reverse: abc", "sentiment: bad"] * 4,
                              "completion": [" pos", " sport", " cba", " neg"] * 4, "task_ids": [0, 1, 2, 0] * 4})
    with tempfile.TemporaryDirectory() as out:
        model = build()
        AlterSFTTrainer(
            model=model, args=SFTConfig(out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                        report_to=[], use_cpu=True, save_strategy="steps", save_steps=4, bf16=False,
                                        dataset_num_proc=None),
            train_dataset=data, processing_class=ByT5Tokenizer(), peft_config=LoraConfig(**CAUSAL_LORA),
            callbacks=[StageSwitchCallback(stage1_steps=2, stage2_learning_rate=1e-3)]).train()
        reloaded = PeftModel.from_pretrained(build(), f"{out}/checkpoint-4")
        load_mta_weights(reloaded, f"{out}/checkpoint-4")
    ids, task = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([1])
    assert model.config.stage == 2 == reloaded.get_base_model().config.stage
    with torch.no_grad():  # `model` is the trained ALTER model inside SFTTrainer's PEFT wrapper
        torch.testing.assert_close(reloaded.eval()(input_ids=ids, task_ids=task).logits,
                                   model.eval()(input_ids=ids, task_ids=task).logits, rtol=0, atol=1e-6)


def test_sdpa_output_attentions_matches_the_plain_model():
    plain = tiny_causal_lm("llama", attn_implementation="sdpa")
    model = tiny_causal_alter("llama", stage=1)
    batch = left_padded_batch()
    with torch.no_grad():
        expected = plain(**batch, output_attentions=True).attentions
        got = model(**batch, task_ids=torch.tensor([0, 1, 2, 0]), output_attentions=True).attentions
    assert got == expected == ()
