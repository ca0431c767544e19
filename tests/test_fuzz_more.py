"""More fuzzing of what ucxkv reads from the network (hypothesis, bounded).

- The lookup-buffer wire (:mod:`kv_transfer._lookup_wire`): request and answer
  decoders fed random bytes, mutated valid bodies, wrong magic and versions,
  tensor counts that disagree with the request type, lying msgpack lengths and
  deep nesting. Only
  :class:`LookupProtocolError` (``WireVersionError`` included) may come out,
  never another exception, and a frame claiming gigabytes allocates nothing big.
- The proxy's request bodies: the proxy runs as a subprocess over fake upstreams
  (``tests/test_proxy_faults.py``) and gets random and mutated bodies on both
  generate routes. Every answer is a JSON error (4xx/5xx) or a normal answer,
  never a hang or a plain-text 500; afterwards a well-formed request succeeds and
  ``/health`` is 200.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any, Iterator

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from kv_transfer import _lookup_wire as wire
from kv_transfer.errors import LookupProtocolError, WireVersionError
from tests.test_proxy_faults import ProxyProc, Upstreams, get_json, post

# ---------------------------------------------------------------------------
# lookup wire
# ---------------------------------------------------------------------------

def _request(body: bytes, peer: str, n: int | None = None) -> Any:
    """decode_request with the tensor count the request's type carries (unless ``n`` lies)."""
    try:
        typ = type(msgspec.msgpack.decode(body[wire.PREAMBLE_SIZE:], type=wire.Request))
        want = wire.REQUEST_TENSORS[typ]
    except Exception:  # noqa: BLE001 - undecodable: any count will do, decode_request refuses it
        want = 0
    return wire.decode_request(body, want if n is None else n, peer)


_DECODERS = (_request, wire.decode_response)


def _frame(body: bytes, version: int = wire.WIRE_VERSION, magic: bytes = wire.MAGIC) -> bytes:
    return struct.pack("<4sHH", magic, version, 0) + body


def _decode_all(data: bytes) -> None:
    """Run both decoders; only the module's own errors may come out."""
    for dec in _DECODERS:
        try:
            msg = dec(data, "fuzz-peer")
        except LookupProtocolError as exc:
            assert "fuzz-peer" in str(exc)
            continue
        assert isinstance(msg, (wire.Fetch, wire.Stats, wire.Abort, wire.Found, wire.NotFound,
                                wire.StatsReply, wire.AbortReply, wire.ErrorReply))


_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_opt_str = st.none() | st.text(max_size=40)
_messages = st.one_of(
    st.builds(wire.Fetch, _ints, _opt_str, st.booleans(), _ints, st.floats(allow_nan=True)),
    st.builds(wire.Stats, _ints),
    st.builds(wire.Abort, _ints, st.text(max_size=40)),
    st.builds(wire.Found, _ints, _ints, st.lists(_ints, max_size=8), _opt_str),
    st.builds(wire.NotFound, _ints),
    st.builds(wire.StatsReply, _ints, _ints, _ints, _ints),
    st.builds(wire.AbortReply, _ints, _ints),
    st.builds(wire.ErrorReply, _ints, st.text(max_size=40), st.text(max_size=80)),
)


@st.composite
def _mutated(draw: Any) -> bytes:
    """A valid frame, then a few byte-level mutations."""
    msg = draw(_messages)
    data = bytearray(wire.encode(msg))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "append", "preamble"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "preamble" and len(data) >= wire.PREAMBLE_SIZE:
            # a foreign version or reserved bits in an otherwise valid body
            field = draw(st.sampled_from([(4, "<H"), (6, "<H")]))
            struct.pack_into(field[1], data, field[0], draw(st.integers(0, 2 ** (8 * struct.calcsize(field[1])) - 1)))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_lookup_decoders_random_bytes(data: bytes) -> None:
    _decode_all(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_fuzz_lookup_decoders_valid_preamble_random_body(body: bytes, n: int) -> None:
    _decode_all(_frame(body))
    try:
        wire.decode_request(_frame(body), n, "fuzz-peer")
    except LookupProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(_mutated())
def test_fuzz_lookup_decoders_mutated_frames(data: bytes) -> None:
    _decode_all(data)


@settings(max_examples=150, deadline=None)
@given(_messages, st.integers(0, 1 << 16))
def test_lookup_round_trip(msg: Any, n: int) -> None:
    is_request = isinstance(msg, (wire.Fetch, wire.Stats, wire.Abort))
    body = wire.encode(msg)
    if is_request:
        if n != wire.REQUEST_TENSORS[type(msg)]:  # a request carries exactly what its type says
            with pytest.raises(LookupProtocolError, match=f"announces {n} tensors"):
                wire.decode_request(body, n, "p")
        got = wire.decode_request(body, wire.REQUEST_TENSORS[type(msg)], "p")
    else:
        got = wire.decode_response(body, "p")
    if isinstance(msg, wire.Fetch) and msg.wait_s != msg.wait_s:  # NaN != NaN
        assert got.wait_s != got.wait_s
    else:
        assert got == msg


@settings(max_examples=100, deadline=None)
@given(_messages, st.integers(0, 0xFFFF).filter(lambda v: v != wire.WIRE_VERSION))
def test_lookup_foreign_version_names_both(msg: Any, version: int) -> None:
    body = msgspec.msgpack.encode(msg)
    for dec in _DECODERS:
        with pytest.raises(WireVersionError) as ei:
            dec(_frame(body, version=version), "peer-v")
        text = str(ei.value)
        assert f"speaks v{version}" in text and f"we speak v{wire.WIRE_VERSION}" in text and "peer-v" in text


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=4, max_size=4).filter(lambda m: m != wire.MAGIC), st.binary(max_size=40))
def test_lookup_wrong_magic(magic: bytes, body: bytes) -> None:
    for dec in _DECODERS:
        with pytest.raises(LookupProtocolError, match="magic"):
            dec(_frame(body, magic=magic), "p")


