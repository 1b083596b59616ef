"""supervisor/queue.py: the deadline queue of accepted requests."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
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


def half(req_id: int, deadline: float, connection: int, local: bool = True) -> Request:
    request = make_request(req_id, deadline)
    client, server = ("127.0.0.1", "127.0.0.1") if local else ("192.0.2.7", "198.51.100.1")
    request.pair_key = ((client, 700 + connection), (server, 2049))
    return request


def test_a_peer_on_this_host_is_told_from_a_remote_one() -> None:
    request = make_request(1, 1.0)
    cases = {
        (("127.0.0.5", 700), ("127.0.0.5", 2049)): True,  # a loopback mount
        (("::1", 700, 0, 0), ("::1", 2049, 0, 0)): True,
        (("::ffff:127.0.0.1", 700, 0, 0), ("::ffff:127.0.0.1", 2049, 0, 0)): True,
        (("192.0.2.7", 700), ("192.0.2.7", 2049)): True,  # this host by its own address
        (("192.0.2.7", 700), ("198.51.100.1", 2049)): False,  # a remote peer
    }
    for key, local in cases.items():
        request.pair_key = key
        assert request.local_peer is local, key
    request.pair_key = None
    assert not request.local_peer
    request.sock.close()


def test_both_halves_of_a_connection_can_wait_and_either_is_found() -> None:
    queue = DeadlineQueue()
    client, server = half(1, 10.0, 0), half(2, 5.0, 0)
    other = half(3, 4.0, 1)
    for request in (client, server, other):
        queue.push(request)
    assert queue.partner_queued(client) and queue.partner_queued(server)
    assert not queue.partner_queued(other)
    assert queue.count_partners({client.pair_key, other.pair_key, None}) == 3
    # The later-queued half going first must not hide the earlier one.
    assert queue.pop_first(lambda r: r.req_id == 2) is server
    assert not queue.partner_queued(client)
    assert queue.pop_partner({server.pair_key}) is client
    assert queue.count_partners({client.pair_key}) == 0
    assert queue.pop() is other and len(queue) == 0
    for request in (client, server, other):
        request.sock.close()


def test_pop_first_takes_the_earliest_admissible_and_leaves_the_rest_in_order() -> None:
    queue = DeadlineQueue()
    requests = [make_request(i, deadline) for i, deadline in enumerate((3.0, 1.0, 2.0, 4.0))]
    for request in requests:
        queue.push(request)
    assert queue.pop_first(lambda r: r.req_id in (0, 2, 3)) is requests[2]
    assert queue.pop_first(lambda r: False) is None
    assert [r.req_id for r in queue.drain()] == [1, 0, 3]
    for request in requests:
        request.sock.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["push", "pop", "partner", "first"]), st.integers(0, 5))))
def test_every_queued_request_comes_out_once_and_pairs_stay_findable(ops: list) -> None:
    """Random pushes and takes (plain, as a partner, or the first admissible):
    a request leaves the queue exactly once, and `partner_queued` and
    `count_partners` always agree with what is really queued."""
    queue = DeadlineQueue()
    queued: list[Request] = []
    taken: list[Request] = []
    next_id = 0
    for op, arg in ops:
        if op == "push":
            request = half(next_id, float(arg), connection=arg % 3)
            request.sock.close()
            next_id += 1
            queue.push(request)
            queued.append(request)
            continue
        if not queued:
            continue
        if op == "pop":
            got = queue.pop()
            assert got is min(queued, key=lambda r: (r.deadline, r.req_id))
        elif op == "partner":
            key = (("127.0.0.1", 700 + arg % 3), ("127.0.0.1", 2049))
            got = queue.pop_partner({key})
            same = [r for r in queued if r.pair_key == key]
            assert (got is None) == (not same)
            if got is None:
                continue
            assert got is min(same, key=lambda r: (r.deadline, r.req_id))
        else:
            got = queue.pop_first(lambda r, arg=arg: r.req_id % 2 == arg % 2)
            fitting = [r for r in queued if r.req_id % 2 == arg % 2]
            if got is None:
                assert not fitting
                continue
            assert got is min(fitting, key=lambda r: (r.deadline, r.req_id))
        queued.remove(got)
        taken.append(got)
        for request in queued:
            others = [r for r in queued if r is not request and r.pair_key == request.pair_key]
            assert queue.partner_queued(request) == bool(others)
        assert len(queue) == len(queued)
        assert queue.count_partners({r.pair_key for r in taken}) == sum(
            1 for r in queued if r.pair_key in {t.pair_key for t in taken}
        )
    assert sorted(r.req_id for r in queue.drain()) == sorted(r.req_id for r in queued)
