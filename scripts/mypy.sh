#!/usr/bin/env bash
# Type-check tlshd/, supervisor/ and workers/ as the modules they are installed
# as: pyproject.toml maps supervisor/ to tlshd.supervisor and workers/ to
# tlshd.workers, a mapping mypy cannot read.  So mypy runs on a tree of
# symlinks laid out like the installed package, and the paths it reports are
# turned back into paths of this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/tlshd"
for file in tlshd/*.py; do
    ln -s "$root/$file" "$tree/tlshd/"
done
ln -s "$root/supervisor" "$tree/tlshd/supervisor"
ln -s "$root/workers" "$tree/tlshd/workers"
cd "$tree"
status=0
"$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
    -p tlshd "$@" >"$tree/out" || status=$?
sed -e 's#^tlshd/supervisor/#supervisor/#' -e 's#^tlshd/workers/#workers/#' "$tree/out"
exit "$status"
