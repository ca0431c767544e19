"""The process's single UCX context and worker, and the waits on its requests.

Why one file of ~950 lines: one owner of one native resource; the lock, the
progress thread, the waits and the probed receives all follow one locking
discipline, which a split would scatter.

One :class:`Engine` per process owns the native UCX resources. Every UCX call
goes through its lock, so the worker is never touched by two threads at once.
Progress is made in two places, and callers never drive it themselves:

- a thread that *waits* on a request progresses the worker itself while it
  waits, which is what makes a blocking transfer as fast as the wire;
- a background thread progresses the worker when requests are in flight and
  nobody waits (so a non-blocking send keeps moving while its caller computes).

One owner of the worker's wake-ups: at any time at most one thread, the
*leader*, sleeps on the worker's event fd: the newest thread in
:meth:`Engine.wait` (or one spinning in :meth:`Engine.recv_frame`, which
progresses the worker anyway), else the progress thread when nobody waits and
work needs watching. Every sleeping thread has its own epoll set, and the lead
moves by moving the worker's fd between those sets, without waking anyone. Whoever
progresses the worker kicks (through its own eventfd) exactly the sleeping
waiters whose operation is now complete; the others sleep on. A leader whose
own wait ends hands the fd over before it leaves (:meth:`Engine._pass_lead`),
so events are never left unwatched.

Waits are bounded: each takes a deadline and a liveness check, and raises
instead of hanging.
"""

from __future__ import annotations

import atexit
import collections
import copy
import ctypes
import logging
import os
import select
import threading
import time
import weakref
from typing import Any, Callable, NoReturn, Sequence

from . import _ucp_tag
from ._wakeup import Wakeup
from .errors import LocalUsageError, PeerDeadError, PeerTimeoutError, RemoteProtocolError, TransportError

log = logging.getLogger(__name__)

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
#: UCX's TCP segment (8K by default) bounds each active message, and an emulated GET's reply
#: travels as such messages: 64K (= UCX's default TCP receive segment) made ``kv_bw --kv-mode rma``
#: over tcp 1.1-2.1x faster in 5 paired runs (docs/bench.md). Set before the context reads it;
#: the environment wins.
TCP_TX_SEG_SIZE = "64K"
os.environ.setdefault("UCX_TCP_TX_SEG_SIZE", TCP_TX_SEG_SIZE)

#: A waiting thread progresses the worker itself this long (µs) before it sleeps until
#: its operation completes (see Engine.wait); ``UCXKV_SPIN_US`` overrides (0: sleep at once).
DEFAULT_SPIN_US = 200
#: A sleeping waiter checks its peer's liveness and its deadline this often, and the progress
#: thread re-progresses the worker this often, while anything happened in the last ``_QUIET_S``...
_TICK_S = 0.05
#: ... and this often once that long passed without anything happening. A wake-up after a long
#: sleep costs 0.3-5 ms of CPU on a 2-core VM (cold caches: the same calls take 20-1000x their warm
#: time): twenty a second per thread put an idle pipe at 2-4 % of a core (bench.idle_cpu,
#: docs/bench.md). Liveness does not wait for the tick: the control plane wakes a pipe's waiters as
#: soon as its peer says Goodbye or falls silent (:meth:`Engine.wake_waiters`).
_IDLE_TICK_S = 2.0
_QUIET_S = 1.0
#: The progress thread's tick in a quiet process (it leads then: events wake it).
_QUIET_TICK_S = 5.0
#: A thread that streams sends (posts at most ``_STREAM_GAP_S`` apart, the last one this recently, in
#: s) progresses the worker itself, one progress per send call: the progress thread does not lead for
#: its background sends meanwhile, and wakes again this long after it stood aside. Leading then woke
#: it for 0.7 of the events per 64 KiB message of a stream, on the sender's second core, and cost
#: 15-25 % of the stream's rate (docs/bench.md). A 64 KiB stream posts every 20-60 µs here, a 1 MiB
#: one every 100-140 µs; a caller posting 16 MiB every millisecond or so is not streaming, and its
#: sends need the progress thread between its posts (5-6 GB/s with it, ~12 % less without).
_STANDASIDE_S = 0.001
_STREAM_GAP_S = 0.0002
# Endpoint close: UCX gets this many attempts of this long each to disconnect.
_CLOSE_PERIOD_NS = 100_000
_CLOSE_ATTEMPTS = 100
#: How often (at most) the worker's unexpected queue is swept of messages no live pipe owns.
_SWEEP_S = 0.05
#: The compiled fast path (transport._ucp_tag) holds the engine's lock at most this long (ns) per
#: call; a waiter for a small message calls it again until its spin (UCXKV_SPIN_US) is over.
_FAST_SLICE_NS = 50_000
#: A wait this soon after its thread's recv_frame spun in vain sleeps without spinning again.
_RESPIN_S = 0.001

# A packed UCX worker address starts with a header byte whose low 4 bits are the
# address format version (ucp/wireup/address.c: UCP_OBJECT_VERSION_V1 = 0, V2 = 1;
# any other value trips an assertion that aborts the process), then a 64-bit uuid.
_UCX_ADDRESS_VERSIONS = (0, 1)
_UCX_ADDRESS_MIN = 1 + 8
#: Largest worker address accepted (ours are a few hundred bytes; many NICs make a few KiB).
MAX_WORKER_ADDRESS = 16 * 1024


def check_worker_address(address: object, peer: str) -> bytes:
    """Return ``address`` if UCX can safely unpack it; raise :class:`RemoteProtocolError` otherwise.

    Everything a peer sends that reaches native code passes here first: the
    type, the length and the format version are checked in Python, so a
    malformed address is refused instead of aborting the process inside UCX.
    """
    if not isinstance(address, bytes):
        raise RemoteProtocolError(f"{peer} sent a worker address of type {type(address).__name__}, expected bytes")
    if not _UCX_ADDRESS_MIN <= len(address) <= MAX_WORKER_ADDRESS:
        raise RemoteProtocolError(f"{peer} sent a {len(address)}-byte UCX worker address "
                                  f"(a valid one has {_UCX_ADDRESS_MIN} to {MAX_WORKER_ADDRESS} bytes)")
    version = address[0] & 0x0F
    if version not in _UCX_ADDRESS_VERSIONS:
        raise RemoteProtocolError(f"{peer} sent a UCX worker address of unknown format version {version} "
                                  f"(this UCX reads {list(_UCX_ADDRESS_VERSIONS)})")
    return address


#: Forks this process has gone through in Python (``os.fork``, multiprocessing's fork): an engine
#: made before the last one belongs to the parent (see :meth:`Engine._check_pid`).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def _untraced(exc: BaseException) -> BaseException:
    """A copy of ``exc`` without its traceback (``exc`` itself for a type that copy cannot rebuild).

    An object that keeps an error for whoever asks (an :class:`Op`, a failed request) keeps such
    a copy and raises copies of it (:func:`_raise_kept`): a raised error's traceback holds the frames
    it passed, and those frames hold the keeper, a cycle that only the collector frees, with every
    buffer, endpoint and fd the frames refer to.
    """
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001
        return exc


