#!/usr/bin/env bash
# Multi-node: run the ucxkv proxy in the foreground, in front of prefill and decode nodes.
#
# Usage: PREFILL_HOST=10.0.0.1 DECODE_HOST=10.0.0.2 PROXY_HOST=0.0.0.0 scripts/proxy_node.sh
#        PREFILL_URLS=http://p1:8100,http://p2:8100 DECODE_URLS=http://d1:8200 scripts/proxy_node.sh
#
# Environment (defaults in brackets):
#   PYTHON               [python3]   interpreter with ucxkv (and aiohttp) importable
#   PREFILL_HOST         [127.0.0.1]
#   PREFILL_HTTP_PORT    [8100]
#   PREFILL_URLS         [http://$PREFILL_HOST:$PREFILL_HTTP_PORT]  comma list of prefill servers
#   DECODE_HOST          [127.0.0.1]
#   DECODE_HTTP_PORT     [8200]
#   DECODE_URLS          [http://$DECODE_HOST:$DECODE_HTTP_PORT]    comma list of decode servers
#   PROXY_HOST           [127.0.0.1] listen address (0.0.0.0 to serve other hosts)
#   PROXY_PORT           [8000]
#   PROXY_POLICY         [round_robin]  or least_loaded
#   PROXY_TIMEOUT        [300]       seconds per upstream call (for streams: between chunks)
#   PROXY_EXTRA_ARGS     [empty]     more proxy arguments (e.g. "--log-level DEBUG")
#   WAIT_UPSTREAMS       [1]         1: wait until the first prefill and decode URLs answer /health
#   HEALTH_TIMEOUT       [900]       seconds to wait for them
set -euo pipefail

# shellcheck source=scripts/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PREFILL_HOST="${PREFILL_HOST:-127.0.0.1}"
PREFILL_HTTP_PORT="${PREFILL_HTTP_PORT:-8100}"
PREFILL_URLS="${PREFILL_URLS:-http://${PREFILL_HOST}:${PREFILL_HTTP_PORT}}"
DECODE_HOST="${DECODE_HOST:-127.0.0.1}"
DECODE_HTTP_PORT="${DECODE_HTTP_PORT:-8200}"
DECODE_URLS="${DECODE_URLS:-http://${DECODE_HOST}:${DECODE_HTTP_PORT}}"
PROXY_HOST="${PROXY_HOST:-127.0.0.1}"
PROXY_PORT="${PROXY_PORT:-8000}"
PROXY_POLICY="${PROXY_POLICY:-round_robin}"
PROXY_TIMEOUT="${PROXY_TIMEOUT:-300}"
PROXY_EXTRA_ARGS="${PROXY_EXTRA_ARGS:-}"
WAIT_UPSTREAMS="${WAIT_UPSTREAMS:-1}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"

if [[ "$WAIT_UPSTREAMS" == "1" ]]; then
    wait_health prefill "${PREFILL_URLS%%,*}" "$HEALTH_TIMEOUT"
    wait_health decode "${DECODE_URLS%%,*}" "$HEALTH_TIMEOUT"
fi

extra=()
read -r -a extra <<<"$PROXY_EXTRA_ARGS" || true
cmd=("$PYTHON" -m kv_transfer.proxy --prefill "$PREFILL_URLS" --decode "$DECODE_URLS"
    --host "$PROXY_HOST" --port "$PROXY_PORT" --policy "$PROXY_POLICY" --timeout "$PROXY_TIMEOUT")
if ((${#extra[@]})); then cmd+=("${extra[@]}"); fi
ucxkv_log "${cmd[*]}"
exec "${cmd[@]}"