@pytest.mark.parametrize("n", [3, 1 << 16, 2**31, 2**32 - 1])
def test_lookup_lying_tensor_count_refused(n: int) -> None:
    with pytest.raises(LookupProtocolError, match=f"announces {n} tensors"):
        wire.decode_request(_frame(msgspec.msgpack.encode(wire.Fetch(1))), n, "p")


@pytest.mark.parametrize("frame", [b"", b"LKB\x00", bytes(3), bytes(16), b"LKB\x00\x02\x00"])
def test_lookup_not_a_message(frame: bytes) -> None:
    for dec in _DECODERS:
        with pytest.raises(LookupProtocolError):
            dec(frame, "p")


def test_lookup_oversized_body_refused() -> None:
    for dec in _DECODERS:
        with pytest.raises(LookupProtocolError, match="oversized"):
            dec(_frame(b"\x00" * (wire.MAX_BODY + 1)), "p")


_VALID_FETCH = msgspec.msgpack.encode(wire.Fetch(1))  # a fixmap: 0x8N, then "type", "Fetch", ...


def _with_extra_field(value: bytes) -> bytes:
    """The valid Fetch with one more (unknown) field holding ``value``."""
    return bytes([_VALID_FETCH[0] + 1]) + _VALID_FETCH[1:] + b"\xa1z" + value


@pytest.mark.parametrize("body", [
    b"\x91" * 60000,                                     # 60000 nested arrays
    b"\x81\xa1a" * 20000,                                # 20000 nested maps
    _with_extra_field(b"\x91" * 60000 + b"\xc0"),        # deep junk in an ignored field
    b"\x81" + b"\x91" * 60000,                           # deep map key
], ids=["arrays", "maps", "ignored-field", "key"])
def test_lookup_deep_nesting_is_a_protocol_error(body: bytes) -> None:
    assert len(body) <= wire.MAX_BODY
    for dec in _DECODERS:
        with pytest.raises(LookupProtocolError):
            dec(_frame(body), "p")


@pytest.mark.parametrize("claim", [
    b"\xdb\xff\xff\xff\xff",          # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",          # bin32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",          # array32 of 4G items
    b"\xdf\xff\xff\xff\xff",          # map32 of 4G pairs
    b"\xc9\xff\xff\xff\xff\x01",      # ext32 of 4 GiB
])
@pytest.mark.parametrize("where", ["top", "field", "request_id"])
def test_lookup_lying_lengths_allocate_nothing_big(claim: bytes, where: str) -> None:
    if where == "top":
        body = claim + b"\x00" * 64
    elif where == "field":
        body = _with_extra_field(claim + b"\x00" * 64)
    else:
        body = b"\x83\xa4type\xa5Abort\xa3seq\x01\xaarequest_id" + claim + b"abc"
    tracemalloc.start()
    try:
        for dec in _DECODERS:
            with pytest.raises(LookupProtocolError):
                dec(_frame(body), "p")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-2, -1, 0, 1, 2]), max_size=6),
       st.integers(0, 12))
def test_fuzz_unflatten_parts(codes: list[int], n_flat: int) -> None:
    flat = [torch.tensor([i]) for i in range(n_flat)]
    try:
        parts = wire.unflatten_parts(codes, flat, "p")
    except LookupProtocolError:
        assert any(c < -2 for c in codes) or wire.count_parts(codes) != n_flat
        return
    assert wire.count_parts(codes) == n_flat and len(parts) == len(codes)
    assert wire.flatten_parts(parts) == (list(codes), flat)


# ---------------------------------------------------------------------------
# the proxy's request bodies
# ---------------------------------------------------------------------------

ROUTES = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def fuzz_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    ups = Upstreams()
    tmp = tmp_path_factory.mktemp("fuzzproxy")
    proxy = None
    try:
        proxy = ProxyProc(["--prefill", ups.prefill(), "--decode", ups.decode(chunks=2),
                           "--timeout", "5"], tmp / "proxy.log")
        yield proxy
        assert proxy.proc.poll() is None, proxy.logs()
    finally:
        if proxy is not None:
            proxy.close()
            assert proxy.proc.returncode == 0, proxy.logs()
            assert "Error handling request" not in proxy.logs(), proxy.logs()
        ups.close()


