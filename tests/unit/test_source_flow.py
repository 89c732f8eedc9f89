"""runbook_lib.source.flow, beyond what tests/test_runbook_core.py covers: the spellings of `@flow`
and `Secret` (aliases, modules), flow names, keyword-only parameters, relative and package imports
through the repository's modules, and the entrypoint helpers."""

from __future__ import annotations

import pytest

from runbook_lib.core.errors import FlowSourceError
from runbook_lib.source.flow import (
    analyse_entrypoint,
    analyse_flow,
    local_top_level_names,
    module_imports,
    parse,
    repository_imports,
)
from tests.unit.flow_sources import ANNOTATED_ORCHESTRATOR, ORCHESTRATOR


def test_the_test_orchestrator_reads_like_the_real_one():
    info = analyse_flow(ORCHESTRATOR, "orchestrator_main", "src/orchestrator.py")
    assert info.is_flow and info.flow_name == "orchestrator_main" and info.decorators == ['flow(name="orchestrator_main")']
    assert [(p.name, p.required) for p in info.parameters] == [
        ("batch_size", False), ("batch_id", False), ("time_budget_seconds", False)]
    assert info.parameter("batch_id").annotation == "Optional[str]" and info.parameter("batch_id").default == "None"
    assert info.parameter("nope") is None
    # the block name comes from a module constant
    assert info.secret_blocks == ["postgres-connection-string"] and info.swallowed_secret_loads == []


@pytest.mark.parametrize("source,name", [
    ("import prefect\n@prefect.flow\ndef main(): pass\n", "main"),
    ("import prefect as pf\n@pf.flow(retries=1)\ndef main_flow(): pass\n", "main-flow"),
    ("from prefect import flow as f\n@f(name='Custom Name')\ndef main(): pass\n", "Custom Name"),
    ("from prefect import flow\n@other\n@flow()\nasync def run_all(): pass\n", "run-all"),
])
def test_every_spelling_of_the_flow_decorator_is_recognised(source, name):
    info = analyse_flow(source, source.split("def ")[1].split("(")[0])
    assert info.is_flow and info.flow_name == name


@pytest.mark.parametrize("source", [
    "from prefect import task\n@task\ndef main(): pass\n",
    "from mylib import flow\n@flow\ndef main(): pass\n",  # not prefect's
    "import prefect\n@prefect.task\ndef main(): pass\n",
    "def main(): pass\n",
])
def test_other_decorators_are_not_flows(source):
    info = analyse_flow(source, "main")
    assert not info.is_flow and info.flow_name is None


def test_a_computed_flow_name_is_unknown():
    info = analyse_flow("from prefect import flow\nNAME = 'x'\n@flow(name=NAME)\ndef main(): pass\n", "main")
    assert info.is_flow and info.flow_name is None


def test_keyword_only_and_positional_only_parameters():
    info = analyse_flow("from prefect import flow\n@flow\ndef main(a, /, b: int = 1, *, c: str, d=None): pass\n", "main")
    assert [(p.name, p.annotation, p.default, p.required) for p in info.parameters] == [
        ("a", None, None, True), ("b", "int", "1", False), ("c", "str", None, True), ("d", None, "None", False)]


def test_every_spelling_of_secret_load_is_found():
    source = (
        "from prefect.blocks import system\n"
        "import prefect.blocks.system as blocks\n"
        "from prefect.blocks.system import Secret as S\n"
        "BLOCK = 'modal-token-id'\n"
        "def a():\n    return system.Secret.load(BLOCK)\n"
        "async def b():\n    return await blocks.Secret.aload('modal-token-secret')\n"
        "def c(name):\n    try:\n        return S.load(name)\n    except Exception:\n        pass\n"
        "VALUE = S.load('module-level')\n"
    )
    loads = analyse_flow(source, "a").secret_loads
    assert [(s.block, s.function, s.swallowed) for s in loads] == [
        ("modal-token-id", "a", False), ("modal-token-secret", "b", False), (None, "c", True),
        ("module-level", None, False)]
    assert loads[2].handler == "except Exception (line 12)"


