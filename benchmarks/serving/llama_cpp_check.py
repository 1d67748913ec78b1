"""Step 2b of the serving checks (docs/serving.md): the exported decoder-only ALTER tasks in llama.cpp.

Runs in its own environment with `llama-cpp-python` (built from source by pip) and Transformers. The `gguf` package
on PyPI holds only the GGUF reader/writer, not llama.cpp's `convert_hf_to_gguf.py`; llama-cpp-python's source
distribution vendors llama.cpp with that script (and its `conversion/` package and `gguf-py`), so the conversion is
the one of the llama.cpp that llama-cpp-python runs. For each causal case of `references.json` (`make_exports.py`):

1. `python LLAMA_CPP/convert_hf_to_gguf.py FOLDER --outtype f32 --outfile CASE-f32.gguf` (and `f16`, reported only);
2. `llama_cpp.Llama` generates greedily (`top_k=1`, `temp=0`, no repeat penalty) from the recorded prompt token ids,
   and the tokens are compared with those the ALTER model generated for the task, token for token (up to and
   including the first end-of-sequence token, where Transformers' `generate` stops);
3. llama.cpp's logits over each prompt are compared with Transformers' on the exported folder;
4. llama.cpp's tokenizer (from the GGUF) is compared with the Hugging Face tokenizer on the chat-formatted prompts.

    python benchmarks/serving/llama_cpp_check.py outputs/serving LLAMA_CPP_DIR   # exit status 1 if a token differs
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def convert(llama_cpp_dir, folder, outfile, outtype):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(Path(llama_cpp_dir) / "convert_hf_to_gguf.py"), str(folder),
                          "--outtype", outtype, "--outfile", str(outfile)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {folder}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def greedy(llm, ids, max_new_tokens, eos):
    tokens = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new_tokens:
            break
    return tokens


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root, llama_cpp_dir = Path(argv[0]), Path(argv[1])
    import llama_cpp
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    references = json.loads((root / "references.json").read_text())
    results, all_same = {}, True
    for name, case in references.items():
        if case["kind"] != "causal":
            continue
        folder = Path(case["folder"])
        eos = case["eos_token_id"]
        eos = set(eos if isinstance(eos, list) else [eos])
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        entry = {"architecture": case["architecture"]}
        for outtype in ("f32", "f16"):
            gguf_path = root / f"{name}-{outtype}.gguf"
            seconds = convert(llama_cpp_dir, folder, gguf_path, outtype)
            llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=2, n_batch=512, logits_all=True,
                                  verbose=False, seed=0)
            tokens, worst = [], 0.0
            for ids in case["prompts"]:
                tokens.append(greedy(llm, ids, case.get("max_new_tokens", 24), eos))
                llm.reset()
                llm.eval(ids)
                scores = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
                with torch.no_grad():
                    expected = hf(torch.tensor([ids])).logits[0].numpy()
                worst = max(worst, float(np.abs(scores - expected).max()))
            same = tokens == case["alter_tokens"]
            differing = [i for i, (a, b) in enumerate(zip(tokens, case["alter_tokens"])) if a != b]
            tokenizer_same = []
            for text, ids in zip(case.get("prompt_texts", []), case["prompts"]):
                rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False)
                tokenizer_same.append(llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids)
            entry[outtype] = {"convert_seconds": round(seconds, 1), "gguf_bytes": gguf_path.stat().st_size,
                              "tokens_equal_alter": same, "differing_prompts": differing,
                              "tokens_compared": sum(map(len, case["alter_tokens"])),
                              "max_abs_logit_difference_llama_cpp_vs_transformers": worst,
                              "llama_cpp_tokenizer_equals_hf": all(tokenizer_same) if tokenizer_same else None}
            if outtype == "f32":
                all_same &= same
            print(f"{name} {outtype}: {case['architecture']} -> GGUF ({seconds:.0f} s): llama.cpp greedy tokens "
                  f"{'IDENTICAL to' if same else 'DIFFER from'} ALTER's for the task ({entry[outtype]['tokens_compared']}"
                  f" tokens, {len(case['prompts'])} prompts{'' if same else f'; differing prompts {differing}'}); "
                  f"max |logit| llama.cpp vs Transformers {worst:.3g}; tokenizer "
                  f"{'same ids' if all(tokenizer_same) else 'DIFFERENT ids'} on the chat-formatted prompts")
            del llm
            gguf_path.unlink()
        results[name] = entry
    (root / "llama_cpp_results.json").write_text(json.dumps({"versions": versions, "cases": results}, indent=1) + "\n")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
