"""Key requests from workers go through the supervisor, within the request's scope."""

from __future__ import annotations

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import recv_exactly, running_daemon
from tests.helpers.engines import Peer, ScopedKeyService, key_engine
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(120)


def test_key_requests_are_scoped_and_remote_auth_reported() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, key_engine, keyservice=ScopedKeyService()):
        peer = Peer(
            kernel,
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.X509,
            cert=1001,
            privkey=1002,
        )
        line = recv_exactly(peer.client, len(b"secret-1001 yes\n"))
        assert line == b"secret-1001 yes\n"
        # 4242 came from this request's add_cert, so the supervisor lets it through.
        assert peer.request.wait_done(10) == (0, (4242,))
