"""The README and docs/ cannot rot silently: their code runs, their links resolve, their figures are in the files.

Conventions (also in CONTRIBUTING.md), for README.md, CONTRIBUTING.md and docs/*.md:

- Every fenced block whose info string is `python` or `bash` runs, in the order of its page, in one temporary folder
  per page (so a block can use the files an earlier block of its page wrote), with `OMP_NUM_THREADS=1`, offline,
  `PYTHONPATH` at the repository, `examples/`, `benchmarks/` and `tests/` linked into the folder, and `.venv/bin/`
  holding `python` and `alter-hub` (the set-up commands make those in a real clone). `python` blocks run with the
  suite's interpreter, `bash` blocks with `bash -eo pipefail`. Other info strings (`text`, `json`, `console`, ...)
  never run.
- A block that must not run (it downloads, takes minutes, or holds a placeholder such as `"org/alter-medical"`) has
  `<!-- not-run: the reason -->` on the line just above its fence.
- A block followed by `<!-- output -->` and a ```` ```text ```` block: every non-blank line of that text block must
  be a line of what the code printed, in order (other printed lines may come between them). In an expected line,
  `...` matches anything, and `~1.86` matches a number within 0.05 of 1.86.
- A figure quoted from `benchmarks/results/`: the block (a table, a paragraph or a list item: up to the next blank
  line) that holds it has `<!-- figures: PATH [PATH ...] -->` on the line just above it, and every number of 10 or
  more, or with a decimal point, in that block must be in one of those files (rounded as the text rounds it, or as
  a percentage of a fraction there). In README.md, docs/performance.md and docs/quality.md every table needs such a
  line (`<!-- figures: none -->` for a table of no measured figures).
- Every relative link and image (`[text](path#anchor)`) resolves to a file of the repository, and every anchor to a
  heading of its page (GitHub's anchor rules).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_utils import REPO

DOCS = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
LINKED = [*DOCS, REPO / "CHANGELOG.md"]
FIGURE_PAGES = {"README.md", "performance.md", "quality.md"}
RUN_LANGUAGES = {"python", "bash"}
BLOCK_TIMEOUT_S = 300

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.+?)\s*-->\s*$")
OUTPUT = re.compile(r"\A\s*<!--\s*output\s*-->\s*\n\s*```text\n(?P<text>.*?)^\s*```", re.S | re.M)
FIGURES = re.compile(r"^[ ]*<!--\s*figures:\s*(?P<paths>.+?)\s*-->[ ]*$", re.M)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
NUMBER = re.compile(r"(?<![\w.])(?<!\w-)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?!\.?\d|,\d{3})")


def page_id(path):
    return str(path.relative_to(REPO))


def code_blocks(path):
    """(info, body, line above the fence, the text after the block) of every fenced block of a page."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        body = "\n".join(line[len(match.group("indent")):] for line in match.group("body").split("\n"))
        blocks.append((match.group("info").strip(), body, before, text[match.end():]))
    return blocks


def runnable_blocks(path):
    runs = []
    for info, body, before, after in code_blocks(path):
        language = info.split()[0] if info else ""
        if language not in RUN_LANGUAGES or NOT_RUN.search(before):
            continue
        expected = OUTPUT.match(after)
        runs.append((language, body, expected.group("text") if expected else None))
    return runs


def expected_line_matches(expected, actual):
    pattern = ""
    for piece in re.split(r"(\.\.\.|~-?\d+(?:\.\d+)?)", expected.strip()):
        if piece == "...":
            pattern += ".*"
        elif piece.startswith("~"):
            pattern += r"(-?\d+(?:\.\d+)?)"
        else:
            pattern += re.escape(piece)
    match = re.fullmatch(pattern, actual.strip())
    if not match:
        return False
    wanted = [float(piece[1:]) for piece in re.findall(r"~-?\d+(?:\.\d+)?", expected)]
    return all(abs(float(got) - want) <= 0.05 + 1e-9 for got, want in zip(match.groups(), wanted))


