"""constraints.txt installs on every Python pyproject.toml admits, down to its floor (3.11.0): CI builds
.venv on Debian's Python 3.11.2, developers often on a newer 3.11 (`make lock` resolves on whichever
Python it runs: a newer one can pick a release an older 3.11 cannot install, as soupsieve 3.0.2 and
later, or leave out what only an older one needs, as redis's async-timeout below 3.11.3)."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from runbook_lib.source.packages import dependency_closure
from tests.conftest import PROJECT_ROOT

PROJECT = "prefect-deployment-runbook"
EXTRAS = ("sandbox", "test")  # what `make venv` installs


def pins() -> dict[str, str]:
    found = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version.strip()
    return found


def floor() -> str:
    """The lowest Python pyproject.toml's requires-python admits, as major.minor (">=3.11" -> "3.11")."""
    spec = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    lows = [s.version for s in SpecifierSet(spec) if s.operator == ">="]
    assert len(lows) == 1 and lows[0].count(".") == 1, f"requires-python {spec!r}: expected one lower bound, X.Y"
    return lows[0]


def installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_pinned_release_installed_here_admits_the_oldest_python_the_project_admits():
    oldest, checked, refused = f"{floor()}.0", 0, []
    for name, version in pins().items():
        dist = installed(name)
        if dist is None or dist.version != version:
            continue  # not this environment's (a marker left it out): its metadata is not here to read
        checked += 1
        requires = dist.metadata.get("Requires-Python")
        if requires and not SpecifierSet(requires).contains(oldest, prereleases=True):
            refused.append(f"{name}=={version} (Requires-Python {requires})")
    assert checked > 100, f"only {checked} pins installed here at their pinned version: is this .venv the lock's?"
    assert not refused, (f"pinned releases that Python {oldest} (pyproject.toml's floor) cannot install: "
                         f"{', '.join(refused)}; pin the newest release that admits it")


def test_what_the_oldest_python_installs_is_pinned():
    """Every distribution `pip install -e '.[sandbox,test]'` reaches on the floor Python (markers evaluated
    there, e.g. `python_full_version < "3.11.3"`) is pinned, installed here or not."""
    reached = dependency_closure(PROJECT, floor(), frozenset(EXTRAS)) - {PROJECT}
    assert len(reached) > 100, f"the walk reached only {len(reached)} distributions: is the project installed here?"
    unpinned = sorted(reached - pins().keys())
    assert not unpinned, (f"reached on Python {floor()}.0 but not pinned in constraints.txt: {unpinned}; "
                          "pin the version CI installs")
