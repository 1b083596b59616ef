"""Workers: unprivileged processes that each run exactly one TLS handshake,
forked on request by a per-generation zygote (workers/zygote.py)."""

from __future__ import annotations

# Reserved exit status of a zygote or worker that could not start (e.g. the
# unprivileged user does not exist).  The one definition: the supervisor halts
# on it instead of respawning forever; a death by signal is never a boot error.
WORKER_BOOT_ERROR = 3
