"""The README's snippets do what the README says they do."""

import os
import re
import subprocess
import sys

from training_utils import REPO

README = REPO / "README.md"


def python_block_after(heading):
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return match.group(1)


def test_in_python_training_snippet_shows_learning(tmp_path):
    """It used to run 208 s and print `0.0 0.0`; now it prints the evaluation loss falling, as the README says."""
    code = python_block_after("### In Python")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    match = re.search(r"eval loss ([\d.]+) -> ([\d.]+) \(stage 1\) -> ([\d.]+)", run.stdout)
    assert match, run.stdout[-3000:]
    before, stage1, final = map(float, match.groups())
    assert stage1 < before - 1.0 and final < before - 1.0, match.group(0)
    claim = re.search(r"`eval loss ([\d.]+) -> ([\d.]+) \(stage 1\) -> ([\d.]+)`", README.read_text())
    assert claim, "the README says what the snippet prints"
    assert abs(float(claim.group(1)) - before) < 0.05 and abs(float(claim.group(2)) - stage1) < 0.05, match.group(0)
    assert "sentiment accuracy" in run.stdout and (tmp_path / "alter-out" / "routing_heatmap.png").is_file()
