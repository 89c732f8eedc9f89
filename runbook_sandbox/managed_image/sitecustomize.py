"""Import guard of the emulated managed runtime image (see runbook_sandbox/managed_runtime.py).

Loaded by `site` at interpreter start because this directory is on the flow process's PYTHONPATH.
Top-level modules listed in $RUNBOOK_MANAGED_BLOCKED_MODULES (modules of distributions installed
on this machine but absent from the managed image) import only from $RUNBOOK_MANAGED_SITE, the
run's pip_packages directory; anywhere else they are missing, as in the real image.
"""

import json
import os
import sys
from importlib.machinery import PathFinder


class ManagedImageFinder:
    """A meta-path finder consulted first: blocked modules come from the target or not at all."""

    def __init__(self, blocked, target):
        self.blocked = frozenset(blocked)
        self.target = target

    def find_spec(self, fullname, path=None, target=None):
        if "." in fullname or fullname not in self.blocked:
            return None
        spec = PathFinder.find_spec(fullname, [self.target]) if self.target else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        return spec


def _install():
    listing = os.environ.get("RUNBOOK_MANAGED_BLOCKED_MODULES")
    if not listing:
        return
    with open(listing) as f:
        blocked = json.load(f)
    sys.meta_path.insert(0, ManagedImageFinder(blocked, os.environ.get("RUNBOOK_MANAGED_SITE") or None))


_install()
