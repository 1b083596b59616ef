"""DONE's STATUS stays within MAX_ERRNO on the wire (issue 12, item 6).

Both lab kernels (Debian's 6.12.117 and 7.3.4, tests/lab/test_kernel_probe.py)
publish DONE's policy as STATUS u32 in 0..MAX_ERRNO (4095) and refuse anything
above with ERANGE; a refused DONE leaves the request to the consumer's timer.
The fake kernel applies the same policy, so whatever a worker reports, the
DONE that HandshakeNetlink.done() sends must be accepted and carry a status the
consumer can read as an errno.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from tests.fakekernel import FakeKernel
from tlshd.netlink import HandshakeNetlink
from tlshd.uapi import MAX_ERRNO, AuthMode, MsgType


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    with FakeKernel() as fake:
        yield fake


@pytest.fixture
def daemon(kernel: FakeKernel) -> Iterator[HandshakeNetlink]:
    netlink = kernel.make_netlink()
    netlink.open()
    yield netlink
    netlink.close()


@pytest.mark.parametrize(
    ("given", "kernel_sees"),
    [
        (MAX_ERRNO, MAX_ERRNO),  # the bound itself is a valid status
        (-MAX_ERRNO, MAX_ERRNO),  # negative errnos are sent as positive ones
        (MAX_ERRNO + 1, errno.EIO),  # one past the bound: EIO, not a refused DONE
        (-(MAX_ERRNO + 1), errno.EIO),
        (1 << 31, errno.EIO),
        (-(1 << 31), errno.EIO),
        (errno.EKEYREJECTED, errno.EKEYREJECTED),
    ],
)
def test_done_status_reaches_the_kernel_within_max_errno(
    kernel: FakeKernel, daemon: HandshakeNetlink, given: int, kernel_sees: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _addr = listener.accept()
    with client, server:
        request = kernel.submit(server, MsgType.CLIENTHELLO, AuthMode.UNAUTH)
        params = daemon.accept()
        assert params is not None
        try:
            daemon.done(params.sockfd, given)  # raises NetlinkError if the kernel refused it
        finally:
            os.close(params.sockfd)
        assert request.wait_done(5) == (kernel_sees, ())
    assert kernel.done_errors == 0