_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_field_values = st.one_of(
    _json_values,
    st.sampled_from([-1, 0, 2**63, 2**64 + 1, 10**300, -(10**300), 1e308, "1", "true", "false", [], {}, [1, 2]]),
)


@st.composite
def _typed_bodies(draw: Any) -> bytes:
    """JSON objects whose known fields carry random (often wrong) types."""
    body: dict[str, Any] = {}
    for key in ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream",
                "stream_options", "min_tokens", "temperature", "kv_transfer_params", "n"):
        if draw(st.booleans()):
            body[key] = draw(_field_values)
    body.update(draw(st.dictionaries(st.text(max_size=10), _json_values, max_size=3)))
    return json.dumps(body).encode()


_NASTY = [
    b"", b" ", b"{", b"}", b"null", b"[]", b"[1,2]", b'"str"', b"42", b"true", b"{nope", b'{"a":}',
    b'{"prompt": "x", "max_tokens": 1' + b"1" * 5000 + b"}",       # an int past Python's digit limit
    b'{"prompt": "x", "max_tokens": 1e999999}',                   # overflows to inf
    b'{"prompt": "x", "max_tokens": NaN, "temperature": -Infinity}',
    b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",         # too deep for the parser
    b'{"prompt": ' + b"[" * 600 + b"]" * 600 + b"}",               # parses, too deep to copy
    b'{"prompt": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}",
    b'{"prompt": "\xff\xfe\xfd"}',                               # not UTF-8
    b"\xff\xfe{\x00}\x00",                                       # UTF-16-ish
    b'{"prompt": "\\ud800 lone surrogate", "stream": "yes"}',
    b'{"prompt": "x", "stream": 1, "stream_options": 7}',
    b'{"prompt": "x", "stream": true, "messages": {"role": 3}}',
    b'{"prompt": "x"}\x00trailing',
    b'{"prompt": "x", "prompt": ["dup"]}',
]


@st.composite
def _bodies(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["typed", "typed", "mutated", "random", "nasty", "json"]))
    if kind == "typed":
        return draw(_typed_bodies())
    if kind == "json":
        return json.dumps(draw(_json_values)).encode()
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "nasty":
        return draw(st.sampled_from(_NASTY))
    data = bytearray(draw(_typed_bodies()))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


_CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                  "application/json; charset=latin-1", "application/json; charset=no-such-codec",
                  "application/octet-stream", ""]


def _check_answer(status: int, ctype: str, raw: bytes, what: Any) -> None:
    assert 200 <= status < 600, (status, what)
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype, raw[:300], what)
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), raw
        return
    assert status == 200, (status, raw[:300], what)
    if ctype.startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]"), raw
    else:
        assert json.loads(raw)["served_by"] == "decode", raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_bodies(), route=st.sampled_from(ROUTES), ctype=st.sampled_from(_CONTENT_TYPES))
def test_fuzz_proxy_request_bodies(fuzz_proxy: ProxyProc, body: bytes, route: str, ctype: str) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    status, got_ctype, raw = post(fuzz_proxy.port, route, body, headers=headers, timeout=10)
    _check_answer(status, got_ctype, raw, (route, ctype, body[:200]))


@pytest.mark.parametrize("body", _NASTY, ids=[f"nasty{i}" for i in range(len(_NASTY))])
@pytest.mark.parametrize("route", ROUTES)
def test_proxy_nasty_bodies(fuzz_proxy: ProxyProc, body: bytes, route: str) -> None:
    status, ctype, raw = post(fuzz_proxy.port, route, body, timeout=10)
    _check_answer(status, ctype, raw, body[:200])
    if status >= 400:
        assert 400 <= status < 500, (status, raw)  # the client's fault, not a proxy failure


@pytest.mark.parametrize("route", ROUTES)
def test_proxy_nesting_limit(fuzz_proxy: ProxyProc, route: str) -> None:
    from kv_transfer.proxy import _MAX_DEPTH

    def body(depth: int) -> bytes:  # the object itself is level 1
        return b'{"prompt": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    status, _, raw = post(fuzz_proxy.port, route, body(_MAX_DEPTH))
    assert status == 200 and json.loads(raw)["served_by"] == "decode", raw
    status, _, raw = post(fuzz_proxy.port, route, body(_MAX_DEPTH + 1))
    err = json.loads(raw)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and f"deeper than {_MAX_DEPTH}" in err["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_proxy_still_serves_after_fuzz(fuzz_proxy: ProxyProc, route: str) -> None:
    body = {"model": "tiny", "prompt": "hello", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, _, raw = post(fuzz_proxy.port, route, json.dumps(body).encode())
    assert status == 200 and json.loads(raw)["served_by"] == "decode", raw
    status, _, raw = post(fuzz_proxy.port, route, json.dumps({**body, "stream": True}).encode())
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]"), raw
    status, health = get_json(fuzz_proxy.port, "/health")
    assert status == 200 and health["status"] == "ok", health
    assert fuzz_proxy.proc.poll() is None
