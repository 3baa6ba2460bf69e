#!/usr/bin/env bash
# Installs the official A2A JavaScript SDK (@a2a-js/sdk) and Express from the npm registry into
# the cache, once per version, and prints the node_modules directory holding them. The A2A
# interop tests run `node runner/tests/support/a2a_peer.mjs <that directory>`.
set -euo pipefail
SDK=1.3.0
EXPRESS=5.2.1
cache="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/npm/a2a-js-sdk-$SDK-express-$EXPRESS"
modules="$cache/node_modules"
if [ ! -f "$modules/@a2a-js/sdk/package.json" ] || [ ! -f "$modules/express/package.json" ]; then
	command -v npm >/dev/null || { echo "a2a_peer_js.sh: npm is needed to install the A2A JavaScript SDK" >&2; exit 1; }
	mkdir -p "$cache"
	npm install --prefix "$cache" --no-audit --no-fund --no-save --loglevel=error \
		"@a2a-js/sdk@$SDK" "express@$EXPRESS" >&2
fi
[ -f "$modules/@a2a-js/sdk/package.json" ] || { echo "a2a_peer_js.sh: @a2a-js/sdk missing after npm install" >&2; exit 1; }
echo "$modules"
