"""Step 02: is the Secret-block change on the branch the deployment uses? The question is answered
from content, not from branch names: real repositories get rebased, cherry-picked, squash-merged,
and their branches deleted after merging.

`inspect()` fetches every branch into a private clone and reads the target: when its entrypoint
(and the repository modules it imports) already loads the DSN's Secret block, the answer is yes,
with where (file:line), whatever became of the named branch (a missing branch is then a note).
Otherwise the named branch is compared with the target by patch and by content (`git cherry`; a
change already present on the target), so only the commits that bring a change the target lacks
count, with the files they touch; when the branch is missing, the other remote branches are
searched for one whose entrypoint loads the block. `propose()` previews the merge against the
current target without a work tree (`git merge-tree`): a fast-forward, a clean merge with its
diff summary, or the conflicting files (then there is nothing to approve, and nothing is pushed);
it says whether the unique changes touch the entrypoint's module closure (when they do not, the
merge is not needed for this deployment). `apply()` merges and pushes the approved plan with
GITHUB_TOKEN (an `http.extraHeader` through git's environment, never in a URL or on a command
line), refusing when the remote moved since the plan was shown. `verify()` fetches again.
"""

from __future__ import annotations

import ast
import subprocess
from dataclasses import dataclass
from typing import Any

from runbook_lib.checks.base import Check, CheckReport, define
from runbook_lib.core import render
from runbook_lib.core.errors import FlowSourceError, GitError, RunbookError
from runbook_lib.notebook.context import StepContext, show
from runbook_lib.records.outputs import MergeOutput
from runbook_lib.source.flow import SecretLoad, parse, repository_imports, secret_loads
from runbook_lib.steps.base import Step
from runbook_lib.systems.git import BranchComparison, GitWorkspace, MergeConflict

DEFAULT_FEATURE_BRANCH = "feature/secret-blocks"

MERGED = define("merge.merged", "The Secret-block change is on the target",
                proves="the target branch has the change the deployment needs: its entrypoint loads the block, or "
                       "the named branch brings no change the target lacks (compared by patch and content)",
                remediation="check the repository URL and that the target branch exists")
LOADS_BLOCK = define("merge.entrypoint_loads_block", "The target's entrypoint loads the Secret block",
                     proves="the target's entrypoint, or a repository module it imports, calls Secret.load(<the DSN "
                            "block>)")
LOAD_HANDLED = define("merge.load_error_handled", "A failed Secret block load fails the run",
                      proves="a failed Secret.load is not swallowed (the run fails at its start, naming the block)")


# -- the entrypoint's Secret block ----------------------------------------------------------------


def _raises_outside_handler(tree: ast.Module, load: SecretLoad) -> int | None:
    """The line of a `raise` in the load's function outside the handler that catches the load
    (the function still fails when the block cannot be loaded), or None."""
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and n.name == load.function and n.lineno <= load.line <= (n.end_lineno or n.lineno)), None)
    if fn is None:
        return None
    handler_spans = [(h.lineno, h.end_lineno or h.lineno) for t in ast.walk(fn) if isinstance(t, ast.Try)
                     if t.body and t.body[0].lineno <= load.line <= (t.body[-1].end_lineno or load.line)
                     for h in t.handlers]
    for node in ast.walk(fn):
        if isinstance(node, ast.Raise) and not any(a <= node.lineno <= b for a, b in handler_spans):
            return node.lineno
    return None


@dataclass
class BlockLoading:
    """How the code the entrypoint runs loads Secret blocks: (file, load, raising line) each."""

    loads: list[tuple[str, SecretLoad, int | None]]

    def of(self, block: str) -> list[tuple[str, SecretLoad, int | None]]:
        return [entry for entry in self.loads if entry[1].block == block]


def block_loading(files: dict[str, str], entrypoint: str) -> BlockLoading:
    """Every Secret.load in the entrypoint file and the repository modules it imports."""
    _, visited = repository_imports(files, entrypoint)
    loads = []
    for path in visited:
        tree = parse(files[path], path)
        for load in secret_loads(tree):
            loads.append((path, load, _raises_outside_handler(tree, load) if load.swallowed else None))
    return BlockLoading(loads)


