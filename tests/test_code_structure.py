"""The package's import graph: the training side imports the model side, never the reverse; the callback does not
import the trainer (as Transformers' `trainer_callback.py` does not import `trainer.py`); the routing report and the
task lifecycle live in files of their own, and the Hub files import only torch, transformers and each other."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_alter"


def relative_imports(name: str) -> set[str]:
    """The sibling modules `name` (a file of the package) imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modeling_alter."):
            found.add(node.module.split(".", 1)[1])
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: relative_imports(path.name) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_callback_does_not_import_the_trainer():
    graph = import_graph()
    assert "trainer" not in graph["callback"]
    assert "stages" not in graph["callback"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()

    def visit(module, path):
        for child in graph.get(module, ()):
            assert child not in path, f"import cycle: {' -> '.join(path + [child])}"
            visit(child, path + [child])

    for module in graph:
        visit(module, [module])


@pytest.mark.parametrize("module, moved", [
    ("routing_report", {"RoutingStatistics", "mta_module_labels", "ROUTING_HEATMAP_NAME", "ROUTING_STATS_NAME"}),
    ("task_lifecycle", {"AlterTasksMixin", "FrozenRows", "PrefixMatcher", "remap_mta_tasks", "plan_task_changes",
                        "tokenize_prefix", "BLOCKED_GATE_LOGIT"}),
])
def test_moved_code_lives_in_its_own_file(module, moved):
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    defined |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert moved <= defined
    for other in ("trainer.py", "mta.py"):
        other_tree = ast.parse((PACKAGE / other).read_text(encoding="utf-8"))
        other_defined = {node.name for node in other_tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        assert not moved & other_defined, (other, moved & other_defined)


def test_mta_py_is_the_module_and_its_routing():
    assert relative_imports("mta.py") == {"configuration_mta"}
    assert relative_imports("task_lifecycle.py") == {"configuration_mta", "mta"}


def test_trainer_keeps_exporting_the_routing_report():
    from modeling_alter import routing_report, trainer

    assert trainer.RoutingStatistics is routing_report.RoutingStatistics
    assert trainer.mta_module_labels is routing_report.mta_module_labels


def test_routing_report_and_callback_import_without_the_trainer():
    """Importing the callback or the routing report does not import `modeling_alter.trainer` (a fresh process)."""
    code = (
        "import sys, modeling_alter.callback, modeling_alter.routing_report, modeling_alter.task_lifecycle;"
        "print('modeling_alter.trainer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "False"


def test_callback_defaults_are_the_training_arguments_defaults():
    """`StageSwitchCallback.merge_args` treats a field at its `AlterTrainingArguments` default as unset; it reads the
    defaults from its own `DEFAULTS` so as not to import the trainer: they must agree."""
    from modeling_alter.callback import StageSwitchCallback
    from modeling_alter.trainer import AlterTrainingArguments

    fields = AlterTrainingArguments.__dataclass_fields__
    for arg_name, attribute in StageSwitchCallback.SETTINGS:
        assert fields[arg_name].default == StageSwitchCallback.DEFAULTS[attribute], arg_name
