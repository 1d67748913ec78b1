"""Loads a Hub folder the way a user who has only `transformers` installed would, and reports what it found.

`hub_upload.check` runs this file as a script in a separate interpreter (`python -I isolated_load.py FOLDER RESULT`)
from an empty temporary working directory, with a fresh `HF_MODULES_CACHE`, offline, and without credentials. The
script imports nothing from this project: it blocks `modeling_alter` and `hub_upload` on `sys.meta_path` (so even an
installed copy of the project cannot be picked up) and refuses every internet socket. It loads the folder through
`AutoConfig`, `AutoTokenizer` and `AutoModelForSeq2SeqLM(trust_remote_code=True)` (`AutoModelForCausalLM` for a
decoder-only folder, which also runs once in `pipeline("text-generation")`), generates once per task, and writes
a JSON report to RESULT: `{"ok": true, ...}` or `{"ok": false, "step": ..., "error": ...}`.
"""

import importlib.abc
import json
import socket
import sys
import traceback
from pathlib import Path


BLOCKED_PACKAGES = ("modeling_alter", "hub_upload")
PROMPT = "hello world"


class ProjectImportBlocker(importlib.abc.MetaPathFinder):
    """Makes `import modeling_alter` / `import hub_upload` (and their submodules) fail, wherever they are installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED_PACKAGES:
            raise ModuleNotFoundError(
                f"import of {fullname!r} is blocked: the Hub folder must load without the ALTER project installed "
                "(its code files may import only torch, transformers and each other, relatively)",
                name=fullname,
            )
        return None


def block_internet():
    """Makes every AF_INET/AF_INET6 connection attempt raise, so that loading cannot silently download anything."""
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access to {address!r} is disabled during the isolated load check")

    def connect(sock, address):
        refuse(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock, address):
        refuse(sock, address)
        return original_connect_ex(sock, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


def compare_weights(model, folder):
    """Tensors of the folder's safetensors files the model lacks or holds with other values, and model weights that
    no file provides (tied weights count as provided); at most 10 names each."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    unexpected, different, provided = [], [], set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                if name not in state:
                    unexpected.append(name)
                    continue
                provided.add(state[name].data_ptr())
                if not torch.equal(file.get_tensor(name).to(state[name].dtype), state[name].cpu()):
                    different.append(name)
    missing = [name for name, tensor in state.items() if tensor.data_ptr() not in provided]
    problems = {"missing": missing, "unexpected": unexpected, "different values": different}
    return {kind: sorted(names)[:10] for kind, names in problems.items() if names}


def load_and_generate(folder, report):
    """Loads the folder with the Auto classes and generates once per task, filling `report` as it goes."""
    report["step"] = "importing torch and transformers"
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    report["step"] = "loading the config with AutoConfig.from_pretrained(trust_remote_code=True)"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    report["config_class"] = f"{type(config).__module__}.{type(config).__qualname__}"
    # A decoder-only ALTER folder maps AutoModelForCausalLM, an encoder-decoder one AutoModelForSeq2SeqLM.
    causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    auto_name = "AutoModelForCausalLM" if causal else "AutoModelForSeq2SeqLM"
    report["auto_class"] = auto_name

    report["step"] = "loading the tokenizer with AutoTokenizer.from_pretrained(trust_remote_code=True)"
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    report["tokenizer_class"] = type(tokenizer).__name__

    report["step"] = f"loading the model with {auto_name}.from_pretrained(trust_remote_code=True)"
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True)
    report["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"

    report["step"] = "comparing the loaded weights with the safetensors files"
    report["weight_problems"] = compare_weights(model, folder)

    report["step"] = "counting parameters"
    parameters = dict(model.named_parameters())
    report["task_names"] = list(config.task_names)
    report["stage"] = config.stage
    report["parameters"] = {
        "total": sum(p.numel() for p in parameters.values()),
        "stage1_trainable": sum(parameters[n].numel() for n in model.trainable_parameter_names(1)),
        "stage2_trainable": sum(parameters[n].numel() for n in model.trainable_parameter_names(2)),
    }

    model.eval()
    generations = {}
    for name in config.task_names:
        report["step"] = (
            f"generating for task {name!r} with model.generate(**batch, task_ids=model.task_ids([{name!r}]))"
        )
        batch = tokenizer([PROMPT], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**batch, task_ids=model.task_ids([name]), max_new_tokens=8, num_beams=2)
        new_tokens = output[0, batch["input_ids"].shape[1]:] if causal else output[0]  # a causal LM repeats the prompt
        generations[name] = tokenizer.decode(new_tokens, skip_special_tokens=True)
    report["generations"] = generations
    if causal:
        name = config.task_names[0]
        report["step"] = (
            'running pipeline("text-generation", model=folder, trust_remote_code=True) with '
            f"task_ids=model.task_ids([{name!r}])"
        )
        generator = transformers.pipeline("text-generation", model=folder, trust_remote_code=True)
        result = generator(PROMPT, task_ids=generator.model.task_ids([name]), max_new_tokens=8, do_sample=False)
        report["pipeline"] = {name: result[0]["generated_text"]}
    report["loaded_project_modules"] = sorted(
        name for name in sys.modules if name.partition(".")[0] in BLOCKED_PACKAGES
    )
    report["ok"] = True
    del report["step"]


def main(argv):
    if len(argv) != 2:
        print("usage: python -I isolated_load.py FOLDER RESULT_JSON", file=sys.stderr)
        return 2
    folder, result_path = argv
    sys.meta_path.insert(0, ProjectImportBlocker())
    block_internet()
    report = {"ok": False, "step": "starting"}
    try:
        load_and_generate(folder, report)
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent process
        traceback.print_exc()
        report.update(ok=False, error=f"{type(error).__name__}: {error}")
    with open(result_path, "w", encoding="utf-8") as file:
        json.dump(report, file)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