@dataclass
class MergeState:
    """What `inspect()` found: the target, where it loads the block, and the named branch against it."""

    target: str
    target_sha: str
    loads: list[str]  # "path:line (function)" of each Secret.load of the block the entrypoint's code makes
    feature: str
    comparison: BranchComparison | None  # None when the named branch does not exist
    closure: list[str]  # the repository files the entrypoint runs (at the branch head, else the target)
    candidates: list[str]  # when the branch is missing: remote branches whose entrypoint loads the block
    branches: list[str]

    @property
    def target_has_change(self) -> bool:
        return bool(self.loads)

    @property
    def unique_in_closure(self) -> list[str]:
        if self.comparison is None:
            return []
        return [f for f in self.comparison.unique_files if f in self.closure]

    @property
    def action(self) -> str | None:
        """The merge to make, or None when there is nothing to merge for this deployment."""
        c = self.comparison
        if self.target_has_change or c is None or c.merged or not self.unique_in_closure:
            return None
        return "fast-forward" if c.preview.kind == "fast-forward" else "merge commit"

    def summary(self) -> str:
        c = self.comparison
        lines = [f"{self.target} is at {self.target_sha[:12]}."]
        if self.loads:
            lines.append(f"{self.target} already loads the Secret block: {'; '.join(self.loads)}.")
        else:
            lines.append(f"{self.target} does not load the Secret block (its entrypoint and the modules it imports).")
        if c is None:
            lines.append(f"Branch {self.feature} does not exist (branches: {', '.join(self.branches) or 'none'}).")
            if not self.loads:
                lines.append("Branches whose entrypoint loads the block: " + (", ".join(self.candidates) or "none") + ".")
            return "\n".join(lines)
        lines.append(f"{self.feature} ({c.feature_sha[:12]}): {len(c.ahead)} commit(s) not on {self.target} by hash, "
                     f"{len(c.already_on_target)} of them already there as the same patch or change, "
                     f"{len(c.unique)} bringing a change {self.target} lacks:")
        lines += [f"  {commit}  ({', '.join(files) or 'no files'})" for commit, files in c.unique]
        if c.unique:
            touched = self.unique_in_closure
            lines.append("They touch the entrypoint's modules: " + ", ".join(touched) if touched else
                         "None of them touches the entrypoint's modules: the merge is not needed for this deployment.")
        preview = c.preview
        if preview is not None and c.unique:
            if preview.kind == "conflict":
                lines.append(f"Merging into the current {self.target} CONFLICTS in: {', '.join(preview.conflicts)}.")
            else:
                lines.append(f"Merging into the current {self.target}: {preview.kind}." + (f"\n{preview.stat}" if preview.stat else ""))
        return "\n".join(lines)

    def facts(self) -> dict[str, Any]:
        base = self.comparison.facts() if self.comparison else {"feature": self.feature, "exists": False}
        return {**base, "target": self.target, "target_sha": self.target_sha, "target_loads_block": self.loads,
                "merged": self.comparison.merged if self.comparison else None,
                "unique_in_closure": self.unique_in_closure, "candidates": self.candidates}

    def _repr_html_(self) -> str:
        status = "pass" if self.target_has_change or self.action is None else "warn"
        return render.Table("", ("Where the branches stand",), [
            (render.Cell(self.summary(), status=status, pre=True),)])._repr_html_()

    def __str__(self) -> str:
        return self.summary()


# -- the step -------------------------------------------------------------------------------------


