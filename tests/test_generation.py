"""generate() with task_ids: decoding strategies, mixed-task batches, KV cache, concurrency."""

import threading

import pytest
import torch

from conftest import random_batch, tiny_alter


def source(batch=4, seed=3):
    inputs = random_batch(batch=batch, seed=seed, pad=False)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


DECODING = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, do_sample=False),
    "beam_multi": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}


@pytest.fixture(params=[1, 2], ids=["stage1", "stage2"])
def model(request):
    model = tiny_alter()
    model.set_stage(request.param)
    if request.param == 2:
        with torch.no_grad():
            for mta in model.mta_modules().values():
                mta.gate_mix.fill_(0.7)
    return model


@pytest.mark.parametrize("strategy", sorted(DECODING))
def test_mixed_task_batch_equals_per_example_runs(model, strategy):
    inputs, task_ids = source(), torch.tensor([2, 0, 1, 0])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, **DECODING[strategy])
    together = model.generate(**inputs, task_ids=task_ids, **kwargs)
    per_row = kwargs.get("num_return_sequences", 1)
    for i in range(4):
        alone = model.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, task_ids=task_ids[i:i + 1], **kwargs)
        assert torch.equal(together[i * per_row:(i + 1) * per_row], alone)


def test_task_ids_change_the_generation(model):
    inputs = source()
    kwargs = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    scores = [model.generate(**inputs, task_ids=torch.full((4,), t), **kwargs).scores[0] for t in range(3)]
    assert (scores[0] - scores[1]).abs().max() > 1e-3 and (scores[1] - scores[2]).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", sorted(DECODING))
def test_kv_cache_gives_the_same_sequences(model, strategy):
    inputs, task_ids = source(), torch.tensor([2, 0, 1, 0])
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, **DECODING[strategy])
    cached = model.generate(**inputs, task_ids=task_ids, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, task_ids=task_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sampling_with_a_seed_is_reproducible_and_uses_the_task(model):
    inputs, task_ids = source(), torch.tensor([2, 0, 1, 0])
    kwargs = dict(do_sample=True, top_k=0, max_new_tokens=6, num_return_sequences=3)
    torch.manual_seed(11)
    first = model.generate(**inputs, task_ids=task_ids, **kwargs)
    torch.manual_seed(11)
    second = model.generate(**inputs, task_ids=task_ids, **kwargs)
    assert first.shape[0] == 12 and torch.equal(first, second)
    # with one candidate token allowed, sampling reduces to greedy decoding, task by task
    greedy = model.generate(**inputs, task_ids=task_ids, max_new_tokens=6, do_sample=False)
    sampled = model.generate(**inputs, task_ids=task_ids, max_new_tokens=6, do_sample=True, top_k=1)
    assert torch.equal(greedy, sampled)


def test_scores_of_a_padded_mixed_batch_match_per_example_scores(model):
    inputs, task_ids = random_batch(seed=5), torch.tensor([1, 2, 0, 2])
    inputs.pop("labels")
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    together = model.generate(**inputs, task_ids=task_ids, **kwargs)
    length = int(inputs["attention_mask"][0].sum())
    alone = model.generate(input_ids=inputs["input_ids"][:1, :length], task_ids=task_ids[:1], **kwargs)
    assert torch.equal(together.sequences[0], alone.sequences[0])
    for step_together, step_alone in zip(together.scores, alone.scores):
        torch.testing.assert_close(step_together[0], step_alone[0], atol=1e-5, rtol=1e-5)


def test_concurrent_generation_with_different_tasks_matches_sequential(model):
    inputs = source(batch=2)
    jobs = {t: torch.full((2,), t) for t in range(3)}
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=2)
    sequential = {t: model.generate(**inputs, task_ids=ids, **kwargs) for t, ids in jobs.items()}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def work(task, ids):
        try:
            barrier.wait()
            for _ in range(3):
                results.setdefault(task, []).append(model.generate(**inputs, task_ids=ids, **kwargs))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for task, outputs in results.items():
        assert all(torch.equal(out, sequential[task]) for out in outputs)
