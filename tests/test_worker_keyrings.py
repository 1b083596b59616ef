"""Workers cannot reach the supervisor's keys by themselves.

Possession of a key follows the keyrings a process holds, not its uid, and a
forked child shares its parent's session keyring (keyrings(7)).  A worker that
only changed uid would still read every key linked there; workers therefore
join a fresh session keyring before dropping privileges.
"""

from __future__ import annotations

import os

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import recv_exactly, running_daemon
from tests.helpers.engines import Peer, key_reading_engine
from tlshd import keyring

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="privileges are only dropped as root"),
]


@pytest.fixture
def session_key():  # type: ignore[no-untyped-def]
    # A private session keyring for this test process (and the daemon it
    # forks), with a key only root may read: possession is what grants access.
    keyring.join_session_keyring(None)
    session = keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING)
    serial = keyring.add_key("user", "tlshd-test-session-secret", b"secret", session)
    yield serial
    keyring.revoke_key(serial)


def test_supervisor_possesses_the_key(session_key: int) -> None:
    # The control: the same read succeeds in the process the daemon forks from.
    assert keyring.read_key(session_key) == b"secret"


def test_worker_cannot_read_the_session_keyring(kernel: FakeKernel, session_key: int) -> None:
    with running_daemon(kernel, key_reading_engine):
        peer = Peer(kernel, peername=str(session_key))
        assert recv_exactly(peer.client, 5) == b"DENY!"
        assert peer.request.wait_done(20)[0] == 0
        peer.close()
