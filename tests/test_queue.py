"""supervisor/queue.py: the deadline queue of accepted requests."""

from __future__ import annotations

import socket

from tlshd.supervisor.queue import DeadlineQueue, Request

from tlshd.log import handshake_logger
from tlshd.params import HandshakeParams


def make_request(req_id: int, deadline: float) -> Request:
    sock = socket.socket()
    params = HandshakeParams(sockfd=sock.fileno(), peer_identities=(5,), cert_serial=6)
    return Request(req_id, params, sock, "peer", 0.0, deadline, handshake_logger(req_id, "peer"))


def test_deadline_queue_orders_and_expires() -> None:
    queue = DeadlineQueue()
    requests = [make_request(i, deadline) for i, deadline in enumerate((5.0, 1.0, 3.0, 1.0))]
    for request in requests:
        queue.push(request)
    assert queue.next_deadline() == 1.0
    assert [r.req_id for r in queue.pop_expired(2.0)] == [1, 3]  # ties: accept order
    assert queue.pop().req_id == 2
    assert [r.req_id for r in queue.drain()] == [0]
    assert len(queue) == 0 and queue.next_deadline() is None
    assert requests[0].known_serials == {5, 6}
    for request in requests:
        request.sock.close()
