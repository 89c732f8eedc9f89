"""What the managed runtime must install for the flow to import: requirement strings and import names.

A Prefect Managed pool runs the flow in Prefect's image (Python `RUNTIME_PYTHON`, prefect and its
dependencies installed) and installs `pip_packages` when a run starts. An import the image does
not provide and no pip package supplies makes the run crash at start ("No module named ..."),
which is what `missing_imports` predicts from the flow's syntax tree, before deploying.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from runbook_lib.core.values import parse_requirement, validate_requirements

RUNTIME_PYTHON = "3.12"

# Import names whose distribution is named differently (the usual pip-install surprises).
IMPORT_TO_DISTRIBUTION: dict[str, str] = {
    "psycopg2": "psycopg2-binary",
    "dotenv": "python-dotenv",
    "yaml": "PyYAML",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "bs4": "beautifulsoup4",
    "cv2": "opencv-python-headless",
    "jwt": "PyJWT",
    "dateutil": "python-dateutil",
    "attr": "attrs",
    "OpenSSL": "pyOpenSSL",
    "Crypto": "pycryptodome",
    "magic": "python-magic",
    "docx": "python-docx",
    "pptx": "python-pptx",
    "git": "GitPython",
    "serial": "pyserial",
    "zmq": "pyzmq",
    "jose": "python-jose",
    "multipart": "python-multipart",
    "slugify": "python-slugify",
    "MySQLdb": "mysqlclient",
    "fitz": "PyMuPDF",
    "dns": "dnspython",
    "nacl": "PyNaCl",
    "socks": "PySocks",
    "websocket": "websocket-client",
    "pkg_resources": "setuptools",
    "distutils": "setuptools",
    "google.protobuf": "protobuf",
    "Levenshtein": "python-Levenshtein",
    "markdown": "Markdown",
}

# Distributions that provide the same import name as the suggested one.
EQUIVALENT_DISTRIBUTIONS: dict[str, set[str]] = {
    "psycopg2": {"psycopg2", "psycopg2-binary"},
    "cv2": {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"},
    "Crypto": {"pycryptodome", "pycrypto"},
    "jose": {"python-jose", "jose"},
}

# Standard-library modules removed in 3.12 (present in this interpreter's list when it is older).
_REMOVED_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
_REMOVED_IN_313 = {
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",
}


def top_level(module: str) -> str:
    return module.split(".", 1)[0]


def stdlib_modules(python: str = RUNTIME_PYTHON) -> frozenset[str]:
    """Top-level standard-library module names of Python `python` (e.g. "3.12")."""
    names = set(sys.stdlib_module_names)
    major_minor = tuple(int(p) for p in python.split(".")[:2])
    if major_minor >= (3, 12):
        names -= _REMOVED_IN_312
    if major_minor >= (3, 13):
        names -= _REMOVED_IN_313
    return frozenset(names)


def _marker_environment(python: str) -> dict[str, str]:
    env = default_environment()
    env.update({"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                "platform_system": "Linux", "os_name": "posix"})
    return env


@lru_cache(maxsize=8)
def dependency_closure(distribution: str = "prefect", python: str = RUNTIME_PYTHON,
                       extras: frozenset[str] = frozenset()) -> frozenset[str]:
    """Canonical names of `distribution` (with its `extras`) and everything it requires (extras followed),
    for Python `python`, as recorded in the installed packages' metadata (this project pins the runtime's
    prefect). A requirement not installed here is named, not followed."""
    env = _marker_environment(python)
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(canonicalize_name(distribution), frozenset(extras))]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None:
                wanted = any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))
                if not wanted:
                    continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return frozenset(names)


@lru_cache(maxsize=1)
def _installed_packages() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions providing it (a scan of every installed
    distribution: read once per process)."""
    return metadata.packages_distributions()


@lru_cache(maxsize=1)
def _imports_by_distribution() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, dists in _installed_packages().items():
        for dist in dists:
            out.setdefault(canonicalize_name(dist), set()).add(module)
    return out


def runtime_provided_imports(python: str = RUNTIME_PYTHON) -> frozenset[str]:
    """Top-level imports the managed runtime image has without pip_packages: stdlib + prefect's closure."""
    provided = set(stdlib_modules(python))
    by_dist = _imports_by_distribution()
    for dist in dependency_closure("prefect", python):
        provided |= by_dist.get(dist, {dist.replace("-", "_")})
    return frozenset(provided)


def _import_key(module: str) -> str:
    """The longest dotted prefix of `module` with a known distribution, else its top-level name."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in IMPORT_TO_DISTRIBUTION:
            return ".".join(parts[:n])
    return parts[0]


def distribution_for_import(module: str) -> str:
    """The distribution to pip-install for `import module` (psycopg2 -> psycopg2-binary, ...)."""
    key = _import_key(module)
    if key in IMPORT_TO_DISTRIBUTION:
        return IMPORT_TO_DISTRIBUTION[key]
    local = _installed_packages().get(top_level(module))
    if local:
        return local[0]
    return top_level(module)


def distributions_providing(module: str) -> set[str]:
    """Canonical names of every distribution known to provide `module`."""
    top = top_level(module)
    names = {canonicalize_name(distribution_for_import(module)), canonicalize_name(top)}
    names |= {canonicalize_name(d) for d in EQUIVALENT_DISTRIBUTIONS.get(top, set())}
    names |= {canonicalize_name(d) for d in _installed_packages().get(top, [])}
    return names


@dataclass(frozen=True)
class MissingImport:
    module: str
    distribution: str  # what to add to pip_packages

    def __str__(self) -> str:
        return f"import {self.module} needs {self.distribution!r} in pip_packages"


def missing_imports(
    imports: Iterable[str],
    pip_packages: Iterable[str],
    *,
    python: str = RUNTIME_PYTHON,
    local_modules: Iterable[str] = (),
) -> list[MissingImport]:
    """Imports that neither the runtime image, the repository itself, nor pip_packages provide."""
    installed = {canonicalize_name(r.name) for r in validate_requirements(pip_packages)}
    provided = runtime_provided_imports(python)
    local = {top_level(m) for m in local_modules}
    missing: dict[str, MissingImport] = {}
    for module in imports:
        top, key = top_level(module), _import_key(module)
        if top in provided or top in local or key in missing:
            continue
        if distributions_providing(module) & installed:
            continue
        missing[key] = MissingImport(key, distribution_for_import(module))
    return list(missing.values())


def redundant_packages(pip_packages: Iterable[str], python: str = RUNTIME_PYTHON) -> list[str]:
    """Requirements the runtime image already provides (harmless, but slower run start-up and a
    chance to change the image's versions)."""
    closure = dependency_closure("prefect", python)
    return [r for r in pip_packages if canonicalize_name(parse_requirement(r).name) in closure]