def _raise_kept(exc: BaseException) -> NoReturn:
    """Raise a copy of the kept error ``exc`` (see :func:`_untraced`)."""
    raise _untraced(exc)


class Op:
    """A group of UCX requests that complete together (one tensor, or several).

    Holds references to every buffer involved until the requests are done,
    so memory UCX may still touch is never freed under it.
    """

    __slots__ = ("requests", "keepalive", "on_done", "error", "_done", "stream")

    def __init__(self, requests: list[Any], keepalive: list[Any], on_done: Callable[[], Any] | None = None,
                 stream: bool = False):
        self.requests = requests
        self.keepalive = keepalive
        self.on_done = on_done
        self.error: BaseException | None = None
        self._done = False
        # bulk data (many fragments): its waiter spins again after each wake-up instead of
        # sleeping per fragment (a small op's waiter does not: an idle wait stays idle)
        self.stream = stream

    def poll(self) -> bool:
        """True once every request completed; raises the first request's UCX error."""
        if self._done:
            if self.error is not None:
                _raise_kept(self.error)
            return True
        for r in self.requests:
            if not r.completed:
                return False
        self._done = True
        self.keepalive = []
        # Drop the callback once it ran (or cannot run): it usually refers back to the
        # receive that owns this op, and a cycle would keep received tensors alive until gc.
        on_done, self.on_done = self.on_done, None
        try:
            for r in self.requests:
                r.check_error()
            if on_done is not None:
                on_done()
        except BaseException as exc:
            self.error = _untraced(exc)
            raise
        return True


class ProbedRecv:
    """A tag receive that is posted only once its message arrived, so its length is known.

    UCX accepts a message *shorter* than the buffer posted for it without a word;
    probing first lets the receiver compare the length with what it expects, and
    a message longer than the buffer is refused too (it is still consumed, so
    nothing is left behind in the worker). Quacks like a ucxx request for :class:`Op`.
    """

    __slots__ = ("_engine", "_ep", "_buf", "_tag", "_expect", "_what", "_is_open", "_req", "length", "_error")

    def __init__(self, engine: "Engine", ep: Any, buf: Any, tag: int, expect: int | None, what: str,
                 is_open: Callable[[], bool]):
        self._engine, self._ep, self._buf, self._tag = engine, ep, buf, tag
        self._expect, self._what, self._is_open = expect, what, is_open
        self._req: Any = None
        self.length = -1
        self._error: RemoteProtocolError | None = None

    @property
    def completed(self) -> bool:
        if self._req is None:
            eng = self._engine
            with eng._lock:
                if not self._is_open():  # never post on a closed endpoint
                    self._error = PeerDeadError(f"{self._what}: the endpoint was closed")
                    return True
                found = eng._stash.pop(self._tag, None) or eng.worker.tag_probe(eng._api.UCXXTag(self._tag),
                                                                                 remove=True)
                if not found.matched:
                    return False
                self.length = n = found.length
                room = len(self._buf)
                if n > room or (self._expect is not None and n != self._expect):
                    want = f"{self._expect} bytes" if self._expect is not None else f"at most {room} bytes"
                    self._error = RemoteProtocolError(f"{self._what}: {n} bytes arrived, expected {want}")
                self._req = self._ep.tag_recv_with_handle(_array(self._buf), found)
        return self._req.completed

    def check_error(self) -> None:
        if self._error is not None:
            _raise_kept(self._error)
        self._req.check_error()


class Arrived:
    """A message the fast path already received in full, shaped like a ucxx request for :class:`Op`."""

    __slots__ = ("length",)
    completed = True

    def __init__(self, length: int):
        self.length = length

    def check_error(self) -> None:
        """Nothing can fail any more."""


class _Landed:
    """What :meth:`Engine.recv_frame` returns for a message whose bytes it landed where the caller asked."""

    __slots__ = ()


#: The one :class:`_Landed`.
LANDED = _Landed()
_NOT_INTO: "tuple[None, None, int]" = (None, None, 0)


class Failed:
    """A request that already failed with ``error``, shaped like a ucxx request for :class:`Op`."""

    __slots__ = ("error", "length")
    completed = True

    def __init__(self, error: TransportError, length: int = -1):
        self.error, self.length = error, length

    def check_error(self) -> None:
        _raise_kept(self.error)


#: :class:`_SendsInFlight` frees only at its head, in posting order, until it holds more than this many.
_SENDS_BOUND = 64


class _SendsInFlight:
    """The compiled path's background sends in flight (:class:`_ucp_tag.NativeRequests`, in posting order),
    in the engine's tracked ops as one op while any is: the progress thread progresses the worker for them
    as for any tracked op (it leads when nobody waits), and each of its polls frees those finished at the
    head. A send that joins while it is tracked costs an append: no poll, no lead check (an earlier
    send already guarantees progress). Each send's own waiter frees it too, in whatever order. A head
    that does not complete (a stalled peer) holds nothing else back: past ``bound`` sends, a poll frees
    every finished one.
    """

    __slots__ = ("queue", "tracked", "bound")

    def __init__(self) -> None:
        self.queue: collections.deque[Any] = collections.deque()
        self.tracked = False
        self.bound = _SENDS_BOUND

    def add(self, reqs: Any, engine: "Engine") -> None:
        """Queue ``reqs`` (engine lock held); the first of a stream tracks the queue (see ``Engine.track``)."""
        self.queue.append(reqs)
        if self.tracked:
            return
        self.tracked = True
        engine._pending.add(self)
        engine._progress_thread_duty()

    def poll(self) -> bool:
        """True (and untracked) once nothing is in flight; never raises: a failure is its send's waiter's."""
        q = self.queue
        while q and q[0].completed:
            q.popleft()
        if len(q) > self.bound:  # a head that does not complete (a stalled peer): others must not pile up
            self.queue = q = collections.deque(r for r in q if not r.completed)
            self.bound = max(_SENDS_BOUND, 2 * len(q))  # (amortized: a full pass only after the queue doubled)
        if q:
            return False
        self.tracked = False
        return True


