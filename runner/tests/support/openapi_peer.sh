#!/usr/bin/env bash
# Installs FastAPI and uvicorn from PyPI into a virtual environment in the cache, once per
# version, and prints the path of its Python. The OpenAPI adapter's tests run
# runner/tests/support/openapi_peer.py with it: a service whose OpenAPI document FastAPI writes
# itself from the code that serves it.
set -euo pipefail
FASTAPI=0.165.0
UVICORN=0.55.0
venv="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/pypi/fastapi-$FASTAPI"
python="$venv/bin/python"
if ! "$python" -c "import fastapi, uvicorn" 2>/dev/null; then
	command -v python3 >/dev/null || { echo "openapi_peer.sh: python3 is needed to install FastAPI" >&2; exit 1; }
	rm -rf "$venv"
	python3 -m venv "$venv" >&2 || { echo "openapi_peer.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
	"$venv/bin/pip" install --quiet --disable-pip-version-check "fastapi==$FASTAPI" "uvicorn==$UVICORN" >&2
fi
"$python" -c "import fastapi, uvicorn" || { echo "openapi_peer.sh: FastAPI does not import from $venv" >&2; exit 1; }
echo "$python"
