"""Disaggregation benchmark: one vLLM instance vs 1P1D through ``UcxConnector``.

``python -m bench.disagg`` starts real vLLM servers on this machine (tiny local
model from :mod:`bench.tiny_model`), sends a Poisson load of mixed long and short
streaming completions at several request rates, and reports TTFT and ITL
(p50, p99) per configuration and rate, with the KV-transfer share of TTFT.
See ``bench/disagg/README.md`` and :mod:`bench.disagg.run`.
"""

from bench.disagg.run import (  # noqa: F401
    RequestResult,
    format_table,
    make_workload,
    parse_args,
    parse_connector_stats,
    parse_proxy_prefill,
    percentile,
    summarize_rate,
    to_json,
)
