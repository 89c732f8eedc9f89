"""runner.kernel: the shell channel notebooks are executed with reads a reply that arrived while the
client was sending on the same socket (nbclient answering a widget), within one poll slice instead of
at the end of the cell timeout. Real zmq sockets and jupyter_client's own Session (no kernel: the
peer is a ROUTER socket, as the kernel's shell is). And the connection files its kernel managers wrote
are removed on demand when their kernels were killed rather than shut down."""

from __future__ import annotations

import asyncio
import time
from queue import Empty

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from runbook_lib.runner.kernel import POLL_SLICE, KernelManager, ShellChannel
from tests.conftest import run_fresh


class _Pair:
    """A kernel-side ROUTER (plain zmq) and the client's DEALER behind a `ShellChannel`."""

    def __init__(self) -> None:
        self.session = Session(key=b"k")
        self.sync_ctx, self.async_ctx = zmq.Context(), zmq.asyncio.Context()
        self.router = self.sync_ctx.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        dealer = self.async_ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        self.channel = ShellChannel(dealer, self.session)

    def request(self) -> list[bytes]:
        """The client sends a request (as `execute` does); the kernel side reads it: its identity."""
        self.channel.send(self.session.msg("execute_request", {"code": "1"}))
        ident, *_ = self.router.recv_multipart()
        return [ident]

    def reply(self, ident: list[bytes], text: str) -> None:
        self.session.send(self.router, "execute_reply", {"status": "ok", "text": text}, ident=ident)

    def close(self) -> None:
        self.channel.close()
        self.router.close(linger=0)
        self.sync_ctx.term()
        self.async_ctx.term()


@pytest.fixture
def pair():
    p = _Pair()
    yield p
    p.close()


def test_a_reply_that_arrives_while_the_client_sends_is_read_within_a_slice(pair):
    """The reply lands while the loop is busy; the client then sends a comm message through
    Session.send (a plain send, which takes the socket's wake-up): jupyter_client's channel would
    sleep to its timeout (10 s here), this one reads the reply after at most one slice."""

    async def scenario() -> tuple[float, dict]:
        ident = pair.request()
        began = time.monotonic()
        waiting = asyncio.ensure_future(pair.channel.get_msg(timeout=10))
        await asyncio.sleep(0.05)  # the wait is polling
        pair.reply(ident, "done")
        time.sleep(0.05)  # the reply reaches the client's socket before the loop runs again
        pair.channel.send(pair.session.msg("comm_msg", {"comm_id": "c", "data": {}}))
        msg = await waiting
        return time.monotonic() - began, msg

    for _ in range(3):
        took, msg = asyncio.run(scenario())
        assert msg["content"]["text"] == "done"
        assert took < 1.5, f"the reply was read after {took:.2f} s (slices of {POLL_SLICE} s)"
        pair.router.recv_multipart()  # the comm message, read by the kernel side


def test_the_timeout_keeps_its_meaning(pair):
    async def scenario() -> None:
        ident = pair.request()
        began = time.monotonic()
        with pytest.raises(Empty):
            await pair.channel.get_msg(timeout=0.6)
        assert 0.6 <= time.monotonic() - began < 2.0
        with pytest.raises(Empty):
            await pair.channel.get_msg(timeout=0)
        pair.reply(ident, "late")
        assert (await pair.channel.get_msg(timeout=5))["content"]["text"] == "late"
        pair.reply(ident, "there")
        time.sleep(0.05)
        assert (await pair.channel.get_msg(timeout=0))["content"]["text"] == "there"

    asyncio.run(scenario())


def test_the_kernel_managers_clients_wait_on_this_channel():
    """papermill and the warm kernel are given KernelManager; the client it builds must use ShellChannel
    (jupyter_client builds clients from `client_factory`, not from `client_class` as declared)."""
    assert KernelManager().client().shell_channel_class is ShellChannel


LEFT_BEHIND = """
import json, sys
from pathlib import Path
from runbook_lib.runner.kernel import KernelManager, remove_connection_files
directory = Path(sys.argv[1])
killed, shut_down = KernelManager(), KernelManager()
for name, manager in (("killed", killed), ("shut-down", shut_down)):
    manager.connection_file = str(directory / f"kernel-{name}.json")
    manager.write_connection_file()
shut_down.cleanup_connection_file()  # as its manager's cleanup does when the kernel is shut down
before = sorted(p.name for p in directory.iterdir())
remove_connection_files()
remove_connection_files()  # again: nothing left to do
print(json.dumps({"before": before, "after": sorted(p.name for p in directory.iterdir())}))
"""


def test_connection_files_left_by_killed_kernels_are_removed(tmp_path):
    """A kernel killed rather than shut down (a step process leaving with `os._exit` once its runner is gone)
    leaves the connection file its manager wrote, with the kernel's signing key: `remove_connection_files`
    removes what this process's managers wrote and did not remove, and nothing else. In a fresh interpreter:
    the managers are the process's."""
    (tmp_path / "someone-elses.json").write_text("{}")
    files = run_fresh(LEFT_BEHIND, str(tmp_path))
    assert files["before"] == ["kernel-killed.json", "someone-elses.json"]
    assert files["after"] == ["someone-elses.json"]
