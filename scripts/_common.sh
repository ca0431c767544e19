# shellcheck shell=bash
# Shared helpers for the ucxkv launch scripts; sourced, not run.
#
# Environment (defaults in brackets; every script documents the ones it uses):
#   PYTHON            [python3]  interpreter with vLLM and ucxkv importable
#   MODEL             [unset]    model path or name; unset: build a tiny random model
#   MODEL_DIR         [${TMPDIR:-/tmp}/ucxkv-tiny-model]  where the tiny model goes
#   DTYPE             [float32]  vLLM --dtype (use auto/bfloat16 for real models on GPU)
#   MAX_MODEL_LEN     [2048]     vLLM --max-model-len
#   ENFORCE_EAGER     [1]        1: pass --enforce-eager; 0: let vLLM compile / capture graphs
#   KV_CONNECTOR      [UcxConnector]
#   KV_CONNECTOR_MODULE [kv_transfer.vllm_connector]
#   KV_LOAD_FAILURE_POLICY [unset] "recompute" or "fail" (vLLM's default is fail)
#   KV_EXTRA_CONFIG   [empty]    more kv_connector_extra_config members, as JSON text
#                                without braces, e.g. '"lease_s": 60, "kv_buffer_size": 4e9'
#   VLLM_EXTRA_ARGS   [empty]    extra vLLM server arguments, split on spaces
#   PREFILL_TP, DECODE_TP [1]    --tensor-parallel-size of each side (any pair where one divides
#                                the other and the KV heads split; workers use ports kv_port + rank)
#   PREFILL_DP, DECODE_DP [1]    --data-parallel-size of each side (prefill DP engine i uses
#                                ports kv_port + i*TP ...: leave PREFILL_KV_PORT .. + TP*DP - 1 free)
#   UCX_TLS, UCX_NET_DEVICES [unset] exported to vLLM when set (UCX picks otherwise)
#   VLLM_CPU_KVCACHE_SPACE [1]   GiB of KV cache on CPU builds (ignored on GPU)
#   UCXKV_AUTH, UCXKV_SECRET_FILE [unset] control-plane authentication (docs/reliability.md): a KV
#                                listener on a non-loopback address needs UCXKV_AUTH=secret (and the
#                                same UCXKV_SECRET_FILE on every prefill and decode node) or curve, or
#                                an explicit UCXKV_AUTH=none on a trusted network

UCXKV_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the connector module must import in every vLLM process (front end, EngineCore, workers)
export PYTHONPATH="${UCXKV_REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

PYTHON="${PYTHON:-python3}"
MODEL_DIR="${MODEL_DIR:-${TMPDIR:-/tmp}/ucxkv-tiny-model}"
DTYPE="${DTYPE:-float32}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
ENFORCE_EAGER="${ENFORCE_EAGER:-1}"
KV_CONNECTOR="${KV_CONNECTOR:-UcxConnector}"
KV_CONNECTOR_MODULE="${KV_CONNECTOR_MODULE:-kv_transfer.vllm_connector}"
KV_LOAD_FAILURE_POLICY="${KV_LOAD_FAILURE_POLICY:-}"
KV_EXTRA_CONFIG="${KV_EXTRA_CONFIG:-}"
VLLM_EXTRA_ARGS="${VLLM_EXTRA_ARGS:-}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if [[ -n "${UCX_TLS:-}" ]]; then export UCX_TLS; fi
if [[ -n "${UCX_NET_DEVICES:-}" ]]; then export UCX_NET_DEVICES; fi

ucxkv_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# require_kv_auth KV_HOST: refuse, before vLLM starts, what the KV listener would refuse later:
# a non-loopback address without UCXKV_AUTH (secret, curve, or an explicit none).
require_kv_auth() {
    case "$1" in
        127.*|localhost|::1) return 0 ;;
    esac
    if [[ -z "${UCXKV_AUTH:-}" ]]; then
        ucxkv_log "error: the KV listener would bind $1 (not loopback) without authentication. Set" \
            "UCXKV_AUTH=secret and UCXKV_SECRET_FILE=path (the same file on every prefill and decode node)," \
            "or UCXKV_AUTH=none on a network only the serving cluster reaches (docs/reliability.md)."
        exit 2
    fi
    export UCXKV_AUTH
}

# ensure_model: set MODEL, building the tiny test model when it is unset.
ensure_model() {
    if [[ -z "${MODEL:-}" ]]; then
        ucxkv_log "MODEL unset: building a tiny random model in ${MODEL_DIR}"
        MODEL="$("$PYTHON" -m bench.tiny_model "$MODEL_DIR" | tail -n 1)"
    fi
    export MODEL
}

