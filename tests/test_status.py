"""supervisor/status.py: the root-only status socket."""

from __future__ import annotations

import os
import selectors
import socket
import stat

from tlshd.supervisor.status import StatusServer

from tests.helpers.daemon import short_tmpdir


def test_status_socket_is_private_and_replaces_stale_file() -> None:
    directory = short_tmpdir() / "sub"
    path = directory / "status.sock"
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    with selectors.DefaultSelector() as selector:
        server = StatusServer(str(path), selector, lambda: {"ok": 1})
        assert server.open()
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        server.close()
        assert not path.exists()


def test_status_socket_creates_private_directory_and_survives_failure() -> None:
    base = short_tmpdir()
    path = base / "run" / "status.sock"
    with selectors.DefaultSelector() as selector:
        server = StatusServer(str(path), selector, dict)
        assert server.open()
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        server.close()
        (base / "file").write_text("x")
        assert not StatusServer(str(base / "file" / "s.sock"), selector, dict).open()
