#!/usr/bin/env bash
# nbdev-clean and nbdev-export must leave no diff, and README.md must match nbs/index.ipynb.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
snap=$(mktemp -d); trap 'rm -rf "$snap"' EXIT
cp -r nbs slm_research README.md "$snap"/
status=0
$bin/nbdev-clean
diff -r -q "$snap/nbs" nbs || { echo "nbdev-clean changed the notebooks above: run nbdev-clean and commit"; status=1; }
$bin/nbdev-export
diff -r -q -x __pycache__ "$snap/slm_research" slm_research || { echo "nbdev-export changed the package above: slm_research/ is generated, export and commit"; status=1; }
$bin/slm-research docs --no-site >/dev/null
diff -q "$snap/README.md" README.md || { echo "README.md is out of date with nbs/index.ipynb: run make readme and commit"; status=1; }
[ $status = 0 ] && echo "in sync: notebooks clean, package exported, README current"
exit $status
