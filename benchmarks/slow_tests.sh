#!/usr/bin/env bash
# The checks marked slow (left out of the default `python -m pytest -q`): run before a release
# or after touching what they cover (symmetry tables, vendored datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m slow "$@"
