"""Speed and memory of ALTER's Mixture-of-Task-Adapters against plain T5 and PEFT peers (issue 5), and of the
decoder-only `AlterForCausalLM` against the plain Llama-shaped LM it was converted from (issue 12, section `causal`:
a SmolLM2-135M shape, 30 layers; 8 of them with --quick).

    python benchmarks/speed.py            # full run, about 25 min on a 2-core CPU (causal section: 11)
    python benchmarks/speed.py --quick    # about 5 min: fewer tokens, repetitions and task counts
    python benchmarks/speed.py --device cuda   # the same on a GPU in bf16 (a separate column of the table)
    python benchmarks/speed.py --sections scaling --scaling-parts train --task-counts 32,128   # one table part

Every figure is a ratio against a plain `T5ForConditionalGeneration` of the same shape (t5-small: d_model 512,
d_ff 2048, 6+6 layers, 8 heads, vocab 32128; random weights, fixed seed) measured in the same process: the
variants of one section run in interleaved rounds (the order rotates every round) and the figure is the median over
the rounds of (variant time / T5 time in that round). Beside it: the analytic FLOP ratio and, for generation, the
weight-traffic ratio (bytes of weights read), the two limits a perfect implementation would meet.

The decoder-only generation is also timed step by step (`stepwise_generation`): the models' forward passes of one
greedy generation interleaved at every step, so that each ALTER step is compared with the plain model's step taken
a fraction of a second apart rather than whole `generate` calls seconds apart ("paired step by step" rows).

Timing on CPU is the process's CPU time with one intra-op thread (`--threads 1 --clock cpu`, the default): on a
shared machine the wall clock mostly measures the other tenants. Peak memory is the peak resident set size of a
fresh subprocess during one training step (after a warm-up step), minus the resident size before the model was
built; glibc is told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_) so that the RSS follows the live
tensors. On CUDA: wall clock after `torch.cuda.synchronize()` and `torch.cuda.max_memory_allocated()`.

Writes `speed_<device>.json` and `scaling_<device>.png` to `--output` (default `benchmarks/results/`) and prints
a Markdown table; when both `speed_cpu.json` and `speed_cuda.json` are there, the table has both columns.
"""

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_alter import AlterForConditionalGeneration  # noqa: E402

hf_logging.set_verbosity_error()

SHAPE = dict(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, feed_forward_proj="relu",
             dropout_rate=0.1, decoder_start_token_id=0)
ADAPTER_DIM, SHARED, PEER_RANK = 64, 1, 16
TARGETS = {
    "gen_s1_one": ("<=", 1.03), "gen_s1_mixed": ("<=", 1.06), "gen_s2_dense": ("<=", 1.10), "gen_s2_top2": ("<=", 1.06),
    "train_s1": ("<=", 1.08), "train_s2_dense": ("<=", 0.85), "train_s2_top2": ("<=", 0.85), "mem_s2_dense": ("<=", 0.70),
    "mem_s2_top2": ("<=", 0.70),
    # decoder-only (issue 12): ALTER on a Llama-shaped LM against the plain LM of the same shape
    "causal_gen_s1": ("<=", 1.03), "causal_gen_s2_topk": ("<=", 1.10), "causal_train_s2": ("<=", 0.85),
}
# A SmolLM2-135M-shaped Llama (random weights); --quick keeps 8 of its 30 layers.
CAUSAL_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                    pad_token_id=0, eos_token_id=1)


# ---- models ---------------------------------------------------------------------------------------------------------


def make_t5(device, dtype):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**SHAPE))
    model.generation_config.decoder_start_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def make_alter(t5, num_tasks=8, stage=1, top_k=None, seed=1):
    """An ALTER model converted from `t5`, with adapters, gate and gate mix as after training (all non-zero)."""
    model = AlterForConditionalGeneration.from_t5(t5, task_names=[f"task{i}" for i in range(num_tasks)],
                                                  adapter_dim=ADAPTER_DIM, num_shared_adapters=SHARED,
                                                  router_top_k=top_k)
    torch.manual_seed(seed)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_up.normal_(0, 0.02)
            mta.shared_up.normal_(0, 0.02)
            mta.router.weight.normal_(0, 0.02)
            mta.task_embedding.weight.normal_(0, 1.0)
            mta.gate_mix.fill_(0.5)
    model.set_stage(stage)
    return model.to(t5.device).eval()


def without_mta(model):
    """The ALTER backbone alone (every MTA removed): shows how the backbone itself compares with HF's T5."""
    control = copy.deepcopy(model)
    for module in control.modules():
        if hasattr(module, "mta"):
            module.mta = None
    return control


def randomize_peft(model):
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "poly_lora_B" in name:
                p.normal_(0, 0.02)
    return model


def make_poly(t5, n_splits):
    from peft import PolyConfig, TaskType, get_peft_model

    config = PolyConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=PEER_RANK, n_tasks=8, n_skills=8, n_splits=n_splits,
                        target_modules=["wi", "wo"])
    return randomize_peft(get_peft_model(copy.deepcopy(t5), config)).eval()


def make_lora(t5):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=PEER_RANK, lora_alpha=PEER_RANK, target_modules=["wi", "wo"])
    model = get_peft_model(copy.deepcopy(t5), config, adapter_name="task0")
    for i in range(1, 8):
        model.add_adapter(f"task{i}", config)
    return randomize_peft(model).eval()


