"""Command line of the lab: ``python3 -m tests.lab {build,demo,shell,run,clean}``."""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from tests.lab.build import LabError, cache_dir, ensure_image, log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.lab", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or refresh the cached kernel/root/initramfs")
    b.add_argument("--refresh", action="store_true", help="re-resolve the newest kernel")
    b.add_argument("--extra", nargs="*", default=[], help="extra Debian packages")
    sub.add_parser("clean", help="remove the whole cache")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.monotonic()
            img = ensure_image(args.extra, refresh=args.refresh)
            log(
                f"image ready in {time.monotonic() - t0:.0f}s: kernel {img.kernel.version}, "
                f"root {img.root}, initramfs {img.initramfs}"
            )
        elif args.cmd == "clean":
            d = cache_dir()
            log(f"removing {d}")
            shutil.rmtree(d, ignore_errors=True)
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
