"""Seeds the sandbox's copy of `bencrane/data-enrichment-orchestration-v1` from the project's `flows/`.

The history reproduces the plan's situation: `main` holds an orchestrator that reads its DSN from
the `DATABASE_URL` environment variable only, and the unmerged branch `feature/secret-blocks` is one
commit ahead with the orchestrator that loads the Prefect Secret block `postgres-connection-string`
(or, with `merged=True`, that branch is already merged into `main`).

`flows/src/orchestrator.py` is the feature-branch version; the `main` version is derived from it by
replacing the section between the DSN-source markers with an environment-only `get_database_url()`.
The repository is built in a temporary directory and moved into place only when complete, so a
failed seeding leaves nothing behind.

Instead of that story, `sandbox up --repo <path or URL>` (`seed_from_source`, decided by
`use_repository`) seeds the same `<owner>/<repo>` with every branch of a repository of the user's:
all local branches of a path, all remote heads of a URL (and their tags), fetched with the user's own
git set-up (credential helpers, SSH keys) but never prompting; `HEAD` names `main` when there is one,
else the source's own HEAD branch. The source is recorded in the config (`cfg.git.seed_source`), so a
later `up` keeps the repository (and what was pushed to it) and a restart seeds a missing one from the
same source.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .config import PROJECT_ROOT, SandboxConfig

DEFAULT_SOURCE_DIR = PROJECT_ROOT / "flows"
ORCHESTRATOR = Path("src") / "orchestrator.py"
BEGIN_MARKER = "# --- runbook:dsn-source begin ---"
END_MARKER = "# --- runbook:dsn-source end ---"
FEATURE_BRANCH = "feature/secret-blocks"
MAIN_BRANCH = "main"
AUTHOR_NAME = "Runbook Sandbox"
AUTHOR_EMAIL = "sandbox@example.invalid"
SKIPPED_NAMES = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")

MSG_MAIN = "Orchestrator flow: sequencer and dispatcher to Modal, DSN from DATABASE_URL"
MSG_FEATURE = "Load the database DSN from the Prefect Secret block postgres-connection-string"
MSG_MERGE = f"Merge branch '{FEATURE_BRANCH}'"

# The DSN source on `main`: the environment only (what the plan found before the branch).
ENV_ONLY_SECTION = '''\
import os


def get_database_url() -> str:
    """The database DSN, from the DATABASE_URL environment variable."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError(
            "DATABASE_URL is not set: the orchestrator reads its database DSN from this environment variable"
        )
    return url
