"""Checks of the flow's repository and code: the URL (with .git), readable anonymously, the branch,
the entrypoint file, the `@flow` function (read from its syntax tree, never imported), its
parameters against the deployment's, and `pip_packages` against the flow's imports."""

from __future__ import annotations

import ast

from packaging.utils import canonicalize_name

from runbook_lib.checks.base import Fail, Outcome, Skip, check, ok, warn
from runbook_lib.checks.facts import Facts
from runbook_lib.core.errors import FlowSourceError, RunbookError
from runbook_lib.core.values import parse_requirement, validate_requirements
from runbook_lib.source.flow import analyse_flow, local_top_level_names, parse, repository_imports
from runbook_lib.source.packages import missing_imports, redundant_packages


@check("source.repo_url", "Repository URL ends in .git",
       proves="the repository URL is one flow.from_source clones (ending in .git) and carries no credentials")
def repo_url(facts: Facts) -> Outcome:
    url = facts.repo_url()
    given = facts.settings.value("source.repo_url")
    if facts.settings.source.clone_url_was_fixed:
        return warn(
            f"{given} does not end in .git; the runbook uses {url}. Without .git, flow.from_source treats an "
            "https URL as fsspec remote storage instead of a git repository, and the deploy fails",
            f"set the URL with .git: {url} ({facts.where('source.repo_url')})", url=url,
        )
    return ok(url, url=url)


@check("source.reachable", "Repository readable anonymously",
       proves="the repository can be read without credentials, as the managed runtime clones it",
       remediation="the managed runtime clones the repository without credentials: make it public (or fix the URL)")
def reachable(facts: Facts) -> Outcome:
    facts.need(facts.repo_url, "source.repo_url", "a usable repository URL")
    try:
        refs = facts.refs()
    except RunbookError as exc:
        raise Fail(f"{exc}", "the managed runtime clones the repository without credentials: make it public (or fix "
                   f"the URL, {facts.where('source.repo_url')})") from None
    heads = sum(1 for r in refs if r.startswith("refs/heads/"))
    return ok(f"{heads} branch(es), read without credentials")


@check("source.branch", lambda s: f"Branch {s.source.branch!r} exists" if s else "Branch exists",
       proves="the branch the deployment follows exists; its head is the commit that is planned")
def branch(facts: Facts) -> Outcome:
    sha = facts.branch_sha()
    return ok(f"{facts.settings.source.branch} is at {sha}", sha=sha, commit_sha=sha)


@check("source.entrypoint_file", "Entrypoint file exists",
       proves="the entrypoint's file is in the repository at the branch head")
def entrypoint_file(facts: Facts) -> Outcome:
    src = facts.settings.source
    try:
        files = facts.files()
    except Skip:
        raise
    except RunbookError as exc:
        raise Fail(f"cannot read the files of branch {src.branch!r}: {exc}",
                   "check that the repository can be cloned anonymously") from None
    if src.entrypoint_path not in files:
        near = sorted(files)[:20]
        raise Fail(
            f"{src.entrypoint_path} does not exist at {src.branch!r} (Python files there: {', '.join(near) or 'none'})",
            "set source.entrypoint to '<path from the repository root>:<function>' "
            f"({facts.where('source.entrypoint')}), or push the file to {src.branch!r}",
        )
    return ok(f"{src.entrypoint_path} at {src.branch!r}")


