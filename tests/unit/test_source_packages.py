"""runbook_lib.source.packages: requirement strings, import names mapped to distributions, what the runtime image provides."""

from __future__ import annotations

import pytest

from runbook_lib.core.errors import (
    RequirementError,
)


def test_requirement_strings_are_validated():
    from runbook_lib.core.values import parse_requirement, validate_requirements

    assert parse_requirement("psycopg2-binary>=2.9; python_version >= '3.9'").name == "psycopg2-binary"
    with pytest.raises(RequirementError, match="invalid pip requirement 'modal==='"):
        parse_requirement("modal===")
    with pytest.raises(RequirementError, match="surrounding whitespace"):
        parse_requirement(" modal")
    with pytest.raises(RequirementError, match=r"'Python_Dotenv' is listed twice"):
        validate_requirements(["python-dotenv", "Python_Dotenv==1.0"])

def test_import_names_map_to_distributions_and_the_runtime_image():
    from runbook_lib.source.packages import (
        distribution_for_import,
        redundant_packages,
        runtime_provided_imports,
        stdlib_modules,
    )

    assert distribution_for_import("psycopg2.extras") == "psycopg2-binary"
    assert distribution_for_import("dotenv") == "python-dotenv"
    assert distribution_for_import("yaml") == "PyYAML"
    assert distribution_for_import("modal") == "modal"
    provided = runtime_provided_imports("3.12")
    assert {"os", "json", "prefect", "pydantic", "httpx", "anyio"} <= provided
    assert not {"modal", "psycopg2"} & provided
    assert "distutils" in stdlib_modules("3.11") and "distutils" not in stdlib_modules("3.12")
    assert redundant_packages(["psycopg2-binary", "modal", "python-dotenv", "prefect"]) == ["python-dotenv", "prefect"]

def test_equivalent_distributions_satisfy_an_import():
    from runbook_lib.source.packages import missing_imports

    assert missing_imports(["psycopg2"], ["psycopg2==2.9.9"]) == []
    assert missing_imports(["psycopg2"], ["psycopg2-binary>=2.9"]) == []
    assert [str(m) for m in missing_imports(["psycopg2"], [])] == ["import psycopg2 needs 'psycopg2-binary' in pip_packages"]
