"""tlshd: a Python implementation of the Linux TLS handshake daemon.

The kernel's net/handshake family asks user space to run a TLS 1.3 handshake
on a socket it already owns; this package accepts the socket, performs the
handshake, programs kernel TLS and reports back.  See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
