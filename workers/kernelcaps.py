"""What the running kernel's TLS can do, probed once by the privileged supervisor.

Workers have no capabilities and a seccomp filter, so they cannot probe; they
inherit the answers through fork.  This module imports nothing, so that the
supervisor can record them without loading the engine (cryptography) on its
way to READY.
"""

from __future__ import annotations

# Whether the running kernel has TLS_TX_MAX_PAYLOAD_LEN (Linux 6.19).  The
# supervisor probes it once at start (supervisor/tlsmodule.ensure_tls_module),
# before it forks the zygote; until then, and in any process that never
# probed, the answer is "no": never promise a limit the kernel might not enforce.
_caps_tx_records = False


def record_caps_tx_records(supported: bool) -> None:
    global _caps_tx_records
    _caps_tx_records = supported


def caps_tx_records() -> bool:
    return _caps_tx_records