def test_imports_record_their_level_and_whether_a_function_imports_them():
    tree = parse("import a.b, c\nfrom . import x, y\nfrom ..pkg import z\nfrom d import e\n"
                 "def f():\n    import g\n", "pkg/sub/mod.py")
    assert [(i.module, i.level, i.in_function) for i in module_imports(tree)] == [
        ("a.b", 0, False), ("c", 0, False), (".x", 1, False), (".y", 1, False), ("..pkg", 2, False), ("d", 0, False),
        ("g", 0, True)]


def test_repository_imports_follow_relative_and_package_imports():
    files = {
        "flows/main.py": "from .lib.tools import run\nfrom . import shared\nimport requests\n",
        "flows/__init__.py": "import yaml\n",
        "flows/lib/__init__.py": "",
        "flows/lib/tools.py": "from ..shared import helper\nimport numpy as np\n",
        "flows/shared.py": "import json\ndef helper(): pass\n",
        "other/unused.py": "import pandas\n",
    }
    external, visited = repository_imports(files, "flows/main.py:main")
    assert sorted(i.module for i in external) == ["json", "numpy", "requests", "yaml"]
    assert visited == ["flows/main.py", "flows/lib/tools.py", "flows/__init__.py", "flows/lib/__init__.py",
                       "flows/shared.py"]
    # A package's __init__ runs when one of its modules is imported absolutely.
    external, visited = repository_imports({**files, "run.py": "import flows.shared\n"}, "run.py:main")
    assert visited == ["run.py", "flows/shared.py", "flows/__init__.py"]
    assert sorted(i.module for i in external) == ["json", "yaml"]


def test_local_top_level_names_come_from_the_root_and_the_entrypoints_directory():
    files = {"src/orchestrator.py": "", "src/helpers/__init__.py": "", "src/scoring.py": "", "tools.py": "",
             "lib/x.py": ""}
    assert local_top_level_names(files, "src/orchestrator.py:main") == {
        "src", "tools", "lib", "orchestrator", "helpers", "scoring"}
    assert local_top_level_names({"a.py": "", "b/c.py": ""}, "a.py:main") == {"a", "b"}


def test_entrypoint_helpers_name_what_is_missing():
    files = {"src/orchestrator.py": ORCHESTRATOR}
    assert analyse_entrypoint(files, "src/orchestrator.py:orchestrator_main").flow_name == "orchestrator_main"
    with pytest.raises(FlowSourceError, match="^entrypoint file src/missing.py is not in the repository$"):
        analyse_entrypoint(files, "src/missing.py:main")
    with pytest.raises(FlowSourceError, match="^entrypoint file src/missing.py is not in the repository$"):
        repository_imports(files, "src/missing.py:main")
    with pytest.raises(FlowSourceError, match=r"^src/bad.py does not parse: .* \(line 1\)$"):
        repository_imports({"src/o.py": "import bad\n", "src/bad.py": "def (:\n"}, "src/o.py:main")



def test_flow_analysis_finds_the_flow_its_parameters_imports_and_secret_loads():
    from runbook_lib.source.flow import analyse_flow

    info = analyse_flow(ANNOTATED_ORCHESTRATOR, "orchestrator_main", "src/orchestrator.py")
    assert info.is_flow and not info.is_async and info.flow_name == "orchestrator-main"  # Prefect's default naming
    assert [(p.name, p.annotation, p.default) for p in info.parameters] == [("batch_size", "int", "50"), ("dry_run", "bool", "False")]
    modules = {i.module for i in info.imports}
    assert {"os", "prefect", "psycopg2", "dotenv", "modal", "src.sequencer", "dispatcher"} <= modules
    assert next(i for i in info.imports if i.module == "modal").in_function
    loads = {(s.function, s.block): s for s in info.secret_loads}
    assert loads[("get_dsn", "postgres-connection-string")].swallowed
    assert loads[("get_dsn", "postgres-connection-string")].handler == "except Exception (line 15)"
    assert not loads[("strict_dsn", "postgres-connection-string")].swallowed
    assert loads[("nested", "modal-token-id")].swallowed  # re-raised inward, swallowed by the bare except
    assert loads[("nested", "modal-token-id")].handler.startswith("bare except")
    assert not loads[("narrow", "modal-token-secret")].swallowed  # KeyError does not catch Secret.load's ValueError
    assert info.secret_blocks == ["modal-token-id", "modal-token-secret", "postgres-connection-string"]
    assert [(e.name, e.has_default) for e in info.env_reads] == [("DATABASE_URL", True), ("MODAL_TOKEN_ID", False)]

    plain = analyse_flow(ANNOTATED_ORCHESTRATOR, "not_a_flow")
    assert not plain.is_flow and plain.flow_name is None
    named = analyse_flow("from prefect import flow\n@flow(name='orchestrator_main')\nasync def f(): pass\n", "f")
    assert named.flow_name == "orchestrator_main" and named.is_async