def make_xlora(t5):
    """X-LoRA over 8 LoRA adapters, if PEFT can build it on T5 (it is designed for decoder-only models)."""
    from peft import LoraConfig, TaskType, XLoraConfig, get_peft_model

    folder = tempfile.mkdtemp(prefix="xlora-")
    lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=PEER_RANK, lora_alpha=PEER_RANK, target_modules=["wi", "wo"])
    paths = {}
    for i in range(8):
        path = os.path.join(folder, f"task{i}")
        randomize_peft(get_peft_model(copy.deepcopy(t5), lora)).save_pretrained(path)
        paths[f"task{i}"] = path
    base = copy.deepcopy(t5)
    base.config.use_cache = False
    config = XLoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, hidden_size=SHAPE["d_model"], xlora_depth=2, adapters=paths)
    return get_peft_model(base, config).eval()


@contextlib.contextmanager
def poly_task_ids(model, task_ids):
    """Passes `task_ids` to every Poly layer, expanded to the batch it sees (beam search expands the decoder batch,
    which PEFT's own `task_ids=` hook does not)."""
    from peft.tuners.poly.layer import Linear as PolyLinear

    def hook(_, args, kwargs):
        rows = args[0].shape[0]
        kwargs["task_ids"] = task_ids.repeat_interleave(rows // task_ids.shape[0])
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, PolyLinear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- analytic costs -------------------------------------------------------------------------------------------------


def backbone_costs(batch, src, tgt_or_new, rows, generate):
    """FLOPs and bytes of weights read by T5 (GEMMs and attention scores; 1 multiply-add = 2 FLOPs)."""
    d, f, L, V = SHAPE["d_model"], SHAPE["d_ff"], SHAPE["num_layers"], SHAPE["vocab_size"]
    flops = 2 * batch * src * L * (4 * d * d + 2 * src * d + 2 * d * f)  # encoder
    flops += 2 * rows * src * L * 2 * d * d  # cross-attention keys and values
    layer_bytes = 4 * L * (4 * d * d + 2 * d * f)
    weight_bytes = layer_bytes + 4 * L * 2 * d * d
    steps = range(1, tgt_or_new + 1) if generate else [tgt_or_new]
    for t in steps:
        tokens = rows if generate else rows * tgt_or_new
        keys = t if generate else (tgt_or_new + 1) / 2
        flops += 2 * tokens * (L * (6 * d * d + 2 * keys * d + 2 * src * d + 2 * d * f) + d * V)
        weight_bytes += 4 * (L * (6 * d * d + 2 * d * f) + V * d)
    return flops, weight_bytes


def adapter_costs(kind, batch, src, tgt_or_new, rows, generate, num_tasks=8, distinct=8):
    """Extra FLOPs and weight bytes of one adapter scheme, per the same conventions."""
    d, f, L = SHAPE["d_model"], SHAPE["d_ff"], SHAPE["num_layers"]
    r, n = ADAPTER_DIM, num_tasks + SHARED
    enc_tokens = batch * src
    dec_calls = [(rows, t) for t in range(1, tgt_or_new + 1)] if generate else [(rows * tgt_or_new, 0)]
    pair_flops, pair_bytes, router = 4 * d * r, 4 * 2 * d * r, 0
    if kind.startswith("alter"):
        stage, mode = kind.split("_")[1:3]
        router = 2 * d * n if stage == "s2" else 0
        if mode in ("one", "mixed"):
            pairs = 1
            read = lambda tokens: 1 if mode == "one" else min(distinct, num_tasks)  # noqa: E731
        elif mode == "dense":
            pairs, read = n, (lambda tokens: n)
        else:  # top-k: own task plus k chosen (upper bound)
            pairs = 3
            read = lambda tokens: min(n, tokens * pairs)  # noqa: E731
        flops = L * enc_tokens * (pairs * pair_flops + router)
        weight_bytes = L * read(enc_tokens) * pair_bytes
        for tokens, _ in dec_calls:
            flops += L * tokens * (pairs * pair_flops + router)
            weight_bytes += L * read(tokens) * pair_bytes
        return flops, weight_bytes
    rank, per_adapter = PEER_RANK, 2 * PEER_RANK * (d + f)  # LoRA on wi and wo: A and B of both
    flops = 2 * L * enc_tokens * per_adapter
    weight_bytes = 4 * L * 8 * per_adapter  # LoRA: the 8 adapters of a mixed batch; Poly: the 8 skills
    for tokens, _ in dec_calls:
        flops += 2 * L * tokens * per_adapter
        weight_bytes += 4 * L * 8 * per_adapter
    if kind.startswith(("poly", "mhr")):  # per example: mix the 8 skills into its own A and B, every forward
        examples = [batch] + [rows] * len(dec_calls)
        flops += sum(2 * L * 2 * e * 8 * rank * (d + f) for e in examples)
    return flops, weight_bytes


def generate_limits(kind, beams, new, distinct=8, num_tasks=8):
    base_f, base_b = backbone_costs(8, 64, new, 8 * beams, generate=True)
    if kind in ("t5", "control"):
        return 1.0, 1.0
    f, b = adapter_costs(kind, 8, 64, new, 8 * beams, True, num_tasks=num_tasks, distinct=distinct)
    return (base_f + f) / base_f, (base_b + b) / base_b


def train_flop_ratio(kind, src, tgt, num_tasks=8):
    """Forward + backward FLOPs: backward = input gradients (1x forward) + weight gradients of what trains."""
    base_f, _ = backbone_costs(8, src, tgt, 8, generate=False)
    if kind in ("t5", "control"):
        return 1.0
    name = {"s1": "alter_s1_mixed", "s1_split": "alter_s1_mixed", "s2_dense": "alter_s2_dense",
            "s2_top2": "alter_s2_top2"}.get(kind, kind)
    extra, _ = adapter_costs(name, 8, src, tgt, 8, False, num_tasks=num_tasks)
    if kind in ("s1", "s1_split"):
        return 3 * (base_f + extra) / (3 * base_f)
    tokens = 8 * (src + tgt)
    trained = tokens * SHAPE["num_layers"] * 4 * SHAPE["d_model"] * ADAPTER_DIM * SHARED  # shared adapters' grads
    if not kind.startswith("s2"):
        trained = extra  # PEFT: every adapter weight trains
    return (2 * (base_f + extra) + trained) / (3 * base_f)


def state_memory_ratio(model, t5):
    """(weights + gradients + AdamW states) of what trains, over the same for T5 full fine-tuning."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (4 * total + 12 * trained) / (16 * sum(p.numel() for p in t5.parameters()))


# ---- timing ---------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, device, kind):
        self.device, self.kind = device, kind

    def __call__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.process_time() if self.kind == "cpu" else time.perf_counter()


def interleaved(fns, reps, clock, warmup=1, log=None):
    """Runs every callable `reps` times in rotating order; returns {name: [seconds per round]}."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for rnd in range(reps):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
        if log:
            log(f"  round {rnd + 1}/{reps}")
    return times


def paired_ratio(times, name, baseline="t5"):
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


def spread(times, name, baseline="t5"):
    ratios = [t / b for t, b in zip(times[name], times[baseline])]
    return [min(ratios), max(ratios)]


# ---- sections -------------------------------------------------------------------------------------------------------


def inputs(device, batch, src, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, SHAPE["vocab_size"], (batch, src), generator=g).to(device)
    return ids, torch.ones_like(ids)


def generate_section(args, t5, log):
    device, dtype = args.device, t5.dtype
    ids, mask = inputs(device, 8, 64)
    one, mixed = torch.zeros(8, dtype=torch.long, device=device), torch.arange(8, device=device)
    s1, s2, s2k = make_alter(t5, stage=1), make_alter(t5, stage=2), make_alter(t5, stage=2, top_k=2)
    variants = {"t5": (t5, {}), "control": (without_mta(s1), {"task_ids": one}),
                "alter_s1_one": (s1, {"task_ids": one}), "alter_s1_mixed": (s1, {"task_ids": mixed}),
                "alter_s2_dense": (s2, {"task_ids": mixed}), "alter_s2_top2": (s2k, {"task_ids": mixed})}
    peers, errors = {}, {}
    for name, build in (("poly", lambda: make_poly(t5, 1)), ("mhr", lambda: make_poly(t5, 4)),
                        ("lora", lambda: make_lora(t5)), ("xlora", lambda: make_xlora(t5))):
        if name in args.skip_peers:
            continue
        try:
            peers[name] = build().to(device=device, dtype=dtype)
        except Exception as error:  # reported in the table
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    results = {}
    for beams in args.beams:
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=beams, do_sample=False)
        fns = {}
        for name, (model, extra) in variants.items():
            fns[name] = (lambda m=model, e=extra: m.generate(input_ids=ids, attention_mask=mask, **kwargs, **e))
        for name, model in peers.items():
            if name in ("poly", "mhr"):
                def run(m=model):
                    with poly_task_ids(m, mixed):
                        return m.generate(input_ids=ids, attention_mask=mask, **kwargs)
            elif name == "lora":
                run = (lambda m=model: m.generate(input_ids=ids, attention_mask=mask,
                                                  adapter_names=[f"task{i}" for i in range(8)], **kwargs))
            else:
                run = (lambda m=model: m.generate(input_ids=ids, attention_mask=mask, **kwargs))
            try:
                with torch.no_grad():
                    run()
                fns[name] = run
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        log(f"generate, {beams} beam(s): {', '.join(fns)}")
        with torch.no_grad():
            times = interleaved(fns, args.reps, args.clock_fn, log=log)
        for name in fns:
            flop, traffic = generate_limits(name, beams, args.new_tokens)
            results[f"gen_b{beams}_{name}"] = dict(
                ratio=paired_ratio(times, name), spread=spread(times, name), flop_ratio=flop, traffic_ratio=traffic,
                median_ms=1e3 * statistics.median(times[name]), rounds_ms=[1e3 * t for t in times[name]])
    return results, errors


