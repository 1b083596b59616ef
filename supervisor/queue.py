"""Accepted requests and the queue of those waiting for a worker.

A `Request` owns the supervisor's copy of the accepted socket (`sock`), from
ACCEPT until DONE: the kernel resolves DONE's SOCKFD in the sender's fd table,
so this copy must stay open until DONE is sent.  Only `handoff.complete`
closes it, exactly once, right after DONE.

Queued requests are served oldest deadline first; an expired one is failed
rather than handed to a worker that could not finish in time.

A request may carry a `pair_key`: the TCP connection's (client address,
server address).  When both ends of a connection are local (a loopback NFS
mount), the client's and the server's requests share it, and neither
handshake can progress until both have a worker; the broker uses
`pop_partner` to hand the second half out right after the first, and
`partner_queued` to tell a half whose other half is already waiting here.
"""

from __future__ import annotations

import heapq
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tlshd.log import HandshakeLogAdapter
from tlshd.params import HandshakeParams, role_name
from tlshd.uapi import AuthMode


@dataclass(eq=False)
class Request:
    req_id: int
    params: HandshakeParams
    sock: socket.socket
    peer: str
    accepted_at: float  # time.monotonic()
    deadline: float  # time.monotonic()
    log: HandshakeLogAdapter
    worker_pid: int | None = None
    # Key serials the worker may name: those in ACCEPT plus any the
    # supervisor handed out for this request (psk_search, add_cert).
    known_serials: set[int] = field(default_factory=set)
    completed: bool = False
    handoffs: int = 0  # workers it was handed to (one that died unstarted gives it back)
    # keyservice.RequestScope, made on the worker's first key request
    key_scope: Any = None
    # (client address, server address) of the connection; None if unknown
    pair_key: tuple[object, object] | None = None

    def __post_init__(self) -> None:
        params = self.params
        self.known_serials.update(params.peer_identities)
        self.known_serials.update(s for s in (params.cert_serial, params.privkey_serial) if s)

    @property
    def needs_keys(self) -> bool:
        """The worker will read keys from the kernel's keyrings (through the
        supervisor) for this request: a certificate and its private key, or
        a PSK.  Such a request never goes to a worker host, whose threads
        serve other requests (workers/host.py)."""
        params = self.params
        keyring_keys = params.cert_serial or params.privkey_serial or params.peer_identities
        return bool(keyring_keys or params.keyring) or params.auth_mode == AuthMode.PSK

    @property
    def role(self) -> str:
        return role_name(self.params.message_type)

    @property
    def local_peer(self) -> bool:
        """The peer is this host: the client's address is a loopback one or
        the server's own, so the connection's other half is (or will be) a
        request of ours too (supervisor/broker.py counts such halves apart).
        A connection between two different addresses of this host is not
        recognised as local."""
        if self.pair_key is None:
            return False
        client, server = self.pair_key
        if not (isinstance(client, tuple) and isinstance(server, tuple)):
            return False
        host = client[0]
        return host.startswith(("127.", "::ffff:127.")) or host in ("::1", server[0])


class DeadlineQueue:
    """Requests waiting for an idle worker, earliest deadline first.

    A request taken out of the middle (`pop_partner`) stays in the heap as a
    stale entry until it reaches the top; `_queued` holds the live ones."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Request]] = []
        self._queued: dict[int, Request] = {}  # req_id -> request
        # Both halves of a loopback connection can wait at once: keep each.
        self._by_pair: dict[tuple[object, object], list[Request]] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.deadline, request.req_id, request))
        self._queued[request.req_id] = request
        if request.pair_key is not None:
            self._by_pair.setdefault(request.pair_key, []).append(request)

    def _forget(self, request: Request) -> None:
        del self._queued[request.req_id]
        key = request.pair_key
        if key is not None and request in (halves := self._by_pair.get(key, [])):
            halves.remove(request)
            if not halves:
                del self._by_pair[key]

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._queued.get(heap[0][1]) is not heap[0][2]:
            heapq.heappop(heap)

    def pop(self) -> Request:
        self._drop_stale()
        request = heapq.heappop(self._heap)[2]
        self._forget(request)
        return request

    def pop_partner(
        self,
        pair_keys: Iterable[tuple[object, object] | None],
        allowed: Callable[[Request], bool] = lambda _r: True,
    ) -> Request | None:
        """A queued request that shares a key in `pair_keys` (earliest
        deadline) and that `allowed` accepts, or None."""
        found = [
            r for k in pair_keys if k is not None for r in self._by_pair.get(k, ()) if allowed(r)
        ]
        if not found:
            return None
        request = min(found, key=lambda r: (r.deadline, r.req_id))
        self._forget(request)
        return request

    def count_partners(self, pair_keys: Iterable[tuple[object, object] | None]) -> int:
        """How many queued requests share a key in `pair_keys`."""
        return sum(len(self._by_pair.get(k, ())) for k in pair_keys if k is not None)

    def partner_queued(self, request: Request) -> bool:
        """The other half of `request`'s connection waits here too."""
        if request.pair_key is None:
            return False
        return any(r is not request for r in self._by_pair.get(request.pair_key, ()))

    def pop_first(self, admissible: Callable[[Request], bool]) -> Request | None:
        """The earliest-deadline queued request that `admissible` accepts, or None."""
        self._drop_stale()
        if self._heap and admissible(self._heap[0][2]):
            return self.pop()
        candidates = [r for r in self._queued.values() if admissible(r)]
        if not candidates:
            return None
        request = min(candidates, key=lambda r: (r.deadline, r.req_id))
        self._forget(request)
        return request

    def next_deadline(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[Request]:
        expired = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            expired.append(self.pop())
        return expired

    def drain(self) -> list[Request]:
        requests = sorted(self._queued.values(), key=lambda r: (r.deadline, r.req_id))
        self._heap.clear()
        self._queued.clear()
        self._by_pair.clear()
        return requests

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._queued.values()))
