"""What may leave this machine: the allow-list of files, and the scans for pickles, credentials, links and local paths.

`scan_folder(folder)` walks a folder and returns the relative paths of the files to upload, or raises
`UnsafeFolderError` listing every problem, each with its file (and line, for text files):

- **Allow-list.** Only the files a Transformers model repository needs: `README.md`, `LICENSE`, `config.json`,
  `generation_config.json`, safetensors weights (`model.safetensors` or `model-XXXXX-of-XXXXX.safetensors` with
  `model.safetensors.index.json`), tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
  `special_tokens_map.json`, `added_tokens.json`, `vocab.json`, `vocab.txt`, `merges.txt`, `spiece.model`,
  `tokenizer.model`), pictures (`*.png`, `*.jpg`, `*.jpeg`, also in subdirectories), and the Python files that
  `config.json` or `tokenizer_config.json` name in `auto_map` (plus the files they import relatively). Everything
  else, hidden files and directories included, is refused.
- **Pickles.** `.bin`, `.pt`, `.pth`, `.pkl`, `.pickle`, `.ckpt`, `.joblib`, `.npy`, `.npz` are refused, and so is
  any allowed file whose bytes start like a pickle or a zip archive (what `torch.save` writes). Safetensors files must
  have a valid safetensors header; pictures must carry their format's signature.
- **Credentials.** Hugging Face tokens (`hf_...`, `api_org_...`), AWS access key ids (`AKIA...`, `ASIA...`), AWS and
  other secret keys assigned in text (`aws_secret_access_key = ...`, `client_secret: ...`), GitHub tokens and private
  key blocks, in every text file and safetensors header, and in the bytes of binary files. `.env` files are refused.
- **Links.** Symbolic links that point outside the folder (or nowhere) are refused, and so are links to directories.
- **Local paths.** Text files must not contain absolute paths of this machine: the home directory, the folder itself,
  the current directory, the temporary directory, paths given in `extra_paths` (e.g. the model directory), and any
  `/home/<user>`, `/Users/<user>`, `/root`, `/tmp`, `/var/folders`, `/private/var` or `C:\\Users\\` path.
"""

import fnmatch
import json
import os
import re
import struct
import tempfile
from pathlib import Path

from .errors import UnsafeFolderError


ALLOWED_PATTERNS = (
    "README.md",
    "LICENSE",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-?????-of-?????.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "*.png",
    "*.jpg",
    "*.jpeg",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
TEXT_SUFFIXES = (".json", ".md", ".py", ".txt")
TEXT_NAMES = ("LICENSE",)
IMAGE_SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff"}
MAX_FINDINGS_PER_FILE = 10

CREDENTIAL_PATTERNS = (
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9_])(?:hf_|api_org_)[A-Za-z0-9]{30,}")),
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    (
        "a secret key",
        re.compile(
            r"(?i)(?:aws_?secret_?(?:access_?)?key|secret_?access_?key|secret_?key|client_?secret|api_?key|"
            r"access_?token|auth_?token|password)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-.=]{16,}"
        ),
    ),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}")),
    ("a private key", re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----")),
)
GENERIC_LOCAL_PATH = re.compile(
    r"(?<![\w.:/~-])(?:/home/[^/\s\"'`]+|/Users/[^/\s\"'`]+|/root|/tmp|/var/folders|/private/var|/private/tmp)"
    r"(?=[/\s\"'`),;:]|$)"
    r"|(?<![\w])[A-Za-z]:\\{1,2}Users\\{1,2}"
)


def scan_folder(folder, extra_paths=()) -> list[str]:
    """
    Returns the sorted relative (POSIX) paths of the files in `folder` that may be uploaded, or raises
    `UnsafeFolderError` listing every refused file, credential, link and local path (see the module docstring).
    `extra_paths` are more absolute paths of this machine that must not appear in any text file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UnsafeFolderError([f"{folder}: not a directory"])
    root = root.resolve()
    findings = []
    allowed_code = _auto_map_code_files(root)
    local_paths = _local_path_pattern(root, extra_paths)
    files = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        directory = Path(directory)
        for name in sorted(dirnames):
            path = directory / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                findings.append(_link_finding(root, path, relative, is_directory=True))
            elif name.startswith("."):
                findings.append(f"{relative}/: hidden directory; only the model's files are uploaded")
        dirnames[:] = [n for n in sorted(dirnames) if not (directory / n).is_symlink() and not n.startswith(".")]
        for name in sorted(filenames):
            path = directory / name
            relative = path.relative_to(root).as_posix()
            refusal = _refusal(root, path, relative, allowed_code)
            if refusal:
                findings.append(refusal)
                continue
            findings.extend(_scan_content(path, relative, local_paths))
            files.append(relative)
    if findings:
        raise UnsafeFolderError(findings)
    return sorted(files)


def _refusal(root, path, relative, allowed_code):
    """The reason `path` may not be uploaded at all, or None."""
    name = path.name
    if path.is_symlink():
        finding = _link_finding(root, path, relative, is_directory=False)
        if finding:
            return finding
    lowered = name.lower()
    if lowered == ".env" or lowered.startswith(".env.") or lowered.endswith(".env"):
        return f"{relative}: environment file (.env) refused; it typically holds credentials"
    if lowered.endswith(PICKLE_SUFFIXES):
        return (
            f"{relative}: pickle-based file refused ({path.suffix}); loading it can run arbitrary code. Save weights "
            "with safetensors (`model.save_pretrained(...)` writes model.safetensors)"
        )
    if path.suffix == ".py":
        if "/" in relative or name not in allowed_code:
            return (
                f"{relative}: stray Python file; only the modules named in config.json's auto_map (and the files "
                f"they import relatively) are uploaded: {sorted(allowed_code) or 'none'}"
            )
        return None
    if name.startswith("."):
        return f"{relative}: hidden file refused; only the model's files are uploaded"
    if "/" in relative and path.suffix.lower() not in IMAGE_SIGNATURES:
        return f"{relative}: stray file refused; only pictures may sit in subdirectories, model files at the top level"
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in ALLOWED_PATTERNS):
        return f"{relative}: stray file refused, not in the allow-list ({', '.join(ALLOWED_PATTERNS)}, auto_map code)"
    return _format_refusal(path, relative)


def _link_finding(root, path, relative, is_directory):
    target = Path(os.path.realpath(path))
    if not target.exists():
        return f"{relative}: broken symbolic link (-> {os.readlink(path)})"
    if target != root and root not in target.parents:
        return f"{relative}: symbolic link pointing outside the folder (-> {target}); copy the file in instead"
    if is_directory:
        return f"{relative}: symbolic link to a directory; copy the files in instead"
    return None


def _format_refusal(path, relative):
    """Checks that a binary file is what its name says; returns the problem or None."""
    with open(path, "rb") as file:
        head = file.read(16)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return f"{relative}: the content is a pickle despite its name; refused"
    if head.startswith(b"PK\x03\x04"):
        return f"{relative}: the content is a zip archive (e.g. a torch.save checkpoint) despite its name; refused"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SIGNATURES and not head.startswith(IMAGE_SIGNATURES[suffix]):
        return f"{relative}: not a {suffix[1:].upper()} picture (wrong file signature); refused"
    if suffix == ".safetensors":
        try:
            read_safetensors_header(path)
        except ValueError as error:
            return f"{relative}: not a valid safetensors file ({error}); refused"
    return None


def read_safetensors_header(path) -> str:
    """The JSON header of a safetensors file, as text (raises ValueError when the file is not safetensors)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > 100_000_000:
            raise ValueError(f"header length {length} does not fit in the {size}-byte file")
        header = file.read(length).decode("utf-8", errors="strict")
    parsed = json.loads(header)
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    return header


