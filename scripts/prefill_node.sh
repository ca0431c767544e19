#!/usr/bin/env bash
# Multi-node: run the prefill (KV producer) vLLM server on this node, in the foreground.
#
# Usage: PREFILL_HOST=10.0.0.1 MODEL=/models/m scripts/prefill_node.sh
#
# Environment (defaults in brackets):
#   PYTHON               [python3]   interpreter with vLLM and ucxkv importable
#   MODEL                [unset]     model path/name; unset: build the tiny random model
#                                    (deterministic, so every node builds the same one)
#   MODEL_DIR            [${TMPDIR:-/tmp}/ucxkv-tiny-model]
#   DTYPE                [float32]   vLLM --dtype (auto/bfloat16 for real models on GPU)
#   MAX_MODEL_LEN        [2048]      vLLM --max-model-len
#   ENFORCE_EAGER        [1]         1: pass --enforce-eager
#   PREFILL_HOST         [127.0.0.1] this node's address as the decode nodes and the proxy
#                                    reach it: the HTTP server and the KV listener bind here
#   PREFILL_BIND_HOST    [$PREFILL_HOST] HTTP listen address (e.g. 0.0.0.0)
#   PREFILL_HTTP_PORT    [8100]      OpenAI server port
#   PREFILL_KV_PORT      [14579]     KV listener port (kv_connector_extra_config.kv_port)
#   KV_CONNECTOR         [UcxConnector]
#   KV_CONNECTOR_MODULE  [kv_transfer.vllm_connector]
#   KV_LOAD_FAILURE_POLICY [unset]   recompute|fail, added to the config when set
#   KV_EXTRA_CONFIG      [empty]     more kv_connector_extra_config members (JSON, no braces)
#   PREFILL_TP           [1]         --tensor-parallel-size
#   PREFILL_DP           [1]         --data-parallel-size (workers serve KV on PREFILL_KV_PORT
#                                    .. PREFILL_KV_PORT + TP*DP - 1: leave them free)
#   VLLM_EXTRA_ARGS      [empty]     extra vLLM server arguments 
#   UCX_TLS              [unset]     e.g. rc,cuda_copy,cuda_ipc or tcp; exported when set
#   UCX_NET_DEVICES      [unset]     e.g. mlx5_0:1; exported when set
#   VLLM_CPU_KVCACHE_SPACE [1]       GiB of KV cache (CPU builds)
#   UCXKV_AUTH           [unset]     required when PREFILL_HOST is not loopback: secret (with
#                                    UCXKV_SECRET_FILE, the same on the decode nodes), curve, or none
set -euo pipefail

# shellcheck source=scripts/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PREFILL_HOST="${PREFILL_HOST:-127.0.0.1}"
PREFILL_BIND_HOST="${PREFILL_BIND_HOST:-$PREFILL_HOST}"
PREFILL_HTTP_PORT="${PREFILL_HTTP_PORT:-8100}"
PREFILL_KV_PORT="${PREFILL_KV_PORT:-14579}"
require_kv_auth "$PREFILL_HOST"

ensure_model
PREFILL_TP="${PREFILL_TP:-1}"
PREFILL_DP="${PREFILL_DP:-1}"
vllm_cmd kv_producer "$PREFILL_BIND_HOST" "$PREFILL_HTTP_PORT" "$PREFILL_HOST" "$PREFILL_KV_PORT" "$PREFILL_TP" "$PREFILL_DP"
ucxkv_log "prefill node: http://${PREFILL_HOST}:${PREFILL_HTTP_PORT}, KV listener ${PREFILL_HOST}:${PREFILL_KV_PORT}"
ucxkv_log "${VLLM_CMD[*]}"
exec "${VLLM_CMD[@]}"
