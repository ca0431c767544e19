"""The Pipe: a one-way, ordered stream of tensors between two processes.

Why one file of ~650 lines: the send and receive halves share one state (the
sequence numbers and tags, the endpoint's single owner, the break and close
rules), which a split would scatter. Accepting many peers is its own module,
:mod:`transport._listener`; the wire format is :mod:`transport._envelope`.

``Pipe.listen`` binds a ZeroMQ control socket and waits for one peer;
``Pipe.connect`` dials it. The handshake swaps UCX worker addresses, so the
data moves over whatever UCX picks (shared memory, cma, TCP, RDMA, cuda_ipc).
Each end may send and receive: the tensors one end sends arrive at the other
in the order sent (each direction is its own FIFO).

Every send is one header frame (:class:`transport._envelope.Header`: a
sequence number, a spec per tensor with dtype, shape, byte count and device,
and for :meth:`Pipe.send_message` the message body) followed by one payload
per tensor too large to ride inside the header, sent straight from the
tensor's memory and received straight into the tensor the receiver allocates
on the device it asked for. ``None`` travels as a spec alone. A message with
N tensors is one header and its payloads, never a header per tensor.

CUDA memory is touched by UCX off the caller's streams, so a send of a CUDA
tensor first waits for the work queued on the calling thread's current stream
of its device (the kernels that wrote it), and a receive into CUDA memory
waits likewise before UCX may write it (``transport._cuda_order``). A received
CUDA tensor is complete in device memory when the receive returns.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from typing_extensions import Unpack

import numpy as np
import torch

from . import _envelope as codec
from . import _cuda_order, _ucp_tag, _wire
from ._control import ClientLink, ControlServer, Link, dial
from ._engine import _FAST_SLICE_NS, LANDED, Arrived, Engine, Failed, Op, _raise_kept, get_engine
from ._options import PipeKeywords, PipeOptions
from ._wire import PROTOCOL_VERSION, Hello, Reject, Welcome

if TYPE_CHECKING:
    from ._rma import MemoryDescriptor, RemoteMemory
from .errors import (LocalUsageError, PeerClosedError, PeerDeadError, PeerError, PeerTimeoutError, RemoteProtocolError,
                     TransportError)

log = logging.getLogger(__name__)

#: A transfer at least this large is waited for as a stream (see transport._engine.Op).
_STREAM_BYTES = 64 * 1024
#: After the peer's Goodbye, a send still waits this long (s) for the peer's close to drain it.
_GOODBYE_DRAIN_S = 1.0

__all__ = ["Pipe", "Handle", "TensorLike"]

TensorLike = Any  # torch.Tensor, numpy.ndarray, cupy.ndarray, or anything with __dlpack__
_SEQ_BITS = 23
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_TAG_BASE_BITS = 40


def _capabilities() -> list[str]:
    caps = ["host"]
    if torch.cuda.is_available():
        caps.append("cuda")
    return caps


def _hello_problem(hello: Hello, service: str) -> Reject | None:
    """The rejection a listener of ``service`` owes this Hello, or None if it may be accepted."""
    if hello.service != service:
        return Reject("service", f"this listener serves {service!r}, not {_wire.clip(hello.service, 40)!r}")
    if not (0 < hello.recv_tag < (1 << _TAG_BASE_BITS)):
        return Reject("malformed", f"recv_tag {hello.recv_tag} out of range")
    return None


def _host_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte memoryview of a contiguous tensor's memory, copied to the host first if it is not there.

    For a CPU tensor it is the tensor's own memory (writable): numpy's view where numpy
    has the dtype (fewer torch calls on the small-message path), else a uint8 byte view.
    A CUDA tensor's bytes are copied to the host (one synchronous device-to-host copy):
    inline bytes travel in the host header frame, and the alternative, a payload message
    of its own sent from device memory, costs a second UCX message and the same copy
    inside UCX (cuda_copy); so the copy stays.
    """
    if t.device.type != "cpu":
        return memoryview(codec.byte_view(t).cpu().numpy())
    try:
        return memoryview(t.numpy()).cast("B")
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, float8), a conj view: through torch
        return memoryview(codec.byte_view(t).numpy())


def _numpy_dtypes() -> dict[str, np.dtype]:
    """The wire dtypes numpy holds with the same torch dtype (bfloat16, complex32 and float8 are not)."""
    out = {}
    for name, dt in codec.DTYPES.items():
        try:
            nd = np.dtype(name)
        except TypeError:
            continue
        if torch.from_numpy(np.empty(0, dtype=nd)).dtype == dt:
            out[name] = nd
    return out


_NP_DTYPES = _numpy_dtypes()


def _copy_inline(t: torch.Tensor, data: memoryview) -> None:
    """Copy a tensor's inline bytes (from its header frame) into ``t``, on any device."""
    if t.device.type == "cpu":
        _host_bytes(t)[:] = data
    else:
        codec.byte_view(t).copy_(torch.frombuffer(data, dtype=torch.uint8))


def _compiled_sendable(obj: TensorLike, cuda: bool) -> torch.Tensor | None:
    """``obj`` as a torch tensor if the compiled path may send its memory as it is: a contiguous CPU
    tensor (or, with ``cuda``, a CUDA one: only as a payload, never copied in C) that is not a lazy
    conj/neg view (such a view's memory is not its values: the ordinary path resolves it); else None."""
    t = obj if type(obj) is torch.Tensor else codec.as_torch(obj)
    if (t.is_cpu or cuda and t.is_cuda) and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t
    return None


def _device_type(t: torch.Tensor) -> str:
    """``t``'s device type as a spec names it (``cpu``, ``cuda``), without making a ``torch.device`` for
    host memory (``t.device`` builds one at each call)."""
    return "cpu" if t.is_cpu else t.device.type


#: msgpack's bytes of each int below 128 (a positive fixint: the byte itself).
_MSGPACK_SMALL = [bytes([i]) for i in range(128)]


def _header_at(seq: int, tail: bytes) -> bytes:
    """The header (msgspec's encoding of a :class:`codec.Header`) of send #``seq`` whose bytes after the
    sequence number are ``tail`` (see :meth:`Pipe._spec_tail`): the array marker, ``seq`` masked as msgpack
    writes an int, then ``tail``."""
    s = seq & _SEQ_MASK
    return b"\x93" + (_MSGPACK_SMALL[s] if s < 128 else _msgpack_uint(s)) + tail


def _msgpack_uint(n: int) -> bytes:
    """A non-negative int below 2**32 in msgpack's shortest form, as msgspec writes it."""
    if n < 128:
        return _MSGPACK_SMALL[n]
    if n < 256:
        return b"\xcc" + bytes([n])
    if n < 65536:
        return b"\xcd" + n.to_bytes(2, "big")
    return b"\xce" + n.to_bytes(4, "big")


def _u32_framed(header: bytes) -> bytes:
    """``header`` behind its little-endian u32 length: a header frame as every sender writes it."""
    return len(header).to_bytes(4, "little") + header


def _refuse_lazy_view(out: torch.Tensor, name: str) -> None:
    """Raise :class:`LocalUsageError` if ``out`` is a lazy conjugate or negative view: its memory does not
    hold its values, so bytes received into it would not read back as sent."""
    if out.is_conj() or out.is_neg():
        raise LocalUsageError(f"{name} is a lazy conjugate or negative view; receive into a tensor that owns "
                              "its values (resolve_conj() / resolve_neg() first)")


def _done_ok(req: Any) -> bool:
    """Whether a header receive completed without error (an error is raised later, by the ordinary path)."""
    try:
        if req.completed:
            req.check_error()
            return True
    except Exception:  # noqa: BLE001 - the slot that finishes it raises it
        pass
    return False


