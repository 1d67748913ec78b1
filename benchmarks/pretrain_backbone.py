#!/usr/bin/env python
"""Pretrains a small T5 backbone from scratch on the shared English corpus (issue 9, section 1).

    python benchmarks/pretrain_backbone.py              # full run, < 40 min on a shared 2-core CPU
    python benchmarks/pretrain_backbone.py --quick      # smoke test, < 3 min (3000 paragraphs for the tokenizer, 30 steps)

1. Trains a SentencePiece-style Unigram tokenizer with `tokenizers` (WhitespaceSplit + Metaspace pre-tokenizer, the
   same pipeline `T5Tokenizer` / `T5TokenizerFast` builds) on `../shared/data/corpus/*.txt` (relative to the
   repository root; `--corpus_dir` overrides) and saves it as a `T5TokenizerFast` with T5's layout: `<pad>`=0,
   `</s>`=1, `<unk>`=2, the pieces, then the 100 sentinels `<extra_id_99>` ... `<extra_id_0>` at the end of the
   vocabulary (so `<extra_id_0>` is the last id, as in T5).
2. Pretrains a small T5 v1.1-style model (gated-GELU feed-forward, no dropout during pretraining) with T5's
   span-corruption objective (15 % noise density, mean noise span length 3) on the tokenized corpus, packed into
   contiguous chunks that give 128 input tokens (with sentinels and `</s>`) and ~29 target tokens.
   Transformers >= 5.24 always ties T5's output projection to the input embedding (`tie_word_embeddings` only selects
   T5 v1.0's d_model**-0.5 output rescaling), so the model is tied and keeps that rescaling, which also keeps the
   initial logits of a tied head small.
3. Saves an ordinary T5 folder (`save_pretrained` + tokenizer, safetensors) to `--output_dir` (default
   `benchmarks/backbone/`), with `loss_curve.png` (train and validation loss against step), `train_log.json` and a
   README naming the exact command. The saved config has `dropout_rate` `--finetune_dropout` (0.1, as the released
   T5 checkpoints, which were pretrained without dropout and fine-tuned with it). The folder loads with
   `T5ForConditionalGeneration.from_pretrained`, `AutoTokenizer.from_pretrained`,
   `AlterForConditionalGeneration.from_t5(folder, task_names=...)` and `examples/train_two_stage.py --base_model`.

Reproducibility: a fixed `--max_steps`, seeds for the data order, the corruption noise and the initialisation,
single-threaded tokenizer training and a fixed number of torch threads make the command reproduce the checkpoint
bit for bit on the same machine and library versions. `--max_minutes` is only a safety cap: if it stops training
early the run is NOT reproducible, and the README says so.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "backbone"
NUM_SENTINELS = 100


# --------------------------------------------------------------------------------------------------------------
# T5 span corruption. Transformers' torch API has no span-corruption data collator, so this is a hand-written numpy
# port of T5's `t5.data.preprocessors.random_spans_noise_mask` / `noise_span_to_unique_sentinel` (Raffel et al.
# 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", section 3.1.4) as
# re-implemented by `FlaxDataCollatorForT5MLM` and `compute_input_and_target_lengths` in Transformers'
# `examples/flax/language-modeling/run_t5_mlm_flax.py`. The only change: an explicit `np.random.Generator` instead
# of numpy's global state, so that the noise is reproducible and independent of other code.
# --------------------------------------------------------------------------------------------------------------


def compute_input_and_target_lengths(inputs_length, noise_density=0.15, mean_noise_span_length=3.0):
    """The number of raw tokens to corrupt so the model input (sentinels and `</s>` included) has `inputs_length`
    tokens, and the resulting target length (sentinels and `</s>` included)."""

    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    return tokens_length, targets_length


def random_spans_noise_mask(length, rng, noise_density=0.15, mean_noise_span_length=3.0):
    """A boolean mask of `length` with about `noise_density * length` noise tokens in about
    `noise_tokens / mean_noise_span_length` spans; the sequence starts with a non-noise span."""
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(num_noise_tokens / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def random_segmentation(num_items, num_segments):
        """Splits `num_items` into `num_segments` non-empty segments at random; returns their lengths."""
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)
    return span_num % 2 == 1


def _sentinel_ids(mask, vocab_size):
    """Per position: the sentinel id where a masked span starts (`<extra_id_0>` = vocab_size - 1, then
    decreasing), -1 inside a span after its first token, 0 elsewhere."""
    mask = mask.astype(np.int64)
    start = mask - np.roll(mask, 1, axis=-1) * mask
    start[:, 0] = mask[:, 0]
    sentinel = np.where(start != 0, np.cumsum(start, axis=-1), start)
    sentinel = np.where(sentinel != 0, vocab_size - sentinel, 0)
    sentinel -= mask - start
    return sentinel


def _filter(input_ids, sentinel, eos_id):
    full = np.where(sentinel != 0, sentinel, input_ids)
    out = full[full >= 0].reshape((input_ids.shape[0], -1))
    return np.concatenate([out, np.full((input_ids.shape[0], 1), eos_id, dtype=out.dtype)], axis=-1)


def span_corrupt(token_chunks, rng, vocab_size, eos_id=1, noise_density=0.15, mean_noise_span_length=3.0):
    """T5 span corruption of a [batch, tokens_length] array: returns (inputs, targets). Each noise span becomes one
    sentinel in the input (`<extra_id_0>`, `<extra_id_1>`, ... in order); the target lists each sentinel followed
    by the span it replaced; both end with `</s>`."""
    batch, length = token_chunks.shape
    mask = np.stack([random_spans_noise_mask(length, rng, noise_density, mean_noise_span_length)
                     for _ in range(batch)])
    inputs = _filter(token_chunks, _sentinel_ids(mask, vocab_size), eos_id)
    targets = _filter(token_chunks, _sentinel_ids(~mask, vocab_size), eos_id)
    return inputs, targets


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def train_tokenizer(files, vocab_size, max_lines=None, every=1):
    """A T5-layout `T5TokenizerFast` whose Unigram pieces were trained on every `every`-th paragraph of `files`."""
    # Single-threaded training: Unigram's EM sums floats in a thread-dependent order otherwise.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    # The pre-tokenizer T5TokenizerFast uses, so the trained pieces see the same words at encoding time.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - NUM_SENTINELS, special_tokens=specials,
                                      unk_token="<unk>", max_piece_length=16, show_progress=True)

    def lines():
        n = 0
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        n += 1
                        if (n - 1) % every == 0:
                            yield line
                        if max_lines is not None and n >= max_lines:
                            return

    tok.train_from_iterator(lines(), trainer=trainer)
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    assert [p for p, _ in pieces[:3]] == specials, pieces[:3]
    # T5's layout: the sentinels close the vocabulary in reverse, <extra_id_0> last.
    vocab = [(p, float(s)) for p, s in pieces] + [(f"<extra_id_{i}>", 0.0) for i in range(NUM_SENTINELS - 1, -1, -1)]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # encoding is deterministic in any thread order
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=NUM_SENTINELS)
    tokenizer.model_max_length = 512
    return tokenizer


def tokenize_corpus(tokenizer, files, max_lines=None):
    """All non-empty paragraphs, tokenized without `</s>` and concatenated (T5's `reduce_concat_tokens`)."""
    paragraphs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            paragraphs.extend(line.strip() for line in fh if line.strip())
    if max_lines is not None:
        paragraphs = paragraphs[:max_lines]
    ids = tokenizer(paragraphs, add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((t for seq in ids for t in seq), dtype=np.int64), len(paragraphs)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def lr_at(step, args):
    """Linear warmup, then linear decay to `min_lr_ratio` of the peak at `max_steps`."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.learning_rate * (1.0 - (1.0 - args.min_lr_ratio) * min(1.0, frac))


@torch.no_grad()
def evaluate(model, val_batches):
    model.eval()
    total, count = 0.0, 0
    for inputs, labels in val_batches:
        out = model(input_ids=inputs, labels=labels)
        n = labels.numel()
        total += out.loss.item() * n
        count += n
    model.train()
    return total / count


def plot_curve(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps, losses = zip(*log["train"]) if log["train"] else ((), ())
    ax.plot(steps, losses, label="train (mean over logging interval)", lw=1.2)
    if log["val"]:
        vs, vl = zip(*log["val"])
        ax.plot(vs, vl, "o-", label="validation (held-out chunks)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("span-corruption cross-entropy (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(log.get("title", "T5 span-corruption pretraining"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus_dir", default=None, help=f"folder of *.txt (default {DEFAULT_CORPUS})")
    p.add_argument("--output_dir", default=None, help=f"default {DEFAULT_OUTPUT}")
    p.add_argument("--quick", action="store_true", help="smoke test (< 3 min): first 3000 paragraphs for the "
                                                        "tokenizer, 20000 for the data, 30 steps; "
                                                        "writes to /tmp/alter_backbone_quick unless --output_dir")
    p.add_argument("--vocab_size", type=int, default=6000, help="including the 100 sentinels")
    p.add_argument("--tokenizer_every", type=int, default=3,
                   help="train the tokenizer on every N-th paragraph (Unigram training is single-threaded here)")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--d_kv", type=int, default=32)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=4, help="encoder layers (and decoder layers)")
    p.add_argument("--input_length", type=int, default=128, help="model input tokens after corruption")
    p.add_argument("--noise_density", type=float, default=0.15)
    p.add_argument("--mean_noise_span_length", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=850,
                   help="fixed step count (about 34 min at ~2.4 s/step on the shared 2-core CPU)")
    p.add_argument("--learning_rate", type=float, default=1.5e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--val_chunks", type=int, default=256, help="held-out chunks for validation")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--finetune_dropout", type=float, default=0.1, help="dropout_rate written to the saved config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (fixed for reproducibility; on a shared 2-core machine one thread is "
                        "several times faster than two, which wait on each other)")
    p.add_argument("--max_minutes", type=float, default=36.0,
                   help="safety cap on the training loop's wall time; stopping early breaks reproducibility")
    p.add_argument("--num_examples", type=int, default=5, help="denoising examples printed at the end")
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps = min(args.max_steps, 30)
        args.tokenizer_every = 1
        args.warmup_steps = min(args.warmup_steps, 10)
        args.eval_every = 20
        args.log_every = 5
        args.val_chunks = 32
        args.batch_size = min(args.batch_size, 16)
        args.max_minutes = min(args.max_minutes, 2.0)
        if args.output_dir is None:
            args.output_dir = "/tmp/alter_backbone_quick"
    return args


def main(argv=None):
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    command = "PYTHONPATH=. python benchmarks/pretrain_backbone.py" + "".join(" " + shlex.quote(a) for a in raw_argv)
    t_start = time.time()
    corpus = Path(args.corpus_dir) if args.corpus_dir else DEFAULT_CORPUS
    files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else []
    if not files:
        sys.exit(f"pretrain_backbone: no corpus: the folder {corpus.resolve()} is missing or has no *.txt files. "
                 f"It is expected next to the repository, at ../shared/data/corpus relative to {ROOT}; pass "
                 f"--corpus_dir to use another folder.")
    output_dir = Path(args.output_dir) if args.output_dir else DEFAULT_OUTPUT
    output_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from tqdm.auto import tqdm
    from transformers import T5Config, T5ForConditionalGeneration

    print(f"command: {command}")
    print(f"corpus: {corpus.resolve()} ({len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB)")

    # 1. Tokenizer
    t0 = time.time()
    max_lines = 3000 if args.quick else None
    tokenizer = train_tokenizer(files, args.vocab_size, max_lines=max_lines, every=args.tokenizer_every)
    vocab_size = len(tokenizer)
    sentinel0 = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert sentinel0 == vocab_size - 1, (sentinel0, vocab_size)
    t_tok = time.time() - t0
    print(f"tokenizer: Unigram, {vocab_size} ids ({vocab_size - NUM_SENTINELS} pieces + {NUM_SENTINELS} sentinels), "
          f"trained in {t_tok:.0f}s")

    # 2. Data: packed token stream -> chunks; a seeded shuffle of chunks holds out the validation set.
    t0 = time.time()
    stream, n_par = tokenize_corpus(tokenizer, files, max_lines=20000 if args.quick else None)
    tokens_length, targets_length = compute_input_and_target_lengths(
        args.input_length, args.noise_density, args.mean_noise_span_length)
    n_chunks = len(stream) // tokens_length
    chunks = stream[: n_chunks * tokens_length].reshape(n_chunks, tokens_length)
    order = np.random.default_rng(args.seed).permutation(n_chunks)
    val_idx, train_idx = order[: args.val_chunks], order[args.val_chunks:]
    print(f"data: {n_par} paragraphs -> {len(stream):,} tokens -> {n_chunks:,} chunks of {tokens_length} tokens ({len(train_idx):,} train, {len(val_idx)} "
          f"validation); inputs {args.input_length} tokens, targets {targets_length}; tokenized in "
          f"{time.time() - t0:.0f}s")

    val_rng = np.random.default_rng([args.seed, 1])
    val_batches = []
    for i in range(0, len(val_idx), 64):
        inp, tgt = span_corrupt(chunks[val_idx[i:i + 64]], val_rng, vocab_size, tokenizer.eos_token_id,
                                args.noise_density, args.mean_noise_span_length)
        val_batches.append((torch.from_numpy(inp), torch.from_numpy(tgt)))

    # 3. Model
    torch.manual_seed(args.seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=args.d_model, d_ff=args.d_ff, d_kv=args.d_kv, num_heads=args.num_heads,
        num_layers=args.num_layers, num_decoder_layers=args.num_layers, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 0
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: T5 gated-gelu d_model {args.d_model}, d_ff {args.d_ff}, {args.num_heads} heads x d_kv "
          f"{args.d_kv}, {args.num_layers}+{args.num_layers} layers, vocab {vocab_size}: {n_params:,} parameters "
          f"({n_params * 4 / 2**20:.1f} MiB fp32)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-8)

    # 4. Train
    data_rng = np.random.default_rng([args.seed, 2])
    perm, pos, epoch = data_rng.permutation(train_idx), 0, 0
    log = {"train": [], "val": [], "title": f"T5 span corruption, {n_params / 1e6:.1f}M params"}
    v = evaluate(model, val_batches)
    log["val"].append((0, v))
    print(f"step 0: validation loss {v:.3f}")
    model.train()
    t_train = time.time()
    running, running_n, stopped_early = 0.0, 0, False
    bar = tqdm(range(args.max_steps), desc="pretraining", dynamic_ncols=True, mininterval=5)
    step = 0
    for step in bar:
        if pos + args.batch_size > len(perm):
            perm, pos, epoch = data_rng.permutation(train_idx), 0, epoch + 1
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        inp, tgt = span_corrupt(chunks[idx], data_rng, vocab_size, tokenizer.eos_token_id,
                                args.noise_density, args.mean_noise_span_length)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=torch.from_numpy(inp), labels=torch.from_numpy(tgt)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        running_n += 1
        done = step + 1
        if done % args.log_every == 0:
            log["train"].append((done, running / running_n))
            bar.set_postfix(loss=f"{running / running_n:.3f}", lr=f"{lr_at(step, args):.1e}", epoch=epoch)
            running, running_n = 0.0, 0
        if done % args.eval_every == 0 or done == args.max_steps:
            v = evaluate(model, val_batches)
            log["val"].append((done, v))
            tqdm.write(f"step {done}: validation loss {v:.3f} ({(time.time() - t_train) / 60:.1f} min)")
        if (time.time() - t_train) / 60 > args.max_minutes and done < args.max_steps:
            stopped_early = True
            tqdm.write(f"WARNING: --max_minutes {args.max_minutes} reached after {done} of {args.max_steps} steps; "
                       f"stopping early (this checkpoint is not reproducible bit for bit).")
            break
    bar.close()
    steps_done = step + 1
    if running_n:
        log["train"].append((steps_done, running / running_n))
    if not log["val"] or log["val"][-1][0] != steps_done:
        log["val"].append((steps_done, evaluate(model, val_batches)))
    train_minutes = (time.time() - t_train) / 60
    model.eval()

    # 5. Denoising examples (held-out chunks, greedy decoding)
    examples = []
    ex_inp, ex_tgt = span_corrupt(chunks[val_idx[: args.num_examples]], np.random.default_rng([args.seed, 3]),
                                  vocab_size, tokenizer.eos_token_id, args.noise_density, args.mean_noise_span_length)
    with torch.no_grad():
        pred = model.generate(input_ids=torch.from_numpy(ex_inp), max_new_tokens=targets_length + 8, do_sample=False,
                              num_beams=1)
    print("\nDenoising examples (held-out text; greedy):")
    for i in range(len(ex_inp)):
        item = {"input": tokenizer.decode(ex_inp[i], skip_special_tokens=False),
                "target": tokenizer.decode(ex_tgt[i], skip_special_tokens=False),
                "prediction": tokenizer.decode(pred[i], skip_special_tokens=False).replace("<pad>", "").strip()}
        examples.append(item)
        print(f"[{i}] input:      {item['input']}\n    target:     {item['target']}\n    prediction: {item['prediction']}")

    # 6. Save
    model.config.dropout_rate = args.finetune_dropout
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    plot_curve(log, output_dir / "loss_curve.png")
    total_minutes = (time.time() - t_start) / 60
    summary = {
        "command": command, "corpus": str(corpus.resolve()), "corpus_files": [f.name for f in files],
        "quick": args.quick, "args": vars(args), "parameters": n_params, "vocab_size": vocab_size,
        "tokens": int(len(stream)), "chunks_train": int(len(train_idx)), "chunks_val": int(len(val_idx)),
        "tokens_length": tokens_length, "targets_length": targets_length, "steps": steps_done,
        "epochs_seen": round(steps_done * args.batch_size / len(train_idx), 3), "stopped_early": stopped_early,
        "final_train_loss": log["train"][-1][1] if log["train"] else None, "final_val_loss": log["val"][-1][1],
        "train_minutes": round(train_minutes, 2), "total_minutes": round(total_minutes, 2),
        "tokenizer_minutes": round(t_tok / 60, 2), "log": log, "examples": examples,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
    }
    (output_dir / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_readme(output_dir, summary, config)
    print(f"\nsaved to {output_dir} | {n_params:,} params | {steps_done} steps in {train_minutes:.1f} min "
          f"(total {total_minutes:.1f} min) | final train loss {summary['final_train_loss']:.3f} | "
          f"validation loss {summary['final_val_loss']:.3f}")
    return summary


def write_readme(output_dir, s, config):
    a = s["args"]
    val = ", ".join(f"{st}: {v:.3f}" for st, v in s["log"]["val"])
    ex = "\n".join(f"- input: `{e['input']}`\n  - target: `{e['target']}`\n  - prediction: `{e['prediction']}`"
                   for e in s["examples"][:3])
    early = ("\n**Stopped early by --max_minutes: this checkpoint is NOT reproducible bit for bit.**\n"
             if s["stopped_early"] else "")
    text = f"""# Small T5 backbone pretrained from scratch (ALTER issue 9)

A T5 v1.1-style encoder-decoder (gated-GELU, no dropout in pretraining; `dropout_rate` {a['finetune_dropout']} in
the config for fine-tuning) with a Unigram tokenizer, both trained here from scratch on the shared English corpus
with T5's span-corruption objective. An ordinary T5 folder: `T5ForConditionalGeneration.from_pretrained`,
`AutoTokenizer.from_pretrained`, `AlterForConditionalGeneration.from_t5(folder, task_names=...)` and
`examples/train_two_stage.py --base_model {output_dir.name if output_dir.name != 'backbone' else 'benchmarks/backbone'}` take it as they take `google/flan-t5-small`.
{early}
Reproduce (from the repository root, the corpus at `../shared/data/corpus`; bit for bit on the same machine type
and library versions, {s['threads']} torch threads):

    {s['command']}

- Corpus: {len(s['corpus_files'])} files of `../shared/data/corpus/` (public-domain books and speeches,
  Shakespeare, the Brown corpus; see `../shared/data/README.md`), {s['tokens']:,} tokens with this tokenizer.
- Tokenizer: SentencePiece-style Unigram (`tokenizers`), {s['vocab_size']} ids: `<pad>`=0, `</s>`=1, `<unk>`=2,
  pieces, then `<extra_id_99>` ... `<extra_id_0>` (= {s['vocab_size'] - 1}); saved as `T5TokenizerFast`.
- Model: d_model {config.d_model}, d_ff {config.d_ff}, {config.num_heads} heads x d_kv {config.d_kv},
  {config.num_layers} encoder + {config.num_decoder_layers} decoder layers, vocab {config.vocab_size},
  {s['parameters']:,} parameters (fp32 safetensors). Transformers >= 5.24 always ties T5's output projection to the
  input embedding, so the head is tied (with T5's d_model**-0.5 output rescaling).
- Objective: span corruption, noise density {a['noise_density']}, mean span length {a['mean_noise_span_length']},
  chunks of {s['tokens_length']} tokens -> inputs of {a['input_length']} tokens, targets of {s['targets_length']}.
- Training: {s['steps']} steps x batch {a['batch_size']} ({s['epochs_seen']} epochs over {s['chunks_train']:,}
  chunks), AdamW (betas 0.9/0.98, weight decay {a['weight_decay']}), peak lr {a['learning_rate']}, {a['warmup_steps']}
  warmup steps, linear decay to {a['min_lr_ratio']} x peak, gradient clipping {a['max_grad_norm']}, seed {a['seed']}.
- Wall time: {s['train_minutes']:.1f} min training, {s['total_minutes']:.1f} min in all (tokenizer
  {s['tokenizer_minutes']:.1f} min) on {s['threads']} CPU threads.
- Final loss: train {s['final_train_loss']:.3f}, validation ({s['chunks_val']} held-out chunks) {s['final_val_loss']:.3f}.
  Validation loss by step: {val}.
- Versions: {', '.join(f'{k} {v}' for k, v in s['versions'].items())}.

![loss curve](loss_curve.png)

Denoising examples (held-out text, greedy decoding; more in `train_log.json`):

{ex}
"""
    (output_dir / "README.md").write_text(text)


if __name__ == "__main__":
    main()