class _Sleeper:
    """A thread's way to sleep: its own epoll set, holding its kick eventfd and, while this thread
    is the engine's leader, the worker's event fd (moved in and out by :meth:`Engine._lead`).

    One per thread that waits (thread-local) and one for the progress thread. ``op`` is what
    the thread waits on, ``asleep`` whether it is past its spin (so others' progress may complete
    ``op`` and must kick it), ``kicked`` whether a kick is on its way. ``wakes`` counts sleeps
    that ended before their timeout (a kick or a worker event), for tests and benches. The fds
    close with :meth:`close`: at the exit of the thread it belongs to (see :class:`_ThreadExit`),
    or when the object is freed.
    """

    __slots__ = ("ep", "wakeup", "op", "asleep", "kicked", "has_fd", "wakes", "name", "busy_at", "__weakref__")

    def __init__(self, name: str):
        self.wakeup = Wakeup()
        self.ep = select.epoll()
        self.ep.register(self.wakeup.fd, select.EPOLLIN)
        self.op: Op | None = None
        self.asleep = self.kicked = False
        self.has_fd = False  # the worker's fd is in ep (only ever the leader's)
        self.wakes = 0
        self.name = name
        self.busy_at = 0.0  # when this thread's last wait woke or ended in success (see _QUIET_S)

    def close(self) -> None:
        """Close the epoll set and the kick fd (idempotent); only once the thread is done with them.
        Also on a sleeper whose ``__init__`` failed part way (out of fds): what it opened is closed."""
        ep = getattr(self, "ep", None)
        if ep is not None and not ep.closed:
            ep.close()
        wakeup = getattr(self, "wakeup", None)
        if wakeup is not None:
            wakeup.close()

    __del__ = close

    def kick(self) -> None:
        self.wakeup.set()

    def wake(self) -> None:
        """Kick this waiter if it is asleep and no kick is on its way already (engine lock held)."""
        if self.asleep and not self.kicked:
            self.kicked = True
            self.kick()

    def sleep(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s; True if woken (a kick, consumed here, or a worker event)."""
        if not self.ep.poll(timeout):
            return False
        self.wakes += 1
        self.wakeup.clear()
        return True


class _ThreadExit:
    """Closes a waiting thread's :class:`_Sleeper` when that thread ends.

    Held only by the thread's ``threading.local`` (freed as the thread exits), whereas the sleeper
    itself may outlive the thread: an error raised through :meth:`Engine.wait` keeps that frame,
    and the sleeper in it, in its traceback, until the cyclic collector runs (measured: a lookup
    server kept two fds per dropped consumer that way)."""

    __slots__ = ("sleeper",)

    def __init__(self, sleeper: _Sleeper):
        self.sleeper = sleeper

    def __del__(self) -> None:
        self.sleeper.close()


def _finished(op: Op) -> bool:
    """Whether every request of ``op`` completed (engine lock held); its ``on_done`` is left to its waiter."""
    if op._done:
        return True
    try:
        return all(r.completed for r in op.requests)
    except Exception:  # noqa: BLE001 - its waiter raises it
        return True


def _stop_engine(stop: threading.Event, wakeup: Wakeup, thread: threading.Thread) -> None:
    stop.set()
    wakeup.set()
    thread.join(timeout=2.0)


class Engine:
    """Owner of the process's UCX context and worker. Use :func:`get_engine`."""

    def __init__(self) -> None:
        import ucxx._lib.libucxx as ucx_api  # imported late: CUDA must initialise after fork

        self._api = ucx_api
        self._pid, self._forks = os.getpid(), _forks
        self._lock = threading.RLock()
        config = _safe_tls_config()
        self.context = ucx_api.UCXContext(config, feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP, ucx_api.Feature.RMA))
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.address: bytes = bytes(self.worker.address.tobytes())
        # Ask endpoints for peer-failure handling only where a transport in use provides it:
        # asking on shared memory alone makes UCX log an ERROR before the fallback works.
        self._peer_error_handling = _has_error_handling(self.context.config.get("TLS", ""))
        self._pending: set[Op] = set()
        self._sends = _SendsInFlight()  # background sends of the compiled path, tracked as one op
        self._draining: list[tuple[Any, Any]] = []
        #: tag ranges of live pipes: mask bits -> {tag >> bits: number of owners}
        self._owned: dict[int, dict[int, int]] = {}
        #: messages a sweep took out of the worker for a live pipe, by tag, until its receive takes them
        self._stash: dict[int, Any] = {}
        self._next_sweep = 0.0
        self._spin_s = _spin_seconds()
        self._serving = 0  # users of unattended progress (see serve())
        #: the progress thread saw nothing happen for _QUIET_S: it watches the worker's fd itself
        #: while nobody waits, instead of ticking (see _progress_loop)
        self._quiet = False
        #: when another thread than the progress thread last drove the worker: took the lead from the
        #: progress thread (the process is not quiet) or posted sends (see _STANDASIDE_S)
        self._caller_at = 0.0
        self._post_gap = 1.0  # from the activity before the last post to that post (see _STANDASIDE_S)
        self._aside_until = 0.0  # the progress thread does not lead before this (see _progress_loop)
        self._local = threading.local()
        self._worker_fd = self.worker.epoll_file_descriptor
        #: the threads in wait(), oldest first (see _lead)
        self._waiting: list[_Sleeper] = []
        #: the one sleeper whose epoll set holds the worker's fd (None: nobody sleeps on it)
        self._leader: _Sleeper | None = None
        self._sleepers: weakref.WeakSet[_Sleeper] = weakref.WeakSet()
        self._pt = self._new_sleeper("ucxkv-progress")
        self._stop = threading.Event()
        # the compiled one-message path, when it can be built and UCXKV_FAST_PATH is not 0
        cuda = _ucp_tag.cuda_enabled()  # (a malformed value fails here, whether or not the path can be built)
        self.tag_fast = _ucp_tag.lib() if _ucp_tag.enabled() else None
        #: CUDA payload tensors take the compiled path too (UCX finds their memory type itself)
        self.tag_fast_cuda = self.tag_fast is not None and cuda
        if self.tag_fast is not None:
            self._worker_h = self.worker.handle
            self._c_prog = ctypes.c_uint()
            self._c_progp = ctypes.byref(self._c_prog)
            self._c_changed = ctypes.c_int()
            self._c_changedp = ctypes.byref(self._c_changed)
            self._c_one = (ctypes.c_void_p * 1)()  # a single request's array for ukv_wait_requests (lock held)
        self._thread = threading.Thread(target=self._progress_loop, name="ucxkv-progress", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_engine, self._stop, self._pt.wakeup, self._thread)
        cfg = self.context.config
        log.info("UCX engine up: UCX_TLS=%s RNDV_THRESH=%s spin=%.0fus fast path=%s (CUDA payloads: %s)",
                 cfg.get("TLS"), cfg.get("RNDV_THRESH"), self._spin_s * 1e6, self.tag_fast is not None,
                 self.tag_fast_cuda)

    # -- endpoints -------------------------------------------------------
    def connect(self, worker_address: bytes, peer: str) -> Any:
        """Create an endpoint to a peer's worker address (any transport, shm included).

        Peer-failure error handling is asked for when a transport in use can
        provide it; otherwise (shared memory alone), or when UCX refuses it, the
        endpoint has none and the control plane's heartbeats detect a dead peer.
        Raises :class:`RemoteProtocolError` for an address UCX cannot safely read.
        """
        api = self._api
        addr = api.UCXAddress.create_from_buffer(check_worker_address(worker_address, peer))
        # the progress thread ticks again (it leaves the quiet state): over tcp, the peer's side of
        # this connection waits for our worker to ack it, and that raises no event here to wake
        # a quiet leader; its waiter spins until we progress (docs/bench.md, idle CPU)
        self._pt.kick()
        with self._lock:
            if self._peer_error_handling:
                try:
                    return self.worker.create_endpoint_from_worker_address(addr, True)
                except Exception as exc:  # noqa: BLE001 - UCX raises its own hierarchy
                    log.debug("endpoint to %s with error handling failed (%s); retrying without", peer, exc)
            try:
                return self.worker.create_endpoint_from_worker_address(addr, False)
            except Exception as exc:  # noqa: BLE001
                raise PeerDeadError(f"cannot create a UCX endpoint to {peer}: {exc}") from exc

    def settle(self, ep: Any, peer: str, wait_s: float | None = None,
               alive: Callable[[], str | None] | None = None) -> None:
        """Post a flush of the new endpoint ``ep``, which completes the endpoint's wireup now instead
        of at its first message: wait up to ``wait_s`` for it (``alive`` as in :meth:`wait`), or
        (None) track it in the background.

        Over tcp, an endpoint nobody has sent on yet kept one of its sockets armed for writing
        until the first message: the worker's fd stayed readable and an idle waiter woke
        8,000-9,000 times a second (3 % of a core in 10 of 10 connections measured, none after
        this flush; docs/bench.md, idle CPU). Without the compiled RMA helper it does nothing.
        """
        what = f"settling the endpoint to {peer}"
        try:
            from ._rma import _Flush  # (imports this module: not at the top)

            with self._lock:
                flush = _Flush.post(ep.handle, what)
        except Exception as exc:  # noqa: BLE001 - no compiler: the endpoint settles at its first message
            log.debug("endpoint to %s not flushed at connect: %s", peer, exc)
            return
        if not flush.pending:
            return
        if wait_s is None:
            self.track(Op([flush], []))
        else:
            self.wait(Op([flush], []), time.monotonic() + wait_s, what, alive)

    def close_endpoint(self, ep: Any, orderly: bool = False) -> None:
        """Close an endpoint, cancelling its in-flight requests.

        ``orderly`` (the peer is alive and nothing is in flight) lets UCX finish the
        disconnect, bounded by a few milliseconds: otherwise the endpoint's TCP
        connection stays in CLOSE-WAIT on both sides for the life of the process.
        Without it (a dead or broken peer) the close is forced and never blocks.
        """
        with self._lock:
            try:
                # Closing an endpoint that UCX already failed crashes ucxx: skip it.
                if ep.alive:
                    if orderly:
                        ep.close_blocking(_CLOSE_PERIOD_NS, _CLOSE_ATTEMPTS)
                    else:  # a blocking close waits on in-flight requests to a dead peer
                        ep.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("endpoint close: %s", exc)
            for _ in range(10):
                self.worker.progress()

    # -- requests --------------------------------------------------------
    def tag_send(self, ep: Any, buf: Any, tag: int) -> Any:
        api = self._api
        with self._lock:
            return ep.tag_send(_array(buf), tag=api.UCXXTag(tag))

    def tag_recv(self, ep: Any, buf: Any, tag: int, expect: int | None, what: str,
                 is_open: Callable[[], bool]) -> ProbedRecv:
        """Receive the message tagged ``tag`` into ``buf`` once it arrived, while ``is_open()``.

        ``expect`` is the exact length it must have (None: anything up to
        ``len(buf)``; the request's ``length`` tells what came). Any other length
        fails the request with :class:`RemoteProtocolError` naming ``what``.
        """
        return ProbedRecv(self, ep, buf, tag, expect, what, is_open)

    def drain(self, ep: Any, tag_base: int, mask_bits: int, limit: int = 4096) -> int:
        """Receive and drop what waits in the worker on tags that share ``tag_base``'s top bits.

        Called when a peer goes, so messages it sent on tags nobody will receive
        again do not stay in the process-wide worker's unexpected queue. Returns
        how many messages were dropped.
        """
        api = self._api
        mask = api.UCXXTagMask(((1 << 64) - 1) ^ ((1 << mask_bits) - 1))
        dropped = 0
        with self._lock:
            # the drop receives own their scratch buffers: keep them until UCX is done with them
            self._draining = [(r, b) for r, b in self._draining if not r.completed]
            key = tag_base >> mask_bits
            dropped += self._drop_stashed(lambda tag: tag >> mask_bits == key)
            for _ in range(limit):
                found = self.worker.tag_probe(api.UCXXTag(tag_base), mask, remove=True)
                if not found.matched:
                    break
                buf = _scratch(found.length)
                self._draining.append((ep.tag_recv_with_handle(_array(buf), found), buf))
                dropped += 1
            for _ in range(10 if dropped else 0):
                self.worker.progress()
        return dropped

    def _check_pid(self) -> None:
        """Refuse use from a forked child: the worker and its queues are the parent's. (A count of forks
        comes first: ``getpid`` is a system call, and a stream's send checks twice. Every fork after which
        Python runs in the child counts: ``PyOS_AfterFork_Child`` runs the hook.)"""
        if _forks != self._forks and os.getpid() != self._pid:
            raise LocalUsageError("the UCX engine was created before fork; create pipes after forking")

    # -- the one-message fast path (transport._ucp_tag) -----------------------
    def send_frame(self, ep: Any, tag: int, header: bytes, data: int | bytes | None, nbytes: int, what: str,
                   is_open: Callable[[], bool]) -> "_ucp_tag.NativeRequest | None":
        """Send ``u32 len(header) | header | data[:nbytes]`` as one message on ``tag`` (needs :attr:`tag_fast`).

        ``data`` is an address, a bytes object, or None when ``nbytes`` is 0; its memory is
        free again on return. Returns None once sent, or the request still in flight after
        one slice (wait on it with an :class:`Op`). Raises :class:`PeerDeadError` naming
        ``what`` if the endpoint is closed or failed, or UCX refuses the send.
        """
        assert self.tag_fast is not None
        self._check_pid()
        with self._lock:
            h = ep.handle if is_open() else 0  # ucxx drops the handle of an endpoint that failed
            if not h:
                raise PeerDeadError(f"{what}: the endpoint is closed")
            rc, c_req, progressed = _ucp_tag.EXT.send_frame(self._worker_h, h, tag, header, data, nbytes,
                                                            _FAST_SLICE_NS)
            if progressed:
                self._progressed()
            if rc == 1:
                req = _ucp_tag.NativeRequest(c_req, what, self._lock)
                self._draining.append((req, None))  # freed once done, also if its waiter gives up
                return req
        if rc < 0:
            raise PeerDeadError(f"{what} failed: {_ucp_tag.status_string(rc)}")
        return None

    def recv_frame(self, ep: Any, tag: int, buf: Any, addr: int, is_open: Callable[[], bool],
                   what: Callable[[], str], into: "tuple[bytes, int, int] | None" = None
                   ) -> "Arrived | _Landed | _ucp_tag.NativeRequest | ProbedRecv | None":
        """Receive the message on exactly ``tag`` into ``buf`` (at ``addr``) if it arrives while this
        thread spins (``UCXKV_SPIN_US``, in slices of the engine's lock); needs :attr:`tag_fast`.

        Returns None when nothing arrived (nothing consumed: the caller takes the ordinary
        path, which waits with its timeout and liveness checks; also when the endpoint
        closed), else the received message (:class:`Arrived`, or a :class:`NativeRequest`
        still in flight that keeps ``buf`` until done, or for a message a sweep had parked
        in the stash, the :class:`ProbedRecv` that takes it). With ``into = (expect, dst,
        n)``: a message received at once that is exactly ``expect`` followed by ``n`` bytes
        has those copied to address ``dst`` and comes back as :data:`LANDED`; any other
        comes back as above, ``dst`` untouched. A message longer than ``buf`` raises
        :class:`RemoteProtocolError` (it was consumed, truncated), a UCX error
        :class:`PeerDeadError`, both naming ``what()``.
        """
        me = self._hold_lead()  # this spin progresses the worker: no one need sleep on it meanwhile
        try:
            return self._recv_frame(ep, tag, buf, addr, is_open, what, into or _NOT_INTO)
        finally:
            if me is not None:
                self._drop_lead(me)

    def _recv_frame(self, ep: Any, tag: int, buf: Any, addr: int, is_open: Callable[[], bool],
                    what: Callable[[], str], into: "tuple[bytes | None, int | None, int]"
                    ) -> "Arrived | _Landed | _ucp_tag.NativeRequest | ProbedRecv | None":
        """:meth:`recv_frame`'s spin."""
        assert self.tag_fast is not None
        ext = _ucp_tag.EXT
        self._check_pid()
        lock, cap = self._lock, len(buf)
        # UCXKV_SPIN_US=0 promises no spinning: one probe, no progress slice
        slice_ns = min(_FAST_SLICE_NS, int(self._spin_s * 1e9))
        end = 0.0
        while True:
            with lock:
                if not is_open():
                    return None
                if tag in self._stash:
                    return ProbedRecv(self, ep, buf, tag, None, what(), is_open)
                expect, dst, dst_len = into
                rc, n, c_req, progressed = ext.recv_frame(self._worker_h, tag, addr, cap, slice_ns, expect, dst,
                                                          dst_len)
                if progressed:
                    self._progressed()
                if rc == 1:
                    req = _ucp_tag.NativeRequest(c_req, what(), lock, n, buf)
                    self._draining.append((req, buf))  # buf outlives the request, whatever its waiter does
            if rc != 2 and n > cap:  # consumed (truncated): the peer broke the frame limit
                raise RemoteProtocolError(f"{what()}: {n} bytes arrived, expected at most {cap} bytes")
            if rc == 3:
                return LANDED
            if rc == 0:
                return Arrived(n)
            if rc == 1:
                return req
            if rc < 0:
                raise PeerDeadError(f"{what()} failed: {_ucp_tag.status_string(rc)}")
            now = time.monotonic()
            if not end:
                end = now + self._spin_s - _FAST_SLICE_NS * 1e-9
            if now >= end:
                self._local.spun_at = now  # the ordinary wait that follows sleeps at once (see wait)
                return None

    def send_tensors(self, ep: Any, sends: "Sequence[tuple[int, bytes, int, int, int]]", keep: Any, what: str,
                     is_open: Callable[[], bool], background: bool) -> "_ucp_tag.NativeRequests | None":
        """Send each ``(tag, header, pay_tag, addr, nbytes)`` of ``sends``: the header frame ``u32 len(header) |
        header`` on ``tag`` (from a copy), then ``nbytes`` at ``addr`` on ``pay_tag`` (in place: ``keep``, the
        memory's owner, is held until UCX is done with it); one C call each, under one hold of the lock, that
        progresses the worker once; needs :attr:`tag_fast`.

        Returns None when every send completed at posting, else their requests still in flight (one C
        array: wait with :meth:`wait_sends`). With ``background`` they progress with nobody waiting,
        tracked together with the other background sends (:class:`_SendsInFlight`): only the first send
        of a stream costs a lead check, none costs a poll. Without it, they are freed once done even
        if their waiter gives up. Raises :class:`PeerDeadError` naming ``what`` if the endpoint is closed
        or a send fails at posting (what was posted before it stays in flight, tracked alike).
        """
        return self._post_sends(ep, len(sends), keep, what, is_open, background, _ucp_tag.EXT.post_tensors, sends)

    def send_tensor(self, ep: Any, tag: int, header: bytes, addr: int, nbytes: int, keep: Any, what: str,
                    is_open: Callable[[], bool]) -> "_ucp_tag.NativeRequests | None":
        """:meth:`send_tensors` of the one send ``(tag, header, tag | 1, addr, nbytes)``, in the background: a
        stream's send, one C call without a batch's list and tuple (``_tag_ext.post_tensor``); the same
        returns, tracking and errors."""
        return self._post_sends(ep, 1, keep, what, is_open, True, _ucp_tag.EXT.post_tensor, tag, header, addr,
                                nbytes)

    def _post_sends(self, ep: Any, n: int, keep: Any, what: str, is_open: Callable[[], bool], background: bool,
                    post: Callable[..., tuple[int, int, int]], *args: Any) -> "_ucp_tag.NativeRequests | None":
        """Post ``n`` sends with ``post(worker, ep handle, *args, requests)`` (``_tag_ext.post_tensors`` or
        ``post_tensor``) under the lock, then what follows any post: the progress it made, the caller's post
        gap (a stream: see :meth:`_progress_loop`), the requests left in flight tracked (``background``) or
        left to drain; :meth:`send_tensors` says what it returns and raises."""
        assert self.tag_fast is not None
        self._check_pid()
        reqs = _ucp_tag.NativeRequests(2 * n, what, self._lock, keep)
        with self._lock:
            h = ep.handle if is_open() else 0  # ucxx drops the handle of an endpoint that failed
            if not h:
                raise PeerDeadError(f"{what}: the endpoint is closed")
            rc, progressed, inflight = post(self._worker_h, h, *args, reqs)
            if progressed:
                self._progressed()
            now = time.monotonic()
            self._post_gap, self._caller_at = now - self._caller_at, now
            if inflight and background:
                self._sends.add(reqs, self)
            elif inflight:
                self._draining.append((reqs, None))  # freed once done, also if its waiter gives up
        if rc < 0:
            raise PeerDeadError(f"{what} failed: {_ucp_tag.status_string(rc)}")
        return reqs if inflight else None

    def wait_sends(self, reqs: "_ucp_tag.NativeRequests", timeout: float, what: str,
                   alive: Callable[[], str | None] | None = None) -> None:
        """Wait up to ``timeout`` seconds for sends :meth:`send_tensors` left in flight, with :meth:`wait`'s
        promises (``alive``, errors naming ``what``): one C call when they are done already (the usual case
        for the older sends of a window; no clock read), else :meth:`wait` on their C array (which spins on
        it in C slices, then sleeps). A failed send is a :class:`PeerDeadError`."""
        self._check_pid()
        if reqs.completed:
            reqs.check_error()
            return
        self.wait(Op([reqs], []), time.monotonic() + timeout, what, alive)

    def recv_tensors(self, slots: Any, k: int, spin_ns: int) -> tuple[int, bool]:
        """One slice of ``ukv_recv_tensors`` on ``slots[:k]`` (a :class:`_ucp_tag.RecvSlot` array), engine
        lock held; returns (slots still waiting or in flight, whether anything moved: a slot, or data
        of one still arriving). Needs :attr:`tag_fast`.

        The compiled receive probes only the worker, not the stash where a sweep parks what it took
        out of the worker: a slot whose message is parked there waits here until its caller takes it
        (``Pipe._take_parked``, which gives it state ``ST_HDR_TAKEN`` or ``ST_PAY_TAKEN``).
        """
        lib = self.tag_fast
        assert lib is not None
        self._check_pid()
        with self._lock:
            open_ = lib.ukv_recv_tensors(self._worker_h, slots, k, spin_ns, self._c_progp, self._c_changedp)
            moved = bool(self._c_changed.value)
            if self._c_prog.value:
                self._progressed()
        return open_, moved

    def own(self, tag_base: int, mask_bits: int) -> None:
        """Declare the tags sharing ``tag_base``'s top bits live: a sweep keeps messages on them.

        Every message that arrives on a tag no live owner declared is received
        and dropped by the next sweep (at most every ``_SWEEP_S`` while the worker
        makes progress), so a peer can park nothing in the process-wide worker
        beyond its own live pipe's range, also after that pipe closed.
        """
        with self._lock:
            owners = self._owned.setdefault(mask_bits, {})
            key = tag_base >> mask_bits
            owners[key] = owners.get(key, 0) + 1

    def disown(self, tag_base: int, mask_bits: int) -> None:
        """Undo one :meth:`own`; what still arrives on those tags is dropped from now on."""
        with self._lock:
            owners = self._owned.get(mask_bits, {})
            key = tag_base >> mask_bits
            if owners.get(key, 0) > 1:
                owners[key] -= 1
            else:
                owners.pop(key, None)
            self._drop_stashed(lambda tag: tag >> mask_bits == key)

    def _is_owned(self, tag: int) -> bool:
        return any(tag >> bits in owners for bits, owners in self._owned.items())

    def _drop(self, found: Any) -> None:
        """Receive a probed message into scratch and forget it (engine lock held)."""
        buf = _scratch(found.length)
        self._draining.append((self.worker.tag_recv_with_handle(_array(buf), found), buf))

    def _drop_stashed(self, which: Callable[[int], bool]) -> int:
        gone = [tag for tag in self._stash if which(tag)]
        for tag in gone:
            self._drop(self._stash.pop(tag))
        return len(gone)

    def _sweep(self, limit: int = 4096) -> int:
        """Empty the worker's unexpected queue (engine lock held): messages on live tags go to the
        stash for their receive, all others are dropped. Returns how many were dropped."""
        api = self._api
        self._draining = [(r, b) for r, b in self._draining if not r.completed]
        dropped = 0
        anything, anything_mask = api.UCXXTag(0), api.UCXXTagMask(0)
        for _ in range(limit):
            found = self.worker.tag_probe(anything, anything_mask, remove=True)
            if not found.matched:
                break
            tag = found.sender_tag.value
            if self._is_owned(tag):
                self._stash[tag] = found
            else:
                self._drop(found)
                dropped += 1
        if dropped:
            log.info("dropped %d message(s) on tags no live pipe owns (a closed pipe's peer, or a stranger)",
                     dropped)
        return dropped

    def track(self, op: Op) -> Op:
        """Let the progress thread progress ``op`` until it completes (nobody has to wait on it)."""
        with self._lock:
            self._pending.add(op)
            # a message that arrived before its receive was tracked raises no worker event:
            # look now, or a progress pass without events would leave it to a 50 ms tick
            try:
                op.poll()
            except Exception:  # noqa: BLE001 - kept in op.error for its waiter
                pass
            self._progress_thread_duty()
        return op

    def serve(self, delta: int) -> None:
        """Count a user (+1) or drop one (-1) of unattended progress: while any, the worker's
        events are always watched (peers' emulated RMA on our registrations), by the progress
        thread when no thread is in :meth:`wait`."""
        with self._lock:
            self._serving += delta
            self._progress_thread_duty()

    # -- who watches the worker ------------------------------------------
    def _new_sleeper(self, name: str) -> _Sleeper:
        s = _Sleeper(name)
        self._sleepers.add(s)
        return s

    def _sleeper(self) -> _Sleeper:
        s = getattr(self._local, "sleeper", None)
        if s is None:
            s = self._local.sleeper = self._new_sleeper(threading.current_thread().name)
            self._local.exit = _ThreadExit(s)
        return s

    def wake_counts(self) -> dict[str, int]:
        """Sleeps that ended before their timeout (a kick or a worker event), by thread name, over
        the threads that ever slept in this engine and still exist (debugging and tests)."""
        with self._lock:
            return {s.name: s.wakes for s in list(self._sleepers)}

    def _lead(self, new: _Sleeper | None, arm: bool = False) -> None:
        """Make ``new`` the leader, the one thread that sleeps on the worker's fd (engine lock held).

        The fd moves between the threads' epoll sets, so a sleeping thread gains or loses it
        without waking; a leader that is not asleep gets it only when it goes to sleep
        (:meth:`_watch`), so a wait that ends within its spin costs no system call. ``arm``:
        ``new`` may be asleep already, so the worker is armed for it here and the fd given
        to it now (if events are still pending, ``new`` is kicked to progress them itself).
        """
        old = self._leader
        if old is new:
            return
        if old is not None and old.has_fd:
            old.ep.unregister(self._worker_fd)
            old.has_fd = False
        if old is self._pt and new is not None:
            # a thread waits or spins: the process is not quiet, and when that thread is done the
            # lead is not handed back to the progress thread (which would cost a worker arm and two
            # epoll_ctl per message of a ping-pong); that thread sees for itself once it is quiet again
            self._quiet = False
            self._caller_at = time.monotonic()
        self._leader = new
        if new is not None and arm:
            if not self._arm():
                new.kick()
            self._watch(new)

    def _watch(self, s: _Sleeper) -> None:
        """Put the worker's fd in the leader ``s``'s epoll set (engine lock held; the worker armed)."""
        if not s.has_fd:
            s.ep.register(self._worker_fd, select.EPOLLIN)
            s.has_fd = True

    def _arm(self) -> bool:
        """Arm the worker for a thread that may be asleep (engine lock held), progressing what is
        pending first; False if events still came in between (that thread must progress them)."""
        for _ in range(4):
            if self.worker.arm():
                return True
            self._progress()
        return False

    def _hold_lead(self) -> _Sleeper | None:
        """Take the lead for a spin outside :meth:`wait` (which progresses the worker itself), if a
        thread sleeps on the worker's fd: it would wake for the events this spin handles anyway. Returns
        the caller's sleeper to give to :meth:`_drop_lead` after the spin, or None if nobody led."""
        if self._leader is None:  # (read without the lock: at worst one needless wake-up)
            return None
        me = self._sleeper()
        with self._lock:
            self._lead(me)
        return me

    def _drop_lead(self, me: _Sleeper) -> None:
        """Undo :meth:`_hold_lead`: the lead goes to the newest waiter, or the progress thread."""
        with self._lock:
            if self._leader is me:
                self._pass_lead()

    def _progress_thread_duty(self) -> None:
        """Give the progress thread the lead when work needs watching (or the process is quiet) and
        no thread is in :meth:`wait`, take it back when neither holds (engine lock held)."""
        if self._serving or self._pending or self._quiet:
            if self._leader is None and not self._waiting and time.monotonic() >= self._aside_until:
                self._lead(self._pt, arm=True)
        elif self._leader is self._pt:
            self._lead(None)

    def _pass_lead(self) -> None:
        """The leader leaves: the newest other thread in :meth:`wait` leads (one asleep and not about
        to leave preferred), else the progress thread if work needs it (engine lock held)."""
        nxt = None
        for s in reversed(self._waiting):
            if nxt is None or (nxt.kicked and not s.kicked):
                nxt = s
        if nxt is None:
            self._lead(None)
            self._progress_thread_duty()
        else:
            self._lead(nxt, arm=nxt.asleep)

    def _progress(self, me: _Sleeper | None = None, native: list[Any] | None = None, check: bool = False) -> bool:
        """Progress the worker (engine lock held); True if it did anything. Then :meth:`_progressed`,
        also when it did nothing if ``check`` (the caller woke on a worker event someone else consumed).

        ``native``: the requests, all the helper's (NativeRequest, NativeRequests), of the caller's op: one C call
        progresses the worker until they complete or a slice (``_FAST_SLICE_NS``) ends. Otherwise the
        worker is progressed until it has nothing more to do.
        """
        if native is not None:
            did = 0
            if len(native) == 1 and type(native[0]) is _ucp_tag.NativeRequests:  # sends: their own C array
                arr, n = native[0].address, native[0].n
            elif len(native) == 1:  # one request (a payload or a header still arriving): no array to build
                arr = self._c_one
                arr[0] = native[0]._req
                n = 1 if arr[0] else 0
            else:
                ptrs = [p for r in native for p in (r.pending() if type(r) is _ucp_tag.NativeRequests else (r._req,)) if p]
                arr, n = (ctypes.c_void_p * len(ptrs))(*ptrs), len(ptrs)
            if n:
                assert self.tag_fast is not None
                self.tag_fast.ukv_wait_requests(self._worker_h, arr, n, _FAST_SLICE_NS, self._c_progp)
                did = self._c_prog.value
        else:
            progress_once = self.worker.progress_once
            did = progress_once()
            if did:
                for _ in range(255):
                    if not progress_once():
                        break
        self._maybe_sweep()  # also when idle now: what arrived just after the last sweep must not stay parked
        if did or check:
            self._progressed(me)
        return bool(did)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_S
            self._sweep()

    def _progressed(self, me: _Sleeper | None = None) -> None:
        """What follows progress that did something (engine lock held): run tracked ops' completions
        (a header's posts its payload receive), then kick each thread asleep in :meth:`wait` (but
        ``me``) whose op is now complete, and only those: the others sleep on."""
        self._poll_pending()
        for s in self._waiting:  # (the cheap tests first: this runs after every progress that did something)
            if s.asleep and not s.kicked and s is not me and s.op is not None and _finished(s.op):
                s.wake()

    def _poll_pending(self) -> None:
        """Poll the tracked ops and forget the finished ones (an error stays for its waiter)."""
        if not self._pending:
            return
        done = []
        for op in list(self._pending):  # a completion may track a new op (a payload receive)
            try:
                if op.poll():
                    done.append(op)
            except Exception:  # noqa: BLE001 - surfaced to its waiter
                done.append(op)
        for op in done:
            self._pending.discard(op)

    def wait(self, op: Op, deadline: float, what: str, alive: Callable[[], str | None] | None = None) -> None:
        """Progress until ``op`` completes (its ``on_done`` has run).

        The calling thread progresses the worker itself (for every op, tracked
        ones included): spinning for ``UCXKV_SPIN_US`` (the fast path of a small
        message; skipped right after :meth:`recv_frame` spun in this thread), then
        sleeping (no CPU while nothing arrives); a ``stream`` op's waiter spins
        again after each wake-up. Of the threads in here, only the newest (the
        leader, see :meth:`_lead`) sleeps on the worker's event fd; the others
        sleep on their own kick fd, written by whoever's progress completed their
        op, and wake for nothing else. A leader that leaves hands the fd over at
        once (:meth:`_pass_lead`). Raises :class:`PeerTimeoutError` at ``deadline`` (a
        ``time.monotonic`` value) and :class:`PeerDeadError` as soon as
        ``alive()`` returns a reason (checked every ``_TICK_S``, every ``_IDLE_TICK_S`` once the
        wait has been quiet for ``_QUIET_S``, and at once on :meth:`wake_waiters`).
        ``what`` names the wait in those errors (it should name the peer).
        """
        self._check_pid()
        lock = self._lock
        with lock:  # fast path: complete at posting (an eager send) or after one progress (arrived)
            if self._poll(op, what) or (self._progress() and self._poll(op, what)):
                return
        worker = self.worker
        start = time.monotonic()
        spin_until = start + self._spin_s
        # a thread that just spun in recv_frame for this message does not spin twice
        spinning = self._spin_s > 0 and start - getattr(self._local, "spun_at", -1.0) > _RESPIN_S
        me = self._sleeper()
        me.op, me.asleep, me.kicked = op, False, False
        woken = False  # the last sleep ended early: a worker event, maybe consumed by someone else
        armed = False
        n = 0
        # an op of compiled-path requests is spun on in C, a slice per iteration (see _progress)
        native = op.requests if self.tag_fast is not None and all(type(r) is _ucp_tag.NativeRequest or type(r) is _ucp_tag.NativeRequests
                                                            for r in op.requests) else None
        with lock:
            self._waiting.append(me)
            self._lead(me)  # the newest waiter leads: its events are the likeliest next
        try:
            while True:
                with lock:
                    self._progress(me, native if spinning else None, woken)
                    if self._poll(op, what):
                        me.busy_at = time.monotonic()
                        return
                    if not spinning:
                        me.asleep, me.kicked = True, False
                        armed = True
                        if self._leader is me:
                            armed = worker.arm()  # False: events are pending, progress again
                            if armed:
                                self._watch(me)
                n += 1
                if spinning and native is None and (n & 31):
                    continue
                now = time.monotonic()
                self._check(start, now, deadline, what, alive)
                if spinning:
                    if now >= spin_until:
                        spinning = False
                    if native is None:  # (the C slice yields by itself)
                        os.sched_yield()  # more runnable threads than cores: the peer may need this one
                    woken = False
                elif armed:
                    # a thread with nothing happening for _QUIET_S (over all its waits) ticks slowly
                    tick = _TICK_S if now - me.busy_at < _QUIET_S else _IDLE_TICK_S
                    woken = me.sleep(min(tick, max(deadline - now, 0.0)))
                    if woken:
                        me.busy_at = time.monotonic()
                        if op.stream:
                            spinning, spin_until = self._spin_s > 0, me.busy_at + self._spin_s
        finally:
            with lock:
                me.op, me.asleep = None, False
                self._waiting.remove(me)
                if self._leader is me:
                    self._pass_lead()
                elif not self._waiting:
                    self._progress_thread_duty()

    def wake_waiters(self) -> None:
        """Wake every thread asleep in :meth:`wait`, to check its peer's liveness now (a peer said
        Goodbye or was found dead) instead of at its next tick."""
        with self._lock:
            for s in self._waiting:
                s.wake()

    def _check(self, start: float, now: float, deadline: float, what: str,
               alive: Callable[[], str | None] | None) -> None:
        if alive is not None:
            reason = alive()
            if reason:
                raise PeerDeadError(f"{what}: {reason}")
        if now >= deadline:
            raise PeerTimeoutError(f"{what}: timed out after {now - start:.1f}s")

    def _poll(self, op: Op, what: str) -> bool:
        """Whether ``op`` completed (engine lock held); raises its error, naming ``what``."""
        try:
            if not op.poll():
                return False
        except TransportError:
            self._pending.discard(op)
            raise
        except Exception as exc:  # noqa: BLE001 - a UCX error on this op
            self._pending.discard(op)
            raise PeerDeadError(f"{what} failed: {exc}") from exc
        self._pending.discard(op)
        return True

    def _progress_loop(self) -> None:
        """Progress what nobody waits on: tracked operations and emulated RMA served to peers.

        It sleeps on its own kick fd, and leads (sleeps on the worker's event fd
        too) only while such work exists and no thread is in :meth:`wait`
        (:meth:`_progress_thread_duty`): waiters progress the worker for everyone,
        tracked ops included, so a waiter is not slowed by a second thread waking
        for its events (measured in docs/bench.md). Handing it the lead moves the
        fd into its epoll set and arms the worker, without waking it.

        It also wakes every ``_TICK_S`` to progress the worker once, so that an idle
        process still answers UCX's own connection traffic: over tcp, a peer's new
        endpoint waits for our connection ack with write interest armed on its
        socket, and until we progress, that peer's worker fd stays readable and its
        waiter spins (measured at 48-99 % of a core before this tick; see
        docs/bench.md). After ``_QUIET_S`` without progress, a kick, tracked work or a
        thread taking the lead, the process is *quiet*: this thread stops ticking and
        leads instead while nobody waits, so the next event (a message) wakes it at
        once, and it wakes every ``_QUIET_TICK_S`` otherwise. A new endpoint
        (:meth:`connect`) kicks it out of the quiet state: the connection's handshake
        needs progress without an event to announce it. Twenty wake-ups a second were 1-2 % of a core on a
        2-core VM, where a wake-up after a long sleep costs 0.5-3 ms of CPU (docs/bench.md).
        Once something happens it gives the lead back and ticks again (a busy process's
        events are its waiters', see above).

        While another thread streams sends (posts ``_STREAM_GAP_S`` apart), the progress
        thread does not lead for them: each send call progresses the worker, and the
        stream's events are that thread's. It stands aside for ``_STANDASIDE_S`` at a time, then
        leads again if the sends are still in flight, so a sender that stops posting (and never
        waits) has its sends progressed within that delay.
        """
        me, lock = self._pt, self._lock
        eventful = time.monotonic()
        while not self._stop.is_set():
            with lock:
                did = self._progress(me)
                if not did:
                    self._poll_pending()  # e.g. sends that completed at posting
                now = time.monotonic()
                if did:
                    eventful = now
                self._quiet = (not (self._pending or self._serving)
                               and now - max(eventful, self._caller_at) >= _QUIET_S)
                if self._leader is me and now - self._caller_at < _STANDASIDE_S and self._post_gap < _STREAM_GAP_S:
                    # a thread streams sends, progressing the worker at each: the events are its own
                    self._aside_until = now + _STANDASIDE_S
                    self._lead(None)
                self._progress_thread_duty()
                tick = _QUIET_TICK_S if self._quiet else _TICK_S
                if self._leader is not me and self._aside_until > now:
                    tick = min(tick, self._aside_until - now)
                armed = True
                if self._leader is me:
                    armed = self.worker.arm()  # False: events are pending, progress again
                    if armed:
                        self._watch(me)
            if not armed:
                # events pending (a stream's fragments keep arriving): yield the core and the GIL first, or
                # this loop starves the thread it was kicked for (the sender between two waits, which needs
                # the lock and the GIL to become a waiter again): measured 26-29 passes and 185-200 us of
                # this thread's CPU per 1 MiB message over sm; 0.5 passes and 40-59 us with it (docs/bench.md)
                os.sched_yield()
                continue
            # the tick: pending ops are re-polled in case one completes without an event, and
            # an idle worker is progressed (peers' connection handshakes, see the docstring)
            if me.sleep(tick):
                eventful = time.monotonic()

    def shutdown(self) -> None:
        """Stop the progress thread (idempotent)."""
        self._finalizer()


