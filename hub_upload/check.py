"""`check`: validates a Hub folder, and loads it in a separate, isolated Python the way a user of the Hub would.

In order, each step stopping the check with every problem it found:

1. `safety.scan_folder`: allow-list, pickles, credentials, links, local paths (`UnsafeFolderError`).
2. Structure: `config.json` (model_type `alter` with `auto_map` for `AutoConfig` and `AutoModelForSeq2SeqLM`, or
   `alter_causal` with `AutoConfig` and `AutoModelForCausalLM` (see `families.py`), its code
   files present and importing only the standard library, `torch`, `transformers` and each other), safetensors
   weights (one file, or shards that match their index), `generation_config.json`, `tokenizer_config.json`, and the
   card (`card.verify_model_card`).
3. Isolated load: `isolated_load.py` runs under `python -I` from an empty temporary directory, with a fresh
   `HF_HOME` and `HF_MODULES_CACHE`, offline, without credentials in its environment, with `modeling_alter` and
   `hub_upload` blocked and internet sockets refused. It loads config, tokenizer and model through the Auto classes
   with `trust_remote_code=True` (as the card's snippet does) and generates once per task. The classes must come
   from the folder's code (`transformers_modules...`), every tensor of the safetensors files must be in the loaded
   model with the same values (and every model weight in a file, tied weights aside), and the card's task list,
   stage and parameter counts must match the loaded model.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard

from .card import verify_model_card
from .errors import FolderCheckError
from .families import family_of
from .safety import read_safetensors_header, scan_folder


REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModelForSeq2SeqLM")
ALLOWED_CODE_IMPORTS = {"torch", "transformers", "__future__"}
DEFAULT_TIMEOUT = 900
STDERR_TAIL_LINES = 15


@dataclass
class CheckReport:
    """A folder that passed `check_folder`: its files and sizes, what the isolated load reported, and warnings."""

    folder: Path
    files: list[tuple[str, int]]
    load: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        lines = [f"OK: {self.folder} passed every check ({len(self.files)} files, {format_size(self.total_size)})"]
        lines += [f"  {path:<48} {format_size(size):>10}" for path, size in self.files]
        lines.append(
            f"loaded in a clean Python: {self.load['config_class']}, {self.load['model_class']}, "
            f"{self.load['tokenizer_class']}"
        )
        counts = self.load["parameters"]
        lines.append(
            f"parameters: {counts['total']:,} total, {counts['stage1_trainable']:,} trainable in stage 1, "
            f"{counts['stage2_trainable']:,} in stage 2"
        )
        lines += [f"  generate(task_ids=[{task!r}]) -> {text!r}" for task, text in self.load["generations"].items()]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def format_size(size) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def check_folder(folder, *, timeout=DEFAULT_TIMEOUT, python=None, extra_paths=()) -> CheckReport:
    """
    Checks `folder` as described in the module docstring and returns a `CheckReport`; raises `UnsafeFolderError`
    or `FolderCheckError` (with every problem, each naming its file) otherwise. `python` is the interpreter of the
    isolated load (defaults to this one); `timeout` bounds it in seconds.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderCheckError([f"{folder}: not a directory"])
    files = scan_folder(folder, extra_paths=extra_paths)
    problems, config = check_structure(folder, files)
    warnings = []
    if config is not None and "README.md" in files:
        card_problems, warnings = verify_model_card((folder / "README.md").read_text(encoding="utf-8"), folder, config)
        problems += card_problems
    if problems:
        raise FolderCheckError(problems)

    report = load_in_clean_python(folder, timeout=timeout, python=python)
    alter = ModelCard((folder / "README.md").read_text(encoding="utf-8")).data.to_dict()["alter"]
    problems = compare_load_report(report, config, alter)
    if problems:
        raise FolderCheckError(problems)
    sizes = [(path, (folder / path).stat().st_size) for path in files]
    return CheckReport(folder, sizes, report, warnings)


def check_structure(folder, files) -> tuple[list[str], dict | None]:
    """Problems with the folder's required files; also returns the parsed `config.json` (None if unreadable)."""
    problems = []
    present = set(files)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md"):
        if name not in present:
            problems.append(f"{name}: missing")
    config = _read_json(folder, "config.json", problems) if "config.json" in present else None
    if "generation_config.json" in present:
        _read_json(folder, "generation_config.json", problems)
    if "tokenizer_config.json" in present:
        _read_json(folder, "tokenizer_config.json", problems)
    if config is not None:
        family = family_of(config.get("model_type"))
        if family is None:
            problems.append(
                f"config.json: model_type is {config.get('model_type')!r}, expected 'alter' or 'alter_causal'"
            )
        required_auto_classes = ("AutoConfig", family.auto_class if family else REQUIRED_AUTO_CLASSES[1])
        task_names = config.get("task_names")
        if not isinstance(task_names, list) or not task_names or not all(isinstance(t, str) for t in task_names):
            problems.append(f"config.json: task_names {task_names!r} is not a non-empty list of names")
        auto_map = config.get("auto_map")
        if not isinstance(auto_map, dict):
            problems.append(
                "config.json: auto_map is missing; save the model with save_pretrained after importing modeling_alter"
            )
            auto_map = {}
        for auto_class in required_auto_classes:
            reference = auto_map.get(auto_class)
            if not isinstance(reference, str) or "." not in reference:
                problems.append(f"config.json: auto_map[{auto_class!r}] is {reference!r}, expected 'module.ClassName'")
                continue
            module_file = reference.rsplit(".", 1)[0] + ".py"
            if module_file not in present:
                problems.append(
                    f"config.json: auto_map[{auto_class!r}] names {module_file}, which is not in the folder"
                )
        for name in sorted(n for n in present if n.endswith(".py")):
            problems += _check_code_imports(folder / name, name, present)
    problems += _check_weights(folder, present)
    return problems, config


