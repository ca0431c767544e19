"""The compiled path's CPython extension (transport/_tag_ext.py) on its own: what it writes and what it refuses.

No endpoint is needed: ``Requests`` of NULL entries, ``fill_window``'s slot words and the argument
checks of every call are plain memory. The transfers themselves are covered by the fast-path tests.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from transport import _ucp_tag
from transport.errors import PeerDeadError

pytestmark = pytest.mark.skipif(_ucp_tag.lib() is None, reason="the compiled path cannot be built here")


def test_requests_start_empty_complete_at_once_and_drop_what_they_keep():
    keep = bytearray(8)
    r = _ucp_tag.NativeRequests(6, "sending 3 tensors to a peer", threading.RLock(), keep)
    assert r.n == 6 and r.pending() == [] and r.status == 0 and r.keep is keep
    assert r.completed is True and r.keep is None  # every entry NULL: nothing in flight
    assert _ucp_tag.NativeRequests(0, "nothing", threading.Lock()).completed is True


def test_a_failure_recorded_while_posting_is_the_first_one_and_names_the_transfer():
    r = _ucp_tag.NativeRequests(2, "sending a tensor to vm:1", threading.RLock())
    r.check_error()
    r.fail(-3)
    r.fail(-2)  # (only the first is kept)
    with pytest.raises(PeerDeadError, match="sending a tensor to vm:1: "):
        r.check_error()
    assert r.status == -3


def test_requests_refuse_a_negative_size():
    with pytest.raises(ValueError):
        _ucp_tag.NativeRequests(-1, "x", threading.Lock())


def test_fill_window_writes_each_slots_tags_frame_expected_bytes_and_out():
    k, words = 3, _ucp_tag.RECV_SLOT_WORDS
    arr = (_ucp_tag.RecvSlot * k)()
    frames = np.zeros((k, 64), dtype=np.uint8)
    blob = b"aaaa" + b"bbbbb" + b"cc"
    outs = [np.zeros(16, dtype=np.uint8) for _ in range(k)]
    base = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value
    mask = (1 << 23) - 1
    _ucp_tag.EXT.fill_window(arr, words, 5 << 24, mask - 1, mask, frames.ctypes.data, 64, blob, [4, 5, 2],
                             [o.ctypes.data for o in outs], [16, 16, 8])
    got = np.frombuffer(arr, dtype=np.uint64).reshape(k, words)
    for i, seq in enumerate([mask - 1, mask, 0]):  # the sequence number wraps under the mask
        tag = (5 << 24) | (seq << 1)
        assert got[i, :8].tolist() == [tag, tag | 1, frames.ctypes.data + 64 * i, 64, base + [0, 4, 9][i],
                                       [4, 5, 2][i], outs[i].ctypes.data, [16, 16, 8][i]]
        assert got[i, 8:].tolist() == [0] * (words - 8)  # length, state, status, request: untouched


@pytest.mark.parametrize("bad, match", [
    (dict(arr_len=1), "more slots than the buffer holds"),
    (dict(expect_lens=[4, 99]), "expect_lens add up to more than expect holds"),
    (dict(out_lens=[1]), "lists of different lengths"),
    (dict(words=4), "fewer than 8 words"),
])
def test_fill_window_refuses_what_would_write_or_read_out_of_bounds(bad: dict, match: str):
    arr = (_ucp_tag.RecvSlot * bad.get("arr_len", 2))()
    frames = np.zeros((2, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        _ucp_tag.EXT.fill_window(arr, bad.get("words", _ucp_tag.RECV_SLOT_WORDS), 0, 0, 1, frames.ctypes.data, 64,
                                 b"x" * 8, bad.get("expect_lens", [4, 4]), [1, 1], bad.get("out_lens", [1, 1]))
    assert np.frombuffer(arr, dtype=np.uint64).tolist() == [0] * (len(arr) * _ucp_tag.RECV_SLOT_WORDS)


def test_the_calls_refuse_malformed_arguments_before_touching_ucx():
    ext = _ucp_tag.EXT
    r = _ucp_tag.NativeRequests(2, "x", threading.Lock())
    with pytest.raises(TypeError):
        ext.post_tensors(1, 1, ((1, b"h", 1, 1, 1),), r)  # a tuple, not a list
    with pytest.raises(TypeError):
        ext.post_tensors(1, 1, [(1, "h", 1, 1, 1)], r)  # a str header
    with pytest.raises(ValueError, match="more sends than"):
        ext.post_tensors(1, 1, [(1, b"h", 1, 1, 1)] * 2, r)
    with pytest.raises(TypeError):
        ext.post_tensor(1, 1, 1, "h", 1, 1, r)  # a str header
    with pytest.raises(TypeError):
        ext.post_tensor(1, 1, 1, b"h", 1, 1)  # no requests
    with pytest.raises(ValueError, match="two entries"):
        ext.post_tensor(1, 1, 1, b"h", 1, 1, _ucp_tag.NativeRequests(1, "x", threading.Lock()))
    with pytest.raises(TypeError):
        ext.send_frame(1, 1, 1, b"h", None, 0)  # six arguments
    with pytest.raises(ValueError, match="fewer than nbytes"):
        ext.send_frame(1, 1, 1, b"h", b"abc", 4, 0)
    with pytest.raises(ValueError, match="nbytes without data"):
        ext.send_frame(1, 1, 1, b"h", None, 4, 0)
    with pytest.raises(ValueError, match="NULL buffer"):
        ext.recv_frame(1, 1, None, 64, 0, None, None, 0)
    with pytest.raises(TypeError):
        ext.recv_frame(1, 1, 1, 64, 0, "expect", None, 0)
    assert r.pending() == [] and r.status == 0