def check_output(expected, stdout):
    lines = stdout.splitlines()
    position = 0
    for wanted in filter(str.strip, expected.splitlines()):
        while position < len(lines) and not expected_line_matches(wanted, lines[position]):
            position += 1
        assert position < len(lines), f"the page says the block prints\n  {wanted}\nbut it printed:\n{stdout[-4000:]}"
        position += 1


def page_environment(folder):
    """The folder a new user's clone would give a page's commands: .venv/bin with python and alter-hub."""
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "python3"):  # a script, not a link: a linked venv interpreter would lose its packages
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    (bin_dir / "alter-hub").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hub_upload "$@"\n')
    (bin_dir / "alter-hub").chmod(0o755)
    for name in ("examples", "benchmarks", "tests"):
        (folder / name).symlink_to(REPO / name)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "MPLBACKEND": "Agg"}


RUN_PAGES = [path for path in DOCS if runnable_blocks(path)]


@pytest.mark.parametrize("page", RUN_PAGES, ids=page_id)
def test_code_blocks_run_and_print_what_the_page_says(page, tmp_path):
    env = page_environment(tmp_path)
    for number, (language, body, expected) in enumerate(runnable_blocks(page), 1):
        script = tmp_path / f"block{number}.{'py' if language == 'python' else 'sh'}"
        script.write_text(body, encoding="utf-8")
        command = [sys.executable, script.name] if language == "python" else ["bash", "-eo", "pipefail", script.name]
        start = time.time()
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        where = f"{page_id(page)}, {language} block {number} ({time.time() - start:.0f} s):\n{body[:600]}"
        assert run.returncode == 0, f"{where}\nexit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        if expected is not None:
            try:
                check_output(expected, run.stdout)
            except AssertionError as error:
                raise AssertionError(f"{where}\n{error}") from None


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [body.strip() for info, body, _, _ in code_blocks(REPO / "README.md")
                if info.startswith("bash") and "pytest" in body and "python3 -m venv .venv" in body]
    assert len(commands) == 1, f"the README has one set-up + test command: {commands}"
    assert commands[0] in ci.splitlines(), f".ci/run does not run the README's test command {commands[0]!r}"
    assert "python3 -m venv .venv && .venv/bin/pip install" in readme


# ---------------------------------------------------------------------------------------------------- links


