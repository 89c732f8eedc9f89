"""The flow's git repository, read with the git command line: what a ref points at, and files at a ref.

`GitRepo`: `ls_remote()` lists the remote's refs; `read_file(ref, path)` fetches just that commit
(shallow) into a private bare repository in a temporary directory and reads the file from it.
`GitWorkspace`: a private clone of branches, to compare them by hash, by patch (`git cherry`: a
rebased or cherry-picked commit is the same patch under another hash) and by content (a squash
merge), preview a merge without a work tree (`git merge-tree --write-tree`), merge and push.
A token (GITHUB_TOKEN) is sent as an HTTP header through git's environment, never on the command
line or in the URL, and is masked in every message.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook_lib.core.errors import GitError
from runbook_lib.core.secrets import redact, register_secret
from runbook_lib.core.settings import RunbookSettings


class GitRepo:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0):
        self.url = url
        self.timeout = timeout
        self._token = token
        self._cache: Path | None = None
        self._fetched: dict[str, str] = {}  # ref -> commit sha
        if token:
            register_secret(token, "GITHUB_TOKEN")
            register_secret(self._basic(token), "GITHUB_TOKEN")

    @classmethod
    def from_settings(cls, settings: RunbookSettings, **kwargs: Any) -> "GitRepo":
        settings.require("source.repo_url")
        return cls(settings.value("source.repo_url"), settings.value("source.github_token"), **kwargs)

    @staticmethod
    def _basic(token: str) -> str:
        return base64.b64encode(f"x-access-token:{token}".encode()).decode()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "GCM_INTERACTIVE": "never"})
        if self._token:
            env.update({
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {self._basic(self._token)}",
            })
        return env

    def _git(self, *args: str, cwd: Path | None = None, what: str) -> str:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=cwd, env=self._env(), capture_output=True, text=True, timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise GitError(f"{what}: git gave no answer from {self.url} within {self.timeout:.0f}s") from None
        except FileNotFoundError:
            raise GitError("the git command is not installed") from None
        if proc.returncode != 0:
            raise GitError(f"{what}: {self._explain(proc.stderr)}")
        return proc.stdout

    def _explain(self, stderr: str) -> str:
        text = redact(stderr.strip())
        low = text.lower()
        if "authentication failed" in low or "could not read username" in low or " 401" in low or " 403" in low:
            return f"{self.url} refused access (check GITHUB_TOKEN, or whether the repository is public): {text}"
        if "not found" in low and "repository" in low:
            return f"repository {self.url} does not exist or is not visible with these credentials: {text}"
        if "couldn't find remote ref" in low or "not our ref" in low:
            return f"no such branch, tag or commit in {self.url}: {text}"
        return text or "git failed without a message"

    # -- remote -------------------------------------------------------------------------------
    def ls_remote(self) -> dict[str, str]:
        """ref name (`refs/heads/main`, `HEAD`, ...) -> commit sha."""
        out = self._git("ls-remote", self.url, what=f"listing the refs of {self.url}")
        refs = {}
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            if ref:
                refs[ref] = sha
        return refs

    def branch_sha(self, branch: str) -> str | None:
        """The commit `branch` points at on the remote, or None when there is no such branch."""
        return self.ls_remote().get(f"refs/heads/{branch}")

    # -- content ------------------------------------------------------------------------------
    def _bare(self) -> Path:
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="runbook-git-"))
            self._git("init", "--bare", "--quiet", str(self._cache), what="preparing a local cache")
        return self._cache

    def fetch(self, ref: str) -> str:
        """Fetch `ref` (branch, tag or full sha) shallowly; return its commit sha."""
        if ref in self._fetched:
            return self._fetched[ref]
        if ref.startswith("-"):
            raise GitError(f"invalid ref {ref!r}")
        self._git("fetch", "--quiet", "--depth=1", "--no-tags", self.url, ref, cwd=self._bare(),
                  what=f"fetching {ref!r} from {self.url}")
        sha = self._git("rev-parse", "FETCH_HEAD^{commit}", cwd=self._bare(), what="resolving the fetched commit").strip()
        self._fetched[ref] = sha
        return sha

    def read_file(self, ref: str, path: str) -> str:
        """The text of `path` at `ref`; GitError naming the file when it is not there."""
        sha = self.fetch(ref)
        if path.startswith("-") or path.startswith("/"):
            raise GitError(f"invalid path {path!r}")
        try:
            return self._git("show", f"{sha}:{path}", cwd=self._bare(), what=f"reading {path} at {ref}")
        except GitError:
            files = self.list_files(ref)
            raise GitError(f"{path} does not exist at {ref} ({sha[:12]}) in {self.url}; it has {len(files)} file(s)") from None

    def list_files(self, ref: str) -> list[str]:
        sha = self.fetch(ref)
        out = self._git("ls-tree", "-r", "--name-only", sha, cwd=self._bare(), what=f"listing files at {ref}")
        return out.splitlines()

    def read_files(self, ref: str, suffix: str = ".py") -> dict[str, str]:
        """Every file ending in `suffix` at `ref`: path -> text (for analysing the flow's imports)."""
        return {p: self.read_file(ref, p) for p in self.list_files(ref) if p.endswith(suffix)}

    def close(self) -> None:
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None
            self._fetched.clear()

    def __enter__(self) -> "GitRepo":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- a private clone: compare, preview, merge, push -------------------------------------------------

MERGE_IDENTITY = ("Deployment runbook", "runbook@localhost")


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str

    def __str__(self) -> str:
        return f"{self.sha[:12]} {self.subject}"


@dataclass
class MergePreview:
    """What a merge would do: "nothing" (the target has every change), "fast-forward", "merge" (clean,
    `stat` summarises the result against the target) or "conflict" (`conflicts` names the files)."""

    kind: str
    tree: str
    conflicts: list[str] = field(default_factory=list)
    stat: str = ""


@dataclass
class BranchComparison:
    """Where the feature branch stands against the target branch on the remote."""

    repo_url: str
    target: str
    feature: str
    target_sha: str
    feature_sha: str
    ahead: list[Commit]  # feature commits not in the target, by hash
    behind: list[Commit]  # target commits not in the feature branch
    files: list[str] = field(default_factory=list)  # "M\tpath" lines of what the branch changed since it forked
    unique: list[tuple[Commit, list[str]]] = field(default_factory=list)  # commits bringing a change the target lacks
    already_on_target: list[Commit] = field(default_factory=list)  # the same patch or change is on the target
    preview: MergePreview | None = None

    @property
    def merged(self) -> bool:
        """The target has every change of the branch (by hash, by patch or by content)."""
        return not self.unique

    @property
    def fast_forward(self) -> bool:
        return not self.behind

    @property
    def unique_files(self) -> list[str]:
        return sorted({f for _, files in self.unique for f in files})

    def facts(self) -> dict[str, Any]:
        return {"repository": self.repo_url, "target": self.target, "target_sha": self.target_sha,
                "feature": self.feature, "feature_sha": self.feature_sha, "merged": self.merged,
                "ahead": [str(c) for c in self.ahead], "behind": [str(c) for c in self.behind], "files": self.files,
                "unique": [{"commit": str(c), "files": files} for c, files in self.unique],
                "already_on_target": len(self.already_on_target),
                "preview": {"kind": self.preview.kind, "conflicts": self.preview.conflicts, "stat": self.preview.stat}
                if self.preview else None}


class MergeConflict(GitError):
    """The merge conflicted; it was aborted and nothing was pushed."""


class GitWorkspace(GitRepo):
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

    def fetch_all(self) -> dict[str, str]:
        """Fetch every branch of the remote (full history); branch -> commit sha."""
        self._git("fetch", "--quiet", "--no-tags", "--prune", self.url, "+refs/heads/*:refs/remotes/origin/*",
                  cwd=self._dir(), what="fetching every branch")
        out = self._git("for-each-ref", "--format=%(refname:lstrip=3) %(objectname)", "refs/remotes/origin",
                        cwd=self._dir(), what="listing the fetched branches")
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        proc = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, descendant], cwd=self._dir(),
                              env=self._env(), capture_output=True, text=True, timeout=self.timeout)
        return proc.returncode == 0

    def tree_of(self, ref: str) -> str:
        return self._git("rev-parse", f"{ref}^{{tree}}", cwd=self._dir(), what=f"reading the tree of {ref}").strip()

    def cherry(self, target: str, feature: str) -> tuple[list[Commit], list[Commit]]:
        """(commits of `feature` whose patch `target` lacks, those already on `target` as the same patch:
        rebased or cherry-picked under another hash), oldest first."""
        t, f = self._remote_ref(target), self._remote_ref(feature)
        out = self._git("cherry", "-v", t, f, cwd=self._dir(), what=f"comparing {feature} with {target} by patch")
        unique, equivalent = [], []
        for line in out.splitlines():
            mark, _, rest = line.partition(" ")
            sha, _, subject = rest.partition(" ")
            (unique if mark == "+" else equivalent).append(Commit(sha, subject))
        return unique, equivalent

    def commit_files(self, sha: str) -> list[str]:
        """The paths a commit changes (a merge commit: against its first parent)."""
        out = self._git("diff-tree", "--no-commit-id", "--name-only", "-r", "-m", "--first-parent", sha,
                        cwd=self._dir(), what=f"listing the files of {sha[:12]}")
        return sorted(set(out.split()))

    def change_present(self, target: str, sha: str) -> bool:
        """True when the change `sha` makes (against its first parent) is already in `target`'s tree:
        its reverse applies cleanly there (a squash merge, or the same change made by hand)."""
        diff = self._git("diff", "--binary", f"{sha}^", sha, cwd=self._dir(), what=f"reading the change of {sha[:12]}")
        if not diff.strip():
            return True
        index = self._dir() / ".git" / f"runbook-index-{sha[:12]}"
        env = {**self._env(), "GIT_INDEX_FILE": str(index)}
        try:
            subprocess.run(["git", "read-tree", self._remote_ref(target)], cwd=self._dir(), env=env, check=True,
                           capture_output=True, timeout=self.timeout)
            proc = subprocess.run(["git", "apply", "--cached", "--check", "--reverse"], cwd=self._dir(), env=env,
                                  input=diff, capture_output=True, text=True, timeout=self.timeout)
            return proc.returncode == 0
        finally:
            index.unlink(missing_ok=True)

    def preview_merge(self, target: str, feature: str) -> "MergePreview":
        """What merging `feature` into `target` would do, without touching a work tree (`git merge-tree
        --write-tree`): nothing, a fast-forward, a clean merge (with its diff summary) or conflicts."""
        t, f = self._remote_ref(target), self._remote_ref(feature)
        proc = subprocess.run(["git", "merge-tree", "--write-tree", "--name-only", "--no-messages", t, f],
                              cwd=self._dir(), env=self._env(), capture_output=True, text=True, timeout=self.timeout)
        if proc.returncode not in (0, 1):
            raise GitError(f"previewing the merge of {feature} into {target}: {self._explain(proc.stderr)}")
        lines = proc.stdout.splitlines()
        tree = lines[0].strip() if lines else ""
        if proc.returncode == 1:
            return MergePreview("conflict", tree, conflicts=sorted({line.strip() for line in lines[1:] if line.strip()}))
        if tree == self.tree_of(t):
            return MergePreview("nothing", tree)
        kind = "fast-forward" if self.is_ancestor(t, f) else "merge"
        stat = self._git("diff", "--stat", t, tree, cwd=self._dir(), what="summarising the merge").rstrip()
        return MergePreview(kind, tree, stat=stat)

    def compare(self, target: str, feature: str) -> "BranchComparison":
        """Where `feature` stands against `target` (both fetched): by hash, by patch and by content."""
        shas = self.fetch_branches(target, feature)
        t, f = self._remote_ref(target), self._remote_ref(feature)
        files = self._git("diff", "--name-status", f"{t}...{f}", cwd=self._dir(), what="listing changed files")
        ahead = self._commits(f"{t}..{f}")
        unique, equivalent = self.cherry(target, feature)
        preview = self.preview_merge(target, feature)
        if preview.kind == "nothing":  # squash-merged, or every change made on the target already
            unique, equivalent = [], equivalent + unique
        else:
            present = [c for c in unique if self.change_present(target, c.sha)]
            unique = [c for c in unique if c not in present]
            equivalent = equivalent + present
        return BranchComparison(
            repo_url=self.url, target=target, feature=feature, target_sha=shas[target], feature_sha=shas[feature],
            ahead=ahead, behind=self._commits(f"{f}..{t}"), files=files.splitlines(),
            unique=[(c, self.commit_files(c.sha)) for c in unique], already_on_target=equivalent, preview=preview,
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


