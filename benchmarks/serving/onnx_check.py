"""Step 2a of the serving checks (docs/serving.md): the exported ALTER tasks in ONNX Runtime, through Optimum.

Runs in its own environment, because no release of Optimum's ONNX exporter installs beside Transformers 5 (the
newest, optimum-onnx 0.1.0, requires transformers < 4.58; see docs/serving.md), so this environment has
Transformers 4.57 and never imports ALTER. For each case of `references.json` (written by `make_exports.py`):

1. Optimum's exporter converts the exported folder to ONNX (`main_export`, the function behind
   `optimum-cli export onnx --model FOLDER --task text-generation-with-past OUT`; `text2text-generation-with-past`
   for T5);
2. `ORTModelForCausalLM` / `ORTModelForSeq2SeqLM` generate greedily from the recorded prompts, and the tokens are
   compared with those the ALTER model generated for the task (`alter_tokens`), token for token;
3. the prompts' logits of ONNX Runtime are compared with those of Transformers (this environment's) on the same
   exported folder.

    python benchmarks/serving/onnx_check.py outputs/serving     # exit status 1 when any token differs
"""

import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs/serving")
    import onnxruntime
    import transformers
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from importlib.metadata import version

    versions = {"transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                "optimum": version("optimum"), "optimum-onnx": version("optimum-onnx"), "torch": torch.__version__}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    references = json.loads((root / "references.json").read_text())
    results, all_same = {}, True
    for name, case in references.items():
        folder = Path(case["folder"])
        if not folder.is_absolute() and not folder.exists():
            folder = root / folder.name
        seq2seq = case["kind"] == "seq2seq"
        onnx_dir = root / f"{name}_onnx"
        start = time.perf_counter()
        main_export(str(folder), output=onnx_dir,
                    task="text2text-generation-with-past" if seq2seq else "text-generation-with-past",
                    device="cpu", do_validation=False)
        export_s = time.perf_counter() - start
        ort_class, hf_class = ((ORTModelForSeq2SeqLM, AutoModelForSeq2SeqLM) if seq2seq
                               else (ORTModelForCausalLM, AutoModelForCausalLM))
        ort = ort_class.from_pretrained(onnx_dir)
        hf = hf_class.from_pretrained(folder).eval()
        ort_tokens, hf_tokens, worst = [], [], 0.0
        for ids in case["prompts"]:
            input_ids = torch.tensor([ids])
            mask = torch.ones_like(input_ids)
            kwargs = dict(attention_mask=mask, do_sample=False, num_beams=1,
                          max_new_tokens=case.get("max_new_tokens", 24))
            for model, store in ((ort, ort_tokens), (hf, hf_tokens)):
                with torch.no_grad():
                    out = model.generate(input_ids, **kwargs)
                store.append(out[0].tolist() if seq2seq else out[0, len(ids):].tolist())
            with torch.no_grad():
                extra = {"decoder_input_ids": torch.tensor([[0, 5, 9, 12]])} if seq2seq else {}
                a = ort(input_ids=input_ids, attention_mask=mask, **extra).logits
                b = hf(input_ids=input_ids, attention_mask=mask, **extra).logits
                worst = max(worst, (torch.as_tensor(a) - b).abs().max().item())
        same = ort_tokens == case["alter_tokens"]
        all_same &= same
        first_diff = None
        if not same:
            first_diff = next(i for i, (x, y) in enumerate(zip(ort_tokens, case["alter_tokens"])) if x != y)
        results[name] = {"architecture": case["architecture"], "export_seconds": round(export_s, 1),
                         "tokens_compared": sum(map(len, case["alter_tokens"])),
                         "onnxruntime_tokens_equal_alter": same, "first_differing_prompt": first_diff,
                         "transformers4_tokens_equal_alter": hf_tokens == case["alter_tokens"],
                         "max_abs_logit_difference_onnxruntime_vs_transformers": worst}
        print(f"{name}: {case['architecture']} -> ONNX ({export_s:.0f} s export): ORT{'ModelForSeq2SeqLM' if seq2seq else 'ModelForCausalLM'}"
              f" greedy tokens {'IDENTICAL to' if same else 'DIFFER from'} ALTER's for the task "
              f"({results[name]['tokens_compared']} tokens, {len(case['prompts'])} prompts); Transformers "
              f"{transformers.__version__} on the folder: {'identical' if hf_tokens == case['alter_tokens'] else 'DIFFER'};"
              f" max |logit| ORT vs Transformers {worst:.3g}")
    (root / "onnx_results.json").write_text(json.dumps({"versions": versions, "cases": results}, indent=1) + "\n")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