def _flows_in(source: str, path: str) -> list[str]:
    """Names of the module-level @flow functions of a file."""
    tree = parse(source, path)
    names = dict.fromkeys(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [n for n in names if analyse_flow(source, n, path).is_flow]


@check("source.flow_function", "Entrypoint is a @flow",
       proves="the entrypoint function is decorated with @flow and has a literal flow name (read from its syntax tree)")
def flow_function(facts: Facts) -> Outcome:
    src = facts.settings.source
    source = facts.entry_source()
    where = facts.where("source.entrypoint")
    try:
        info = facts.flow()
    except FlowSourceError as exc:
        flows = _flows_in(source, src.entrypoint_path)
        raise Fail(str(exc), f"set source.entrypoint to a @flow function ({', '.join(flows) or 'none in this file'}; "
                   f"{where})") from None
    if not info.is_flow:
        flows = _flows_in(source, src.entrypoint_path)
        raise Fail(
            f"{src.entrypoint_function} (line {info.line}) is not decorated with @flow "
            f"(decorators: {', '.join(info.decorators) or 'none'}): Prefect cannot deploy it",
            f"point source.entrypoint at a @flow function ({', '.join(f'{src.entrypoint_path}:{f}' for f in flows) or 'none in this file'}; "
            f"{where}), or decorate {src.entrypoint_function} with @flow",
            flows=flows,
        )
    if not info.flow_name:
        raise Fail(f"the flow name of {info.function} is computed at import time: the runbook cannot find its deployment",
                   "give the flow a literal name: @flow(name=\"...\")")
    return ok(f"{src.entrypoint_function} (line {info.line}) is a flow named {info.flow_name!r}", flow_name=info.flow_name)


@check("source.flow_parameters", "Flow takes the deployment's parameters",
       proves="the deployment passes only parameters the flow takes, and every required one (the Edge Function "
              "passes none)")
def flow_parameters(facts: Facts) -> Outcome:
    info = facts.flow_for()
    src, d = facts.settings.source, facts.settings.deployment
    wanted = d.parameters
    names = [p.name for p in info.parameters]
    unknown = [k for k in wanted if k not in names]
    required = [p.name for p in info.parameters if p.required and p.name not in wanted]
    problems = []
    if unknown:
        problems.append(f"the deployment passes {', '.join(unknown)}, which {src.entrypoint_function}"
                        f"({', '.join(names)}) does not take: every run would fail validating its parameters "
                        "(Prefect refuses the deployment: 422)")
    if required:
        problems.append(f"{src.entrypoint_function} requires {', '.join(required)}, which the deployment does not "
                        "pass (the Edge Function starts runs with no parameters)")
    if problems:
        raise Fail("; ".join(problems), "make deployment.parameters match the flow's signature "
                   f"({facts.where('deployment.parameters')}), or give the flow's parameters defaults")
    shown = ", ".join(f"{k}={v!r}" for k, v in wanted.items()) or "none"
    return ok(f"deployment parameters {shown}; flow parameters: {', '.join(names) or 'none'}")


@check("packages.requirements", "pip_packages are valid requirements",
       proves="deployment.pip_packages parse as pip requirements, and none needlessly changes the runtime image")
def requirements(facts: Facts) -> Outcome:
    d = facts.settings.deployment
    where = facts.where("deployment.pip_packages")
    try:
        validate_requirements(d.pip_packages)
    except RunbookError as exc:
        raise Fail(str(exc), f"fix deployment.pip_packages ({where})") from None
    redundant = redundant_packages(d.pip_packages, d.runtime_python)
    # Unpinned, an image package is a no-op for pip; prefect itself or a pinned one may change the image.
    risky = [r for r in redundant
             if canonicalize_name(parse_requirement(r).name) == "prefect" or parse_requirement(r).specifier]
    if risky:
        return warn(
            f"{', '.join(risky)}: already in the managed runtime image (prefect and its dependencies); "
            "listing it again may change the image's versions at every run start",
            f"remove {', '.join(risky)} from deployment.pip_packages ({where})", redundant=risky,
        )
    also = f" ({', '.join(redundant)} also in the runtime image)" if redundant else ""
    return ok((", ".join(d.pip_packages) or "no packages") + also)


@check("packages.imports", "The flow's imports are installed at run time",
       proves="every third-party import of the flow (its entrypoint and the repository modules it imports) is "
              "provided by the runtime image or by pip_packages")
def imports(facts: Facts) -> Outcome:
    d = facts.settings.deployment
    where = facts.where("deployment.pip_packages")
    try:
        validate_requirements(d.pip_packages)
    except RunbookError:
        raise Skip("pip_packages are not valid requirements (see packages.requirements)") from None
    facts.entry_source()
    files = facts.files()
    entry = facts.settings.source.entrypoint
    try:
        external, visited = repository_imports(files, entry)
    except FlowSourceError as exc:
        raise Fail(str(exc), "fix the flow's source so it parses") from None
    local = local_top_level_names(files, entry)
    missing = missing_imports([i.module for i in external], d.pip_packages, python=d.runtime_python, local_modules=local)
    if missing:
        add = [m.distribution for m in missing]
        raise Fail(
            "; ".join(f"import {m.module} is provided neither by the runtime image nor by pip_packages "
                      f"(add {m.distribution!r})" for m in missing)
            + ": the run would crash at start with ModuleNotFoundError",
            f"add {', '.join(repr(a) for a in add)} to deployment.pip_packages ({where})",
            missing={m.module: m.distribution for m in missing},
        )
    names = sorted({i.module.split('.')[0] for i in external})
    return ok(f"{len(names)} top-level imports in {len(visited)} file(s) covered: {', '.join(names)}")


REPOSITORY = [repo_url, reachable, branch, entrypoint_file, flow_function, flow_parameters]
PACKAGES = [requirements, imports]