def train_batch(device, src, tgt, seed=4):
    ids, mask = inputs(device, 8, src, seed)
    labels, _ = inputs(device, 8, tgt, seed + 1)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train_step_fn(model, batch, extra=None, hooks=None):
    """One training step (forward, backward, AdamW step) of the parameters that require grad. A model whose task
    adapters are split (`split_task_adapters`, as `AlterTrainer` trains) trains one parameter per task adapter."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    extra = extra or {}

    def step():
        with hooks() if hooks else contextlib.nullcontext():
            loss = model(**batch, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_models(t5, num_tasks=8, peers=True, skip=(), control=False):
    """name -> (model, extra forward kwargs, hooks) for the training-step section."""
    device = t5.device
    mixed = torch.arange(8, device=device) % num_tasks
    out = {"t5": (copy.deepcopy(t5), {}, None)}
    if control:
        out["control"] = (without_mta(make_alter(t5, num_tasks, stage=1)), {"task_ids": mixed}, None)
    out |= {"s1": (make_alter(t5, num_tasks, stage=1), {"task_ids": mixed}, None),
           "s2_dense": (make_alter(t5, num_tasks, stage=2), {"task_ids": mixed}, None),
           "s2_top2": (make_alter(t5, num_tasks, stage=2, top_k=2), {"task_ids": mixed}, None)}
    if peers:
        for name, build in (("poly", lambda: make_poly(t5, 1)), ("mhr", lambda: make_poly(t5, 4)),
                            ("lora", lambda: make_lora(t5))):
            if name in skip:
                continue
            model = build()
            hooks = (lambda m=model: poly_task_ids(m, mixed)) if name in ("poly", "mhr") else None
            out[name] = (model, {}, hooks)  # LoRA: PEFT trains one active adapter (no mixed-batch training)
    return out


def train_section(args, t5, log):
    batch = train_batch(args.device, args.train_src, 32)
    models = train_models(t5, peers=True, skip=args.skip_peers, control=True)
    fns = {name: train_step_fn(m, batch, e, h) for name, (m, e, h) in models.items()}
    log(f"train step: {', '.join(fns)}")
    times = interleaved(fns, args.train_reps, args.clock_fn, log=log)
    results = {}
    for name in fns:
        model = models[name][0]
        results[f"train_{name}"] = dict(
            ratio=paired_ratio(times, name), spread=spread(times, name), flop_ratio=train_flop_ratio(name, args.train_src, 32),
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            median_ms=1e3 * statistics.median(times[name]), rounds_ms=[1e3 * t for t in times[name]])
    return results


def make_causal_plain(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(CAUSAL_SHAPE, num_hidden_layers=8 if args.quick else CAUSAL_SHAPE["num_hidden_layers"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), attn_implementation="sdpa")
    return model.to(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32).eval()


def make_causal_alter(plain, stage, top_k=None, num_tasks=8):
    """`AlterForCausalLM.from_causal_lm(plain)` with adapters, gate and gate mix as after training (all non-zero)."""
    from modeling_alter import AlterForCausalLM

    model = AlterForCausalLM.from_causal_lm(plain, task_names=[f"task{i}" for i in range(num_tasks)],
                                            adapter_dim=ADAPTER_DIM, num_shared_adapters=SHARED, router_top_k=top_k)
    torch.manual_seed(1)
    with torch.no_grad():
        for mta in model.mta_modules().values():
            mta.task_up.normal_(0, 0.02)
            mta.shared_up.normal_(0, 0.02)
            mta.router.weight.normal_(0, 0.02)
            mta.task_embedding.weight.normal_(0, 1.0)
            mta.gate_mix.fill_(0.5)
    model.set_stage(stage)
    return model.to(plain.device).eval()


def causal_adapter_flops(config, kind, num_tasks=8, top_k=2):
    """FLOPs the MTA modules (FFN-placed) add per token, over all layers: the adapters computed and, in stage 2, the
    router."""
    d, L = config.hidden_size, config.num_hidden_layers
    n = num_tasks + SHARED
    adapters = {"s1": 1, "s2_dense": n, "s2_topk": top_k + 1}[kind] * 4 * d * ADAPTER_DIM * L
    return adapters + (2 * d * n * L if kind != "s1" else 0)


def causal_backbone_flops(config, tokens, attended, heads):
    """FLOPs of the plain LM for `tokens` tokens that attend to `attended` (token, position) pairs in all, with the
    LM head computed for `heads` of them: projections, MLP, attention scores and values, head."""
    d, ff, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token = 2 * (2 * d * d + 2 * d * kv) + 2 * 3 * d * ff
    return L * (tokens * per_token + 4 * d * attended) + heads * 2 * d * V


def causal_flop_ratio(config, kind, prompt, new_tokens=None, num_tasks=8, top_k=2):
    """Analytic FLOP ratio of ALTER (FFN-placed MTA) to the plain LM.

    Generation (`new_tokens` given): the prompt's forward pass, with the LM head on its last position only (as
    `generate` computes it), then one token per further step. A training step (`new_tokens=None`) on sequences of
    `prompt` tokens is forward + backward: 3x the forward for full fine-tuning, 2x for a frozen backbone (activation
    gradients only) plus 3x the adapters'."""
    if new_tokens is not None:
        tokens = prompt + new_tokens - 1
        attended = prompt * (prompt + 1) // 2 + sum(prompt + i for i in range(1, new_tokens))
        backbone = causal_backbone_flops(config, tokens, attended, heads=new_tokens)
        return (backbone + tokens * causal_adapter_flops(config, kind, num_tasks, top_k)) / backbone
    backbone = causal_backbone_flops(config, prompt, prompt * (prompt // 2), heads=prompt)  # mean context: half
    adapters = prompt * causal_adapter_flops(config, kind, num_tasks, top_k)
    if kind == "s1":
        return (3 * backbone + 3 * adapters) / (3 * backbone)
    return (2 * backbone + 3 * adapters) / (3 * backbone)


def causal_traffic_ratio(config, name, batch=8, num_tasks=8, top_k=2):
    """Analytic weight-traffic ratio of `generate` (ALTER over the plain LM), which bounds a batch-8 decoding step
    (it reads weights faster than it computes): every forward reads the backbone's weights (layers and LM head) once,
    and the MTA modules the adapters some token of the batch uses (stage 1: each distinct task's; stage 2 dense:
    all, plus the router; top-k: each token's own task and k chosen, at most all, plus the router)."""
    d, ff, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    backbone = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + V * d
    n = num_tasks + SHARED
    read = {"s1_one": 1, "s1_mixed": min(batch, num_tasks), "s2_dense": n, "s2_topk": min(n, batch * (top_k + 1))}
    adapters = L * (read[name] * 2 * d * ADAPTER_DIM + (n * d if name.startswith("s2") else 0))
    return (backbone + adapters) / backbone


def stepwise_generation(models, ids, new_tokens, reps, clock, log=None):
    """Greedy generation of `new_tokens` tokens by every model of `models` ({name: (model, forward kwargs)}), their
    forward passes interleaved step by step: at each step every model runs its next forward (the prompt's, then one
    per token, each with its own KV cache), in an order that rotates from step to step. Each model's step is so timed
    next to the other models' same step, a fraction of a second apart, where whole `generate` calls are seconds
    apart and a shared machine's speed drifts in between. Returns {name: [seconds per round]}, the sum of a round's
    forwards (and argmax); one untimed round first."""
    from transformers import DynamicCache

    names = list(models)
    # the KV cache's argument name: `cache` in recent Transformers, `past_key_values` before
    cache_arg = {name: "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                 for name, (model, _) in models.items()}
    times = {name: [] for name in names}
    for rnd in range(reps + 1):
        state = {name: (ids, torch.ones_like(ids), DynamicCache(config=model.config))
                 for name, (model, _) in models.items()}
        total = dict.fromkeys(names, 0.0)
        for step in range(new_tokens):
            shift = (rnd + step) % len(names)
            for name in names[shift:] + names[:shift]:
                (model, extra), (tokens, mask, cache) = models[name], state[name]
                start = clock()
                out = model(input_ids=tokens, attention_mask=mask, use_cache=True, logits_to_keep=1,
                            **{cache_arg[name]: cache}, **extra)
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
                total[name] += clock() - start
                state[name] = (tokens, torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), out.past_key_values)
        if rnd:
            for name in names:
                times[name].append(total[name])
            if log:
                log(f"  round {rnd}/{reps}")
    return times


def causal_section(args, log):
    """Decoder-only rows: ALTER (`AlterForCausalLM`, MTA on every MLP) against the plain Llama of the same shape."""
    plain = make_causal_plain(args)
    prompt = 64
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, CAUSAL_SHAPE["vocab_size"], (8, prompt), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    one, mixed = torch.zeros(8, dtype=torch.long, device=args.device), torch.arange(8, device=args.device)
    models = {"plain": (plain, {}), "s1_one": (make_causal_alter(plain, 1), {"task_ids": one})}
    models["s1_mixed"] = (models["s1_one"][0], {"task_ids": mixed})
    models["s2_dense"] = (make_causal_alter(plain, 2), {"task_ids": mixed})
    models["s2_topk"] = (make_causal_alter(plain, 2, top_k=2), {"task_ids": mixed})
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    fns = {name: (lambda m=m, e=e: m.generate(input_ids=ids, attention_mask=mask, **kwargs, **e))
           for name, (m, e) in models.items()}
    log(f"causal generate: {', '.join(fns)}")
    with torch.no_grad():
        times = interleaved(fns, args.reps, args.clock_fn, log=log)
    log(f"causal generation, forwards paired step by step: {', '.join(models)}")
    with torch.no_grad():
        step_times = stepwise_generation(models, ids, args.new_tokens, args.reps, args.clock_fn, log=log)
    results = {}
    for name in fns:
        kind = "s1" if name.startswith("s1") else name
        flop = 1.0 if name == "plain" else causal_flop_ratio(plain.config, kind, prompt, args.new_tokens)
        traffic = 1.0 if name == "plain" else causal_traffic_ratio(plain.config, name)
        for key, measured in (("gen", times), ("steps", step_times)):
            results[f"causal_{key}_{name}"] = dict(
                ratio=paired_ratio(measured, name, "plain"), spread=spread(measured, name, "plain"), flop_ratio=flop,
                traffic_ratio=traffic,
                median_ms=1e3 * statistics.median(measured[name]), rounds_ms=[1e3 * t for t in measured[name]])

    labels = torch.randint(2, CAUSAL_SHAPE["vocab_size"], (8, args.train_src), generator=g).to(args.device)
    batch = dict(input_ids=labels, attention_mask=torch.ones_like(labels), labels=labels)
    train = {"plain": (copy.deepcopy(plain), {}), "s1": (make_causal_alter(plain, 1), {"task_ids": mixed}),
             "s2_dense": (make_causal_alter(plain, 2), {"task_ids": mixed}),
             "s2_topk": (make_causal_alter(plain, 2, top_k=2), {"task_ids": mixed})}
    fns = {name: train_step_fn(m, batch, e) for name, (m, e) in train.items()}
    log(f"causal train step: {', '.join(fns)}")
    times = interleaved(fns, args.train_reps, args.clock_fn, log=log)
    for name in fns:
        flop = 1.0 if name == "plain" else causal_flop_ratio(plain.config, name, args.train_src)
        results[f"causal_train_{name}"] = dict(
            ratio=paired_ratio(times, name, "plain"), spread=spread(times, name, "plain"), flop_ratio=flop,
            trainable=sum(p.numel() for p in train[name][0].parameters() if p.requires_grad),
            median_ms=1e3 * statistics.median(times[name]), rounds_ms=[1e3 * t for t in times[name]])
    return results


def rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args):
    """One measurement, in its own process: peak memory of a training step of one model kind."""
    torch.set_num_threads(args.threads)
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    batch = train_batch(device, args.train_src, 32)
    gc.collect()
    base = rss_bytes("VmRSS") if device == "cpu" else 0
    t5 = make_t5(device, dtype)
    models = train_models(t5, peers=args.memory_child in ("poly", "mhr", "lora"), skip=args.skip_peers)
    model, extra, hooks = models[args.memory_child]
    state_ratio = state_memory_ratio(model, models["t5"][0])
    del models, t5
    gc.collect()
    step = train_step_fn(model, batch, extra, hooks)
    step()  # warm-up: AdamW states exist from here on
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM, the peak resident set size
        step()
        peak = rss_bytes("VmHWM") - base
    print(json.dumps({"peak_bytes": peak, "state_ratio": state_ratio}))


def memory_section(args, log):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    kinds = ["t5", "s2_dense"] if args.quick else ["t5", "s1", "s2_dense", "s2_top2"] + [
        k for k in ("poly", "lora") if k not in args.skip_peers]
    measured = {}
    for kind in kinds:
        log(f"peak memory: {kind}")
        command = [sys.executable, __file__, "--memory-child", kind, "--device", args.device, "--threads",
                   str(args.threads), "--train-src", str(args.train_src), "--skip-peers", ",".join(args.skip_peers)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        measured[kind] = json.loads(out.strip().splitlines()[-1])
    base = measured["t5"]["peak_bytes"]
    return {f"mem_{kind}": dict(ratio=m["peak_bytes"] / base, peak_mb=m["peak_bytes"] / 2**20,
                                state_ratio=m["state_ratio"]) for kind, m in measured.items()}


def scaling_section(args, t5, log):
    """Ratios to plain T5 as the number of tasks grows (`--task-counts`), generation and/or training step
    (`--scaling-parts`). Training compares stage 1 with plain AdamW (every task's adapter updated at every step) and
    with the task adapters split into one parameter per task (only the batch's tasks cost anything in the backward pass
    and the optimizer: how `AlterTrainer` trains) side by side in the same rounds."""
    results = {}
    ids, mask = inputs(args.device, 8, 64)
    batch = train_batch(args.device, args.train_src, 32)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    for num_tasks in args.task_counts:
        mixed = torch.arange(8, device=args.device) % num_tasks
        models = train_models(t5, num_tasks=num_tasks, peers=False)
        gen_times = train_times = None
        if "generate" in args.scaling_parts:
            gen = {"t5": lambda: t5.generate(input_ids=ids, attention_mask=mask, **kwargs)}
            for name in ("s1", "s2_dense", "s2_top2"):
                model = models[name][0]
                gen[name] = (lambda m=model: m.eval().generate(input_ids=ids, attention_mask=mask, task_ids=mixed,
                                                               **kwargs))
            log(f"scaling T={num_tasks}: generate")
            with torch.no_grad():
                gen_times = interleaved(gen, args.reps, args.clock_fn, log=log)
        if "train" in args.scaling_parts:
            fns = {name: train_step_fn(m, batch, e, h) for name, (m, e, h) in models.items()}
            s1_model, s1_extra, _ = models["s1"]
            split_model = copy.deepcopy(s1_model)
            split_model.split_task_adapters()
            fns["s1_split"] = train_step_fn(split_model, batch, s1_extra)
            log(f"scaling T={num_tasks}: train step")
            train_times = interleaved(fns, args.reps, args.clock_fn, log=log)
        for name in ("s1", "s1_split", "s2_dense", "s2_top2"):
            kind = {"s1": "alter_s1_mixed", "s1_split": "alter_s1_mixed", "s2_dense": "alter_s2_dense",
                    "s2_top2": "alter_s2_top2"}[name]
            flop, traffic = generate_limits(kind, 1, args.new_tokens, distinct=min(8, num_tasks), num_tasks=num_tasks)
            row = dict(tasks=num_tasks, mode=name, gen_flop_ratio=flop, gen_traffic_ratio=traffic,
                       train_flop_ratio=train_flop_ratio(name, args.train_src, 32, num_tasks=num_tasks))
            if gen_times is not None and name in gen_times:
                row["gen_ratio"] = paired_ratio(gen_times, name)
            if train_times is not None:
                row["train_ratio"] = paired_ratio(train_times, name)
                row["train_spread"] = spread(train_times, name)
            results[f"T{num_tasks}_{name}"] = row
        del models
        gc.collect()
    return results


def plot_scaling(scaling, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"s1": "stage 1", "s1_split": "stage 1, per-task parameters", "s2_dense": "stage 2 dense",
              "s2_top2": "stage 2 top-2"}
    for ax, key, title in ((axes[0], "gen", "generate (greedy, batch 8)"), (axes[1], "train", "training step")):
        for mode, label in labels.items():
            rows = sorted((r for r in scaling.values() if r["mode"] == mode and f"{key}_ratio" in r),
                          key=lambda r: r["tasks"])
            if not rows:
                continue
            x = [r["tasks"] for r in rows]
            line, = ax.plot(x, [r[f"{key}_ratio"] for r in rows], marker="o", label=f"{label} (measured)")
            ax.plot(x, [r[f"{key}_flop_ratio"] for r in rows], linestyle="--", color=line.get_color(), alpha=0.6,
                    label=f"{label} (FLOP ratio)")
            if key == "gen":
                ax.plot(x, [r["gen_traffic_ratio"] for r in rows], linestyle=":", color=line.get_color(), alpha=0.6,
                        label=f"{label} (weight-traffic ratio)")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel("time / plain T5")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"ALTER vs plain T5 as the number of tasks grows ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- table ----------------------------------------------------------------------------------------------------------

ROWS = [
    ("gen_b1_control", "generate greedy: ALTER backbone without MTA (control)", None),
    ("gen_b1_alter_s1_one", "generate greedy: stage 1, one-task batch", "gen_s1_one"),
    ("gen_b1_alter_s1_mixed", "generate greedy: stage 1, 8 tasks mixed", "gen_s1_mixed"),
    ("gen_b1_alter_s2_dense", "generate greedy: stage 2 dense, 8 tasks mixed", "gen_s2_dense"),
    ("gen_b1_alter_s2_top2", "generate greedy: stage 2 top-2, 8 tasks mixed", "gen_s2_top2"),
    ("gen_b1_poly", "generate greedy: PEFT Poly (8 tasks, 8 skills, r=16)", None),
    ("gen_b1_mhr", "generate greedy: PEFT MHR (Poly, 4 splits)", None),
    ("gen_b1_lora", "generate greedy: PEFT LoRA, 8 adapters, mixed batch", None),
    ("gen_b1_xlora", "generate greedy: PEFT X-LoRA", None),
    ("gen_b4_control", "generate beam 4: ALTER backbone without MTA (control)", None),
    ("gen_b4_alter_s1_one", "generate beam 4: stage 1, one-task batch", "gen_s1_one"),
    ("gen_b4_alter_s1_mixed", "generate beam 4: stage 1, 8 tasks mixed", "gen_s1_mixed"),
    ("gen_b4_alter_s2_dense", "generate beam 4: stage 2 dense, 8 tasks mixed", "gen_s2_dense"),
    ("gen_b4_alter_s2_top2", "generate beam 4: stage 2 top-2, 8 tasks mixed", "gen_s2_top2"),
    ("gen_b4_poly", "generate beam 4: PEFT Poly", None),
    ("gen_b4_mhr", "generate beam 4: PEFT MHR", None),
    ("gen_b4_lora", "generate beam 4: PEFT LoRA, mixed batch", None),
    ("gen_b4_xlora", "generate beam 4: PEFT X-LoRA", None),
    ("train_control", "train step: ALTER backbone without MTA, full fine-tuning (control)", None),
    ("train_s1", "train step: stage 1 (backbone + task adapters), 8 tasks mixed", "train_s1"),
    ("train_s2_dense", "train step: stage 2 dense (frozen backbone)", "train_s2_dense"),
    ("train_s2_top2", "train step: stage 2 top-2 (frozen backbone)", "train_s2_top2"),
    ("train_poly", "train step: PEFT Poly", None),
    ("train_mhr", "train step: PEFT MHR", None),
    ("train_lora", "train step: PEFT LoRA (one adapter: PEFT has no mixed-batch training)", None),
    ("mem_s1", "peak memory, train step: stage 1", None),
    ("mem_s2_dense", "peak memory, train step: stage 2 dense", "mem_s2_dense"),
    ("mem_s2_top2", "peak memory, train step: stage 2 top-2", "mem_s2_top2"),
    ("mem_poly", "peak memory, train step: PEFT Poly", None),
    ("mem_lora", "peak memory, train step: PEFT LoRA", None),
    ("causal_gen_s1_one", "decoder-only (Llama shape) generate greedy: stage 1, one-task batch", "causal_gen_s1"),
    ("causal_gen_s1_mixed", "decoder-only generate greedy: stage 1, 8 tasks mixed", None),
    ("causal_gen_s2_dense", "decoder-only generate greedy: stage 2 dense, 8 tasks mixed", None),
    ("causal_gen_s2_topk", "decoder-only generate greedy: stage 2 top-2, 8 tasks mixed", "causal_gen_s2_topk"),
    ("causal_steps_s1_one", "decoder-only greedy generation, forwards paired step by step: stage 1, one-task batch",
     "causal_gen_s1"),
    ("causal_steps_s1_mixed", "decoder-only, paired step by step: stage 1, 8 tasks mixed", None),
    ("causal_steps_s2_dense", "decoder-only, paired step by step: stage 2 dense, 8 tasks mixed", None),
    ("causal_steps_s2_topk", "decoder-only, paired step by step: stage 2 top-2, 8 tasks mixed", "causal_gen_s2_topk"),
    ("causal_train_s1", "decoder-only train step: stage 1 (backbone + task adapters) vs full fine-tuning", None),
    ("causal_train_s2_dense", "decoder-only train step: stage 2 dense (frozen backbone) vs full fine-tuning",
     "causal_train_s2"),
    ("causal_train_s2_topk", "decoder-only train step: stage 2 top-2 (frozen backbone) vs full fine-tuning",
     "causal_train_s2"),
]


def limit_text(result):
    if result is None:
        return ""
    if "traffic_ratio" in result:
        return f"{result['flop_ratio']:.3f} / {result['traffic_ratio']:.3f}"
    if "flop_ratio" in result:
        return f"{result['flop_ratio']:.3f} / –"
    return f"state {result['state_ratio']:.3f}"


def markdown(runs):
    """runs: {device: results dict}. One column of measured ratios per device."""
    devices = [d for d in ("cpu", "cuda") if d in runs]
    header = ["figure", "target"] + [f"{d.upper()} ratio (min–max over rounds)" for d in devices] + [
        "limit: FLOP / weight-traffic ratio"]
    if "cuda" not in devices:
        header.insert(2 + len(devices), "GPU (bf16) ratio")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = runs[devices[0]]["results"]
    for key, label, target_key in ROWS:
        peer = key.split("_")[-1]
        if not any(key in runs[d]["results"] or peer in runs[d].get("errors", {}) for d in devices):
            continue
        target = TARGETS.get(target_key)
        row = [label, f"{target[0]} {target[1]:.2f}" if target else ""]
        for device in devices:
            result = runs[device]["results"].get(key)
            error = runs[device].get("errors", {}).get(peer)
            if result is None:
                row.append(f"does not run: {error}" if error else "–")
                continue
            text = f"{result['ratio']:.3f}"
            if "spread" in result:
                text += f" ({result['spread'][0]:.2f}–{result['spread'][1]:.2f})"
            if target:
                text += " ✓" if result["ratio"] <= target[1] else " ✗"
            row.append(text)
        if "cuda" not in devices:
            row.append("not run")
        row.append(limit_text(first.get(key)))
        lines.append("| " + " | ".join(row) + " |")
    scaling = runs[devices[0]].get("scaling", {})
    if scaling:
        lines += ["", f"Scaling with the number of tasks T ({devices[0].upper()}; generate greedy, batch of 8 mixing "
                  "min(T, 8) tasks; each cell: measured ratio (FLOP ratio / weight-traffic ratio)):", "",
                  "| T | generate: stage 1 | generate: stage 2 dense | generate: stage 2 top-2 | train: stage 1 "
                  "(AdamW) | train: stage 1 (per-task parameters, AlterTrainer's) | train: stage 2 dense | train: stage 2 "
                  "top-2 |", "|---|---|---|---|---|---|---|---|"]
        for tasks in sorted({r["tasks"] for r in scaling.values()}):
            gen, train = [], []
            for mode in ("s1", "s2_dense", "s2_top2"):
                r = scaling.get(f"T{tasks}_{mode}")
                gen.append(f"{r['gen_ratio']:.3f} ({r['gen_flop_ratio']:.3f} / {r['gen_traffic_ratio']:.3f})"
                           if r and "gen_ratio" in r else "–")
            for mode in ("s1", "s1_split", "s2_dense", "s2_top2"):
                r = scaling.get(f"T{tasks}_{mode}")
                train.append(f"{r['train_ratio']:.3f} ({r['train_flop_ratio']:.3f})" if r and "train_ratio" in r
                             else "–")
            lines.append(f"| {tasks} | " + " | ".join(gen + train) + " |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: 8 new tokens, 3 rounds, T in {2, 32}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1, see the docstring)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu on CPU, wall on CUDA")
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds per figure (default 5; quick 3)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sections", default="generate,train,memory,scaling,causal",
                        help="comma-separated among generate,train,memory,scaling,causal")
    parser.add_argument("--skip-peers", default="", help="comma-separated among poly,mhr,lora,xlora")
    parser.add_argument("--task-counts", default=None,
                        help="comma-separated numbers of tasks of the scaling section (default 2,8,32,128; quick 2,32)")
    parser.add_argument("--scaling-parts", default="generate,train",
                        help="what the scaling section measures: generate, train or both (default)")
    parser.add_argument("--train-src", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.skip_peers = [p for p in args.skip_peers.split(",") if p]
    args.sections = args.sections.split(",")
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures nothing on a GPU; use --clock wall")
    args.train_reps = args.reps or (3 if args.quick else 7)  # a training step is the noisiest figure here
    args.reps = args.reps or (3 if args.quick else 5)
    args.new_tokens = 8 if args.quick else 32
    args.beams = [1] if args.quick else [1, 4]
    default_counts = [2, 32] if args.quick else [2, 8, 32, 128]
    args.task_counts = [int(n) for n in args.task_counts.split(",")] if args.task_counts else default_counts
    args.scaling_parts = args.scaling_parts.split(",")
    if args.quick:
        args.train_src = 64
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    args.clock_fn = Clock(args.device, args.clock)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t5 = make_t5(args.device, dtype)
    results, errors, scaling = {}, {}, {}
    if "generate" in args.sections:
        gen, errors = generate_section(args, t5, log)
        results.update(gen)
    if "train" in args.sections:
        results.update(train_section(args, t5, log))
    if "memory" in args.sections:
        results.update(memory_section(args, log))
    if "scaling" in args.sections:
        scaling = scaling_section(args, t5, log)
    if "causal" in args.sections:
        results.update(causal_section(args, log))
    run = dict(
        results=results, errors=errors, scaling=scaling,
        setup=dict(command=" ".join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)]),
                   device=args.device, dtype=str(dtype), threads=args.threads, clock=args.clock, rounds=args.reps,
                   train_rounds=args.train_reps,
                   quick=args.quick, new_tokens=args.new_tokens, train_source_tokens=args.train_src,
                   torch=torch.__version__, python=platform.python_version(), machine=platform.processor() or
                   platform.machine(), cpu_count=os.cpu_count(),
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                   seconds=round(time.perf_counter() - started)))
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.output / f"speed_{args.device}{suffix}.json").write_text(json.dumps(run, indent=1))
    if scaling:
        plot_scaling(scaling, args.output / f"scaling_{args.device}{suffix}.png", args.device)
    runs = {args.device: run}
    other = "cuda" if args.device == "cpu" else "cpu"
    other_path = args.output / f"speed_{other}{suffix}.json"
    if other_path.exists():
        runs[other] = json.loads(other_path.read_text())
    print(markdown(runs))
    print(f"\n{args.device}, {args.threads} thread(s), {args.clock} clock, median of {args.reps} interleaved rounds "
          f"({args.train_reps} for training steps), {run['setup']['seconds']} s; results in {args.output}")


if __name__ == "__main__":
    main()