class Handle:
    """A transfer in flight. ``wait()`` returns its result (a tensor, None, or a list)."""

    def __init__(self, pipe: "Pipe", ops: list[Op], what: str):
        self._pipe, self._ops, self._what = pipe, ops, what
        self._result: Any = None
        self._waited = False

    def done(self) -> bool:
        """True once every part of the transfer completed (errors surface in ``wait``)."""
        try:
            return all(op.poll() for op in self._ops)
        except Exception:  # noqa: BLE001
            return True

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the transfer completes, at most ``timeout`` seconds (the pipe's default if None)."""
        if self._waited:
            return self._result
        deadline = time.monotonic() + (self._pipe.timeout_s if timeout is None else timeout)
        self._pipe._wait_ops(self._ops, deadline, self._what)
        self._waited = True
        return self._result


class _SendHandle(Handle):
    """Sends posted through the compiled path in one engine call (see :meth:`Pipe._send_async`): their
    requests in one C array, so ``done()`` is one C call, and so is ``wait()`` once they completed."""

    def __init__(self, pipe: "Pipe", reqs: "_ucp_tag.NativeRequests | None", what: str):
        self._pipe, self._reqs, self._what = pipe, reqs, what
        self._result = None
        self._waited = reqs is None  # everything completed at posting

    def done(self) -> bool:
        return self._reqs is None or self._reqs.completed

    def wait(self, timeout: float | None = None) -> Any:
        if not self._waited:
            pipe, reqs = self._pipe, self._reqs
            assert reqs is not None
            try:
                pipe._engine.wait_sends(reqs, pipe.timeout_s if timeout is None else timeout, self._what, pipe._alive)
            except (PeerError, RemoteProtocolError) as exc:
                pipe._fail(exc, self._what)
            self._waited = True
        return None


class _RecvHandle(Handle):
    """Receives posted by :meth:`Pipe.recv_tensors_async`; ``wait()`` returns the tensors in order."""

    def __init__(self, pipe: "Pipe", slots: list["_RecvSlot"], single: bool, fast: "_FastRecv | None" = None):
        super().__init__(pipe, [], "")  # (no words of its own: its waits name each slot, see Pipe._finish_slot)
        self._slots, self._single, self._fast = slots, single, fast

    def done(self) -> bool:
        if self._fast is not None and not self._fast.handed_over:
            with self._pipe._recv_lock:  # one pass of the compiled path, no spin
                self._pipe._drive_fast(self._fast, self._slots, time.monotonic())
        return all(s.header_op._done and all(op._done for op in s.payload_ops) for s in self._slots)

    def wait(self, timeout: float | None = None) -> Any:
        if not self._waited:
            deadline = time.monotonic() + (self._pipe.timeout_s if timeout is None else timeout)
            self._result = self._pipe._finish_slots(self._slots, deadline, self._fast)
            self._waited = True
        return self._result[0] if self._single else self._result


#: The word of a :class:`_ucp_tag.RecvSlot` that holds its ``state``.
_STATE_WORD = [name for name, _ in _ucp_tag.RecvSlot._fields_].index("state")

#: The header op of a slot whose header the compiled path received and found as expected.
_RECEIVED = Op([], [])
_RECEIVED.poll()


class _FastRecv:
    """Receives into ``out`` tensors that the compiled path (``ukv_recv_tensors``) takes when they are waited on.

    Each slot's header is compared byte for byte with the frame a send of its ``out``'s
    dtype and shape puts on the wire; only then is its payload received into ``out``.
    Whatever the compiled path does not finish (another header, nothing yet) is handed
    over to the ordinary path once (:meth:`Pipe._hand_over`), so every check and error
    is the ordinary one.
    """

    __slots__ = ("arr", "k", "outs", "specs", "seq0", "frames", "expect", "device", "background", "handed_over",
                 "taken")

    def __init__(self, k: int, outs: list[torch.Tensor], specs: list[codec.TensorSpec], seq0: int,
                 frames: np.ndarray, expect: list[bytes], device: torch.device, background: bool):
        self.arr = (_ucp_tag.RecvSlot * k)()
        self.k, self.outs, self.specs, self.seq0, self.frames, self.expect = k, outs, specs, seq0, frames, expect
        self.device, self.background = device, background
        self.handed_over = False
        #: slot -> (its receive, the buffer it lands in) for a message a sweep had parked out of the compiled
        #: receive's reach (:meth:`Pipe._take_parked`), until it completed and its slot moved on
        self.taken: dict[int, tuple[Any, Any]] = {}

    def header(self, i: int) -> codec.Header:
        """The header slot ``i`` expects (the one it received, where it matched)."""
        return codec.Header((self.seq0 + i) & _SEQ_MASK, [self.specs[i]], None)


class _WindowMoved:
    """Completes once a compiled receive window moved on (a slot changed state, or none is left waiting),
    for :meth:`Pipe._await_next` to sleep on in the engine's wait: each poll (by whichever thread
    progressed the worker, engine lock held) takes the window one pass further without progressing
    (``ukv_recv_tensors`` with no spin, and :meth:`Pipe._take_parked`), so a message that arrives is
    taken at once. Quacks like a ucxx request for :class:`Op`; a closed endpoint completes it with
    :class:`PeerDeadError`."""

    __slots__ = ("_pipe", "_fb", "_slots", "_what", "_error")

    def __init__(self, pipe: "Pipe", fb: _FastRecv, slots: list["_RecvSlot"], what: str):
        self._pipe, self._fb, self._slots, self._what = pipe, fb, slots, what
        self._error: PeerDeadError | None = None

    @property
    def completed(self) -> bool:
        pipe, fb = self._pipe, self._fb
        eng = pipe._engine
        with eng._lock:
            if pipe._ep_closed:
                self._error = PeerDeadError(f"{self._what}: the endpoint was closed")
                return True
            open_, moved = pipe._fast_pass(fb, self._slots, 0)
        return moved or not open_

    def check_error(self) -> None:
        if self._error is not None:
            _raise_kept(self._error)  # (polled again by every waiter: a copy, as ProbedRecv raises its own)


class _RecvSlot:
    """State of one posted receive: its header op and, once known, its payload op.

    A slot of a :class:`_FastRecv` has no header op until the batch is handed over.
    """

    __slots__ = ("seq", "header_op", "payload_ops", "tensors", "header", "batch", "message", "refused")

    def __init__(self, seq: int, header_op: Op | None, message: bool = False):
        self.seq, self.header_op, self.message = seq, header_op, message
        self.batch = False  # posted by recv_tensors_async (several batches may be pending)
        self.payload_ops: list[Op] = []
        self.tensors: list[torch.Tensor | None] = []
        self.header: codec.Header | None = None
        self.refused: str | None = None  # a message announcing more tensors than the receiver accepts

    @property
    def tensor(self) -> torch.Tensor | None:
        return self.tensors[0] if self.tensors else None


class Pipe:
    """One end of a tensor pipe. Build with :meth:`listen` or :meth:`connect`."""

    def __init__(self, *, name: str | None, options: PipeOptions):
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.options = options
        self.timeout_s = float(options.timeout_s)
        self.device = torch.device(options.device)
        self.max_tensor_bytes = int(options.max_tensor_bytes)
        self._engine: Engine = get_engine()
        self._recv_tag = secrets.randbits(_TAG_BASE_BITS) | 1
        # our receive tags are live from now until the endpoint closes (or this object goes):
        # the engine drops whatever arrives on any other tag (see Engine.own)
        recv_range = (self._tag(self._recv_tag, 0, False), _SEQ_BITS + 1)
        self._engine.own(*recv_range)
        self._disown = weakref.finalize(self, self._engine.disown, *recv_range)
        self._send_tag: int | None = None
        self._ep: Any = None
        self._ep_lock = threading.Lock()
        self._ep_closed = False
        #: Called (engine lock held) right after the endpoint closed: RMA remote keys unpacked on it.
        self._ep_users: list[Any] = []
        self._link: Link | None = None
        self._server: ControlServer | None = None
        self._owns_server = True
        self._connected = threading.Event()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()
        self._send_seq = 0
        self._recv_seq = 0
        self._slots: list[_RecvSlot] = []
        self._broken: str | None = None
        self._recv_refused: str | None = None  # recv_message refused an envelope unreceived: out of step
        #: the compiled receives' header frames (a row each), reused from receive to receive (see _frames)
        self._rx_frames: np.ndarray | None = None
        self._specs: dict[tuple[torch.dtype, torch.Size, bool, str], codec.TensorSpec] = {}  # see _wire_spec
        self._tails: dict[int, tuple[codec.TensorSpec, bytes]] = {}  # see _payload_bytes
        #: dtype and shape of the last tensor recv_tensor decoded here without out, riding inline, for the host
        self._guess: tuple[torch.dtype, torch.Size] | None = None
        self._closed = False
        self.address = ""
        self.peer = "(not connected)"
        self._what_send: str | None = None  # a send's words for errors, per peer (see _send_payload_async)
        #: (dtype, shape, header bytes after seq, nbytes) of the last host tensor _send_payload_async sent
        self._pay_memo: tuple[torch.dtype, torch.Size, bytes, int] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- construction ----------------------------------------------------
    @classmethod
    def listen(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        options: PipeOptions | None = None,
        **keywords: Unpack[PipeKeywords],
    ) -> "Pipe":
        """Listen on ``host:port`` (port 0 picks a free one, see ``.address``) for one peer.

        Returns at once; the first send or receive waits (up to ``timeout_s``)
        for the peer to connect, or call :meth:`wait_connected`. ``options``
        (:class:`PipeOptions`) holds every parameter; the keywords, when given,
        override it (``auth``: :class:`transport.auth.Auth`, None reads ``UCXKV_AUTH``).
        """
        opts = PipeOptions.of(options, **keywords)
        self = cls(name=name, options=opts)
        self._server = ControlServer(host, port, self._on_hello, options=opts, name="pipe")
        self.address = self._server.address
        log.info("pipe %s listening on %s", self.name, self.address)
        return self

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        name: str | None = None,
        options: PipeOptions | None = None,
        service: str = "pipe",
        meta: dict[str, str] | None = None,
        **keywords: Unpack[PipeKeywords],
    ) -> "Pipe":
        """Connect to a listening pipe (or :class:`PipeListener` of ``service``) at ``host:port``.

        Raises :class:`PeerTimeoutError` if nothing answers, :class:`PeerRejectedError`
        if the listener refuses (busy, wrong service or version, authentication).
        ``options`` (:class:`PipeOptions`) holds every parameter; the keywords, when
        given, override it (``auth``: :class:`transport.auth.Auth`, None reads
        ``UCXKV_AUTH``, is how we prove who we are).
        """
        opts = PipeOptions.of(options, **keywords)
        self = cls(name=name, options=opts)
        hello = Hello(role="pipe", name=self.name, worker_address=self._engine.address,
                      recv_tag=self._recv_tag, capabilities=_capabilities(), service=service, meta=dict(meta or {}))
        link, welcome = dial(address, hello, options=opts)
        try:
            if not 0 < welcome.recv_tag < (1 << _TAG_BASE_BITS):
                raise RemoteProtocolError(f"{address} sent recv_tag {welcome.recv_tag} out of range")
            self._attach(link, welcome.worker_address, welcome.recv_tag, dialled=True)
        except BaseException:
            link.close("endpoint creation failed")
            raise
        self.address = address
        return self

    def _on_hello(self, hello: Hello, link: Link) -> Welcome | Reject:
        bad = _hello_problem(hello, "pipe")
        if bad is not None:
            return bad
        if self._connected.is_set() or self._closed:
            return Reject("busy", f"pipe {self.name} already has a peer ({self.peer})")
        self._attach(link, hello.worker_address, hello.recv_tag)
        return Welcome(role="pipe", name=self.name, worker_address=self._engine.address,
                       recv_tag=self._recv_tag, capabilities=_capabilities())

    def _attach(self, link: Link, worker_address: bytes, send_tag: int, dialled: bool = False) -> None:
        self.peer = link.peer
        self._what_send = None  # (built on the first send)
        self._pay_memo = None  # (with the words, which name the peer)
        self._ep = self._engine.connect(worker_address, link.peer)
        # the dialler waits for its endpoint's wireup (a tracked flush on both sides left 5 of 10 idle
        # connections with a socket armed for writing, a tracked flush on the dialler's side 10 of 10)
        self._engine.settle(self._ep, link.peer, wait_s=self.options.timeout_s if dialled else None,
                            alive=link.problem)
        self._link, self._send_tag = link, send_tag
        link.on_problem = self._engine.wake_waiters  # a Goodbye or a silent peer ends this pipe's waits at once
        self._connected.set()
        log.info("pipe %s connected to %s", self.name, self.peer)

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until the peer connected; raises :class:`PeerTimeoutError` otherwise."""
        t = self.timeout_s if timeout is None else timeout
        if not self._connected.wait(t):
            raise PeerTimeoutError(f"pipe {self.name}: no peer connected to {self.address} within {t:.1f}s")

    # -- helpers ---------------------------------------------------------
    def _ready(self, timeout: float | None = None) -> None:
        """Raise unless the pipe is open, unbroken and connected (waiting up to ``timeout`` for a peer)."""
        self._check_usable()
        if not self._connected.is_set():  # (Event.wait costs a lock even when set: ~1 µs per message)
            self.wait_connected(timeout)
            self._check_usable()

    def _check_usable(self) -> None:
        self._engine._check_pid()  # a forked child fails here, before it waits on a lock its parent held at the fork
        if self._closed:
            raise LocalUsageError(f"pipe {self.name} is closed")
        if self._broken is not None:
            raise PeerError(f"pipe {self.name} to {self.peer} is broken: {self._broken}")

    def _alive(self, seq: int | None = None) -> str | None:
        if self._closed:
            return "pipe closed locally"
        if self._link is None:
            return None
        link = self._link
        if link.closed_reason is not None:
            if seq is not None and seq < link.peer_sent:
                return None  # the peer sent this one before saying goodbye: it is on its way
            if seq is None and time.monotonic() - link.closed_at < _GOODBYE_DRAIN_S:
                # a send (or RMA): the closing peer drains what arrived right after its Goodbye,
                # which completes this op, or its endpoint's close fails it; give that a moment
                return None
        return link.problem()

    def _tag(self, base: int, seq: int, payload: bool) -> int:
        return (base << (_SEQ_BITS + 1)) | ((seq & _SEQ_MASK) << 1) | int(payload)

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            log.warning("pipe %s to %s broken: %s", self.name, self.peer, reason)
            self._close_ep()

    def _wait_ops(self, ops: list[Op], deadline: float, what: str, seq: int | None = None) -> None:
        alive = self._alive if seq is None else (lambda: self._alive(seq))
        try:
            for op in ops:
                self._engine.wait(op, deadline, what, alive)
        except (PeerError, RemoteProtocolError) as exc:
            self._fail(exc, what)

    def _fail(self, exc: PeerError | RemoteProtocolError, what: str) -> NoReturn:
        """Break the pipe for a failed wait and raise the error that says whose fault it is."""
        if isinstance(exc, PeerTimeoutError):
            self._break(f"timed out: {what}")
            raise exc
        if isinstance(exc, PeerError):
            if self._closed:  # our own close() interrupted the wait: the caller's doing, not the peer's
                raise LocalUsageError(f"pipe {self.name} was closed while {what}") from None
            self._break(str(exc))
            if self._link is not None and self._link.closed_reason is not None:
                raise PeerClosedError(str(exc)) from None
            raise exc
        self._break(str(exc))
        raise exc

    # -- sending ---------------------------------------------------------
    def _post_send(self, objs: Sequence[TensorLike | None], body: bytes | None) -> tuple[list[Any], list[Any], int]:
        """Post one header for ``objs`` (and ``body``), then a payload per tensor that does not ride inline."""
        tensors: list[torch.Tensor | None] = []
        for obj in objs:
            t = None if obj is None else codec.as_torch(obj)
            if t is not None and (t.is_conj() or t.is_neg()):
                t = t.resolve_conj().resolve_neg()  # a lazy view's memory is not its value
            if t is not None and not t.is_contiguous():
                t = t.contiguous()  # the one copy a strided tensor needs
            tensors.append(t)
        # UCX reads device memory off the caller's stream: the kernels that wrote it (and the copies
        # just made) must have run first
        _cuda_order.settle(t.device for t in tensors if t is not None and not t.is_cpu)
        specs = [None if t is None else codec.spec_of(t, False) for t in tensors]
        seq = self._send_seq
        # what is left of the frame once the header is written goes to small tensors, in order
        wire_seq = seq & _SEQ_MASK  # what the receiver checks (it compares its own seq masked alike)
        header_len = codec.header_size(codec.Header(wire_seq, specs, body))
        inline: list[memoryview] = []
        payloads: list[Any] = []
        keep: list[Any] = []
        nbytes = inlined = 0
        for i, (t, sp) in enumerate(zip(tensors, specs)):
            if t is None or sp is None:
                continue
            nbytes += sp.nbytes
            if codec.rides_inline(inlined + sp.nbytes, header_len):
                inlined += sp.nbytes
                specs[i] = codec.TensorSpec(sp.dtype, sp.shape, sp.nbytes, sp.device, True)
                if sp.nbytes:
                    inline.append(_host_bytes(t))
            elif sp.nbytes:
                buf = codec.ucx_buffer(t)
                payloads.append(buf)
                keep += [t, buf]
        frame = np.empty(codec.HEADER_FRAME_SIZE, dtype=np.uint8)
        used = codec.encode_header(memoryview(frame), codec.Header(wire_seq, specs, body), inline)
        keep.append(frame)
        # the header takes seq, payload j takes seq + j: a send spans max(1, payloads) sequence numbers
        self._send_seq += max(1, len(payloads))
        out = [self._engine.tag_send(self._ep, frame[:used], self._tag(self._send_tag, seq, False))]
        for j, buf in enumerate(payloads):
            out.append(self._engine.tag_send(self._ep, buf, self._tag(self._send_tag, seq + j, True)))
        return out, keep, nbytes

    def _compiled_send(self, objs: Sequence[TensorLike | None], body: bytes | None, seq: int
                       ) -> tuple[bytes, torch.Tensor, int] | None:
        """What send #``seq`` of ``objs`` puts on the wire through the compiled path, as :meth:`_post_send`
        would: its header (the one spec, not inline), the tensor and its byte count; None where the path
        does not apply (a message, several tensors, None, a tensor :func:`_compiled_sendable` refuses,
        or one small enough to ride inline)."""
        if body is not None or len(objs) != 1 or objs[0] is None:
            return None
        t = _compiled_sendable(objs[0], self._engine.tag_fast_cuda)
        if t is None:
            return None
        nbytes = t.nbytes
        header = self._payload_header_bytes(t.dtype, t.shape, nbytes, seq, _device_type(t))
        return None if header is None else (header, t, nbytes)

    def _post_compiled(self, sends: list[tuple[bytes, torch.Tensor, int]], background: bool, what: str
                       ) -> "_ucp_tag.NativeRequests | None":
        """Post :meth:`_compiled_send`'s ``sends`` (built for the next sequence numbers) in one engine call
        (``_send_lock`` held): each header frame on its ``seq``, the tensor's memory, in place, on ``seq``
        with the payload bit. Returns the requests still in flight, or None. (:meth:`_send_payload_async` does
        the same for one tensor, written out: keep the two alike.)"""
        if self._engine.tag_fast_cuda:  # (else every tensor here is a host one: no walk on the host path)
            _cuda_order.settle(t.device for _, t, _ in sends if not t.is_cpu)  # see _post_send
        seq, base = self._send_seq, self._send_tag
        posts = [(self._tag(base, seq + k, False), header, self._tag(base, seq + k, True), t.data_ptr(), nbytes)
                 for k, (header, t, nbytes) in enumerate(sends)]
        self._send_seq = seq + len(sends)
        self.bytes_sent += sum(n for _, _, n in sends)
        keep = sends[0][1] if len(sends) == 1 else [t for _, t, _ in sends]
        return self._engine.send_tensors(self._ep, posts, keep, what, self._ep_open, background)

    def _send_async(self, sends: Sequence[tuple[Sequence[TensorLike | None], bytes | None]], background: bool,
                    what: str) -> Handle:
        self._ready()
        requests: list[Any] = []
        keep: list[Any] = []
        total = streamed = 0
        fast = self._engine.tag_fast is not None
        with self._send_lock:
            if fast:  # every send a bare payload tensor: one engine call, one C array of requests
                seq, compiled = self._send_seq, []
                for k, (objs, body) in enumerate(sends):
                    c = self._compiled_send(objs, body, seq + k)
                    if c is None:
                        break
                    compiled.append(c)
                else:
                    return _SendHandle(self, self._post_compiled(compiled, background, what), what)
            for objs, body in sends:  # the others in order; a bare payload tensor still through the helper
                c = self._compiled_send(objs, body, self._send_seq) if fast else None
                if c is not None:
                    reqs = self._post_compiled([c], False, what)
                    requests += [] if reqs is None else [reqs]
                    streamed += c[2]
                    continue
                r, k, n = self._post_send(objs, body)
                requests += r
                keep += k
                total += n
        self.bytes_sent += total
        op = Op(requests, keep, stream=total + streamed >= _STREAM_BYTES)
        if background:  # a caller that waits at once progresses it itself (no lock/GIL contention)
            self._engine.track(op)
        return Handle(self, [op], what)

    def send_tensors_async(self, tensors: Sequence[TensorLike | None], _background: bool = True) -> Handle:
        """Start sending ``tensors`` in order; return a :class:`Handle` (``wait()`` returns None).

        The tensors must not be modified until the handle completes (their memory
        is read in place). Each tensor is its own send (received by one
        :meth:`recv_tensor` each); :meth:`send_message` sends many under one header.
        """
        return self._send_async([([t], None) for t in tensors], _background,
                                f"sending {len(tensors)} tensor(s) to {self.peer}")

    def send_message_async(self, body: bytes, tensors: Sequence[TensorLike | None] = (),
                           _background: bool = True) -> Handle:
        """Start sending ``body`` (a :class:`MessageCodec`-encoded message) and ``tensors`` as one envelope.

        One header describes every tensor (dtype, shape, byte count, device) and
        carries ``body`` and the small tensors; each larger tensor follows as one
        payload straight from its memory. The peer receives it whole with
        :meth:`recv_message`. The tensors must not be modified until the handle completes.
        """
        return self._send_async([(tensors, bytes(body))], _background,
                                f"sending a message with {len(tensors)} tensor(s) to {self.peer}")

    def send_message(self, body: bytes, tensors: Sequence[TensorLike | None] = (),
                     timeout: float | None = None) -> None:
        """Send ``body`` and ``tensors`` as one envelope; returns once the peer has it all (see :meth:`send_message_async`)."""
        body = bytes(body)
        if not self._send_inline([(tensors, body)], timeout):
            self.send_message_async(body, tensors, _background=False).wait(timeout)

    def send_tensor_async(self, tensor: TensorLike | None) -> Handle:
        """Start sending one tensor (or None); see :meth:`send_tensors_async`."""
        h = self._send_payload_async(tensor) if type(tensor) is torch.Tensor else None
        return h if h is not None else self.send_tensors_async([tensor])

    def _send_payload_async(self, t: torch.Tensor) -> "_SendHandle | None":
        """:meth:`send_tensors_async` of ``[t]`` where ``t`` is a tensor the compiled path sends as a
        payload (the tensor of a stream), without its batch layer: a stream's sender runs this once a
        message, and on this VM each Python call it makes costs several times its warm figure
        (docs/bench.md, "Streams at 1 MiB"). None, having sent nothing, for any other tensor.

        A host tensor of the dtype and shape of the last one sent here (:attr:`_pay_memo`) takes the
        shortest way: its header is the memo's bytes after ``seq``, with no spec looked up."""
        eng = self._engine
        memo = self._pay_memo
        if memo is not None and t.dtype is memo[0] and t.is_cpu and t.shape == memo[1] and t.is_contiguous() \
                and not t.is_conj() and not t.is_neg() and eng.tag_fast is not None:
            self._ready()
            with self._send_lock:
                seq, nbytes, what = self._send_seq, memo[3], self._what_send  # (set with the memo)
                tag = self._tag(self._send_tag, seq, False)
                self._send_seq = seq + 1
                self.bytes_sent += nbytes
                return _SendHandle(self, eng.send_tensor(self._ep, tag, _header_at(seq, memo[2]), t.data_ptr(),
                                                         nbytes, t, what, self._ep_open), what)  # type: ignore[arg-type]
        if eng.tag_fast is None or _compiled_sendable(t, eng.tag_fast_cuda) is None:
            return None
        self._ready()
        device = _device_type(t)
        if device != "cpu":
            _cuda_order.settle((t.device,))  # see _post_send
        with self._send_lock:
            seq, nbytes = self._send_seq, t.nbytes
            spec = self._wire_spec(t.dtype, t.shape, nbytes, False, device)
            header = self._payload_bytes(spec, seq)
            if header is None:
                return None
            what = self._what_send
            if what is None:
                what = self._what_send = f"sending a tensor to {self.peer}"
            tail = self._stream_tail(spec) if device == "cpu" else None
            if tail is not None:
                self._pay_memo = (t.dtype, t.shape, tail, nbytes)
            tag = self._tag(self._send_tag, seq, False)
            self._send_seq = seq + 1
            self.bytes_sent += nbytes
            return _SendHandle(self, eng.send_tensor(self._ep, tag, header, t.data_ptr(), nbytes, t, what,
                                                     self._ep_open), what)

    def send_tensors(self, tensors: Sequence[TensorLike | None], timeout: float | None = None) -> None:
        """Send ``tensors`` in order and return once the peer has received them all."""
        tensors = list(tensors)
        if not self._send_inline([([t], None) for t in tensors], timeout):
            self.send_tensors_async(tensors, _background=False).wait(timeout)

    def send_tensor(self, tensor: TensorLike | None, timeout: float | None = None) -> None:
        """Send one tensor (or None); returns once the peer has it. Raises on timeout or a dead peer."""
        if not self._send_inline([([tensor], None)], timeout):
            self.send_tensors_async([tensor], _background=False).wait(timeout)

    def _send_inline(self, sends: Sequence[tuple[Sequence[TensorLike | None], bytes | None]],
                     timeout: float | None) -> bool:
        """Send each of ``sends`` as one header frame with all its tensors inline, one C call each.

        A send is ``(tensors, body)``: body None for a bare tensor (one in the list), else a
        :meth:`send_message` envelope. Through the compiled path (transport._ucp_tag), the
        bytes on the wire are those of :meth:`_post_send` for the same sends, posted under
        one hold of the send lock as it does. Returns False, having sent nothing, where the
        path does not apply to every send: no helper, a CUDA, strided or lazily conjugated
        tensor, or a tensor that would not ride inline by :meth:`_post_send`'s rule.
        """
        eng = self._engine
        if eng.tag_fast is None or not sends:
            return False
        checked: list[tuple[list[codec.TensorSpec | None], bytes | None, int, Any]] = []
        for objs, body in sends:
            specs: list[codec.TensorSpec | None] = []
            data: list[torch.Tensor] = []
            nbytes = 0
            for obj in objs:
                if obj is None:
                    specs.append(None)
                    continue
                t = _compiled_sendable(obj, False)  # (host memory only: the helper copies it into the frame)
                if t is None:
                    return False
                spec = self._wire_spec(t.dtype, t.shape, t.nbytes, True)
                nb = spec.nbytes
                nbytes += nb
                if not codec.rides_inline(nbytes, 0):  # (already too much for any header)
                    return False
                specs.append(spec)
                if nb:
                    data.append(t)
            if len(data) == 1:
                addr: Any = data[0].data_ptr()
            else:  # several (or none): one buffer the helper copies from (the frame's inline part)
                # (host, contiguous, resolved: each tensor's bytes read straight from its memory, ~0.5 µs
                # where _host_bytes' numpy view costs ~1.3)
                addr = b"".join([ctypes.string_at(t.data_ptr(), t.nbytes) for t in data]) if data else None
            checked.append((specs, body, nbytes, addr))
        self._ready()
        what = (f"sending a tensor to {self.peer}" if sends[0][1] is None
                else f"sending a message with {len(sends[0][0])} tensor(s) to {self.peer}")
        pending: list[Any] = []
        with self._send_lock:
            seq = self._send_seq
            headers = []
            for k, (specs, body, nbytes, _) in enumerate(checked):
                header = codec.encode_header_bytes(codec.Header((seq + k) & _SEQ_MASK, specs, body))
                if not codec.rides_inline(nbytes, len(header)):  # all ride inline iff their sum does
                    return False
                headers.append(header)
            for k, (header, (_, _, nbytes, addr)) in enumerate(zip(headers, checked)):
                try:
                    req = eng.send_frame(self._ep, self._tag(self._send_tag, seq + k, False), header, addr, nbytes,
                                         what, self._ep_open)
                except PeerError as exc:
                    self._fail(exc, what)
                self._send_seq = seq + k + 1
                self.bytes_sent += nbytes
                if req is not None:
                    pending.append(req)
        if pending:  # still in flight after one slice: the ordinary wait, with its timeout
            Handle(self, [Op(pending, [])], what).wait(timeout)
        return True

    # -- receiving -------------------------------------------------------
    def _post_recv(self, device: torch.device, out: torch.Tensor | None = None, background: bool = True,
                   message: bool = False, max_tensors: int | None = None,
                   received: tuple[np.ndarray, Any] | None = None, seq: int | None = None,
                   decoded: tuple[codec.Header, list[memoryview | None]] | None = None) -> _RecvSlot:
        """Post the receive of the next header; once it arrived, allocate its tensors and post their payloads.

        ``received``: the header already arrived (the fast path's frame and request); ``decoded``:
        that header, already decoded from its frame (it is checked here as any other). ``seq``: the
        sequence number a :class:`_FastRecv` slot already took (None: the next one).
        """
        landing = device if out is None else out.device
        if landing.type != "cpu":  # UCX writes device memory off the caller's stream: queued readers first
            _cuda_order.settle((landing,))
        if seq is None:
            seq = self._recv_seq
            self._recv_seq += 1
        frame = np.empty(codec.HEADER_FRAME_SIZE, dtype=np.uint8) if received is None else received[0]
        slot_box: list[_RecvSlot] = []
        what = f"{'message' if message else 'tensor'} #{seq} from {self.peer}"

        def on_header() -> None:
            slot = slot_box.pop()  # the op drops this callback once run: no cycle keeps the slot alive
            if decoded is not None:
                h, inline = decoded
            else:  # only the bytes that arrived are parsed (inline bytes included)
                h, inline = codec.decode_header(memoryview(frame)[:header_req.length], self.peer, seq & _SEQ_MASK,
                                                self.max_tensor_bytes)
            if message and h.body is None:
                raise RemoteProtocolError(f"{self.peer} sent a bare tensor where {what} was expected")
            if not message and (h.body is not None or len(h.tensors) != 1):
                raise RemoteProtocolError(f"{self.peer} sent a message of {len(h.tensors)} tensor(s) where "
                                          f"tensor #{seq} was expected")
            slot.header = h
            if message and max_tensors is not None and len(h.tensors) > max_tensors:
                # nothing of it is received: the caller answers and drops the peer (the stream is out of step)
                slot.refused = f"{what} announces {len(h.tensors)} tensors, at most {max_tensors} accepted"
                return
            if message:  # its payloads take the sequence numbers after it (a bare tensor spans one)
                self._recv_seq = seq + max(1, h.payloads)
            # several payloads: the progress thread posts each as its message arrives (the waiter takes
            # them one by one, and a rendezvous not yet posted would wait for the one before it)
            track = background or h.payloads > 1
            j = 0
            for i, (spec, data) in enumerate(zip(h.tensors, inline)):
                if spec is None:
                    slot.tensors.append(None)
                    continue
                t = self._landing(spec, i, what, device, out)
                slot.tensors.append(t)
                self.bytes_received += spec.nbytes
                if not spec.nbytes:
                    continue
                if spec.inline:
                    _copy_inline(t, data)
                    continue
                slot.payload_ops.append(self._post_payload(t, spec.nbytes, seq + j, f"payload {i} of {what}", track))
                j += 1

        header_req = received[1] if received is not None else self._engine.tag_recv(
            self._ep, frame, self._tag(self._recv_tag, seq, False), None, f"header of {what}", self._ep_open)
        slot = _RecvSlot(seq, Op([header_req], [frame], on_header), message)  # (the op keeps its frame)
        slot_box.append(slot)
        if background:
            self._engine.track(slot.header_op)
        return slot

    def _post_payload(self, t: torch.Tensor, nbytes: int, seq: int, what: str, track: bool) -> Op:
        """Receive the payload message ``seq`` (exactly ``nbytes``) into ``t``, starting it at once.

        Called from a header's completion, inside the progress loop: the payload was
        sent right behind its header, so it has usually arrived (for a rendezvous, its
        request to send): it is probed and posted now rather than at the next poll, and
        UCX answers the sender within the same progress pass.
        """
        buf = codec.ucx_buffer(t)
        req = self._engine.tag_recv(self._ep, buf, self._tag(self._recv_tag, seq, True), nbytes, what, self._ep_open)
        op = Op([req], [t, buf], stream=nbytes >= _STREAM_BYTES)
        if track:
            self._engine.track(op)  # which probes it at once too
        else:
            req.completed  # noqa: B018 - the probe posts the receive if the message is there (errors wait for poll)
        return op

    def _landing(self, spec: codec.TensorSpec, i: int, what: str, device: torch.device,
                 out: torch.Tensor | None) -> torch.Tensor:
        """The tensor that receives ``spec`` (tensor ``i`` of ``what``): ``out`` once checked, else a new one."""
        if out is not None:
            if codec.DTYPES[spec.dtype] != out.dtype or list(out.shape) != list(spec.shape):
                raise RemoteProtocolError(
                    f"{self.peer} sent {spec.dtype}{list(spec.shape)} but the receive expected "
                    f"{codec.dtype_name(out.dtype)}{list(out.shape)}")
            return out
        try:
            return torch.empty(spec.shape, dtype=codec.DTYPES[spec.dtype], device=device)
        except (RuntimeError, MemoryError) as exc:  # the peer's claim, not our fault
            raise RemoteProtocolError(
                f"{what} claims {spec.dtype}{spec.shape[:8]} ({spec.nbytes} bytes) for tensor {i}, "
                f"which cannot be allocated on {device}: {codec.clip(str(exc))}") from None

    def _finish_slot(self, slot: _RecvSlot, deadline: float) -> torch.Tensor | None:
        if slot.header_op is _RECEIVED and not slot.payload_ops:  # the compiled path did it all
            return slot.tensor
        what = f"receiving {'message' if slot.message else 'tensor'} #{slot.seq} from {self.peer}"
        self._wait_ops([slot.header_op], deadline, what + " (header)", slot.seq)
        for i, op in enumerate(slot.payload_ops):
            self._wait_ops([op], deadline, what + f" (payload {i})", slot.seq)
        return slot.tensor

    def _finish_slots(self, slots: list[_RecvSlot], deadline: float, fast: _FastRecv | None = None
                      ) -> list[torch.Tensor | None]:
        out = []
        with self._recv_lock:
            if fast is not None and not fast.handed_over:
                self._drive_fast(fast, slots, deadline)
            for s in slots:
                out.append(self._finish_slot(s, deadline))
                self._slots.remove(s)
        return out

    def recv_tensors_async(
        self, n: int | None = None, device: str | torch.device | None = None, out: Sequence[torch.Tensor] | None = None,
        _single: bool = False, _background: bool = True,
    ) -> Handle:
        """Post receives for the next ``n`` tensors; ``wait()`` returns them as a list, in order.

        With ``out``, the i-th tensor lands in ``out[i]`` in place (no allocation, no copy);
        a tensor whose dtype or shape differs from its ``out`` is a :class:`RemoteProtocolError`.
        A ``wait`` that times out breaks the pipe (as every handle's): unlike :meth:`recv_tensor`
        without ``out``, what was posted does not stay posted for a later call. What is posted
        progresses in the background, waited on or not; a caller that waits at once should use
        :meth:`recv_tensors`, which takes CPU ``out`` tensors (and CUDA ones, with ``UCXKV_FAST_PATH_CUDA=1``)
        through the compiled path.
        """
        if out is not None:
            seen: set[int] = set()  # (a window often repeats one buffer: each is checked once)
            for i, o in enumerate(out):
                if id(o) in seen:
                    continue
                seen.add(id(o))
                if not o.is_contiguous():
                    raise LocalUsageError(f"out[{i}] is not contiguous; receive into a contiguous tensor")
                _refuse_lazy_view(o, f"out[{i}]")
            n = len(out)
        if n is None:
            raise LocalUsageError("recv_tensors_async needs n or out")
        self._ready()
        dev = self.device if device is None else torch.device(device)
        with self._recv_lock:
            if any(not sl.batch for sl in self._slots):
                raise LocalUsageError("a recv_tensor that timed out is still pending on this pipe; call recv_tensor first")
            # the compiled receive runs when the batch is waited on, so only for a caller that waits at once
            # (recv_tensors / recv_tensor): a handle the caller keeps must progress in the background
            fast = (self._defer_fast(list(out), dev, _background)
                    if out is not None and n and not _background and not self._slots
                    and self._engine.tag_fast is not None else None)
            slots = (fast[0] if fast is not None else
                     [self._post_recv(dev, None if out is None else out[i], _background) for i in range(n)])
            for sl in slots:
                sl.batch = True
            self._slots.extend(slots)
        return _RecvHandle(self, slots, _single, None if fast is None else fast[1])

    def _payload_header(self, out: torch.Tensor, seq: int) -> tuple[codec.Header, bytes] | None:
        """The header of send #``seq`` of a tensor of ``out``'s device, dtype and shape whose bytes travel as a
        payload, and its frame as on the wire; None where the compiled receive does not apply: such a
        tensor would ride inline, :meth:`_in_place_bytes` refuses ``out``, or the header would be refused
        (a dtype, depth or size the ordinary path rejects with its own error)."""
        spec = self._payload_spec(out)
        body = None if spec is None else self._payload_bytes(spec, seq)
        return None if body is None else (codec.Header(seq & _SEQ_MASK, [spec], None), _u32_framed(body))

    def _payload_bytes(self, spec: codec.TensorSpec, seq: int) -> bytes | None:
        """The header of send #``seq`` of a tensor of ``spec`` sent as a payload, as msgspec encodes it (the
        frame is ``u32 len | those bytes``), or None if such a tensor rides inline instead; the sender's
        header and the receiver's expected frame both come from here. Built from the spec's encoding
        cached without its sequence number: msgpack writes a :class:`codec.Header` as an array whose first
        item is ``seq``, so its bytes are the array's marker, ``seq`` as msgpack writes an int, then the same
        bytes for every ``seq``."""
        body = _header_at(seq, self._spec_tail(spec))
        return None if codec.rides_inline(spec.nbytes, len(body)) else body

    def _stream_tail(self, spec: codec.TensorSpec) -> bytes | None:
        """:meth:`_spec_tail` where a tensor of ``spec`` is a payload at every ``seq`` (the shortest header
        leaves its bytes no inline room), so :func:`_header_at` alone gives its header; else None
        (:meth:`_payload_bytes` decides at each ``seq``)."""
        tail = self._spec_tail(spec)
        return None if codec.rides_inline(spec.nbytes, 2 + len(tail)) else tail

    def _spec_tail(self, spec: codec.TensorSpec) -> bytes:
        """The bytes of a header of one tensor of ``spec`` after its ``seq`` (see :meth:`_payload_bytes`), cached."""
        got = self._tails.get(id(spec))
        if got is None or got[0] is not spec:
            zero = codec.encode_header_bytes(codec.Header(0, [spec], None))
            if zero[:2] != b"\x93\x00":
                raise AssertionError(f"msgspec encoded a header as {zero[:2]!r}..., not an array of three items")
            if len(self._tails) >= 64:
                self._tails.clear()
            got = self._tails[id(spec)] = (spec, zero[2:])  # (the spec held: its id is not reused meanwhile)
        return got[1]

    def _payload_spec(self, out: torch.Tensor) -> codec.TensorSpec | None:
        """The spec a sender writes for a tensor of ``out``'s device, dtype and shape sent as a payload, if a
        compiled receive may land it in ``out`` (see :meth:`_in_place_bytes`; a dtype the transport does
        not carry is None too: the ordinary path raises its own error)."""
        nbytes = self._in_place_bytes(out)
        if nbytes is None:
            return None
        try:
            return self._wire_spec(out.dtype, out.shape, nbytes, False, _device_type(out))
        except LocalUsageError:
            return None

    def _inline_frame(self, out: torch.Tensor, seq: int) -> bytes | None:
        """The frame of send #``seq`` of a CPU tensor of ``out``'s dtype and shape riding inline, up to its
        bytes (``u32 len | header``, as every sender writes it), for a receive into ``out``; None where the
        comparison does not apply: ``out`` is not a contiguous CPU tensor, such a tensor would travel as a
        payload, or the ordinary path would refuse its header (it then raises its own error). (A lazy
        conjugate or negative view was refused before: :meth:`recv_tensor`.)"""
        nbytes = self._in_place_bytes(out) if out.is_cpu else None  # (the helper copies inline bytes in C)
        if nbytes is None or nbytes > codec.INLINE_LIMIT:
            return None
        try:
            spec = self._wire_spec(out.dtype, out.shape, nbytes, True)
        except LocalUsageError:  # a dtype the transport does not carry
            return None
        header = codec.encode_header_bytes(codec.Header(seq & _SEQ_MASK, [spec], None))
        if not codec.rides_inline(spec.nbytes, len(header)):
            return None
        return _u32_framed(header)

    def _in_place_bytes(self, out: torch.Tensor) -> int | None:
        """``out``'s byte count if a compiled receive may land bytes in its memory as they are: a contiguous
        CPU tensor (or CUDA, where :attr:`Engine.tag_fast_cuda`), of a depth and size the ordinary path
        accepts; else None (that path takes it, with its checks and errors)."""
        if not (out.is_cpu or out.is_cuda and self._engine.tag_fast_cuda) or not out.is_contiguous() \
                or out.dim() > codec.MAX_NDIM:
            return None
        nbytes = out.nbytes
        return None if nbytes > self.max_tensor_bytes else nbytes

    def _wire_spec(self, dtype: torch.dtype, shape: torch.Size, nbytes: int, inline: bool,
                   device: str = "cpu") -> codec.TensorSpec:
        """The spec of a tensor on ``device`` (its type: ``cpu``, ``cuda``) of ``dtype`` and ``shape`` (``nbytes``)
        riding inline or sent as a payload, as every sender writes it; cached, as a pipe sees few shapes.
        Raises :class:`LocalUsageError` for a dtype the transport does not carry."""
        key = (dtype, shape, inline, device)
        spec = self._specs.get(key)
        if spec is None:
            spec = codec.TensorSpec(codec.dtype_name(dtype), list(shape), nbytes, device, inline)
            if len(self._specs) >= 64:
                self._specs.clear()
            self._specs[key] = spec
        return spec

    def _payload_header_bytes(self, dtype: torch.dtype, shape: torch.Size, nbytes: int, seq: int,
                              device: str = "cpu") -> bytes | None:
        """The header of send #``seq`` of a tensor on ``device`` (its type) of ``dtype`` and ``shape`` sent as a
        payload, as msgspec encodes it (its spec cached: a stream repeats a few shapes); None if such a tensor
        rides inline instead. Raises :class:`LocalUsageError` for an unsupported dtype."""
        return self._payload_bytes(self._wire_spec(dtype, shape, nbytes, False, device), seq)

    def _defer_fast(self, outs: list[torch.Tensor], device: torch.device, background: bool
                    ) -> tuple[list[_RecvSlot], _FastRecv] | None:
        """Take the next ``len(outs)`` sequence numbers for a :class:`_FastRecv` (``_recv_lock`` held), or
        None, having taken nothing, where the compiled receive does not apply to every ``out``."""
        seq0 = self._recv_seq
        k = len(outs)
        # a window usually repeats one buffer: its spec, address, size, and its header's bytes after seq where
        # such a tensor is a payload at every seq (None: _payload_bytes decides at each)
        seen: dict[int, tuple[codec.TensorSpec | None, int, int, bytes | None]] = {}
        devices: list[torch.device] = []  # of the CUDA outs
        specs: list[codec.TensorSpec] = []
        expect: list[bytes] = []
        addrs: list[int] = []
        lens: list[int] = []
        for i, o in enumerate(outs):
            got = seen.get(id(o))
            if got is None:
                spec = self._payload_spec(o)
                got = seen[id(o)] = (spec, o.data_ptr(), o.nbytes, None if spec is None else self._stream_tail(spec))
                if not o.is_cpu:
                    devices.append(o.device)
            spec, tail = got[0], got[3]
            if tail is not None:  # (what _payload_bytes returns, without its inline check)
                body = _header_at(seq0 + i, tail)
            else:
                body = None if spec is None else self._payload_bytes(spec, seq0 + i)
                if body is None:
                    return None
            specs.append(spec)  # type: ignore[arg-type]
            expect.append(_u32_framed(body))
            addrs.append(got[1])
            lens.append(got[2])
        blob = b"".join(expect)  # every expected frame in one buffer, alive as long as the receive
        if devices:  # UCX writes device memory off the caller's stream: the kernels queued to read these outs first
            _cuda_order.settle(devices)
        frames, base = self._frames(k)
        fb = _FastRecv(k, outs, specs, seq0, frames, [blob], device, background)  # (slot i's frame: row i)
        _ucp_tag.EXT.fill_window(fb.arr, _ucp_tag.RECV_SLOT_WORDS, self._tag(self._recv_tag, 0, False),
                                 seq0, _SEQ_MASK, base, codec.HEADER_FRAME_SIZE, blob, [len(e) for e in expect],
                                 addrs, lens)
        self._recv_seq = seq0 + k
        return [_RecvSlot(seq0 + i, None) for i in range(k)], fb

    def _frames(self, k: int) -> tuple[np.ndarray, int]:
        """At least ``k`` header frames (rows) for a compiled receive, and their address (``_recv_lock`` held).

        The same frames serve every compiled receive of this pipe, one at a time: each runs only
        while no other receive is posted here (``_recv_small``, ``_defer_fast``), holding ``_recv_lock``
        until it is done or handed over, and a hand-over that gives one of them to the ordinary path
        (a header to check, or one still arriving) drops them (the next receive takes new ones), so a frame that
        a posted receive still holds is never written by the next one.
        """
        frames = self._rx_frames
        if frames is None or len(frames) < k:
            frames = self._rx_frames = np.empty((k, codec.HEADER_FRAME_SIZE), dtype=np.uint8)
            self._rx_addr = frames.ctypes.data
        return frames, self._rx_addr

    def _drive_fast(self, fb: _FastRecv, slots: list[_RecvSlot], deadline: float) -> None:
        """Receive ``fb``'s slots through ``ukv_recv_tensors`` (``_recv_lock`` held), in slices of the engine's
        lock, for as long as something moves (then ``UCXKV_SPIN_US`` more), at most until ``deadline``;
        then hand what is left over to the ordinary path (:meth:`_hand_over`), which waits with its
        timeout and liveness checks and raises every error the ordinary path raises.

        A window that is only waiting when its spin ends (each slot done, or waiting for its next
        message to arrive) does not go to the ordinary path: it sleeps in the engine's wait until it
        moves on, then goes on here (:meth:`_await_next`), so a receiver that waits for its sender
        stays on the compiled path. That wait's timeout or dead peer is raised as the ordinary wait
        raises it, after the hand-over."""
        eng = self._engine
        spin = eng._spin_s
        slice_ns = min(_FAST_SLICE_NS, int(spin * 1e9))
        quiet_at = time.monotonic() + spin
        n = 0
        me = eng._hold_lead()  # this spin progresses the worker: no one need sleep on it meanwhile
        try:
            while not self._ep_closed:
                if eng._stash or fb.taken:  # (read without the lock: looked at again under it)
                    open_, moved = self._fast_pass(fb, slots, slice_ns)
                else:  # (the usual case, one call)
                    open_, moved = eng.recv_tensors(fb.arr, fb.k, slice_ns)
                if not open_:  # every slot past the compiled path (done, or left to the ordinary one)
                    break
                now = time.monotonic()
                if moved:
                    quiet_at = now + spin
                elif now >= quiet_at:
                    if now >= deadline:
                        break
                    if me is not None:  # the wait leads by itself, asleep on the worker's fd
                        eng._drop_lead(me)
                        me = None
                    if not self._await_next(fb, slots, deadline):
                        break
                    me = eng._hold_lead()
                    quiet_at = time.monotonic() + spin
                    continue
                if now >= deadline:
                    break
                n += 1
                if not n & 15 and self._alive(slots[0].seq):
                    break  # the ordinary wait raises it
        finally:
            if me is not None:
                eng._drop_lead(me)
            self._hand_over(fb, slots)

    def _fast_pass(self, fb: _FastRecv, slots: list[_RecvSlot], spin_ns: int) -> tuple[int, bool]:
        """One slice of the compiled receive of ``fb`` (:meth:`Engine.recv_tensors`, ``spin_ns`` long; 0: one
        pass, no progress) after taking what a sweep parked for its slots (:meth:`_take_parked`), under one
        hold of the engine's lock; returns (slots still waiting, whether any moved)."""
        eng = self._engine
        with eng._lock:
            took = self._take_parked(fb, slots)
            open_, moved = eng.recv_tensors(fb.arr, fb.k, spin_ns)
        return open_, moved or took

    def _await_next(self, fb: _FastRecv, slots: list[_RecvSlot], deadline: float) -> bool:
        """Sleep in the engine's wait (no CPU) until ``fb`` moves on, if the window is only waiting for a
        message to arrive: every slot done, or waiting for its header or its payload (``_recv_lock`` held).
        False, at once, for a window in any other state: a message in flight that stalled (the ordinary
        wait of its request spins on it in C between its sleeps: measured faster over tcp at 64 MiB than
        this wait, whose polls do not progress), or a slot past the compiled path (another header, a
        failure: handed over, its error comes now). A timeout or a dead peer breaks the pipe and is
        raised as the ordinary receive raises it (:meth:`_wait_ops`)."""
        arr, nxt = fb.arr, -1
        for i in range(fb.k):
            st = arr[i].state
            if st == _ucp_tag.ST_DONE:
                continue
            if st != _ucp_tag.ST_WAIT_HDR and st != _ucp_tag.ST_WAIT_PAY:
                return False
            if nxt < 0:
                nxt = i
        if nxt < 0:
            return False
        seq = slots[nxt].seq
        what = f"receiving tensor #{seq} from {self.peer} " + (
            "(header)" if arr[nxt].state == _ucp_tag.ST_WAIT_HDR else "(payload 0)")
        self._engine._local.spun_at = time.monotonic()  # this thread just spun: the wait sleeps at once
        self._wait_ops([Op([_WindowMoved(self, fb, slots, what)], [])], deadline, what, seq)
        return True

    def _take_parked(self, fb: _FastRecv, slots: list[_RecvSlot]) -> bool:
        """Receive, for the compiled receive, what a sweep moved out of the worker into the engine's stash
        (engine lock held): the compiled receive probes only the worker. A slot whose header or payload
        is parked gets the ordinary receive of that one message (:meth:`Engine.tag_recv`, which takes it
        from the stash) and state ``ST_HDR_TAKEN`` or ``ST_PAY_TAKEN``, which the helper leaves alone; once
        that receive completed, the slot moves on as the helper would have moved it (a header is compared
        with the expected bytes here). Every other slot of the window stays on the compiled path.
        A receive that failed stays in ``fb.taken`` for :meth:`_hand_over`, whose ordinary
        wait raises its error. Returns whether any slot moved."""
        eng, arr, moved = self._engine, fb.arr, False
        stash = eng._stash
        if not stash and not fb.taken:
            return False
        for i in range(fb.k):
            c = arr[i]
            st = c.state
            if st == _ucp_tag.ST_WAIT_HDR and c.hdr_tag in stash:
                buf = fb.frames[i]
                fb.taken[i] = (eng.tag_recv(self._ep, buf, c.hdr_tag, None, f"header of tensor #{slots[i].seq} from "
                                            f"{self.peer}", self._ep_open), buf)
                c.state = _ucp_tag.ST_HDR_TAKEN
            elif st == _ucp_tag.ST_WAIT_PAY and c.pay_tag in stash:
                if stash[c.pay_tag].length != c.out_len:  # left parked for the ordinary path's error, as the helper does
                    c.state, moved = _ucp_tag.ST_PAY_OTHER, True
                    continue
                buf = codec.ucx_buffer(fb.outs[i])
                fb.taken[i] = (eng.tag_recv(self._ep, buf, c.pay_tag, c.out_len, f"payload 0 of tensor "
                                            f"#{slots[i].seq} from {self.peer}", self._ep_open), buf)
                c.state = _ucp_tag.ST_PAY_TAKEN
        for i, (req, buf) in list(fb.taken.items()):
            c = arr[i]
            if c.state not in (_ucp_tag.ST_HDR_TAKEN, _ucp_tag.ST_PAY_TAKEN) or not req.completed:
                continue
            moved = True
            try:
                req.check_error()
            except Exception:  # noqa: BLE001 - raised by the ordinary wait after the hand-over
                c.state = _ucp_tag.ST_HDR_OTHER if c.state == _ucp_tag.ST_HDR_TAKEN else _ucp_tag.ST_FAILED_PAY
                continue
            del fb.taken[i]
            if c.state == _ucp_tag.ST_PAY_TAKEN:
                c.state = _ucp_tag.ST_DONE
                continue
            c.len = n = req.length
            same = n == c.expect_len and bytes(buf[:n]) == ctypes.string_at(c.expect, n)
            c.state = _ucp_tag.ST_WAIT_PAY if same else _ucp_tag.ST_HDR_OTHER
        return moved

    def _hand_over(self, fb: _FastRecv, slots: list[_RecvSlot]) -> None:
        """Turn each slot of ``fb`` into the ordinary path's state for what the compiled path did
        (``_recv_lock`` held): done, a payload in flight, or a header to check (or still to come)
        that :meth:`_post_recv` takes from there."""
        fb.handed_over = True
        eng = self._engine
        lock = eng._lock
        words = np.frombuffer(fb.arr, dtype=np.int64).reshape(fb.k, _ucp_tag.RECV_SLOT_WORDS)
        for i, st in enumerate(words[:, _STATE_WORD].tolist()):
            slot = slots[i]
            if st == _ucp_tag.ST_DONE:  # (the usual case, without the ctypes view of the other cases)
                # (its header is not kept: only a message's is read again, for its body)
                slot.tensors, slot.header_op = [fb.outs[i]], _RECEIVED
                self.bytes_received += fb.outs[i].nbytes
                continue
            c, out, frame = fb.arr[i], fb.outs[i], fb.frames[i]
            what = f"tensor #{slot.seq} from {self.peer}"
            taken = fb.taken.get(i)  # (a receive of a message found parked: its slot is TAKEN, or failed)
            if st in (_ucp_tag.ST_PAY_FLIGHT, _ucp_tag.ST_FAILED_PAY, _ucp_tag.ST_PAY_TAKEN):
                # its header was the one expected: nothing of it is left to check
                slot.header, slot.tensors, slot.header_op = fb.header(i), [out], _RECEIVED
                self.bytes_received += c.out_len
                if taken is not None:
                    slot.payload_ops = [Op([taken[0]], [out, taken[1]], stream=c.out_len >= _STREAM_BYTES)]
                elif st == _ucp_tag.ST_PAY_FLIGHT:
                    req: Any = _ucp_tag.NativeRequest(c.req, f"payload 0 of {what}", lock, keep=out)
                    with lock:
                        eng._draining.append((req, out))  # out outlives the request, whatever its waiter does
                    slot.payload_ops = [Op([req], [out], stream=c.out_len >= _STREAM_BYTES)]
                elif st == _ucp_tag.ST_FAILED_PAY:
                    slot.payload_ops = [Op([Failed(PeerDeadError(
                        f"payload 0 of {what} failed: {_ucp_tag.status_string(c.status)}"))], [])]
                continue
            received: tuple[np.ndarray, Any] | None
            if taken is not None:  # its header's receive, still in flight or failed
                received = (frame, taken[0])
            elif st == _ucp_tag.ST_WAIT_HDR:
                received = None
            elif st == _ucp_tag.ST_HDR_FLIGHT:
                req = _ucp_tag.NativeRequest(c.req, f"header of {what}", lock, c.len, frame)
                with lock:
                    eng._draining.append((req, frame))
                received = (frame, req)
            elif st == _ucp_tag.ST_FAILED_HDR:
                received = (frame, Failed(PeerDeadError(
                    f"header of {what} failed: {_ucp_tag.status_string(c.status)}")))
            elif c.len > c.cap:  # consumed (truncated): the peer broke the frame limit
                received = (frame, Failed(RemoteProtocolError(
                    f"header of {what}: {c.len} bytes arrived, expected at most {c.cap} bytes")))
            else:  # another header than expected, or the expected one whose payload has not come (or differs)
                received = (frame, Arrived(c.len))
            if received is not None:  # its frame goes with it: the next compiled receive takes new ones
                self._rx_frames = None
            new = self._post_recv(fb.device, out, fb.background, received=received, seq=slot.seq)
            new.batch = True
            slots[i] = new
            self._slots[self._slots.index(slot)] = new

    def recv_tensors(self, n: int | None = None, device: str | torch.device | None = None,
                     out: Sequence[torch.Tensor] | None = None, timeout: float | None = None
                     ) -> list[torch.Tensor | None]:
        """Receive the next ``n`` tensors (or ``len(out)``, each landing in its ``out`` in place), in order.

        What :meth:`recv_tensors_async` then ``wait`` does, for a caller that waits at once: into
        CPU ``out`` tensors (CUDA ones too, with ``UCXKV_FAST_PATH_CUDA=1``), through the compiled path. A
        timeout breaks the pipe (see
        :meth:`recv_tensor` with ``out``).
        """
        try:
            return self.recv_tensors_async(n, device, out, _background=False).wait(timeout)
        except PeerTimeoutError as exc:
            if out is None:
                raise
            self._out_timed_out(exc)

    def recv_tensor_async(self, device: str | torch.device | None = None) -> Handle:
        """Post a receive for the next tensor; ``wait()`` returns it (or None)."""
        return self.recv_tensors_async(1, device, _single=True)

    def recv_tensor(
        self, device: str | torch.device | None = None, timeout: float | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Receive the next tensor (or None) onto ``device`` (the pipe's default if None).

        With ``out`` (contiguous, matching dtype and shape) the bytes land in it in place.
        Without it, a tensor small enough to ride inline in its header, received to the host,
        of the dtype and shape of the one before, lands in a new tensor in the compiled
        receive; one of another dtype numpy holds comes back backed by a numpy array (one
        allocation and copy, the cheapest): it owns its memory and shares it like any tensor,
        but its storage cannot be resized (``resize_`` to a larger size raises).

        Without ``out``, a timeout is not fatal: the receive stays posted and the next
        call picks it up, so nothing the peer sends is lost or reordered. With ``out``,
        a timeout breaks the pipe (:class:`PeerTimeoutError` saying so; every later call
        raises :class:`PeerError`): the receive into ``out`` was posted, so the peer's
        bytes could still land in ``out`` after this call returned, and the caller
        cannot know when ``out`` is theirs again unless the receive is cancelled with the endpoint.
        """
        if out is not None:
            _refuse_lazy_view(out, "out")
        fast = self._engine.tag_fast is not None
        try:
            if fast:
                got = None
                seq = self._recv_seq
                if out is None:
                    # most streams repeat a shape: a host tensor of the last small one's lands in C if the
                    # frame is exactly that tensor's (else it is dropped and the frame decoded)
                    guess = self._guess
                    host = self.device if device is None else device
                    if guess is not None and (host == "cpu" or type(host) is torch.device and host.type == "cpu"):
                        dst = torch.empty(guess[1], dtype=guess[0])
                        expect = self._inline_frame(dst, seq)
                        got = self._recv_small(device, timeout, False, None, None,
                                               None if expect is None else (expect, seq, dst))
                    else:
                        got = self._recv_small(device, timeout, False, None, None)
                else:
                    expect = self._inline_frame(out, seq)
                    if expect is not None:  # lands in out in C if the frame is exactly the one expected
                        got = self._recv_small(device, timeout, False, None, out, (expect, seq, out))
                    elif out.is_contiguous() and self._payload_spec(out) is None:  # else a payload, in a window
                        got = self._recv_small(device, timeout, False, None, out)
                if got is not None:
                    return got[1][0]
            if out is not None:  # (with a payload, through the compiled path: see _FastRecv)
                # waited on at once: this thread progresses it (no hand-over to the progress thread)
                return self.recv_tensors_async(out=[out], _single=True, _background=False).wait(timeout)
        except PeerTimeoutError as exc:
            if out is None:
                raise
            self._out_timed_out(exc)
        return self._recv_next(device, timeout, False, None).tensor

    def _out_timed_out(self, exc: PeerTimeoutError) -> NoReturn:
        """Break the pipe for a receive into ``out`` that timed out, and raise the error that says why."""
        reason = (f"{exc}; a receive into out that times out breaks the pipe, which is now unusable: the bytes "
                  f"could still land in out after the call returned, so the receive cannot stay posted")
        if self._broken is None:
            self._break(reason)
        elif self._broken.startswith("timed out"):  # the wait's own break: this says why
            self._broken = reason
        raise PeerTimeoutError(f"pipe {self.name}: {reason}") from None

    def recv_message(self, device: str | torch.device | None = None, timeout: float | None = None,
                     max_tensors: int | None = None) -> tuple[bytes, list[torch.Tensor | None]]:
        """Receive the next :meth:`send_message` envelope: ``(body, tensors)``, tensors on ``device``.

        Every tensor of the envelope is checked against its spec (dtype, shape,
        byte count, this pipe's ``max_tensor_bytes``) before anything is
        allocated. An envelope announcing more than ``max_tensors`` tensors is
        refused unreceived with :class:`RemoteProtocolError`; the pipe can still
        send (to answer) but receives nothing more. A timeout is not fatal, as
        for :meth:`recv_tensor` without ``out``.
        """
        if self._engine.tag_fast is not None:
            got = self._recv_small(device, timeout, True, max_tensors, None)
            if got is not None:
                assert got[0] is not None
                return got[0], got[1]
        slot = self._recv_next(device, timeout, True, max_tensors)
        if slot.refused is not None:
            self._recv_refused = slot.refused
            raise RemoteProtocolError(slot.refused)
        assert slot.header is not None and slot.header.body is not None
        return slot.header.body, slot.tensors

    @property
    def refused(self) -> str | None:
        """Why :meth:`recv_message` refused an envelope unreceived (the pipe then only sends), or None."""
        return self._recv_refused

    def _recv_next(self, device: str | torch.device | None, timeout: float | None, message: bool,
                   max_tensors: int | None) -> _RecvSlot:
        """Wait for the next posted (or newly posted) receive of the kind asked; it stays posted on a timeout."""
        self._ready(timeout)
        if self._recv_refused is not None:
            raise RemoteProtocolError(f"pipe {self.name} receives nothing more from {self.peer}: {self._recv_refused}")
        dev = self.device if device is None else torch.device(device)
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        with self._recv_lock:
            if any(sl.batch for sl in self._slots):
                raise LocalUsageError("recv_tensors_async handles are pending on this pipe; wait on them first")
            if self._slots and self._slots[0].message != message:
                pending = "recv_message" if self._slots[0].message else "recv_tensor"
                raise LocalUsageError(f"a {pending} that timed out is still pending on this pipe; call {pending} first")
            if not self._slots:
                self._slots.append(self._post_recv(dev, background=False, message=message, max_tensors=max_tensors))
            return self._take_slot(deadline)

    def _take_slot(self, deadline: float) -> _RecvSlot:
        """Wait for the first posted receive to complete and take it (``_recv_lock`` held)."""
        slot = self._slots[0]
        if not slot.header_op._done:
            try:
                self._engine.wait(slot.header_op, deadline, f"receiving #{slot.seq} from {self.peer}",
                                  lambda: self._alive(slot.seq))
            except PeerTimeoutError:
                raise  # nothing arrived yet: the receive stays posted
            except (PeerError, RemoteProtocolError) as exc:
                self._fail(exc, "receiving")
        self._finish_slot(slot, deadline)
        self._slots.pop(0)
        return slot

    def _recv_small(self, device: str | torch.device | None, timeout: float | None, message: bool,
                    max_tensors: int | None, out: torch.Tensor | None,
                    expect: tuple[bytes, int, torch.Tensor] | None = None
                    ) -> tuple[bytes | None, list[torch.Tensor | None]] | None:
        """The next send, if it arrives while this thread spins, through the compiled path (transport._ucp_tag).

        Returns ``(body, tensors)``, or None when it does not apply (a receive is already
        posted) or nothing arrived yet: nothing was consumed and the caller takes the
        ordinary path. A header alone (its tensors all inline) is decoded and copied here;
        anything else (payloads to follow, a refusal, a mismatch) becomes a posted receive
        that the ordinary path finishes, with its checks and errors. ``expect`` is
        :meth:`_inline_frame` of a host tensor (``out``, or a guess of the next tensor's shape
        where ``out`` is None), the sequence number it was built for and that tensor: a frame
        that is exactly it followed by the tensor's bytes lands in the tensor in C, decoded by
        that comparison. A tensor alone decoded here (no ``out``) makes the next guess.
        """
        self._ready(timeout)
        if self._recv_refused is not None:
            raise RemoteProtocolError(f"pipe {self.name} receives nothing more from {self.peer}: {self._recv_refused}")
        # a bad argument fails before anything is taken (a torch.device as is: converting one again costs ~0.2 µs)
        dev = self.device if device is None else device if type(device) is torch.device else torch.device(device)
        with self._recv_lock:
            if self._slots:
                return None
            frames, addr = self._frames(1)
            frame = frames[0]
            seq = self._recv_seq
            kind = "message" if message else "tensor"
            into = dst = None
            if expect is not None and expect[1] == seq:  # (built for this receive, not one another thread took)
                dst = expect[2]
                into = (expect[0], dst.data_ptr(), dst.nbytes)
            try:
                req = self._engine.recv_frame(self._ep, self._tag(self._recv_tag, seq, False), frame, addr,
                                              self._ep_open, lambda: f"header of {kind} #{seq} from {self.peer}", into)
            except (PeerError, RemoteProtocolError) as exc:
                self._recv_seq = seq + 1  # consumed or failed: the pipe breaks
                self._fail(exc, "receiving")
            if req is LANDED:
                assert dst is not None
                self._recv_seq = seq + 1
                self.bytes_received += dst.nbytes
                return None, [dst]
            if req is None:
                return None
            got = None
            if type(req) is Arrived or _done_ok(req):
                got = self._decode_small(frame, req.length, seq)
                complete = got is not None and self._complete_small(got, message, max_tensors)
                if not message and out is None:  # the next guess: this tensor, if it rode inline to the host
                    spec = got[0].tensors[0] if complete and dev.type == "cpu" else None
                    self._guess = None if spec is None else (codec.DTYPES[spec.dtype], torch.Size(spec.shape))
                if complete:
                    return got[0].body, self._land_inline(seq, kind, got, dev, out)
            elif not message and out is None:
                self._guess = None  # (a header with a payload still arriving)
            deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
            # the ordinary path finishes it (with the header decoded here, if it was); the frame goes with it
            # (a fresh one for the next)
            self._rx_frames = None
            self._slots.append(self._post_recv(dev, out, background=False, message=message, max_tensors=max_tensors,
                                               received=(frame, req), decoded=got))
            slot = self._take_slot(deadline)
        if slot.refused is not None:
            self._recv_refused = slot.refused
            raise RemoteProtocolError(slot.refused)
        return (slot.header.body if slot.header is not None else None), slot.tensors

    def _decode_small(self, frame: np.ndarray, n: int, seq: int
                      ) -> tuple[codec.Header, list[memoryview | None]] | None:
        """The header in ``frame[:n]`` and its inline bytes (views of ``frame``), or None if it does not
        decode (the ordinary path decodes it again and raises, breaking the pipe)."""
        try:
            return codec.decode_header(memoryview(frame)[:n], self.peer, seq & _SEQ_MASK, self.max_tensor_bytes)
        except RemoteProtocolError:
            return None

    @staticmethod
    def _complete_small(got: tuple[codec.Header, list[memoryview | None]], message: bool,
                        max_tensors: int | None) -> bool:
        """Whether the decoded header ``got`` is complete in itself (no payloads) and what the receive expects."""
        h, inline = got
        if (h.body is not None) != message:
            return False
        if message:
            if max_tensors is not None and len(h.tensors) > max_tensors:
                return False
        elif len(h.tensors) != 1:
            return False
        for spec, data in zip(h.tensors, inline):  # (h.payloads, without its generator)
            if data is None and spec is not None and spec.nbytes:
                return False  # a payload follows
        return True

    def _land_inline(self, seq: int, kind: str, got: tuple[codec.Header, list[memoryview | None]],
                     dev: torch.device, out: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The tensors of a header whose bytes all rode inline, copied out of its frame; the receive is taken.

        The message is consumed whatever happens here: any error breaks the pipe (a later
        receive must not wait for a sequence number already used).
        """
        h, inline = got
        tensors: list[torch.Tensor | None] = []
        # a new host tensor of a dtype numpy holds: numpy allocates and copies in one step (~1 µs, where
        # torch.empty and a copy into it cost ~3 µs); anything else lands through _landing
        np_dtypes = _NP_DTYPES if out is None and dev.type == "cpu" else {}
        try:
            for i, (spec, data) in enumerate(zip(h.tensors, inline)):
                if spec is None:
                    tensors.append(None)
                    continue
                nd = np_dtypes.get(spec.dtype)
                if nd is not None and data is not None:  # (the spec was checked: data holds shape's bytes exactly)
                    t = torch.from_numpy(np.ndarray(spec.shape, nd, data).copy())
                else:
                    t = self._landing(spec, i, f"{kind} #{seq} from {self.peer}", dev, out)
                    if data is not None and spec.nbytes:
                        _copy_inline(t, data)
                tensors.append(t)
                self.bytes_received += spec.nbytes
        except RemoteProtocolError as exc:
            self._recv_seq = seq + 1
            self._fail(exc, "receiving")
        except BaseException as exc:
            self._recv_seq = seq + 1
            self._break(f"receiving {kind} #{seq} from {self.peer} failed here: {exc!r}")
            raise
        finally:
            self._recv_seq = seq + 1
        return tensors

    # -- one-sided access --------------------------------------------------
    def remote_memory(self, descriptor: "bytes | MemoryDescriptor") -> "RemoteMemory":
        """The peer's registered memory described by ``descriptor``, for one-sided GET/PUT over this pipe.

        The remote keys are unpacked on this pipe's endpoint and released when the
        returned object or this pipe closes (or the peer dies). See :mod:`transport._rma`.
        """
        from ._rma import RemoteMemory

        return RemoteMemory(self, descriptor)

    # -- closing ---------------------------------------------------------
    def _ep_open(self) -> bool:
        return not self._ep_closed

    def _close_ep(self) -> None:
        # Exactly once: a second ucxx close of the same endpoint crashes the process.
        with self._ep_lock:
            if self._ep is not None and not self._ep_closed:
                self._ep_closed = True
                # what the peer sent that nobody will receive must not stay in the shared worker
                dropped = self._engine.drain(self._ep, self._tag(self._recv_tag, 0, False), _SEQ_BITS + 1)
                if dropped:
                    log.info("pipe %s: dropped %d unreceived message(s) from %s", self.name, dropped, self.peer)
                self._disown()  # what the peer still sends on our tags is dropped as it arrives
                link = self._link
                # orderly: unbroken, nothing posted, and the peer healthy or gone with a Goodbye
                orderly = (self._broken is None and not self._slots and link is not None
                           and (link.closed_reason is not None or link.problem() is None))
                self._engine.close_endpoint(self._ep, orderly)
                with self._engine._lock:
                    users, self._ep_users = self._ep_users, []
                    for release in users:
                        release()

    def close(self) -> None:
        """Tell the peer, cancel what is in flight, release everything (idempotent, bounded)."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            if isinstance(self._link, ClientLink):
                self._link.close("peer closed the pipe", self._send_seq)
            elif self._server is not None:
                self._server.say_goodbye(self._link, "peer closed the pipe", self._send_seq)
                time.sleep(0.05)
        self._close_ep()
        self._disown()  # also when no endpoint was ever made
        if self._server is not None and self._owns_server:
            self._server.close()
        log.info("pipe %s closed", self.name)

    def __enter__(self) -> "Pipe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else ("connected" if self._connected.is_set() else "waiting"))
        return f"<Pipe {self.name} {state} peer={self.peer} address={self.address}>"