def test_flow_analysis_errors_are_clear():
    from runbook_lib.source.flow import analyse_flow

    with pytest.raises(FlowSourceError, match=r"has no module-level function 'orchestrator_main' \(it defines: \['get_dsn'"):
        analyse_flow(ANNOTATED_ORCHESTRATOR.replace("def orchestrator_main", "def renamed"), "orchestrator_main", "src/o.py")
    with pytest.raises(FlowSourceError, match=r"src/o.py does not parse: .*line 2"):
        analyse_flow("x = 1\ndef broken(:\n", "broken", "src/o.py")

def test_repository_imports_follow_local_modules_and_feed_the_package_check():
    from runbook_lib.source.flow import local_top_level_names, repository_imports
    from runbook_lib.source.packages import missing_imports

    files = {
        "src/orchestrator.py": ANNOTATED_ORCHESTRATOR,
        "src/__init__.py": "",
        "src/sequencer.py": "from .db import connect\nimport requests\n",
        "src/db.py": "import psycopg2\nimport yaml\n",
        "src/dispatcher.py": "def dispatch_pending_items(*a):\n    import modal\n    import sklearn.cluster\n",
        "scripts/unused.py": "import pandas\n",
    }
    external, visited = repository_imports(files, "src/orchestrator.py:orchestrator_main")
    names = {i.module for i in external}
    assert {"psycopg2", "yaml", "modal", "requests", "sklearn.cluster", "dotenv"} <= names and "pandas" not in names
    assert set(visited) == {"src/orchestrator.py", "src/__init__.py", "src/sequencer.py", "src/db.py", "src/dispatcher.py"}
    local = local_top_level_names(files, "src/orchestrator.py:orchestrator_main")
    assert {"src", "dispatcher", "sequencer"} <= local
    production = ["psycopg2-binary", "modal", "python-dotenv"]
    missing = missing_imports([i.module for i in external], production, local_modules=local)
    assert [(m.module, m.distribution) for m in missing] == [("sklearn", "scikit-learn")]
    missing = missing_imports([i.module for i in external], ["psycopg2-binary"], local_modules=local)
    assert {m.module for m in missing} == {"modal", "sklearn"}


@pytest.mark.parametrize("ends", ["\n", "\r\n", "\r"])
def test_source_segments_are_the_standard_librarys_whatever_the_line_ends_and_characters(ends):
    """The segments (decorators, annotations, defaults) read from lines split once per source: for every
    node of the orchestrator, with each kind of line end, non-ASCII text before and inside the nodes, a
    form feed (not a line end for the parser) and a last line without an end, they are what
    `ast.get_source_segment` gives, or the node unparsed where it gives nothing."""
    import ast

    from runbook_lib.source.flow import _segment

    source = ORCHESTRATOR + (
        '\n\x0c\n@flow(name="café-ünïcode")\ndef é(x: "ñ" = {"k": ("é",\n    1)}, *, y: int = (\n  2)) -> "ø":\n'
        '    return "naïve"  # ✓\nz = [1,\n 2]')
    source = source.replace("\r\n", "\n").replace("\n", ends)
    tree = ast.parse(source)
    nodes = [n for n in ast.walk(tree) if hasattr(n, "end_lineno")]
    assert len(nodes) > 100
    for node in nodes:
        assert _segment(source, node) == (ast.get_source_segment(source, node) or ast.unparse(node)), ast.dump(node)[:200]
