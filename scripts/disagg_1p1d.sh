#!/usr/bin/env bash
# One prefill + one decode vLLM server and the ucxkv proxy, all on this host.
#
# Usage: scripts/disagg_1p1d.sh      (Ctrl-C stops everything)
#
# Environment (defaults in brackets):
#   PYTHON               [python3]   interpreter with vLLM and ucxkv importable
#   MODEL                [unset]     model path/name; unset: build a tiny random model
#                                    with `$PYTHON -m bench.tiny_model "$MODEL_DIR"`
#   MODEL_DIR            [${TMPDIR:-/tmp}/ucxkv-tiny-model]
#   DTYPE                [float32]   vLLM --dtype (auto/bfloat16 for real models on GPU)
#   MAX_MODEL_LEN        [2048]      vLLM --max-model-len
#   ENFORCE_EAGER        [1]         1: pass --enforce-eager
#   PREFILL_HOST         [127.0.0.1] address of the prefill server and its KV listener
#   PREFILL_HTTP_PORT    [8100]      prefill OpenAI server port
#   PREFILL_KV_PORT      [14579]     prefill (producer) KV listener port
#   DECODE_HOST          [127.0.0.1] address of the decode server
#   DECODE_HTTP_PORT     [8200]      decode OpenAI server port
#   PROXY_HOST           [127.0.0.1] proxy listen address
#   PROXY_PORT           [8000]      proxy port
#   PROXY_POLICY         [round_robin]  or least_loaded
#   PROXY_TIMEOUT        [300]       proxy upstream timeout (s)
#   HEALTH_TIMEOUT       [900]       seconds to wait for each server's /health
#   LOG_DIR              [${TMPDIR:-/tmp}/ucxkv-1p1d]  server and proxy logs
#   KV_CONNECTOR         [UcxConnector]
#   KV_CONNECTOR_MODULE  [kv_transfer.vllm_connector]
#   KV_LOAD_FAILURE_POLICY [unset]   recompute|fail, added to the config when set
#   KV_EXTRA_CONFIG      [empty]     more kv_connector_extra_config members (JSON, no braces)
#   VLLM_EXTRA_ARGS      [empty]     extra arguments for both vLLM servers
#   UCX_TLS, UCX_NET_DEVICES [unset] exported to the servers when set
#   VLLM_CPU_KVCACHE_SPACE [1]       GiB of KV cache per server (CPU builds)
#   UCXKV_AUTH           [unset]     required when PREFILL_HOST is not loopback (see _common.sh)
#   PREFILL_TP, DECODE_TP [1]        --tensor-parallel-size of each server
#   PREFILL_DP, DECODE_DP [1]        --data-parallel-size of each server (prefill's workers serve
#                                    KV on PREFILL_KV_PORT .. PREFILL_KV_PORT + TP*DP - 1)
#   PREFILL_CPUS         [0]         VLLM_CPU_OMP_THREADS_BIND for prefill (CPU builds); one core
#                                    is repeated for every rank ("0" -> "0|0" for TP 2)
#   DECODE_CPUS          [1]         VLLM_CPU_OMP_THREADS_BIND for decode (CPU builds), likewise
#   PREFILL_GPU          [0]         CUDA_VISIBLE_DEVICES for prefill (GPU builds)
#   DECODE_GPU           [1 if 2+ GPUs are visible, else 0]  CUDA_VISIBLE_DEVICES for decode
set -euo pipefail

