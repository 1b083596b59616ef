"""tlshd/keyformats.py: cryptography's serialization names, without the package."""

from __future__ import annotations

import subprocess
import sys

from cryptography.hazmat.primitives import serialization

from tlshd import keyformats


def test_the_names_are_cryptographys_own() -> None:
    for name in keyformats.__all__:
        assert getattr(keyformats, name) is getattr(serialization, name), name


def test_the_zygotes_imports_leave_the_serialization_package_out() -> None:
    # It imports SSH, PKCS#7/#12 and DH code: 0.3 s of start-up under emulation.
    code = (
        "import sys\n"
        "import tlshd.credentials, tlshd.workers.engine, tlshd.workers.base\n"
        "import tlshd.workers.contexts, tlshd.workers.tlsctx, tlshd.selfcheck\n"
        "from tlshd.openssl_conf import throwaway_identity\n"
        "tlshd.selfcheck.require_bindings()\n"
        "throwaway_identity('probe')\n"
        "print(sorted(m for m in sys.modules if m.startswith("
        "'cryptography.hazmat.primitives.serialization')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
