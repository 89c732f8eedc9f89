"""GitHub's git endpoint, on loopback: git over smart HTTP for `<owner>/<repo>.git`.

A threaded HTTP server runs git's own `git http-backend` (CGI) for every request, streaming the
request body into it (de-chunking `Transfer-Encoding: chunked` requests; gzip-encoded bodies are
passed on with their `Content-Encoding`, which http-backend inflates) and streaming its answer back.
Repositories are the bare ones under `<state>/git/<owner>/<repo>.git`; an unknown one answers 404.

Reads are anonymous, as for a public GitHub repository. Pushing (`git-receive-pack`: both the ref
advertisement and the POST) needs HTTP Basic auth whose password is the token (`cfg.git.token`,
any user name, e.g. `x-access-token`); otherwise 401 with `WWW-Authenticate: Basic realm="GitHub"`.
Credentials that are presented but wrong are refused on every request, as GitHub does.

Each request is one JSON line in `cfg.request_log_path("git")` (`http_common.RequestLog`): time,
method, path, status, duration, and query, authenticated, chunked, content_encoding, user_agent;
never the Authorization header. `/_sandbox/health` answers 200.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


from runbook_lib.core import processes

from .config import SandboxConfig, config_from_argv
from .git_seed import repo_path, seed_from_source, seed_repository
from .http_common import RequestLog
from .service import ServiceDef

COPY_CHUNK = 64 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Paths inside a repository that http-backend serves (smart protocol and the dumb fallback).
GIT_PATH_RE = re.compile(
    r"^/(info/refs|git-upload-pack|git-receive-pack|HEAD|objects/.+|info/alternates|info/http-alternates|info/packs)$"
)


class GitHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "GitHub-Sandbox"
    server: "GitServer"

    # -- entry points ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- routing ----------------------------------------------------------------------------------
    def _handle(self) -> None:
        self._started = time.monotonic()
        self._status = 0
        self._user: str | None = None
        self._logged = False
        url = urlsplit(self.path)
        self._path, self._query = unquote(url.path), url.query
        try:
            if self._path == "/_sandbox/health":
                self._send_simple(HTTPStatus.OK, "ok\n")
            else:
                self._handle_git(self._path, self._query)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._log()  # when no answer was completed

    def _handle_git(self, path: str, query: str) -> None:
        parts = path.lstrip("/").split("/", 2)
        if len(parts) < 3 or not NAME_RE.match(parts[0]) or not NAME_RE.match(parts[1]):
            return self._send_simple(HTTPStatus.NOT_FOUND, "Not Found\n")
        owner, repo, rest = parts[0], parts[1].removesuffix(".git"), "/" + parts[2]
        if ".." in rest or not GIT_PATH_RE.match(rest) or not repo_path(self.server.cfg, owner, repo).is_dir():
            return self._send_simple(HTTPStatus.NOT_FOUND, "Repository not found.\n")

        auth = self._check_auth()
        if auth is False:
            return self._unauthorized("Invalid username or token. Password authentication is not supported.\n")
        wants_push = rest == "/git-receive-pack" or (
            rest == "/info/refs" and "service=git-receive-pack" in query.split("&")
        )
        if wants_push and auth is None:
            return self._unauthorized("Authentication required to push.\n")
        self._run_backend(f"/{owner}/{repo}.git{rest}", query)

    def _check_auth(self) -> bool | None:
        """None: no credentials; True: the token; False: credentials that are not the token."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # not base64, not ASCII (ValueError), not UTF-8
            return False
        if not hmac.compare_digest(password.encode(), self.server.cfg.git.token.encode()):
            return False
        self._user = user or "x-access-token"
        return True

    # -- responses --------------------------------------------------------------------------------
    def _send_simple(self, status: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        if self._has_unread_body():
            self.close_connection = True  # the body is not read: the connection cannot be reused
        self._status = int(status)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._log()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _unauthorized(self, text: str) -> None:
        self._send_simple(HTTPStatus.UNAUTHORIZED, text, {"WWW-Authenticate": 'Basic realm="GitHub"'})

    def _has_unread_body(self) -> bool:
        return bool(self.headers.get("Content-Length", "0") not in ("", "0") or self._is_chunked())

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    # -- the CGI ----------------------------------------------------------------------------------
    def _cgi_env(self, path_info: str, query: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.server.cfg.state),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_PROJECT_ROOT": str(self.server.cfg.state / "git"),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": self.server_version,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        }
        if self._user:
            env["REMOTE_USER"] = self._user  # makes http-backend enable receive-pack
            env["AUTH_TYPE"] = "Basic"
        if not self._is_chunked() and self.headers.get("Content-Length"):
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        # Without CONTENT_LENGTH http-backend reads the body to EOF (how chunked bodies are passed).
        for key, value in self.headers.items():
            name = key.upper().replace("-", "_")
            if name in ("AUTHORIZATION", "CONTENT_TYPE", "CONTENT_LENGTH", "TRANSFER_ENCODING"):
                continue
            env["HTTP_" + name] = value  # includes Content-Encoding (gzip) and Git-Protocol (v2)
        return env

    def _run_backend(self, path_info: str, query: str) -> None:
        proc = subprocess.Popen(
            ["git", "http-backend"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # into the service log
            env=self._cgi_env(path_info, query),
        )
        feeder = threading.Thread(target=self._feed_body, args=(proc,), daemon=True)
        feeder.start()
        try:
            status, headers = self._read_cgi_headers(proc.stdout)
            self._status = status
            self.send_response(status)
            length = None
            for k, v in headers:
                if k.lower() == "content-length":
                    length = v
                self.send_header(k, v)
            if length is None and self.command != "HEAD":
                self.send_header("Transfer-Encoding", "chunked")
            if self.command == "HEAD":
                self._log()
            self.end_headers()
            if self.command != "HEAD":
                self._copy_body(proc.stdout, chunked=length is None)
            feeder.join(timeout=30)
        finally:
            proc.stdout.close()
            if proc.wait(timeout=30) != 0:
                self.close_connection = True
            if feeder.is_alive():
                self.close_connection = True

    def _feed_body(self, proc: subprocess.Popen) -> None:
        """Stream the request body into http-backend's stdin, then close it (EOF ends the body)."""
        try:
            if self._is_chunked():
                while True:
                    size_line = self.rfile.readline(1024)
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    self._copy_exact(size, proc.stdin)
                    self.rfile.readline(1024)  # CRLF after each chunk
            else:
                self._copy_exact(int(self.headers.get("Content-Length") or 0), proc.stdin)
        except (BrokenPipeError, ConnectionResetError, ValueError, OSError):
            self.close_connection = True
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _copy_exact(self, remaining: int, out) -> None:
        while remaining > 0:
            data = self.rfile.read(min(COPY_CHUNK, remaining))
            if not data:
                raise ConnectionResetError("client closed the connection mid-body")
            out.write(data)
            remaining -= len(data)

    @staticmethod
    def _read_cgi_headers(stdout) -> tuple[int, list[tuple[str, str]]]:
        status, headers = 200, []
        while True:
            line = stdout.readline()
            if not line or line in (b"\r\n", b"\n"):
                break
            key, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            value = value.strip()
            if key.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((key, value))
        return status, headers

    def _copy_body(self, stdout, chunked: bool) -> None:
        """Stream the CGI's body to the client, one block behind, so that the request is logged
        before the client can have the whole answer."""
        held = b""
        while True:
            data = stdout.read1(COPY_CHUNK)
            if not data:
                break
            self._write_block(held, chunked)
            held = data
        self._log()
        self._write_block(held, chunked)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_block(self, data: bytes, chunked: bool) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    # -- request log --------------------------------------------------------------------------------
    def _log(self) -> None:
        """The request's line (never the Authorization header), once; written before the answer's
        last bytes go out."""
        if self._logged:
            return
        self._logged = True
        self.server.request_log.write(
            self.command, self._path, self._status, self._started,
            query=self._query,
            authenticated=self._user is not None,
            chunked=self._is_chunked(),
            content_encoding=self.headers.get("Content-Encoding"),
            user_agent=self.headers.get("User-Agent"),
        )


class GitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.request_log = RequestLog(cfg.request_log_path("git"))
        super().__init__(("127.0.0.1", cfg.git.port), GitHandler)


def health(cfg: SandboxConfig) -> str | None:
    return processes.http_health(f"http://127.0.0.1:{cfg.git.port}/_sandbox/health")  # itself, not via the proxy


def after_start(cfg: SandboxConfig) -> None:
    """Seed the orchestrator repository on first start (from the recorded `--repo` source, else the
    story from flows/); an existing repository is kept as is."""
    if not repo_path(cfg).exists():
        if cfg.git.seed_source:
            seed_from_source(cfg, cfg.git.seed_source)
        else:
            seed_repository(cfg)


SERVICE = ServiceDef(
    name="git_server",
    ports=["git.port"],
    health=health,
    url=lambda cfg: cfg.repo_url,
    after_start=after_start,
    exports=lambda cfg: {"RUNBOOK_REPO_URL": cfg.repo_url, "GITHUB_TOKEN": cfg.git.token},
    start_timeout=30,
)


def main() -> None:
    cfg = config_from_argv()
    server = GitServer(cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"git server on 127.0.0.1:{cfg.git.port}, repositories under {cfg.state / 'git'}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
