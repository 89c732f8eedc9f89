"""Prefect Cloud's managed runtime image, emulated: Python + prefect, plus the run's `pip_packages`.

A `prefect:managed` pool runs each flow in an image holding Python and prefect (with prefect's
dependencies) and nothing else; `pip_packages` are installed when the run starts. The production
failure this reproduces: pip_packages lacks a package the flow's modules import, so the runtime
cannot import the flow. Here the runtime is this machine's interpreter (Python 3.11 from the
project's .venv; production's managed image runs Python 3.12), made to look like that image:

- `pip install --target <cache>/<sha of the sorted pip_packages>`, cached across runs and sandboxes
  under `~/.cache/runbook-sandbox/managed-envs` (file lock per environment). Requirements the image
  already satisfies (prefect itself, or python-dotenv, which prefect depends on) are not installed
  again, and every distribution of the image is pinned to its installed version, so an installed
  package never replaces one prefect runs on.
- the flow process runs with that directory first on PYTHONPATH and an import guard
  (`managed_image/sitecustomize.py`) that makes every top-level module of a distribution outside
  the image unimportable unless the target directory provides it: `import modal` or
  `import psycopg2` fails with ModuleNotFoundError exactly as in a bare managed image, even though
  this .venv has them installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

CACHE_ENV = "RUNBOOK_MANAGED_ENV_CACHE"
GUARD_DIR = Path(__file__).resolve().parent / "managed_image"
# What the guard reads in the flow process.
BLOCKED_MODULES_ENV = "RUNBOOK_MANAGED_BLOCKED_MODULES"
TARGET_ENV = "RUNBOOK_MANAGED_SITE"
# The image's own tooling besides prefect.
IMAGE_EXTRAS = ("pip",)
PIP_TIMEOUT_SECONDS = 900
LOCK_TIMEOUT_SECONDS = 960
COMPLETE_MARKER = ".runbook-managed-env.json"


class ManagedEnvironmentError(RuntimeError):
    """pip_packages could not be installed; the message carries pip's error."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "runbook-sandbox" / "managed-envs")


@lru_cache(maxsize=1)
def image_distributions() -> dict[str, str]:
    """Canonical name -> installed version of every distribution in the image: prefect's closure."""
    found: dict[str, str] = {}
    todo = ["prefect", *IMAGE_EXTRAS]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def blocked_modules() -> list[str]:
    """Top-level modules installed here whose distributions are not in the image."""
    image = image_distributions()
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not module.isidentifier() or module in sys.stdlib_module_names:
            continue
        if not any(canonicalize_name(d) in image for d in dists):
            blocked.add(module)
    return sorted(blocked)


def split_requirements(pip_packages: list[str]) -> tuple[list[str], list[str]]:
    """(to install, already provided by the image). Unparsable strings go to pip, which says why."""
    image = image_distributions()
    to_install, provided = [], []
    for spec in pip_packages:
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            to_install.append(spec)
            continue
        version = image.get(canonicalize_name(req.name))
        if req.marker is not None and not req.marker.evaluate():
            provided.append(spec)
        elif version and not req.extras and not req.url and req.specifier.contains(version, prereleases=True):
            provided.append(spec)
        else:
            to_install.append(spec)
    return to_install, provided


def environment_key(to_install: list[str]) -> str:
    image = image_distributions()
    material = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "packages": sorted(s.strip() for s in to_install),
        "image": sorted(image.items()),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _constraints_file(root: Path) -> Path:
    """Pins of the image's distributions, so pip keeps the versions prefect runs on."""
    lines = sorted(f"{name}=={version}" for name, version in image_distributions().items())
    text = "\n".join(lines) + "\n"
    path = root / f"image-constraints-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def _pip_error(output: str) -> str:
    """pip's own error lines (the `ERROR:` ones), else its last lines."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    text = "\n".join(errors or lines[-6:])
    return text[-2000:]


class _FileLock:
    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout, self._fd = path, timeout, None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise ManagedEnvironmentError(f"timed out waiting for the lock {self.path}")
                time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def ensure_environment(pip_packages: list[str], log: Callable[[str], None] = print) -> Path | None:
    """Install pip_packages (those the image lacks) into a cached target directory; return it.

    None when the image already provides everything. Raises ManagedEnvironmentError with pip's
    error message when pip fails.
    """
    if not isinstance(pip_packages, list) or not all(isinstance(p, str) for p in pip_packages):
        raise ManagedEnvironmentError(f"pip_packages must be a list of strings, got {pip_packages!r}")
    to_install, provided = split_requirements(pip_packages)
    if provided:
        log(f"Already in the managed image (prefect {image_distributions().get('prefect')}): {provided}")
    if not to_install:
        return None
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = environment_key(to_install)
    target = root / key
    with _FileLock(root / f"{key}.lock", LOCK_TIMEOUT_SECONDS):
        if (target / COMPLETE_MARKER).exists():
            log(f"Using cached environment for pip_packages {to_install}")
            return target
        shutil.rmtree(target, ignore_errors=True)
        partial = root / f"{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        log(f"Installing pip_packages {to_install}")
        cmd = [
            sys.executable, "-m", "pip", "install", "--target", str(partial),
            "--no-input", "--disable-pip-version-check", "--no-warn-script-location",
            "--progress-bar", "off", "-c", str(_constraints_file(root)), *to_install,
        ]
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=PIP_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ManagedEnvironmentError(
                f"pip install {to_install} did not finish within {PIP_TIMEOUT_SECONDS}s"
            ) from exc
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise ManagedEnvironmentError(
                f"pip install {to_install} failed (exit {proc.returncode}):\n{_pip_error(proc.stdout)}"
            )
        (partial / COMPLETE_MARKER).write_text(json.dumps({"pip_packages": to_install}))
        partial.rename(target)
    log(f"Installed pip_packages {to_install}")
    return target


def write_blocked_modules(path: Path) -> Path:
    """Write the guard's list (computed once per worker: scanning every distribution takes a while)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blocked_modules()))
    return path


def runtime_environment(target: Path | None, blocked_modules_file: Path) -> dict[str, str]:
    """Environment of the flow process: the target first on PYTHONPATH, then the import guard.

    The worker's own PYTHONPATH (this project) is not passed on: the image does not have it.
    """
    return {
        "PYTHONPATH": os.pathsep.join(str(p) for p in (target, GUARD_DIR) if p),
        BLOCKED_MODULES_ENV: str(blocked_modules_file),
        TARGET_ENV: str(target or ""),
    }