class MergeCheck(Step):
    """Step 02 over a step context: inspect, propose, apply, verify (one notebook cell each)."""

    OUTPUT = MergeOutput

    def __init__(self, ctx: StepContext, feature_branch: str = DEFAULT_FEATURE_BRANCH, target_branch: str | None = None):
        super().__init__(ctx)
        settings = ctx.settings
        with self.failing():
            settings.require("source.repo_url")
            self.feature = _branch_name(feature_branch, "feature_branch")
            self.target = _branch_name(target_branch or settings.source.branch, "target_branch")
            if self.feature == self.target:
                raise RunbookError(f"feature_branch and target_branch are both {self.feature!r}: nothing to merge")
        self.block = settings.blocks.database_url
        self.entrypoint = settings.source.entrypoint
        self.workspace = GitWorkspace(settings.source.clone_url, settings.value("source.github_token"))
        self.state: MergeState | None = None
        self.plan: dict[str, Any] | None = None

    # -- reading ------------------------------------------------------------------------------
    def _loads_at(self, branch: str) -> list[str]:
        files = self.workspace.files_at(branch)
        loading = block_loading(files, self.entrypoint)
        return [f"{path}:{load.line} ({load.function or 'module level'})" for path, load, _ in loading.of(self.block)]

    def _closure_at(self, branch: str) -> list[str]:
        try:
            return sorted(repository_imports(self.workspace.files_at(branch), self.entrypoint)[1])
        except FlowSourceError:
            return []

    def _read(self) -> MergeState:
        heads = self.workspace.fetch_all()
        if self.target not in heads:
            raise GitError(f"the target branch {self.target!r} does not exist in {self.workspace.url} "
                           f"(branches: {', '.join(sorted(heads)) or 'none'})")
        try:
            loads = self._loads_at(self.target)
        except FlowSourceError as exc:
            raise GitError(f"the entrypoint {self.entrypoint} cannot be read on {self.target}: {exc}") from None
        comparison, candidates = None, []
        if self.feature in heads:
            comparison = self.workspace.compare(self.target, self.feature)
        elif not loads:
            for branch in sorted(heads):
                if branch != self.target:
                    try:
                        if self._loads_at(branch):
                            candidates.append(branch)
                    except (FlowSourceError, GitError):
                        continue  # a branch without the entrypoint cannot hold the change
        closure = self._closure_at(self.feature if comparison is not None else self.target)
        return MergeState(self.target, heads[self.target], loads, self.feature, comparison, closure, candidates,
                          sorted(heads))

    def inspect(self) -> MergeState:
        """Fetch every branch; read the target and compare the named branch with it (recorded as `before`)."""
        with self.failing():
            self.state = self._read()
        self.publish(before=self.state.facts())
        return self.state

    # -- the plan -----------------------------------------------------------------------------
    def propose(self) -> Any:
        """Nothing to confirm when the target has the change (or the branch brings nothing it needs);
        a conflicting merge fails here; else the merge (and push) as a plan behind the gate."""
        state = self.state or self.inspect()
        c = state.comparison
        if state.action is None:
            if state.target_has_change:
                why = (f"{self.target} already loads {self.block!r} ({'; '.join(state.loads)})"
                       + (f"; branch {self.feature} does not exist" if c is None else "")
                       + (f"; {self.feature} is already merged into {self.target}" if c is not None and c.merged else ""))
                action = "none: already merged" if c is not None and c.merged else "none: the change is on the target"
            elif c is None:
                with self.failing():
                    self.ctx.record_checks([self._merged_check(state)])
                return None
            elif c.merged:
                why, action = f"{self.feature} is already merged into {self.target}", "none: already merged"
            else:
                why = (f"{self.feature}'s {len(c.unique)} unique commit(s) touch none of the entrypoint's modules "
                       f"({', '.join(c.unique_files)})")
                action = "none: not needed for this deployment"
            self.publish(action=action)
            show(f"{why}: nothing to merge, nothing to push.")
            return None
        if c.preview.kind == "conflict":
            exc = MergeConflict(
                f"merging {self.feature} into the current {self.target} ({state.target_sha[:12]}) conflicts in "
                f"{', '.join(c.preview.conflicts)}: there is nothing to approve, and nothing was pushed; resolve it on "
                f"the branch (rebase {self.feature} onto {self.target}), then re-run this step"
            )
            self.ctx.record_failure(MERGED.failed(str(exc), f"rebase {self.feature} onto {self.target} and resolve "
                                                  f"{', '.join(c.preview.conflicts)}, push it, then re-run this step"), exc)
            raise exc
        with self.failing():
            self.settings.require("source.github_token")
        self.plan = {
            "action": state.action,
            "repository": c.repo_url,
            "merge": f"{self.feature} ({c.feature_sha[:12]}) into {self.target} ({c.target_sha[:12]})",
            "target_sha": c.target_sha,
            "feature_sha": c.feature_sha,
            "commits": [{"commit": str(commit), "files": files} for commit, files in c.unique],
            "already_on_target": len(c.already_on_target),
            "touches": state.unique_in_closure,
            "result": c.preview.stat,
            "push": f"{self.target} to {c.repo_url}, authenticated with GITHUB_TOKEN (never forced)",
        }
        summary = (f"{'fast-forward' if state.action == 'fast-forward' else 'merge'} {self.target} to include "
                   f"{self.feature} ({len(c.unique)} commit(s) bringing a change) and push it")
        self.ctx.confirm_plan(summary, self.plan)  # shows the plan (and, interactive, Approve / Reject)
        return None

    def apply(self) -> str:
        """Merge and push the approved plan; a no-op when there is nothing to merge. The new target sha."""
        state = self.state or self.inspect()
        if self.plan is None:
            return f"nothing to apply: {self.target} needs no merge of {self.feature}"
        self.ctx.require_approved(self.plan)
        c = state.comparison

        def merge_and_push() -> str:
            now = self.workspace.compare(self.target, self.feature)
            if (now.target_sha, now.feature_sha) != (c.target_sha, c.feature_sha):
                raise GitError(
                    f"the live state changed since the plan was shown ({self.target} is now {now.target_sha[:12]}, "
                    f"{self.feature} {now.feature_sha[:12]}); re-run the step to see and confirm the new plan; "
                    "nothing was pushed"
                )
            sha = self.workspace.merge(c)
            self.workspace.push(sha, self.target)
            return sha

        sha = self._step(merge_and_push)
        self.publish(action=state.action, pushed_sha=sha)
        return f"{self.target} is now {sha[:12]} on {c.repo_url} (pushed)"

    def _step(self, fn: Any) -> Any:
        with self.failing():
            return fn()

    # -- verify -------------------------------------------------------------------------------
    def verify(self) -> CheckReport:
        """Fetch again; the checks of the target branch as it now is on the remote."""
        report = CheckReport(step=self.ctx.name)
        try:
            after = self._read()
        except RunbookError as exc:
            report.add(MERGED.failed(str(exc)))
            return report
        self.publish(after=after.facts())
        report.add(self._merged_check(after))
        loads_check, handled_check = self._block_checks()
        report.add(loads_check)
        report.add(handled_check)
        return report

    def _merged_check(self, state: MergeState) -> Check:
        c = state.comparison
        if state.target_has_change:
            where = f"{self.target} at {state.target_sha[:12]} loads {self.block!r} at {'; '.join(state.loads)}"
            if c is None:
                return MERGED.passed(f"{where}; branch {self.feature} does not exist (a note: nothing needs it)",
                                     target_sha=state.target_sha)
            if c.unique:
                touched = state.unique_in_closure
                rest = (f"; {self.feature} still has {len(c.unique)} commit(s) {self.target} lacks "
                        f"({', '.join(c.unique_files)})")
                if touched:
                    return MERGED.warned(
                        where + rest + f", touching the entrypoint's modules ({', '.join(touched)}): the deployment "
                        f"runs {self.target} without them",
                        f"merge {self.feature} if its other changes to the flow are wanted in this deployment")
                return MERGED.warned(where + rest + ", none of the entrypoint's modules: not needed for this deployment",
                                     f"merge {self.feature} when its change is wanted; the deployment does not need it")
            return MERGED.passed(f"{where}; {self.feature} has no change {self.target} lacks", target_sha=state.target_sha)
        if c is None:
            found = ", ".join(state.candidates)
            return MERGED.failed(
                f"{self.target} does not load {self.block!r}, and branch {self.feature} does not exist "
                f"(branches: {', '.join(state.branches) or 'none'})",
                (f"merge one of the branches whose entrypoint loads it: {found} (re-run this step with "
                 f"feature_branch={state.candidates[0]!r})") if found else
                (f"no branch of the repository loads {self.block!r}: make the orchestrator load its DSN with "
                 f"Secret.load({self.block!r}) on a branch, then re-run this step with feature_branch=<it>"),
                candidates=state.candidates,
            )
        if c.merged:
            return MERGED.passed(f"{self.target} at {state.target_sha[:12]} has every change of {self.feature} "
                                 f"({len(c.already_on_target)} commit(s) there as the same patch or change)",
                                 target_sha=state.target_sha)
        if not state.unique_in_closure:
            return MERGED.warned(
                f"{self.feature} has {len(c.unique)} commit(s) {self.target} lacks, touching "
                f"{', '.join(c.unique_files)}, none of the entrypoint's modules: not needed for this deployment",
                f"merge {self.feature} when its change is wanted; the deployment does not depend on it",
            )
        return MERGED.failed(
            f"{self.feature} has {len(c.unique)} commit(s) {self.target} lacks, touching the entrypoint's modules "
            f"({', '.join(state.unique_in_closure)}): the deployment would run the orchestrator of {self.target}, "
            "which does not have the Secret-block change",
            f"run this step with confirm=True to merge and push, or merge {self.feature} into {self.target} on GitHub "
            "(pull request)",
        )

    def _block_checks(self) -> tuple[Check, Check]:
        try:
            files = self.workspace.files_at(self.target)
            loading = block_loading(files, self.entrypoint)
        except (FlowSourceError, GitError) as exc:
            return (LOADS_BLOCK.failed(str(exc), f"check source.entrypoint ({self.entrypoint}) against branch {self.target}"),
                    LOAD_HANDLED.skipped("skipped: the entrypoint could not be read"))
        loads = loading.of(self.block)
        if not loads:
            found = sorted({l.block or "<computed name>" for _, l, _ in loading.loads})
            return (LOADS_BLOCK.failed(
                        f"no Secret.load({self.block!r}) in {self.entrypoint.split(':')[0]} or the modules it imports "
                        f"on {self.target} (Secret blocks loaded: {', '.join(found) or 'none'}): the orchestrator still "
                        "reads its DSN elsewhere (e.g. an environment variable the managed runtime does not have)",
                        f"merge {self.feature} into {self.target} (this step, confirm=True), or make the orchestrator "
                        f"load its DSN with Secret.load({self.block!r})"),
                    LOAD_HANDLED.skipped(f"skipped: no load of {self.block!r}"))
        where = ", ".join(f"{path}:{load.line} ({load.function or 'module level'})" for path, load, _ in loads)
        loads_check = LOADS_BLOCK.passed(f"Secret.load({self.block!r}) at {where} on {self.target}")
        silent = [(p, l) for p, l, raised in loads if l.swallowed and raised is None]
        if silent:
            detail = "; ".join(f"{p}:{l.line} in {l.function or 'module level'} is caught by {l.handler} and nothing "
                               "raises afterwards" for p, l in silent)
            return loads_check, LOAD_HANDLED.warned(
                detail + ": a missing or unreadable block would not fail the run at the start, but later, with a "
                "misleading error (or silently use another DSN)",
                "re-raise in the handler, or raise an error naming the block when no DSN was loaded",
            )
        caught = [(p, l, r) for p, l, r in loads if l.swallowed]
        detail = ("; ".join(f"{p}:{l.line} is caught by {l.handler}, and the function raises at line {r} when no DSN "
                            "was loaded" for p, l, r in caught)
                  if caught else "the load is not wrapped in a handler that swallows its error")
        return loads_check, LOAD_HANDLED.passed(detail)

    def close(self) -> None:
        self.workspace.close()


def _branch_name(name: Any, what: str) -> str:
    """A valid git branch name, else a clear error (before anything is fetched or changed)."""
    if not isinstance(name, str) or not name.strip():
        raise RunbookError(f"{what} must be a branch name, got {name!r}")
    proc = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or name.startswith("-"):
        raise RunbookError(f"{what} {name!r} is not a valid git branch name")
    return name