def _read_json(folder, name, problems):
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except ValueError as error:
        problems.append(f"{name}: not valid JSON ({error})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{name}: expected a JSON object")
        return None
    return data


def _check_code_imports(path, name, present=None):
    """A code file may import only the standard library, torch, transformers and (relatively) its siblings, which
    must be in the folder (`present`: the folder's file names; None skips that check)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=name)
    except SyntaxError as error:
        return [f"{name}:{error.lineno}: syntax error ({error.msg})"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [(node.module or "", node.lineno)]
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and present is not None:
            sibling = node.module.replace(".", "/") + ".py"
            if sibling not in present:
                problems.append(f"{name}:{node.lineno}: imports .{node.module}, but {sibling} is not in the folder")
            continue
        else:
            continue
        for module, line in modules:
            top = module.partition(".")[0]
            if top not in ALLOWED_CODE_IMPORTS and top not in sys.stdlib_module_names:
                problems.append(
                    f"{name}:{line}: imports {module!r}; Hub code may import only the standard library, torch, "
                    "transformers and its sibling files (relatively: 'from .configuration_alter import ...')"
                )
    return problems


def _check_weights(folder, present):
    single = "model.safetensors" in present
    index_name = "model.safetensors.index.json"
    shards = sorted(n for n in present if n.endswith(".safetensors") and n != "model.safetensors")
    if single and (index_name in present or shards):
        return [f"model.safetensors and sharded weights ({index_name}, {shards}) both present; keep one"]
    if single:
        return [] if _tensor_names(folder / "model.safetensors") else ["model.safetensors: holds no tensors"]
    if index_name not in present:
        return ["model.safetensors (or sharded model-*.safetensors with model.safetensors.index.json): missing"]
    problems = []
    index = _read_json(folder, index_name, problems)
    weight_map = (index or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return problems + [f"{index_name}: weight_map is missing or empty"]
    listed = sorted(set(weight_map.values()))
    for shard in listed:
        if shard not in present:
            problems.append(f"{index_name}: shard {shard} is not in the folder")
            continue
        missing = {k for k, v in weight_map.items() if v == shard} - _tensor_names(folder / shard)
        if missing:
            problems.append(f"{shard}: lacks {len(missing)} tensor(s) its index lists, e.g. {sorted(missing)[0]!r}")
    for shard in shards:
        if shard not in listed:
            problems.append(f"{shard}: not listed in {index_name}")
    return problems


def _tensor_names(path) -> set[str]:
    return set(json.loads(read_safetensors_header(path))) - {"__metadata__"}


def _clean_environment(home) -> dict[str, str]:
    """This process's environment minus Python, Hugging Face and credential variables, plus a fresh offline HF home."""
    secret_words = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "HF_", "HUGGING_FACE", "TRANSFORMERS_"))
        and not any(word in key.upper() for word in secret_words)
    }
    env.update(
        HF_HOME=str(home / "hf_home"),
        HF_MODULES_CACHE=str(home / "modules"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def load_in_clean_python(folder, *, timeout=DEFAULT_TIMEOUT, python=None) -> dict:
    """Runs `isolated_load.py` on `folder` in a separate isolated interpreter; returns its report or raises."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="alter-hub-check-") as tmp:
        tmp = Path(tmp)
        script = tmp / "isolated_load.py"
        shutil.copyfile(Path(__file__).with_name("isolated_load.py"), script)
        (tmp / "cwd").mkdir()
        result_path = tmp / "result.json"
        command = [python or sys.executable, "-I", str(script), str(folder), str(result_path)]
        try:
            process = subprocess.run(
                command,
                cwd=tmp / "cwd",
                env=_clean_environment(tmp),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FolderCheckError(
                [f"loading {folder.name} in a clean Python did not finish within {timeout} s"]
            ) from None
        report = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else None
    if report is None or not report.get("ok"):
        tail = "\n".join(f"      {line}" for line in process.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        if report is None:
            reason = f"the interpreter exited with status {process.returncode} before reporting"
        else:
            reason = f"failed while {report.get('step')}: {report.get('error')}"
        raise FolderCheckError(
            [f"loading {folder.name} in a clean Python (python -I, project blocked) {reason}\n{tail}"]
        )
    return report


def compare_load_report(report, config, alter) -> list[str]:
    """Problems between what the isolated load found and what `config.json` and the card's `alter` block say."""
    problems = []
    for key in ("config_class", "model_class"):
        if not report[key].startswith("transformers_modules."):
            problems.append(f"isolated load: {key} {report[key]} was not loaded from the folder's code")
    if report.get("weight_problems"):
        problems.append(f"isolated load: the weights do not match the model: {report['weight_problems']}")
    if report["task_names"] != config.get("task_names"):
        problems.append(f"isolated load: task_names {report['task_names']} differ from config.json's")
    if report["parameters"] != alter.get("parameters"):
        problems.append(
            f"README.md metadata: alter.parameters {alter.get('parameters')} differ from the loaded model's "
            f"{report['parameters']}"
        )
    if report["stage"] != alter.get("stage"):
        problems.append(
            f"README.md metadata: alter.stage {alter.get('stage')} differs from the loaded model's {report['stage']}"
        )
    missing = [task for task in report["task_names"] if task not in report.get("generations", {})]
    if missing:
        problems.append(f"isolated load: no generation for task(s) {missing}")
    return problems


__all__ = ["CheckReport", "check_folder", "check_structure", "compare_load_report", "load_in_clean_python"]
