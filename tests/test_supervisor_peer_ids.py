"""REMOTE_AUTH scoping: which peer ids the supervisor passes on to the kernel.

nfsd marks a session peer-authenticated (needed by `xprtsec=mtls` exports) only
when DONE carries a non-zero REMOTE_AUTH; for a verified client certificate the
x509 server reports UINT_MAX, which names no key.  The supervisor checks every
other serial against the request's scope, so the sentinel must pass for a
server handshake and nowhere else.
"""

from __future__ import annotations

import errno

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import Peer, verified_client_cert_engine
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(120)

UINT_MAX = 0xFFFFFFFF


def test_server_handshake_passes_the_client_certificate_sentinel(kernel: FakeKernel) -> None:
    with running_daemon(kernel, verified_client_cert_engine):
        peer = Peer(kernel, message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509)
        assert peer.request.wait_done(20) == (0, (UINT_MAX,))
        peer.close()


def test_client_handshake_may_not_report_the_sentinel(kernel: FakeKernel) -> None:
    with running_daemon(kernel, verified_client_cert_engine) as daemon:
        peer = Peer(kernel, message_type=MsgType.CLIENTHELLO, auth_mode=AuthMode.X509)
        assert peer.request.wait_done(20) == (errno.EIO, ())
        daemon.wait_for_log("unknown to this request")
        peer.close()