'''


class SeedError(RuntimeError):
    """The repository could not be seeded; the message says why."""


def repo_path(cfg: SandboxConfig, owner: str | None = None, repo: str | None = None) -> Path:
    """Where the bare repository `<owner>/<repo>.git` lives: `<state>/git/<owner>/<repo>.git`."""
    return cfg.state / "git" / (owner or cfg.git.owner) / f"{repo or cfg.git.repo}.git"


def env_only_version(feature_source: str) -> str:
    """The `main` orchestrator: the feature version with its DSN-source section made env-only."""
    lines = feature_source.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise SeedError(
            f"{ORCHESTRATOR} must contain exactly one section between the lines {BEGIN_MARKER!r} and "
            f"{END_MARKER!r} (found {len(begins)} begin and {len(ends)} end marker(s)); "
            "cannot derive the env-only main version"
        )
    begin, end = begins[0], ends[0]
    section = "".join(lines[begin + 1 : end])
    if "def get_database_url" not in section:
        raise SeedError(f"the DSN-source section of {ORCHESTRATOR} does not define get_database_url()")
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    replacement = "".join(indent + line if line.strip() else line for line in ENV_ONLY_SECTION.splitlines(True))
    derived = "".join(lines[: begin + 1]) + replacement + "".join(lines[end:])
    try:
        compile(derived, str(ORCHESTRATOR), "exec")
    except SyntaxError as exc:
        raise SeedError(f"the env-only main version of {ORCHESTRATOR} is not valid Python: {exc}") from exc
    return derived


def _git(args: list[str], cwd: Path, when: str = "2025-06-02T09:00:00+00:00") -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
        "GIT_COMMITTER_NAME": AUTHOR_NAME,
        "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
        "GIT_AUTHOR_DATE": when,
        "GIT_COMMITTER_DATE": when,
    }
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SeedError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def _copy_tree(source: Path, dest: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIPPED_NAMES or n.endswith(SKIPPED_SUFFIXES)}

    shutil.copytree(source, dest, ignore=ignore, dirs_exist_ok=True)


def seed_repository(
    cfg: SandboxConfig,
    *,
    source_dir: Path | None = None,
    merged: bool | None = None,
    owner: str | None = None,
    repo: str | None = None,
) -> Path:
    """Create the bare repository from `source_dir` (default: the project's `flows/`); return its path.

    `merged` (default `cfg.git.seed_merged`) seeds `feature/secret-blocks` already merged into `main`.
    Refuses to overwrite an existing repository.
    """
    source = Path(source_dir or DEFAULT_SOURCE_DIR).resolve()
    merged = cfg.git.seed_merged if merged is None else merged
    target = repo_path(cfg, owner, repo)
    if target.exists():
        raise SeedError(f"repository {target} already exists; not seeding over it")
    orchestrator = source / ORCHESTRATOR
    if not orchestrator.is_file():
        raise SeedError(f"cannot seed the repository: {orchestrator} does not exist")
    feature_source = orchestrator.read_text()
    main_source = env_only_version(feature_source)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=target.parent) as tmp:
        work, bare = Path(tmp) / "work", Path(tmp) / "bare.git"
        work.mkdir()
        _git(["init", "-q", "-b", MAIN_BRANCH], work)
        _copy_tree(source, work)
        (work / ORCHESTRATOR).write_text(main_source)
        _git(["add", "-A"], work)
        _git(["commit", "-q", "-m", MSG_MAIN], work, when="2025-06-02T09:00:00+00:00")

        _git(["checkout", "-q", "-b", FEATURE_BRANCH], work)
        (work / ORCHESTRATOR).write_text(feature_source)
        _git(["commit", "-q", "-a", "-m", MSG_FEATURE], work, when="2025-06-03T14:30:00+00:00")

        _git(["checkout", "-q", MAIN_BRANCH], work)
        if merged:
            _git(["merge", "-q", "--no-ff", "-m", MSG_MERGE, FEATURE_BRANCH], work, when="2025-06-04T10:15:00+00:00")

        _git(["init", "-q", "--bare", "-b", MAIN_BRANCH, str(bare)], Path(tmp))
        _git(["push", "-q", str(bare), f"{MAIN_BRANCH}:{MAIN_BRANCH}", f"{FEATURE_BRANCH}:{FEATURE_BRANCH}"], work)
        bare.rename(target)
    return target


# -- seeding from a repository of the user's (`sandbox up --repo`) ------------------------------------

# `scheme://...` and git's scp-like `[user@]host:path` (no slash before the first colon) are URLs.
URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SCP_RE = re.compile(r"^[^/:]+:")
SOURCE_LIST_TIMEOUT = 120.0
SOURCE_FETCH_TIMEOUT = 1800.0
# Variables that would point git at another repository than the one named on its command line.
REPOSITORY_ENV = {
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_PREFIX", "GIT_QUARANTINE_PATH",
}
STORY = "the seeded story from flows/"


@dataclass
class SeedResult:
    path: Path  # the bare repository served as <owner>/<repo>.git
    source: str  # the source, as recorded (a URL as given, a path made absolute)
    branches: dict[str, str]  # branch name -> head sha, as served
    default: str  # the branch HEAD names

    def summary(self) -> str:
        return f"{len(self.branches)} branch(es), HEAD -> {self.default}"


def is_url(source: str) -> bool:
    return bool(URL_RE.match(source)) or (bool(SCP_RE.match(source)) and not Path(source).exists())


def source_of(repo: str | os.PathLike) -> str:
    """How a `--repo` source is recorded: a URL as is, a path resolved to an absolute one."""
    text = os.fspath(repo).strip()
    if not text:
        raise SeedError("no repository given: --repo needs the path or URL of a git repository")
    if is_url(text):
        return text
    return str(Path(text).expanduser().resolve())


def display_source(source: str) -> str:
    """The source as shown in messages: a URL's password (a token) is masked."""
    if URL_RE.match(source):
        parts = urlsplit(source)
        if parts.password:
            user = parts.username or ""
            host = parts.hostname or ""
            netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return source


def _mask(text: str, source: str) -> str:
    password = urlsplit(source).password if URL_RE.match(source) else None
    return text.replace(password, "***") if password else text


def _source_git(args: list[str], source: str, cwd: Path, timeout: float) -> str:
    """git reading `source` as the user would: their environment and configuration (credential
    helpers, SSH keys, url.insteadOf), but never prompting (no terminal, GIT_TERMINAL_PROMPT=0)."""
    env = {k: v for k, v in os.environ.items() if k not in REPOSITORY_ENV}
    env["GIT_TERMINAL_PROMPT"] = "0"
    shown = display_source(source)
    proc = subprocess.Popen(
        ["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,  # no controlling terminal: ssh cannot ask
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise SeedError(f"cannot seed the sandbox's repository from {shown}: git timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in _mask(err or out, source).splitlines() if ln.strip()]
        detail = lines[0] if lines else f"exit status {proc.returncode}"
        raise SeedError(
            f"cannot seed the sandbox's repository from {shown}: not a git repository, or not readable "
            f"from this machine ({detail})"
        )
    return out


def read_source(source: str, cwd: Path) -> tuple[dict[str, str], str | None]:
    """The branches of `source` (name -> head sha) and the branch its HEAD names (None: detached)."""
    out = _source_git(["ls-remote", "--symref", source, "HEAD", "refs/heads/*"], source, cwd, SOURCE_LIST_TIMEOUT)
    branches: dict[str, str] = {}
    head = None
    for line in out.splitlines():
        left, _, ref = line.partition("\t")
        if left.startswith("ref: ") and ref == "HEAD":
            head = left.removeprefix("ref: ").removeprefix("refs/heads/")
        elif ref.startswith("refs/heads/"):
            branches[ref.removeprefix("refs/heads/")] = left
    return branches, head


def default_branch(branches: dict[str, str] | list[str], head: str | None) -> str:
    """`main` when there is one, else the branch the source's HEAD names, else `master`, else the
    first branch by name."""
    for candidate in (MAIN_BRANCH, head, "master"):
        if candidate and candidate in branches:
            return candidate
    return sorted(branches)[0]


def served_branches(bare: Path) -> dict[str, str]:
    """The branches of a bare repository: name -> head sha."""
    out = _git(["for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/"], bare)
    return {ref.removeprefix("refs/heads/"): sha for sha, _, ref in (ln.partition(" ") for ln in out.splitlines())}


def seed_from_source(
    cfg: SandboxConfig,
    source: str | os.PathLike,
    *,
    owner: str | None = None,
    repo: str | None = None,
    replace: bool = False,
) -> SeedResult:
    """Create the bare repository `<owner>/<repo>.git` with every branch (and tag) of `source`: a
    path (every local branch) or a URL (every remote head). HEAD names `default_branch(...)`.

    Built in a temporary directory and moved into place when complete; an existing repository is
    refused, or with `replace=True` swapped out only once the new one is complete. A source that is
    not a repository, cannot be read or has no branch is refused (SeedError, naming it) and nothing
    of the sandbox's repositories changes.
    """
    source = source_of(source)
    shown = display_source(source)
    target = repo_path(cfg, owner, repo)
    if target.exists() and not replace:
        raise SeedError(f"repository {target} already exists; not seeding over it")
    if not is_url(source) and not Path(source).exists():
        raise SeedError(f"cannot seed the sandbox's repository from {shown}: no such file or directory")
    branches, head = read_source(source, Path(tempfile.gettempdir()))
    if not branches:
        raise SeedError(f"cannot seed the sandbox's repository from {shown}: it has no branch")
    default = default_branch(branches, head)

    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".seed-", dir=target.parent) as tmp:
            bare = Path(tmp) / "bare.git"
            _git(["init", "-q", "--bare", "-b", default, str(bare)], Path(tmp))
            _source_git(
                ["--git-dir", str(bare), "fetch", "--quiet", "--update-shallow", source,
                 "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                source, Path(tmp), SOURCE_FETCH_TIMEOUT,
            )
            served = served_branches(bare)
            missing = sorted(set(branches) - set(served))
            if missing or default not in served:
                raise SeedError(
                    f"cannot seed the sandbox's repository from {shown}: git fetched no "
                    f"{', '.join(missing or [default])}"
                )
            _git(["symbolic-ref", "HEAD", f"refs/heads/{default}"], bare)
            if target.exists():  # replace=True: swap the old repository out only now
                old = Path(tmp) / "replaced.git"
                target.rename(old)
                try:
                    bare.rename(target)
                except OSError:
                    old.rename(target)
                    raise
            else:
                bare.rename(target)
    except BaseException:
        for d in created:  # the directories this call made, deepest first, if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return SeedResult(path=target, source=source, branches=served, default=default)


def use_repository(cfg: SandboxConfig, repo: str | os.PathLike) -> str:
    """What `sandbox up --repo <repo>` does to `<owner>/<repo>.git`, before any service starts; returns
    what happened, for the user, and records the source in `cfg.git.seed_source` (the caller saves).

    - no repository yet: seeded from `repo`;
    - the repository was seeded from this same source: kept as is (what was pushed to it stays);
    - it was seeded from another source (or is the seeded story): `repo` was given explicitly, so the
      repository is replaced by one seeded from it (pushes to the old one are discarded).

    A source that cannot be read raises SeedError before anything changes.
    """
    source = source_of(repo)
    shown = display_source(source)
    recorded = cfg.git.seed_source
    name = f"{cfg.git.owner}/{cfg.git.repo}"
    if not repo_path(cfg).exists():
        result = seed_from_source(cfg, source)
        cfg.git.seed_source = source
        return f"{name} seeded from {shown}: {result.summary()}"
    if recorded == source:
        return f"{name} kept as is (seeded from {shown} before; what was pushed to it stays)"
    result = seed_from_source(cfg, source, replace=True)
    cfg.git.seed_source = source
    was = display_source(recorded) if recorded else STORY
    return (
        f"{name} reseeded from {shown}: {result.summary()}; it replaces the repository seeded from "
        f"{was}, and anything pushed to it"
    )
