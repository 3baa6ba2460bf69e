#!/usr/bin/env bash
# Installs the MCP reference server (@modelcontextprotocol/server-everything) from the npm
# registry into the cache, once per version, and prints the path of its entry point (run it with
# `node <path> stdio` or `node <path> streamableHttp`). Used by `make unit` for the tests of
# `contextos audit --mcp` and `contextos tools import`.
set -euo pipefail
VERSION=2026.8.31
cache="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/npm/server-everything-$VERSION"
entry="$cache/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
if [ ! -f "$entry" ]; then
	command -v npm >/dev/null || { echo "mcp_everything.sh: npm is needed to install the MCP reference server" >&2; exit 1; }
	mkdir -p "$cache"
	npm install --prefix "$cache" --no-audit --no-fund --no-save --loglevel=error \
		"@modelcontextprotocol/server-everything@$VERSION" >&2
fi
[ -f "$entry" ] || { echo "mcp_everything.sh: $entry missing after npm install" >&2; exit 1; }
echo "$entry"
