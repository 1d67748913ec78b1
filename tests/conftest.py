"""Shared fixtures: tiny random T5 and ALTER models built in-process (nothing is downloaded)."""

from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from modeling_alter import AlterConfig, AlterForConditionalGeneration

# A small sample of real data committed with the tests (see tests/fixtures/real/README.md).
REAL_DATA = Path(__file__).resolve().parent / "fixtures" / "real"
TASKS = ["sentiment", "topic", "reverse"]
TINY = dict(vocab_size=120, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0)


def tiny_t5(feed_forward_proj="relu", tie_word_embeddings=True, seed=0):
    torch.manual_seed(seed)
    config = T5Config(**TINY, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings,
                      decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config.decoder_start_token_id = 0
    return model


def tiny_alter(seed=0, randomize_adapters=True, **overrides):
    """A tiny ALTER model; with `randomize_adapters` its up-projections are non-zero, as after training."""
    torch.manual_seed(seed)
    kwargs = dict(TINY, task_names=TASKS, adapter_dim=8, num_shared_adapters=1, decoder_start_token_id=0)
    kwargs.update(overrides)
    model = AlterForConditionalGeneration(AlterConfig(**kwargs)).eval()
    if randomize_adapters:
        with torch.no_grad():
            for mta in model.mta_modules().values():
                for p in (mta.task_up, mta.shared_up, mta.router.weight, mta.task_embedding.weight):
                    p.normal_(0, 0.5)
    return model


def random_batch(batch=4, src_len=9, tgt_len=6, vocab=120, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, src_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if pad:
        attention_mask[0, src_len - 3:] = 0
        input_ids[0, src_len - 3:] = 0
    labels = torch.randint(2, vocab, (batch, tgt_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def t5_relu():
    return tiny_t5("relu", True)


@pytest.fixture
def t5_gated():
    return tiny_t5("gated-gelu", False)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny shapes, where a second thread only adds synchronisation on a busy 2-core
    machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
