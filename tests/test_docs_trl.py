"""The runnable example of docs/training-with-trl.md runs as written and prints what the page says."""

import contextlib
import io
import os
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "training-with-trl.md"


def runnable_blocks(text):
    """The ```python blocks of a page, except those with a `<!-- not-run: ... -->` line above them."""
    return [m.group(2) for m in re.finditer(r"(<!-- not-run:[^\n]*-->\n)?```python\n(.*?)```", text, flags=re.S)
            if not m.group(1)]


def test_training_with_trl_page_runs(tmp_path):
    text = PAGE.read_text(encoding="utf-8")
    assert text.startswith("# Training with TRL\n")
    blocks = runnable_blocks(text)
    assert len(blocks) == 1 and "AlterSFTTrainer" in blocks[0]
    cwd = os.getcwd()
    out = io.StringIO()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            exec(compile(blocks[0], str(PAGE), "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)
    assert out.getvalue().strip().splitlines()[-1] == "2 3"