def github_anchor(heading):
    """GitHub's heading anchor: lower case, punctuation other than '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"`|\*\*|\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text, flags=re.UNICODE)
    return text.replace(" ", "-")


def anchors_of(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6}[ ]+(.+?)[ ]*#*$", text, re.M):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    anchors.update(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", text))
    return anchors


def relative_links(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group("target") for m in LINK.finditer(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", m.group("target"))]


@pytest.mark.parametrize("page", LINKED, ids=page_id)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists() or REPO.resolve() not in [destination, *destination.parents]:
            broken.append(f"{target}: no file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors_of(destination):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    assert not broken, f"{page_id(page)}:\n" + "\n".join(broken)


def test_docs_pages_start_with_what_they_cover_and_a_runnable_example():
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert text.startswith("# "), f"{page.name} starts with its title"
        first_block = code_blocks(page)[0] if code_blocks(page) else None
        assert first_block and first_block[0].split()[0] in RUN_LANGUAGES and not NOT_RUN.search(first_block[2]), (
            f"{page.name}: its first code block is a runnable example")
        intro = text.split("\n\n", 2)[1]
        assert len(intro.split()) >= 15, f"{page.name}: the paragraph under the title says what the page covers"


def test_every_docs_page_is_linked_from_the_readme():
    readme_links = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    missing = [page.name for page in (REPO / "docs").glob("*.md") if page.resolve() not in readme_links]
    assert not missing, f"docs pages the README does not link: {missing}"


# ---------------------------------------------------------------------------------------------------- figures


def numbers_in_file(path):
    """Every number a results file holds: JSON values (and numbers inside its strings), or numbers in its text."""
    text = path.read_text(encoding="utf-8")
    found = [float(n.replace(",", "")) for n in NUMBER.findall(text)]
    if path.suffix == ".json":
        def walk(value):
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                found.append(abs(float(value)))
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
        walk(json.loads(text))
    return found


def figure_is_in(number_text, file_numbers):
    value = float(number_text.replace(",", ""))
    decimals = len(number_text.partition(".")[2])
    for candidate in file_numbers:
        for scaled in (candidate, candidate * 100):
            if abs(scaled - value) <= 0.5 * 10 ** -decimals + 1e-9:  # `value` is `scaled` rounded
                return True
    return False


def figure_blocks(page):
    """(the paths named, the block of text below the marker) of every `<!-- figures: ... -->` marker of a page."""
    text = page.read_text(encoding="utf-8")
    for match in FIGURES.finditer(text):
        rest = text[match.end():].lstrip("\n")
        block = rest.split("\n\n", 1)[0]
        yield match.group("paths"), block


@pytest.mark.parametrize("page", DOCS, ids=page_id)
def test_quoted_figures_are_in_the_results_files(page):
    defects = []
    for paths, block in figure_blocks(page):
        if paths.strip().startswith("none"):
            continue
        files = [REPO / name for name in paths.split()]
        missing = [str(name) for name in files if not name.is_file()]
        if missing:
            defects.append(f"marker names missing files {missing}")
            continue
        file_numbers = [n for name in files for n in numbers_in_file(name)]
        prose = re.sub(r"`[^`\n]*`|\]\([^)]*\)|<!--.*?-->", " ", block)  # code, link targets and comments hold names
        for number in NUMBER.findall(prose):
            if ("." not in number and float(number.replace(",", "")) < 10) or figure_is_in(number, file_numbers):
                continue
            defects.append(f"{number} (in: {block[:80]!r}...) is in none of {paths}")
    assert not defects, f"{page_id(page)}: figures no results file holds:\n" + "\n".join(defects)


@pytest.mark.parametrize("page", [p for p in DOCS if p.name in FIGURE_PAGES], ids=page_id)
def test_every_results_table_names_its_source(page):
    lines = page.read_text(encoding="utf-8").split("\n")
    unmarked = []
    for index, line in enumerate(lines):
        starts_table = line.lstrip().startswith("|") and (index == 0 or not lines[index - 1].lstrip().startswith("|"))
        if starts_table:
            above = lines[index - 1] if index else ""
            if not FIGURES.match(above):
                unmarked.append(f"line {index + 1}: {line[:80]}")
    assert not unmarked, (f"{page_id(page)}: tables without a `<!-- figures: ... -->` line above:\n"
                          + "\n".join(unmarked))


# ---------------------------------------------------------------------------------------------------- version


def test_version_is_the_same_in_the_package_setup_cfg_and_the_changelog():
    import modeling_alter

    setup_version = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert releases, "CHANGELOG.md lists releases as '## [X.Y.Z] - YYYY-MM-DD'"
    assert modeling_alter.__version__ == setup_version == releases[0], (
        modeling_alter.__version__, setup_version, releases[0])


def test_figure_check_catches_a_number_no_file_holds(tmp_path):
    """The figures check is not vacuous: a quoted number absent from the file is reported, a rounded one is not."""
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"ratio": 1.0084770072653886, "score": 0.4319, "n": 706304}))
    numbers = numbers_in_file(results)
    assert figure_is_in("1.008", numbers) and figure_is_in("1.01", numbers) and figure_is_in("43.2", numbers)
    assert figure_is_in("706,304", numbers)
    assert not figure_is_in("1.009", numbers) and not figure_is_in("43.3", numbers)


def test_output_check_matches_lines_in_order_with_wildcards_and_tolerances():
    check_output("eval loss ~7.10 -> ~1.86 (stage 1)\nsentiment accuracy ...",
                 "noise\neval loss 7.12 -> 1.83 (stage 1)\nsentiment accuracy 0.60, mean 0.2\n")
    with pytest.raises(AssertionError):
        check_output("eval loss ~7.10", "eval loss 7.30\n")
    with pytest.raises(AssertionError):
        check_output("b\na", "a\nb\n")


def test_not_run_blocks_say_why():
    for page in DOCS:
        for info, _, before, _ in code_blocks(page):
            if "not-run" in before:
                assert NOT_RUN.search(before), f"{page_id(page)}: a not-run comment gives its reason: {before!r}"