_EH_CAPABLE = {"all", "tcp", "rc", "rc_v", "rc_x", "rc_verbs", "rc_mlx5", "ud", "ud_v", "ud_x", "ud_verbs",
               "ud_mlx5", "dc", "dc_x", "dc_mlx5", "ib", "mlx5", "cuda", "cuda_ipc", "gdr_copy", "cuda_copy"}


def _has_error_handling(tls: str) -> bool:
    """Whether the transports of ``UCX_TLS`` value ``tls`` include one that detects a dead peer."""
    names = [t.strip() for t in tls.split(",") if t.strip()]
    if not names or tls.startswith("^"):
        return True  # UCX's default set (or all but some): tcp/ib are in it
    return any(n in _EH_CAPABLE for n in names)


def _safe_tls_config() -> dict[str, str] | None:
    """Drop cma from a shared-memory-only ``UCX_TLS`` unless ``UCXKV_ALLOW_CMA=1``.

    With no transport that can detect a dead peer, UCX gives endpoints no error
    handling, and its cma transport then *aborts the process* when the peer dies
    during a zero-copy read. posix/sysv shared memory (copy through a segment)
    survives; the control plane's heartbeats detect the dead peer instead.
    """
    tls = os.environ.get("UCX_TLS", "")
    if not tls or os.environ.get("UCXKV_ALLOW_CMA", "0") == "1" or tls.startswith("^"):
        return None
    names = [t.strip() for t in tls.split(",") if t.strip()]
    if any(n in _EH_CAPABLE for n in names) or not any(n in ("sm", "shm", "cma") for n in names):
        return None
    out: list[str] = []
    for n in names:
        if n in ("sm", "shm"):
            out += ["posix", "sysv"]
        elif n != "cma":
            out.append(n)
    out += ["self"] if "self" not in out else []
    new = ",".join(dict.fromkeys(out))
    log.info("UCX_TLS=%s has no peer-failure handling; using %s without cma so a dying peer cannot abort "
             "this process (UCXKV_ALLOW_CMA=1 keeps cma: zero-copy, but unsafe)", tls, new)
    return {"TLS": new}


def _spin_seconds() -> float:
    raw = os.environ.get("UCXKV_SPIN_US", str(DEFAULT_SPIN_US))
    try:
        us = float(raw)
    except ValueError:
        raise LocalUsageError(f"UCXKV_SPIN_US={raw!r} is not a number of microseconds") from None
    if not 0 <= us <= 1e6:
        raise LocalUsageError(f"UCXKV_SPIN_US={raw!r} must be between 0 and 1000000")
    return us * 1e-6


def _scratch(n: int) -> Any:
    import numpy as np

    # a longer message fails as truncated, which is all a drain needs
    return np.empty(max(1, min(n, 1 << 16)), dtype=np.uint8)


_Array: Any = None


def _array(buf: Any) -> Any:
    global _Array
    if _Array is None:  # imported late, as ucxx itself (see Engine.__init__)
        from ucxx._lib.arr import Array

        _Array = Array
    return _Array(buf)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process's engine, created on first use (and anew in a forked child)."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine._pid != os.getpid():
            _engine = Engine()
        return _engine


@atexit.register
def _shutdown_at_exit() -> None:
    if _engine is not None and _engine._pid == os.getpid():
        _engine.shutdown()