# kv_config ROLE KV_HOST KV_PORT: the --kv-transfer-config JSON.
kv_config() {
    local role="$1" host="$2" port="$3" extra="" members=""
    if [[ -n "$KV_EXTRA_CONFIG" ]]; then members=",${KV_EXTRA_CONFIG}"; fi
    if [[ -n "$KV_LOAD_FAILURE_POLICY" ]]; then
        extra=",\"kv_load_failure_policy\":\"${KV_LOAD_FAILURE_POLICY}\""
    fi
    printf '{"kv_connector":"%s","kv_connector_module_path":"%s","kv_role":"%s","kv_connector_extra_config":{"kv_host":"%s","kv_port":%d%s}%s}' \
        "$KV_CONNECTOR" "$KV_CONNECTOR_MODULE" "$role" "$host" "$port" "$members" "$extra"
}

# cpu_bind CORES RANKS: VLLM_CPU_OMP_THREADS_BIND for RANKS worker ranks; a CORES without "|"
# is repeated once per rank ("0" for 2 ranks: "0|0", every rank on core 0).
cpu_bind() {
    local cores="$1" ranks="$2" out="$1" i
    if [[ "$cores" != *"|"* ]]; then
        for ((i = 1; i < ranks; i++)); do out+="|${cores}"; done
    fi
    printf '%s' "$out"
}

# vllm_cmd ROLE HTTP_HOST HTTP_PORT KV_HOST KV_PORT [TP [DP]]: fill the VLLM_CMD array.
vllm_cmd() {
    local role="$1" http_host="$2" http_port="$3" kv_host="$4" kv_port="$5" tp="${6:-1}" dp="${7:-1}"
    local -a extra=()
    read -r -a extra <<<"$VLLM_EXTRA_ARGS" || true
    VLLM_CMD=(
        "$PYTHON" -m vllm.entrypoints.openai.api_server
        --model "$MODEL"
        --host "$http_host" --port "$http_port"
        --dtype "$DTYPE"
        --max-model-len "$MAX_MODEL_LEN"
    )
    if [[ "$ENFORCE_EAGER" == "1" ]]; then VLLM_CMD+=(--enforce-eager); fi
    if ((tp > 1)); then VLLM_CMD+=(--tensor-parallel-size "$tp" --distributed-executor-backend mp); fi
    if ((dp > 1)); then VLLM_CMD+=(--data-parallel-size "$dp"); fi
    VLLM_CMD+=(--kv-transfer-config "$(kv_config "$role" "$kv_host" "$kv_port")")
    if ((${#extra[@]})); then VLLM_CMD+=("${extra[@]}"); fi
}

# spawn LOGFILE CMD...: run CMD in the background in its own session (so that
# `kill -- -PID` reaches vLLM's EngineCore and worker processes too, and a
# Ctrl-C in the terminal reaches only this script); sets SPAWNED_PID.
spawn() {
    local logfile="$1"
    shift
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" >"$logfile" 2>&1 </dev/null &
    else
        "$@" >"$logfile" 2>&1 </dev/null &
    fi
    # shellcheck disable=SC2034  # read by the caller
    SPAWNED_PID=$!
}

# wait_health NAME URL TIMEOUT_S [PID [LOG]]: poll URL/health until it answers 200.
wait_health() {
    local name="$1" url="$2" timeout="$3" pid="${4:-}" logfile="${5:-}"
    local deadline=$((SECONDS + timeout))
    ucxkv_log "waiting for ${name} at ${url}/health (up to ${timeout}s)"
    # no proxy: an http_proxy/HTTP_PROXY set for the outside world must not carry cluster-internal
    # health checks (urllib honours it; the proxy's aiohttp client does not)
    until "$PYTHON" -c 'import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    sys.exit(0 if opener.open(sys.argv[1] + "/health", timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)' "$url" 2>/dev/null; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            ucxkv_log "${name} (pid ${pid}) exited before it became healthy"
            if [[ -n "$logfile" && -f "$logfile" ]]; then tail -n 40 "$logfile" >&2; fi
            return 1
        fi
        if ((SECONDS >= deadline)); then
            ucxkv_log "${name} not healthy after ${timeout}s"
            if [[ -n "$logfile" && -f "$logfile" ]]; then tail -n 40 "$logfile" >&2; fi
            return 1
        fi
        sleep 2
    done
    ucxkv_log "${name} is up (${url})"
}
