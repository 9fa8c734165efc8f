#!/usr/bin/env bash
# The pdoflowd package under a real systemd (systemd-nspawn): see nspawn.py.
#
#   tests/systemd/run.sh [pytest options]
#
# Runs as root. PYTHON picks the interpreter that has pdoflowd and pytest
# (default: .venv/bin/python if present, else python3); PDOFLOWD_DEB names
# an already built package instead of building one.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
	if [ -x "$root/.venv/bin/python" ]; then
		python="$root/.venv/bin/python"
	else
		python=python3
	fi
fi
cd "$root"
exec "$python" -m pytest -q -rsx -p no:cacheprovider "$here/nspawn.py" "$@"
