"""Install pure-Python wheels into the running interpreter's environment.

A minimal stand-in for ``pip install --no-deps --no-index`` (pip's start-up
alone costs ~15 s under TCG): unpack into purelib, the ``<name>.data/<scheme>/``
trees where pip puts them (``data``: the environment's prefix, e.g. the man
pages in share/man; ``scripts``, ``purelib``, ``platlib``), write the console
scripts of ``entry_points.txt`` and the RECORD/INSTALLER files.  Run it with
the venv's python: ``/opt/tlshd/bin/python install_wheel.py X.whl...``.
"""

from __future__ import annotations

import configparser
import os
import sys
import sysconfig
import zipfile
from pathlib import Path


def install(wheel: Path) -> list[str]:
    paths = sysconfig.get_paths()
    purelib = Path(paths["purelib"])
    scripts = Path(paths["scripts"])
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        for info in z.infolist():
            top, _, rest = info.filename.partition("/")
            if not top.endswith(".data"):
                z.extract(info, purelib)
                continue
            scheme, _, relative = rest.partition("/")
            if scheme not in ("data", "scripts", "purelib", "platlib") or not relative:
                raise SystemExit(f"{wheel.name}: unsupported {info.filename}")
            target = Path(paths[scheme]) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
    distinfo = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    made = []
    ep = purelib / distinfo / "entry_points.txt"
    if ep.is_file():
        cp = configparser.ConfigParser(delimiters=("=",))
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read(ep)
        for name, target in (
            cp.items("console_scripts") if cp.has_section("console_scripts") else []
        ):
            mod, _, func = target.strip().partition(":")
            path = scripts / name
            path.write_text(
                f"#!{sys.executable}\nimport sys\nfrom {mod} import {func.split('.')[0]}\n"
                f"if __name__ == '__main__':\n    sys.exit({func}())\n"
            )
            os.chmod(path, 0o755)
            made.append(str(path))
    (purelib / distinfo / "INSTALLER").write_text("tlshd-lab\n")
    return made


if __name__ == "__main__":
    for w in sys.argv[1:]:
        print(w, "->", ", ".join(install(Path(w))) or "(no scripts)")
