#!/usr/bin/env bash
# Installs the official A2A Python SDK (a2a-sdk, with its HTTP server extra) and uvicorn from
# PyPI into a virtual environment in the cache, once per version, and prints the path of its
# Python. The A2A interop tests run runner/tests/support/a2a_peer.py with it.
set -euo pipefail
SDK=1.3.0
UVICORN=0.55.0
venv="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/pypi/a2a-sdk-$SDK"
python="$venv/bin/python"
if ! "$python" -c "import a2a.server.routes, uvicorn" 2>/dev/null; then
	command -v python3 >/dev/null || { echo "a2a_peer.sh: python3 is needed to install the A2A Python SDK" >&2; exit 1; }
	rm -rf "$venv"
	python3 -m venv "$venv" >&2 || { echo "a2a_peer.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
	"$venv/bin/pip" install --quiet --disable-pip-version-check "a2a-sdk[http-server]==$SDK" "uvicorn==$UVICORN" >&2
fi
"$python" -c "import a2a.server.routes, uvicorn" || { echo "a2a_peer.sh: the A2A SDK does not import from $venv" >&2; exit 1; }
echo "$python"
