"""supervisor/tlsmodule.py: is tls.ko there."""

from __future__ import annotations

from tlshd.supervisor.tlsmodule import tls_module_present


def test_tls_module_markers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert not tls_module_present((str(tmp_path / "missing"),))
    assert tls_module_present((str(tmp_path),))
