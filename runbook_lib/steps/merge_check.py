"""Step 02: is the feature branch (the orchestrator that loads its DSN from a Secret block) merged
into the branch the deployment uses? If not, merge it behind the confirmation gate and push.

`inspect()` fetches both branches into a private clone and reports where they stand (commits ahead
and behind, changed files). `propose()` shows the merge as a plan behind the gate (nothing to
confirm when already merged). `apply()` merges (fast-forward when possible, else a merge commit;
a conflict aborts the merge and pushes nothing) and pushes with GITHUB_TOKEN, sent as an
`http.extraHeader` through git's environment, never in a URL or on a command line. `verify()`
fetches again and checks: merged, the target's entrypoint (and the repository modules it
imports) calls `Secret.load("<block>")`, and a failed load is not swallowed.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook_lib.checks.base import Check, CheckReport, define
from runbook_lib.core import render
from runbook_lib.core.errors import FlowSourceError, GitError, RunbookError
from runbook_lib.core.secrets import redact, register_secret
from runbook_lib.notebook.context import StepContext
from runbook_lib.records.outputs import MergeOutput
from runbook_lib.source.flow import SecretLoad, parse, repository_imports, secret_loads
from runbook_lib.steps.base import Step
from runbook_lib.systems.git import GitRepo

MERGED = define("merge.merged", "Feature branch merged into the target",
                proves="the target branch contains the feature branch's commits",
                remediation="check the repository URL and that both branches exist")
LOADS_BLOCK = define("merge.entrypoint_loads_block", "The target's entrypoint loads the Secret block",
                     proves="the target's entrypoint, or a repository module it imports, calls Secret.load(<the DSN "
                            "block>)")
LOAD_HANDLED = define("merge.load_error_handled", "A failed Secret block load fails the run",
                      proves="a failed Secret.load is not swallowed (the run fails at its start, naming the block)")
DEFAULT_FEATURE_BRANCH = "feature/secret-blocks"
MERGE_IDENTITY = ("Deployment runbook", "runbook@localhost")


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str

    def __str__(self) -> str:
        return f"{self.sha[:12]} {self.subject}"


@dataclass
class BranchComparison:
    """Where the feature branch stands against the target branch on the remote."""

    repo_url: str
    target: str
    feature: str
    target_sha: str
    feature_sha: str
    ahead: list[Commit]  # feature commits not in the target
    behind: list[Commit]  # target commits not in the feature branch
    files: list[str] = field(default_factory=list)  # "M\tpath" lines of what the merge brings

    @property
    def merged(self) -> bool:
        return not self.ahead

    @property
    def fast_forward(self) -> bool:
        return not self.behind

    def summary(self) -> str:
        head = (f"{self.feature} ({self.feature_sha[:12]}) vs {self.target} ({self.target_sha[:12]}) on {self.repo_url}: "
                f"{len(self.ahead)} commit(s) ahead, {len(self.behind)} behind")
        if self.merged:
            return head + f"\n{self.feature} is merged into {self.target}: nothing to merge."
        lines = [head, f"{self.feature} is NOT merged into {self.target}; "
                 + ("a fast-forward is possible." if self.fast_forward else "a merge commit is needed."),
                 "Commits it brings:"] + [f"  {c}" for c in self.ahead]
        lines += ["Files it changes:"] + [f"  {f}" for f in self.files]
        return "\n".join(lines)

    def facts(self) -> dict[str, Any]:
        return {"repository": self.repo_url, "target": self.target, "target_sha": self.target_sha,
                "feature": self.feature, "feature_sha": self.feature_sha, "merged": self.merged,
                "ahead": [str(c) for c in self.ahead], "behind": [str(c) for c in self.behind], "files": self.files}

    def __str__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(redact(self.summary()))

    def _repr_html_(self) -> str:
        return render.Table("", ("Where the branches stand",), [
            (render.Cell(self.summary(), status="pass" if self.merged else "warn", pre=True),)])._repr_html_()


class MergeConflict(GitError):
    """The merge conflicted; it was aborted and nothing was pushed."""


class MergeWorkspace(GitRepo):
    """A private clone of two branches of the repository, to compare, merge and push them.

    Reads are anonymous (the repository is public, as the managed runtime needs); only `push`
    sends the token, as a header through git's environment."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0):
        super().__init__(url, None, timeout=timeout)
        self._push_token = token
        register_secret(token, "GITHUB_TOKEN")
        if token:
            register_secret(self._basic(token), "GITHUB_TOKEN")
        self._work: Path | None = None

    def _dir(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="runbook-merge-"))
            weakref.finalize(self, shutil.rmtree, str(self._work), ignore_errors=True)  # a cell that failed
            self._git("init", "--quiet", str(self._work), what="preparing a local clone")
            for key, value in (("user.name", MERGE_IDENTITY[0]), ("user.email", MERGE_IDENTITY[1]),
                               ("commit.gpgsign", "false"), ("merge.ff", "true")):
                if key.startswith("user.") and self._config(key):
                    continue  # the user's own git identity, when configured, signs the merge
                self._git("config", key, value, cwd=self._work, what="configuring the local clone")
        return self._work

    def _config(self, key: str) -> str:
        try:
            return self._git("config", "--get", key, cwd=self._work, what=f"reading git config {key}").strip()
        except GitError:
            return ""

    def close(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        super().close()

    @staticmethod
    def _remote_ref(branch: str) -> str:
        return f"refs/remotes/origin/{branch}"

    def fetch_branches(self, *branches: str) -> dict[str, str]:
        """Fetch the branches' full history; branch -> commit sha. A missing branch is a GitError naming it."""
        remote = self.ls_remote()
        missing = [b for b in branches if f"refs/heads/{b}" not in remote]
        if missing:
            heads = sorted(r.removeprefix("refs/heads/") for r in remote if r.startswith("refs/heads/"))
            raise GitError(f"branch(es) {', '.join(missing)} do not exist in {self.url} (branches: {', '.join(heads) or 'none'})")
        specs = [f"+refs/heads/{b}:{self._remote_ref(b)}" for b in branches]
        self._git("fetch", "--quiet", "--no-tags", self.url, *specs, cwd=self._dir(), what=f"fetching {', '.join(branches)}")
        return {b: self._rev(self._remote_ref(b)) for b in branches}

    def _rev(self, ref: str) -> str:
        return self._git("rev-parse", f"{ref}^{{commit}}", cwd=self._dir(), what=f"resolving {ref}").strip()

    def _commits(self, range_: str) -> list[Commit]:
        out = self._git("log", "--format=%H%x09%s", range_, cwd=self._dir(), what=f"listing commits {range_}")
        return [Commit(*line.split("\t", 1)) for line in out.splitlines() if "\t" in line]

    def compare(self, target: str, feature: str) -> BranchComparison:
        shas = self.fetch_branches(target, feature)
        t, f = self._remote_ref(target), self._remote_ref(feature)
        files = self._git("diff", "--name-status", f"{t}...{f}", cwd=self._dir(), what="listing changed files")
        return BranchComparison(
            repo_url=self.url, target=target, feature=feature, target_sha=shas[target], feature_sha=shas[feature],
            ahead=self._commits(f"{t}..{f}"), behind=self._commits(f"{f}..{t}"), files=files.splitlines(),
        )

    def files_at(self, branch: str, suffix: str = ".py") -> dict[str, str]:
        """Every `suffix` file of the fetched branch: path -> text."""
        ref = self._remote_ref(branch)
        names = self._git("ls-tree", "-r", "--name-only", ref, cwd=self._dir(), what=f"listing files of {branch}")
        return {p: self._git("show", f"{ref}:{p}", cwd=self._dir(), what=f"reading {p} at {branch}")
                for p in names.splitlines() if p.endswith(suffix)}

    def merge(self, comparison: BranchComparison) -> str:
        """Merge the fetched feature branch into the target locally; the new target sha.

        Fast-forward when the target has nothing the feature lacks, else a merge commit. A conflict
        aborts the merge (the clone is left clean) and raises MergeConflict naming the files."""
        target, feature = comparison.target, comparison.feature
        cwd = self._dir()
        self._git("checkout", "--quiet", "-B", target, comparison.target_sha, cwd=cwd, what=f"checking out {target}")
        if comparison.fast_forward:
            self._git("merge", "--quiet", "--ff-only", comparison.feature_sha, cwd=cwd, what=f"fast-forwarding {target}")
        else:
            try:
                self._git("merge", "--quiet", "--no-ff", "--no-edit", "-m", f"Merge branch '{feature}' into {target}",
                          comparison.feature_sha, cwd=cwd, what=f"merging {feature} into {target}")
            except GitError as exc:
                conflicts = self._git("diff", "--name-only", "--diff-filter=U", cwd=cwd, what="listing conflicts").split()
                try:
                    self._git("merge", "--abort", cwd=cwd, what="aborting the merge")
                except GitError:
                    pass
                if conflicts:
                    raise MergeConflict(
                        f"merging {feature} into {target} conflicts in {', '.join(conflicts)}; the merge was aborted "
                        "and nothing was pushed"
                    ) from None
                raise GitError(f"merging {feature} into {target} failed ({exc}); nothing was pushed") from None
        return self._rev("HEAD")

    def push(self, sha: str, branch: str) -> None:
        """Push `sha` to `branch` (never forced: a remote that moved meanwhile refuses it)."""
        if not self._push_token:
            raise GitError("pushing needs GITHUB_TOKEN (a token allowed to push to the repository)")
        self._token = self._push_token
        try:
            self._git("push", "--quiet", "--porcelain", self.url, f"{sha}:refs/heads/{branch}", cwd=self._dir(),
                      what=f"pushing {branch} to {self.url}")
        finally:
            self._token = None


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
        self.workspace = MergeWorkspace(settings.source.clone_url, settings.value("source.github_token"))
        self.comparison: BranchComparison | None = None
        self.plan: dict[str, Any] | None = None

    def _step(self, fn: Any) -> Any:
        """Run one stage; a runbook error marks the step failed (and is raised, failing the cell)."""
        with self.failing():
            return fn()

    def inspect(self) -> BranchComparison:
        """Fetch both branches; where the feature branch stands against the target (recorded as `before`)."""
        self.comparison = self._step(lambda: self.workspace.compare(self.target, self.feature))
        self.publish(before=self.comparison.facts())
        return self.comparison

    def propose(self) -> Any:
        """Nothing to confirm when merged; else the merge (and push) as a plan behind the gate."""
        comparison = self.comparison or self.inspect()
        if comparison.merged:
            self.publish(action="none: already merged")
            return f"{self.feature} is already merged into {self.target}: nothing to merge, nothing to push."
        self._step(lambda: self.ctx.settings.require("source.github_token"))
        self.plan = {
            "action": "fast-forward" if comparison.fast_forward else "merge commit",
            "repository": comparison.repo_url,
            "merge": f"{self.feature} ({comparison.feature_sha[:12]}) into {self.target} ({comparison.target_sha[:12]})",
            "target_sha": comparison.target_sha,
            "feature_sha": comparison.feature_sha,
            "commits": [str(c) for c in comparison.ahead],
            "files": comparison.files,
            "push": f"{self.target} to {comparison.repo_url}, authenticated with GITHUB_TOKEN (never forced)",
        }
        summary = (f"{'fast-forward' if comparison.fast_forward else 'merge'} {self.target} to include {self.feature} "
                   f"({len(comparison.ahead)} commit(s)) and push it")
        self.ctx.confirm_plan(summary, self.plan)  # shows the plan (and, interactive, Approve / Reject)
        return None

    def apply(self) -> str:
        """Merge and push the approved plan; a no-op when already merged. The new target sha."""
        comparison = self.comparison or self.inspect()
        if comparison.merged:
            return f"nothing to apply: {self.feature} is already merged into {self.target} ({comparison.target_sha[:12]})"
        self.ctx.require_approved(self.plan)

        def merge_and_push() -> str:
            now = self.workspace.compare(self.target, self.feature)
            if (now.target_sha, now.feature_sha) != (comparison.target_sha, comparison.feature_sha):
                raise GitError(
                    f"the remote changed since the plan was shown ({self.target} is now {now.target_sha[:12]}, "
                    f"{self.feature} {now.feature_sha[:12]}); re-run the step to see and confirm the new plan; "
                    "nothing was pushed"
                )
            sha = self.workspace.merge(comparison)
            self.workspace.push(sha, self.target)
            return sha

        sha = self._step(merge_and_push)
        self.publish(action="fast-forward" if comparison.fast_forward else "merge commit", pushed_sha=sha)
        return f"{self.target} is now {sha[:12]} on {comparison.repo_url} (pushed)"

    def verify(self) -> CheckReport:
        """Fetch again; the checks of the target branch as it now is on the remote."""
        report = CheckReport(step=self.ctx.name)
        try:
            after = self.workspace.compare(self.target, self.feature)
        except RunbookError as exc:
            report.add(MERGED.failed(str(exc)))
            return report
        self.publish(after=after.facts())
        report.add(self._merged_check(after))
        loads_check, handled_check = self._block_checks()
        report.add(loads_check)
        report.add(handled_check)
        return report

    def _merged_check(self, after: BranchComparison) -> Check:
        if after.merged:
            return MERGED.passed(f"{self.target} at {after.target_sha[:12]} contains {self.feature} "
                                f"({after.feature_sha[:12]}); {len(after.behind)} commit(s) on {self.target} since",
                                target_sha=after.target_sha)
        return MERGED.failed(
            f"{self.feature} is {len(after.ahead)} commit(s) ahead of {self.target}: the deployment would run the "
            f"orchestrator of {self.target}, which does not have the Secret-block change",
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
