"""The flow's git repository, read with the git command line: what a ref points at, and files at a ref.

`ls_remote()` lists the remote's refs; `read_file(ref, path)` fetches just that commit (shallow)
into a private bare repository in a temporary directory and reads the file from it. A token
(GITHUB_TOKEN) is sent as an HTTP header through git's environment, never on the command line
or in the URL, and is masked in every message.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
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
