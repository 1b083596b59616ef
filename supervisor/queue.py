"""Accepted requests and the queue of those waiting for a worker.

A `Request` owns the supervisor's copy of the accepted socket (`sock`), from
ACCEPT until DONE: the kernel resolves DONE's SOCKFD in the sender's fd table,
so this copy must stay open until DONE is sent.  Only `handoff.complete`
closes it, exactly once, right after DONE.

Queued requests are served oldest deadline first; an expired one is failed
rather than handed to a worker that could not finish in time.
"""

from __future__ import annotations

import heapq
import socket
from dataclasses import dataclass, field

from tlshd.log import HandshakeLogAdapter
from tlshd.params import HandshakeParams
from tlshd.uapi import MsgType


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
    generation: int | None = None
    # Key serials the worker may name: those in ACCEPT plus any the
    # supervisor handed out for this request (psk_search, add_cert).
    known_serials: set[int] = field(default_factory=set)
    completed: bool = False

    def __post_init__(self) -> None:
        params = self.params
        self.known_serials.update(params.peer_identities)
        self.known_serials.update(s for s in (params.cert_serial, params.privkey_serial) if s)

    @property
    def role(self) -> str:
        try:
            return MsgType(self.params.message_type).name.lower()
        except ValueError:
            return f"type{self.params.message_type}"


class DeadlineQueue:
    """Requests waiting for an idle worker, earliest deadline first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Request]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.deadline, request.req_id, request))

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[Request]:
        expired = []
        while self._heap and self._heap[0][0] <= now:
            expired.append(heapq.heappop(self._heap)[2])
        return expired

    def drain(self) -> list[Request]:
        requests = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return requests

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (entry[2] for entry in self._heap)