def _auto_map_code_files(root) -> set[str]:
    """The `.py` files named by `auto_map` in config.json / tokenizer_config.json, closed over relative imports."""
    modules = set()
    for config_name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((root / config_name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        references = []
        for value in auto_map.values():
            references.extend(value if isinstance(value, (list, tuple)) else [value])
        for reference in references:
            if isinstance(reference, str) and "--" not in reference and "." in reference:
                modules.add(reference.rsplit(".", 1)[0] + ".py")
    pending = [name for name in modules if "/" not in name]
    modules = set(pending)
    while pending:
        path = root / pending.pop()
        if not path.is_file():
            continue
        for imported in re.findall(
            r"^\s*from\s+\.(\w+)\s+import\b", path.read_text(encoding="utf-8", errors="replace"), re.M
        ):
            if imported + ".py" not in modules:
                modules.add(imported + ".py")
                pending.append(imported + ".py")
    return modules


def _local_path_pattern(root, extra_paths):
    """A regex for the absolute paths of this machine that must not appear in uploaded text."""
    candidates = {str(root), str(Path.home()), os.getcwd(), tempfile.gettempdir()}
    for extra in extra_paths:
        candidates.update({os.path.abspath(extra), os.path.realpath(extra)})
    literals = sorted(
        {c.rstrip("/\\") for c in candidates if c and len(c.rstrip("/\\")) >= 4 and os.path.isabs(c)},
        key=len,
        reverse=True,
    )
    pattern = GENERIC_LOCAL_PATH.pattern
    if literals:
        alternatives = "|".join(re.escape(literal) for literal in literals)
        pattern = rf"(?<![\w.-])(?:{alternatives})(?=[/\\\s\"'`),;:]|$)|{pattern}"
    return re.compile(rf"(?:{pattern})[^\s\"'`),;<>]*")  # the whole path, for the message


def _redact(text):
    return text[:6] + "…" if len(text) > 6 else text


def _scan_text(text, where, local_paths, with_paths=True):
    findings = []
    for kind, pattern in CREDENTIAL_PATTERNS:
        for match in pattern.finditer(text):
            findings.append(f"{where}: contains {kind} ({_redact(match.group(0))}); remove it and revoke it")
    if with_paths:
        for match in local_paths.finditer(text):
            findings.append(
                f"{where}: contains an absolute path of this machine ({match.group(0).rstrip('.:')!r}); uploaded "
                "files must not reveal or depend on local paths"
            )
    return findings


def _scan_content(path, relative, local_paths):
    """Credential and local-path findings in one allowed file (text files line by line)."""
    findings = []
    if path.suffix.lower() in TEXT_SUFFIXES or path.name in TEXT_NAMES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            return [f"{relative}: text file is not valid UTF-8 ({error}); refused"]
        for number, line in enumerate(text.splitlines(), start=1):
            findings.extend(_scan_text(line, f"{relative}:{number}", local_paths))
    elif path.suffix.lower() == ".safetensors":
        findings = _scan_text(read_safetensors_header(path), f"{relative} (header metadata)", local_paths)
    else:
        data = path.read_bytes().decode("latin-1")
        for kind, pattern in CREDENTIAL_PATTERNS:
            for match in pattern.finditer(data):
                findings.append(
                    f"{relative} (byte {match.start()}): contains {kind} ({_redact(match.group(0))}); "
                    "remove it and revoke it"
                )
    if len(findings) > MAX_FINDINGS_PER_FILE:
        findings = findings[:MAX_FINDINGS_PER_FILE] + [
            f"{relative}: … and {len(findings) - MAX_FINDINGS_PER_FILE} more"
        ]
    return findings


__all__ = ["ALLOWED_PATTERNS", "PICKLE_SUFFIXES", "read_safetensors_header", "scan_folder"]