# shellcheck source=scripts/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PREFILL_HOST="${PREFILL_HOST:-127.0.0.1}"
require_kv_auth "$PREFILL_HOST"
PREFILL_HTTP_PORT="${PREFILL_HTTP_PORT:-8100}"
PREFILL_KV_PORT="${PREFILL_KV_PORT:-14579}"
DECODE_HOST="${DECODE_HOST:-127.0.0.1}"
DECODE_HTTP_PORT="${DECODE_HTTP_PORT:-8200}"
PROXY_HOST="${PROXY_HOST:-127.0.0.1}"
PROXY_PORT="${PROXY_PORT:-8000}"
PROXY_POLICY="${PROXY_POLICY:-round_robin}"
PROXY_TIMEOUT="${PROXY_TIMEOUT:-300}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/ucxkv-1p1d}"
PREFILL_TP="${PREFILL_TP:-1}"
PREFILL_DP="${PREFILL_DP:-1}"
DECODE_TP="${DECODE_TP:-1}"
DECODE_DP="${DECODE_DP:-1}"
PREFILL_CPUS="$(cpu_bind "${PREFILL_CPUS:-0}" $((PREFILL_TP * PREFILL_DP)))"
DECODE_CPUS="$(cpu_bind "${DECODE_CPUS:-1}" $((DECODE_TP * DECODE_DP)))"
PREFILL_GPU="${PREFILL_GPU:-0}"
if [[ -z "${DECODE_GPU:-}" ]]; then
    DECODE_GPU=0
    if command -v nvidia-smi >/dev/null 2>&1 && (($(nvidia-smi -L 2>/dev/null | wc -l) >= 2)); then
        DECODE_GPU=1
    fi
fi

PIDS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        ucxkv_log "stopping ${PIDS[*]}"
        local pid
        for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
        local deadline=$((SECONDS + 20))
        for pid in "${PIDS[@]}"; do
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$LOG_DIR"
ensure_model
ucxkv_log "model: ${MODEL}; logs: ${LOG_DIR}"

vllm_cmd kv_producer "$PREFILL_HOST" "$PREFILL_HTTP_PORT" "$PREFILL_HOST" "$PREFILL_KV_PORT" "$PREFILL_TP" "$PREFILL_DP"
ucxkv_log "prefill: ${VLLM_CMD[*]}"
spawn "$LOG_DIR/prefill.log" \
    env VLLM_CPU_OMP_THREADS_BIND="$PREFILL_CPUS" CUDA_VISIBLE_DEVICES="$PREFILL_GPU" "${VLLM_CMD[@]}"
PREFILL_PID=$SPAWNED_PID
PIDS+=("$PREFILL_PID")

# decode gets the producer's KV listener address too
vllm_cmd kv_consumer "$DECODE_HOST" "$DECODE_HTTP_PORT" "$PREFILL_HOST" "$PREFILL_KV_PORT" "$DECODE_TP" "$DECODE_DP"
ucxkv_log "decode: ${VLLM_CMD[*]}"
spawn "$LOG_DIR/decode.log" \
    env VLLM_CPU_OMP_THREADS_BIND="$DECODE_CPUS" CUDA_VISIBLE_DEVICES="$DECODE_GPU" "${VLLM_CMD[@]}"
DECODE_PID=$SPAWNED_PID
PIDS+=("$DECODE_PID")

PREFILL_URL="http://${PREFILL_HOST}:${PREFILL_HTTP_PORT}"
DECODE_URL="http://${DECODE_HOST}:${DECODE_HTTP_PORT}"
wait_health prefill "$PREFILL_URL" "$HEALTH_TIMEOUT" "$PREFILL_PID" "$LOG_DIR/prefill.log"
wait_health decode "$DECODE_URL" "$HEALTH_TIMEOUT" "$DECODE_PID" "$LOG_DIR/decode.log"

spawn "$LOG_DIR/proxy.log" \
    "$PYTHON" -m kv_transfer.proxy --prefill "$PREFILL_URL" --decode "$DECODE_URL" \
    --host "$PROXY_HOST" --port "$PROXY_PORT" --policy "$PROXY_POLICY" --timeout "$PROXY_TIMEOUT"
PROXY_PID=$SPAWNED_PID
PIDS+=("$PROXY_PID")
PROXY_URL="http://${PROXY_HOST}:${PROXY_PORT}"
wait_health proxy "$PROXY_URL" 60 "$PROXY_PID" "$LOG_DIR/proxy.log"

echo "ucxkv 1P1D ready: proxy ${PROXY_URL} (prefill ${PREFILL_URL}, decode ${DECODE_URL}, logs ${LOG_DIR})"
echo "try: curl -s ${PROXY_URL}/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"${MODEL}\", \"prompt\": \"hello\", \"max_tokens\": 8}'"

# run until a server exits or we are interrupted; the EXIT trap stops the rest
set +e
wait -n
rc=$?
set -e
ucxkv_log "a server exited (status ${rc}); stopping the others"
exit "$rc"
