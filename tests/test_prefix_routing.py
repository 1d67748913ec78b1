"""Routing by prompt prefix: `config.task_prefixes`, `task_ids=None` in forward and generate (DESIGN.md §6)."""

import pytest
import torch
from training_utils import TRAIN_TASKS, tiny_model, tokenizer

from modeling_alter import AlterConfig, AlterForConditionalGeneration
from modeling_alter.data import build_eval_datasets
from modeling_alter.task_lifecycle import PrefixMatcher, tokenize_prefix


pytestmark = pytest.mark.usefixtures("one_thread")


PREFIXES = {"sentiment": "sst2: ", "copy": "copy: ", "reverse": "rev: "}


def prefixed_model(stage=1, seed=0):
    model = tiny_model(seed=seed, task_prefixes=PREFIXES)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            for p in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                p.normal_(0, 0.5)
            mta.gate_mix.fill_(0.4)
    model.set_task_prefixes(tokenizer=tokenizer())
    model.set_stage(stage)
    return model.eval()


TEXTS = ["rev: abc def", "sst2: a great film", "copy: x", "sst2: bad", "rev: longer input text here"]
IDS = [2, 0, 1, 0, 2]


def test_matcher_padding_longest_prefix_and_short_inputs():
    matcher = PrefixMatcher([[5, 6], [5, 6, 7], [], [9]])
    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 8, 1], [0, 0, 9, 1], [5, 0, 0, 0], [4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    # longest match wins; left padding; an input shorter than every prefix it starts like; no match
    assert matcher(ids, mask).tolist() == [1, 0, 3, -1, -1]
    # without a mask, padding is content: the third row no longer starts with 9
    assert matcher(ids).tolist() == [1, 0, -1, -1, -1]


def test_tokenize_prefix_is_a_prefix_of_every_input():
    tok = tokenizer()
    ids = tokenize_prefix(tok, "sst2: ")
    for text in ("sst2: hello", "sst2: 1", "sst2: "):
        assert tok(text, add_special_tokens=False)["input_ids"][: len(ids)] == ids


def test_config_validation_and_save_load(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['qa'\]"):
        AlterConfig(task_names=["a"], task_prefixes={"qa": "qa: "})
    with pytest.raises(ValueError, match="same prefix"):
        AlterConfig(task_names=["a", "b"], task_prefixes={"a": "x: ", "b": "x: "})
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        AlterConfig(task_names=["a"], task_prefixes={"a": "x: "}, task_prefix_ids={"a": []})
    model = prefixed_model()
    model.save_pretrained(tmp_path)
    loaded = AlterForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.task_prefixes == PREFIXES
    assert loaded.config.task_prefix_ids == model.config.task_prefix_ids
    # prefixes without token ids: a clear error rather than a silent mis-route
    unfilled = tiny_model(task_prefixes=PREFIXES)
    batch = tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="set_task_prefixes"):
        unfilled(**batch, labels=batch["input_ids"])


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_forward_routes_a_mixed_batch_by_prefix(stage, padding_side):
    model = prefixed_model(stage)
    tok = tokenizer()
    tok.padding_side = padding_side
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    assert model.infer_task_ids(batch["input_ids"], batch["attention_mask"]).tolist() == IDS
    labels = tok(["x"] * len(TEXTS), return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        routed = model(**batch, labels=labels).logits
        explicit = model(**batch, labels=labels, task_ids=torch.tensor(IDS)).logits
        unknown = model(**batch, labels=labels, task_ids=torch.full((5,), 3)).logits if stage == 2 else None
    assert torch.equal(routed, explicit)
    if stage == 2:
        assert not torch.allclose(routed, unknown)


def test_generate_with_beams_routes_by_prefix():
    model = prefixed_model(stage=1)
    batch = tokenizer()(TEXTS, return_tensors="pt", padding=True)
    kwargs = dict(num_beams=3, max_new_tokens=4, do_sample=False)
    routed = model.generate(**batch, **kwargs)
    explicit = model.generate(**batch, task_ids=torch.tensor(IDS), **kwargs)
    assert torch.equal(routed, explicit)
    # routing matters: the same inputs with other task ids generate something else
    other = model.generate(**batch, task_ids=torch.tensor([(i + 1) % 3 for i in IDS]), **kwargs)
    assert not torch.equal(routed, other)


def test_unmatched_inputs_raise_in_stage1_and_route_unknown_in_stage2():
    tok = tokenizer()
    batch = tok(["sst2: ok", "no prefix here", "s"], return_tensors="pt", padding=True)  # "s": shorter than all
    stage1 = prefixed_model(stage=1)
    with pytest.raises(ValueError, match=r"Example\(s\) \[1, 2\] start with none of the task prefixes"):
        stage1.generate(**batch, max_new_tokens=3)
    stage2 = prefixed_model(stage=2)
    assert stage2.infer_task_ids(batch["input_ids"], batch["attention_mask"]).tolist() == [0, 3, 3]
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(stage2.generate(**batch, **kwargs),
                       stage2.generate(**batch, task_ids=torch.tensor([0, 3, 3]), **kwargs))


def test_data_pipeline_adds_the_prefixes():
    tok = tokenizer()
    tasks = {"copy": {"source": ["abc", "copy: already"], "target": ["abc", "already"]}}
    from datasets import Dataset

    tasks = {"copy": Dataset.from_dict(tasks["copy"])}
    data = build_eval_datasets(tasks, tok, TRAIN_TASKS, task_prefixes=PREFIXES)["copy"]
    sources = [tok.decode(list(ids), skip_special_tokens=True) for ids in data["input_ids"]]
    assert sources == ["copy: abc", "copy: already"]


def test_prefixes_follow_keep_and_add_tasks():
    model = prefixed_model(stage=1)
    tok = tokenizer()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    model.infer_task_ids(batch["input_ids"], batch["attention_mask"])  # builds the matcher for the old order
    small = model.keep_tasks(["reverse", "sentiment", "copy"])  # same prefixes, new ids
    assert small.infer_task_ids(batch["input_ids"], batch["attention_mask"]).tolist() == [0, 1, 2, 1, 0]
    two = model.keep_tasks(["copy", "sentiment"])
    assert two.config.task_prefixes == {"sentiment": "sst2: ", "copy": "copy: "}
    with pytest.raises(ValueError, match=r"Example\(s\) \[0, 4\]"):  # "rev: " is no longer a task's prefix
        two.infer_task_ids(batch["input_ids"], batch["attention_mask"])
    model.add_tasks(["legal"])
    model.set_task_prefixes({**model.config.task_prefixes, "legal": "legal: "}, tokenizer=tok)
    legal = tok(["legal: who signs?", "sst2: ok"], return_tensors="pt", padding=True)
    assert model.infer_task_ids(legal["input_ids"], legal["attention_mask"]).tolist() == [3, 0]
