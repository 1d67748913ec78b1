"""`prepare`: builds the folder that goes to the Hub from a training run's output directory (or a model in memory).

The folder holds exactly: `config.json` (with `auto_map`), the family's code files (`configuration_alter.py`,
`configuration_mta.py`, `modeling_alter.py`, `mta.py`, `task_lifecycle.py` for T5; `configuration_alter_causal.py`,
`configuration_mta.py`, `modeling_alter_causal.py`, `mta.py`, `task_lifecycle.py` for decoder-only models, see
`families.py`),
`model.safetensors` (or shards and their index, see `max_shard_size`), `generation_config.json`, the tokenizer files,
`README.md` (the model card) and `routing_heatmap.png` when the run saved a routing picture. The model is loaded and
saved again with `save_pretrained` rather than copied, so checkpoints, optimizer states, `training_args.bin` and
logs of the run never reach the folder.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .card import HUB_ID_PATTERN, build_model_card, check_repo_id, count_parameters, verify_model_card
from .errors import FolderCheckError, PrepareError
from .families import FAMILIES, family_of, peft_folder_hint
from .results import EvalResults, find_result_files, read_eval_results
from .safety import IMAGE_SIGNATURES, scan_folder


CODE_FILES = FAMILIES["alter"].code_files  # the T5 family's code files (each family's: `families.py`)
ROUTING_IMAGE_NAME = "routing_heatmap"
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class PreparedFolder:
    """What `prepare_folder` / `write_folder` wrote."""

    path: Path
    files: list[str]
    parameters: dict[str, int]
    results: EvalResults
    routing_image: str | None
    warnings: list[str] = field(default_factory=list)


def find_routing_image(model_dir) -> Path | None:
    """`routing_heatmap.png` in `model_dir`, else the first top-level `routing*.png`/`.jpg`/`.jpeg` by name."""
    model_dir = Path(model_dir)
    preferred = model_dir / f"{ROUTING_IMAGE_NAME}.png"
    if preferred.is_file():
        return preferred
    candidates = sorted(p for p in model_dir.glob("routing*") if p.is_file() and p.suffix.lower() in IMAGE_SIGNATURES)
    return candidates[0] if candidates else None


def base_model_from_config(config) -> str | None:
    """A Hub id recorded in the config (`base_model` or `base_model_name_or_path`), ignoring local paths."""
    for key in ("base_model", "base_model_name_or_path"):
        value = getattr(config, key, None)
        if isinstance(value, str) and "/" in value and HUB_ID_PATTERN.match(value) and not os.path.exists(value):
            return value
    return None


def prepare_folder(
    model_dir,
    out_dir,
    *,
    repo_id,
    domain,
    tokenizer_dir=None,
    results_files=None,
    routing_image=None,
    base_model=None,
    datasets=(),
    task_datasets=None,
    license="apache-2.0",
    language=None,
    revision_pin="main",
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    allow_missing_results=False,
    overwrite=False,
) -> PreparedFolder:
    """
    Builds the Hub folder `out_dir` from `model_dir`, a training run's output directory (what `trainer.save_model()`
    wrote: the ALTER model, its tokenizer, the `*results*.json` files and the routing picture).

    Args:
        repo_id (`str`): the repository the card's usage snippet loads (`namespace/name`); `push` refuses another.
        domain (`str`): the model's domain, a tag and a word of the card.
        tokenizer_dir: where the tokenizer is, when not in `model_dir`.
        results_files: evaluation JSON files to read instead of `model_dir`'s `*results*.json` (see `results.py`).
        routing_image: the routing picture, instead of `model_dir`'s `routing_heatmap.png`.
        base_model, datasets, task_datasets, license, language: card metadata (`base_model` defaults to the one the
            config records, if any).
        revision_pin (`str`, defaults to `"main"`): the `revision` of the usage snippet. A commit sha is only known
            after a push; `push` prints the snippet pinned to it.
        max_shard_size (`str` or `int`): passed to `save_pretrained`; larger weights are split into shards.
        allow_missing_results (`bool`): write a card without results instead of failing when none are found.
        overwrite (`bool`): replace a non-empty `out_dir`.
    """
    from transformers import AutoTokenizer

    import modeling_alter

    model_dir = Path(model_dir)
    family = _check_model_dir(model_dir)
    check_repo_id(repo_id)
    out_dir = _fresh_out_dir(out_dir, model_dir, overwrite)

    try:
        model = getattr(modeling_alter, family.model_class).from_pretrained(model_dir, dtype="auto")
    except (OSError, ValueError, KeyError) as error:
        raise PrepareError(f"cannot load the ALTER model from {model_dir}: {error}") from error
    tokenizer_source = Path(tokenizer_dir) if tokenizer_dir else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PrepareError(
            f"cannot load a tokenizer from {tokenizer_source}: {error}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(output_dir)) or pass --tokenizer DIR"
        ) from error

    paths = list(results_files) if results_files else find_result_files(model_dir)
    results = read_eval_results(paths, model.config.task_names, model.config.stage)
    if not results and not allow_missing_results:
        where = ", ".join(str(p) for p in paths) if paths else f"no *results*.json in {model_dir}"
        raise PrepareError(
            f"no per-task evaluation results found ({where}); expected keys like 'eval_<task>_<metric>' for the "
            f"tasks {model.config.task_names}. Pass --results FILE, or --allow-missing-results for a card without them"
        )
    if routing_image is None:
        routing_image = find_routing_image(model_dir)
    extra_paths = [model_dir, tokenizer_source, *paths] + ([routing_image] if routing_image else [])
    return write_folder(
        model,
        tokenizer,
        out_dir,
        repo_id=repo_id,
        domain=domain,
        results=results,
        routing_image=routing_image,
        base_model=base_model or base_model_from_config(model.config),
        datasets=datasets,
        task_datasets=task_datasets,
        license=license,
        language=language,
        revision_pin=revision_pin,
        max_shard_size=max_shard_size,
        extra_paths=extra_paths,
    )


def write_folder(
    model,
    tokenizer,
    out_dir,
    *,
    repo_id,
    domain,
    results=None,
    routing_image=None,
    base_model=None,
    datasets=(),
    task_datasets=None,
    license="apache-2.0",
    language=None,
    revision_pin="main",
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    extra_paths=(),
) -> PreparedFolder:
    """
    Writes an ALTER `model`, its `tokenizer`, the routing picture and the model card into the empty (or new)
    directory `out_dir`, then scans it (`safety.scan_folder`) and verifies the card. Arguments as in `prepare_folder`;
    `results` is an `EvalResults` (or None).
    """
    check_repo_id(repo_id)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PrepareError(f"output directory {out_dir} exists and is not empty")
    _check_shard_size(max_shard_size)
    if routing_image is not None:
        routing_image = Path(routing_image)
        suffix = routing_image.suffix.lower()
        if not routing_image.is_file():
            raise PrepareError(f"routing picture {routing_image} does not exist")
        if suffix not in IMAGE_SIGNATURES:
            raise PrepareError(f"routing picture {routing_image} must be a {', '.join(IMAGE_SIGNATURES)} file")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    _check_code_files(out_dir, model)
    tokenizer.save_pretrained(out_dir)
    image_name = None
    if routing_image is not None:
        image_name = ROUTING_IMAGE_NAME + routing_image.suffix.lower()
        shutil.copyfile(routing_image, out_dir / image_name)

    parameters = count_parameters(model)
    results = results or EvalResults()
    card = build_model_card(
        model.config,
        repo_id=repo_id,
        domain=domain,
        parameters=parameters,
        results=results,
        routing_image=image_name,
        base_model=base_model,
        datasets=list(datasets),
        task_datasets=task_datasets,
        license=license,
        language=language,
        revision_pin=revision_pin,
    )
    card.save(out_dir / "README.md")
    files = scan_folder(out_dir, extra_paths=extra_paths)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    problems, warnings = verify_model_card((out_dir / "README.md").read_text(encoding="utf-8"), out_dir, config)
    if problems:
        raise FolderCheckError(problems)
    return PreparedFolder(out_dir, files, parameters, results, image_name, warnings)


def _check_model_dir(model_dir):
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise PrepareError(f"model directory {model_dir} does not exist")
    if not config_path.is_file():
        raise PrepareError(
            f"{model_dir} has no config.json; pass the training run's output directory (where trainer.save_model() "
            "wrote the final model) or a checkpoint directory." + peft_folder_hint(model_dir)
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise PrepareError(f"{config_path} is not a readable JSON object: {error}") from error
    family = family_of(model_type)
    if family is None:
        raise PrepareError(
            f"{config_path} has model_type {model_type!r}, not 'alter' or 'alter_causal'; convert a T5 checkpoint with "
            "AlterForConditionalGeneration.from_t5(...) or a Llama-family causal LM with "
            "AlterForCausalLM.from_causal_lm(...) and train it first"
        )
    return family


def _fresh_out_dir(out_dir, model_dir, overwrite):
    """`out_dir` as an empty directory to write into; only `overwrite` replaces a non-empty one, and never a parent."""
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    protected = [model_dir.resolve(), Path.cwd().resolve(), Path.home().resolve()]
    if any(resolved == p or resolved in p.parents for p in protected):
        raise PrepareError(
            f"output directory {out_dir} is (or contains) the model directory, the current directory or the home "
            "directory; choose a new directory such as MODEL_DIR/hub"
        )
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise PrepareError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise PrepareError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    return out_dir


def _check_shard_size(max_shard_size):
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(max_shard_size) <= 0:
            raise ValueError("must be positive")
    except (ValueError, TypeError, AttributeError) as error:
        raise PrepareError(f"max_shard_size {max_shard_size!r} is not valid (e.g. '5GB', '500MB'): {error}") from None


def _check_code_files(out_dir, model):
    """`save_pretrained` writes the code files only for classes registered for auto classes; make sure it did."""
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") or {}
    family = family_of(config.get("model_type")) or family_of("alter")
    missing = [name for name in family.code_files if not (out_dir / name).is_file()]
    if "AutoConfig" not in auto_map or family.auto_class not in auto_map or missing:
        raise PrepareError(
            f"save_pretrained of {type(model).__name__} wrote no auto_map or code files "
            f"(missing: {missing or 'auto_map'});"
            f" the model class must be registered with register_for_auto_class('{family.auto_class}') and its config"
            " class with register_for_auto_class() (importing modeling_alter does both)"
        )


__all__ = ["PreparedFolder", "base_model_from_config", "find_routing_image", "prepare_folder", "write_folder"]
