"""`benchmarks/pretrain_backbone.py`: T5 span corruption invariants, and the committed backbone as a `from_t5` source.

Reads nothing outside the repository: the span corruption runs on a tiny built-in text, and the checkpoint test reads
the committed `benchmarks/backbone/`.
"""

from pathlib import Path

import numpy as np
import torch
from training_utils import import_script

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ROOT / "benchmarks" / "backbone"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters.")


def load_script():
    return import_script(ROOT / "benchmarks" / "pretrain_backbone.py", "pretrain_backbone")


def reconstruct(inputs, targets, vocab_size, eos_id=1):
    """Puts each target span back in place of its sentinel."""
    is_sentinel = lambda t: t >= vocab_size - 100  # noqa: E731
    spans, current = {}, None
    for t in targets:
        if t == eos_id:
            break
        if is_sentinel(t):
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        if t == eos_id:
            break
        out.extend(spans[int(t)] if is_sentinel(t) else [int(t)])
    return out


def test_span_corruption_invariants():
    pb = load_script()
    words = TEXT.split()
    vocab = {w: i + 3 for i, w in enumerate(dict.fromkeys(words))}  # 0-2: pad, eos, unk as in T5
    vocab_size = len(vocab) + 3 + 100  # + the sentinels, <extra_id_0> = vocab_size - 1
    stream = np.array([vocab[w] for w in words] * 20, dtype=np.int64)

    tokens_length, targets_length = pb.compute_input_and_target_lengths(128, 0.15, 3.0)
    assert (tokens_length, targets_length) == (141, 29)
    n = len(stream) // tokens_length
    chunks = stream[: n * tokens_length].reshape(n, tokens_length)
    rng = np.random.default_rng(0)
    inputs, targets = pb.span_corrupt(chunks, rng, vocab_size, eos_id=1)
    assert inputs.shape == (n, 128) and targets.shape == (n, targets_length)

    noise_tokens, spans = 0, 0
    for i in range(n):
        sentinels_in = [t for t in inputs[i] if t >= vocab_size - 100]
        sentinels_out = [t for t in targets[i] if t >= vocab_size - 100]
        # <extra_id_0>, <extra_id_1>, ... in order, the same in the input and the target; both end with </s>.
        assert sentinels_in == list(range(vocab_size - 1, vocab_size - 1 - len(sentinels_in), -1))
        assert sentinels_out == sentinels_in
        assert inputs[i][-1] == 1 and targets[i][-1] == 1 and targets[i][0] == vocab_size - 1
        assert reconstruct(inputs[i], targets[i], vocab_size) == chunks[i].tolist()
        spans += len(sentinels_in)
        noise_tokens += len(targets[i]) - 1 - len(sentinels_out)
    density = noise_tokens / (n * tokens_length)
    assert abs(density - 0.15) < 0.01, density
    assert abs(noise_tokens / spans - 3.0) < 0.2, noise_tokens / spans

    # The mask on its own: exact noise count, spans alternate starting with non-noise, lengths average ~3.
    masks = np.stack([pb.random_spans_noise_mask(1000, rng) for _ in range(20)])
    assert (masks.sum(1) == 150).all() and not masks[:, 0].any()
    starts = (masks[:, 1:] & ~masks[:, :-1]).sum()
    assert abs(masks.sum() / starts - 3.0) < 0.05


def test_committed_backbone_converts_exactly():
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from modeling_alter import AlterForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    t5 = T5ForConditionalGeneration.from_pretrained(BACKBONE).eval()
    assert t5.config.vocab_size == len(tokenizer) and t5.config.decoder_start_token_id == 0
    enc = tokenizer(["The quick brown <extra_id_0> over the lazy dog.", "It is a truth universally acknowledged."],
                    return_tensors="pt", padding=True)
    assert enc.input_ids[0, -1].item() == 1  # </s> appended
    labels = tokenizer(["<extra_id_0> fox jumps", "<extra_id_0> truth"], return_tensors="pt", padding=True).input_ids
    alter = AlterForConditionalGeneration.from_t5(BACKBONE, task_names=["a", "b"]).eval()
    with torch.no_grad():
        ref = t5(**enc, labels=labels).logits
        out = alter(**enc, labels=labels, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
