#!/usr/bin/env bash
# Multi-node: run the decode (KV consumer) vLLM server on this node, in the foreground.
#
# Usage: PREFILL_HOST=10.0.0.1 DECODE_HOST=10.0.0.2 MODEL=/models/m scripts/decode_node.sh
#
# Environment (defaults in brackets):
#   PYTHON               [python3]   interpreter with vLLM and ucxkv importable
#   MODEL                [unset]     model path/name; unset: build the tiny random model
#   MODEL_DIR            [${TMPDIR:-/tmp}/ucxkv-tiny-model]
#   DTYPE                [float32]   vLLM --dtype (auto/bfloat16 for real models on GPU)
#   MAX_MODEL_LEN        [2048]      vLLM --max-model-len (same as prefill)
#   ENFORCE_EAGER        [1]         1: pass --enforce-eager
#   DECODE_HOST          [127.0.0.1] this node's address as the proxy reaches it
#   DECODE_BIND_HOST     [$DECODE_HOST] HTTP listen address (e.g. 0.0.0.0)
#   DECODE_HTTP_PORT     [8200]      OpenAI server port
#   PREFILL_HOST         [127.0.0.1] the prefill node's KV listener address ...
#   PREFILL_KV_PORT      [14579]     ... and port (kv_connector_extra_config kv_host/kv_port)
#   KV_CONNECTOR         [UcxConnector]
#   KV_CONNECTOR_MODULE  [kv_transfer.vllm_connector]
#   KV_LOAD_FAILURE_POLICY [unset]   recompute|fail, added to the config when set
#   KV_EXTRA_CONFIG      [empty]     more kv_connector_extra_config members (JSON, no braces)
#   DECODE_TP           [1]         --tensor-parallel-size
#   DECODE_DP           [1]         --data-parallel-size
#   VLLM_EXTRA_ARGS      [empty]     extra vLLM server arguments
#   UCX_TLS              [unset]     exported when set
#   UCX_NET_DEVICES      [unset]     exported when set
#   VLLM_CPU_KVCACHE_SPACE [1]       GiB of KV cache (CPU builds)
#   UCXKV_AUTH           [unset]     what the prefill node uses: secret (with the same
#                                    UCXKV_SECRET_FILE), curve, or none
set -euo pipefail

# shellcheck source=scripts/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DECODE_HOST="${DECODE_HOST:-127.0.0.1}"
DECODE_BIND_HOST="${DECODE_BIND_HOST:-$DECODE_HOST}"
DECODE_HTTP_PORT="${DECODE_HTTP_PORT:-8200}"
PREFILL_HOST="${PREFILL_HOST:-127.0.0.1}"
PREFILL_KV_PORT="${PREFILL_KV_PORT:-14579}"

ensure_model
DECODE_TP="${DECODE_TP:-1}"
DECODE_DP="${DECODE_DP:-1}"
vllm_cmd kv_consumer "$DECODE_BIND_HOST" "$DECODE_HTTP_PORT" "$PREFILL_HOST" "$PREFILL_KV_PORT" "$DECODE_TP" "$DECODE_DP"
ucxkv_log "decode node: http://${DECODE_HOST}:${DECODE_HTTP_PORT}, prefill KV listener ${PREFILL_HOST}:${PREFILL_KV_PORT}"
ucxkv_log "${VLLM_CMD[*]}"
exec "${VLLM_CMD[@]}"
