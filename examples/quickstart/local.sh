#!/usr/bin/env bash
# The quickstart on one machine (`make quickstart`): builds `contextos` and the ops-tools
# stand-in, then runs the checkout-5xx Session from this directory with the scripted model —
# a runbook search, a live status read over MCP, a namespace deletion the policy denies, a
# restart that waits for on-call approval (approved here), a status update, and a validated
# answer — prints and verifies the record, replays it under the same versions (identical) and
# under a stricter candidate policy (the gate fails, with the divergence report).
#
# Everything stays on loopback; records go to .contextos/quickstart (recreated on every run).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo="${CARGO:-cargo}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building contextos and the ops-tools stand-in (a cold build takes several minutes)"
"$cargo" build --locked -q -p contextos-runner --bin contextos --example ops_tools
contextos="$target/debug/contextos"

data="$root/.contextos/quickstart"
rm -rf "$data"
mkdir -p "$data"
hmac_key="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# The tool service the Agent names (ops-tools.shop-platform.svc) stands in on a loopback port.
coproc TOOLS { exec "$target/debug/examples/ops_tools" --hmac-key "$hmac_key" \
    --effects "$data/effects.jsonl" --exit-on-stdin-eof 2>"$data/ops-tools.log"; }
trap 'kill "$TOOLS_PID" 2>/dev/null || true' EXIT
read -r -u "${TOOLS[0]}" banner
tools_url="${banner#ops-tools listening on }"
echo "ops-tools stand-in on $tools_url"

cli=("$contextos" --data-dir "$data" --tenant shop)
access=(--secret "ops-tools-webhook/hmac-key=$hmac_key"
    --endpoint-override "http://ops-tools.shop-platform.svc:8080=$tools_url"
    --endpoint-override "http://ops-tools.shop-platform.svc:8081=$tools_url")

step "1. run the session (pauses when the restart needs on-call approval)"
code=0
"${cli[@]}" run -f examples/quickstart "${access[@]}" | tee "$data/run.out" || code=$?
if [ "$code" -ne 4 ]; then
    echo "expected the run to pause for approval (exit 4), got exit $code" >&2
    exit 1
fi
call_hash="$(sed -n 's/^  call hash: //p' "$data/run.out")"

step "2. an on-call engineer approves the restart"
"${cli[@]}" approve checkout-5xx --call "$call_hash" --as dana@example.com --group sre-oncall

step "3. resume: the restart runs once, the status update is posted, the answer is validated"
"${cli[@]}" resume checkout-5xx "${access[@]}"
run_id="$("${cli[@]}" records list --session checkout-5xx | awk 'NR == 2 { print $1 }')"

step "4. the DecisionRecord, and its verification"
"${cli[@]}" records show "$run_id"
"${cli[@]}" records verify "$run_id"
echo
echo "effects the tool service performed (one per idempotency key):"
sed 's/^/  /' "$data/effects.jsonl"

step "5. replay under the same versions: byte-identical decisions"
"${cli[@]}" replay --run "$run_id"

step "6. replay under a stricter candidate policy (examples/quickstart/candidates/policy-no-restarts.yaml)"
code=0
"${cli[@]}" replay --run "$run_id" --candidate examples/quickstart/candidates/policy-no-restarts.yaml \
    --report "$data/replay-report.json" || code=$?
if [ "$code" -ne 3 ]; then
    echo "expected the replay gate to fail (exit 3), got exit $code" >&2
    exit 1
fi
echo
echo "The gate failed as it should: promoting that policy would change what this session did."
echo "JSON report: $data/replay-report.json — records: $data"
