"""PipeOptions: one frozen object of a pipe's parameters, validated once, passed down unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transport import LocalUsageError, Pipe, PipeListener, PipeOptions


@pytest.mark.parametrize("bad,match", [
    (dict(timeout_s=0), "timeout_s must be a positive"),
    (dict(heartbeat_s=-1), "heartbeat_s must be a positive"),
    (dict(heartbeat_s=5.0, peer_timeout_s=2.0), "must be below peer_timeout_s"),
    (dict(max_tensor_bytes=0), "max_tensor_bytes"),
    (dict(device="nowhere:7"), "is not a device"),
    (dict(auth="secret"), "must be a transport.auth.Auth"),
])
def test_bad_options_are_refused_when_built(bad, match):
    with pytest.raises(LocalUsageError, match=match):
        PipeOptions(**bad)


def test_options_are_frozen_and_keywords_not_given_keep_the_base():
    base = PipeOptions(timeout_s=5.0, device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.timeout_s = 1.0  # type: ignore[misc]
    assert PipeOptions.of(base, timeout_s=None, heartbeat_s=None) is base
    got = PipeOptions.of(base, peer_timeout_s=3.0)
    assert (got.timeout_s, got.peer_timeout_s, base.peer_timeout_s) == (5.0, 3.0, PipeOptions().peer_timeout_s)
    assert PipeOptions.of(None) == PipeOptions()
    with pytest.raises(TypeError, match=r"unknown pipe option\(s\) \['timeout'\]"):
        Pipe.connect("127.0.0.1:1", timeout=5.0)  # type: ignore[call-arg]


def test_listener_hands_its_options_to_every_pipe_and_keywords_override_them():
    opts = PipeOptions(timeout_s=7.0, heartbeat_s=0.2, peer_timeout_s=3.0, max_tensor_bytes=1 << 20)
    with PipeListener("127.0.0.1", 0, options=opts) as lst, Pipe.connect(lst.address, options=opts,
                                                                         timeout_s=9.0) as c:
        s = lst.accept(timeout=30)
        with s:
            assert s.options is opts and s.timeout_s == 7.0 and s.max_tensor_bytes == 1 << 20
            assert c.options == dataclasses.replace(opts, timeout_s=9.0) and c.device == torch.device("cpu")
            c.send_tensor(torch.arange(10))
            assert torch.equal(s.recv_tensor(timeout=30), torch.arange(10))
