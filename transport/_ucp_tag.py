"""The compiled fast path of a one-message send or receive (a header with its data inline).

A small tensor travels as one tag message (see :mod:`transport.pipe`). Through
ucxx's Python layer its send or receive costs a dozen Python-level calls
(post, wrap, probe, poll, progress); here each is one C call made with the
engine's lock held and the GIL released (through ctypes, or for the hottest
calls through :mod:`transport._tag_ext`, a CPython extension): the send assembles the frame
(length prefix, header, inline bytes) and posts it; the receive probes the
worker for the message on its exact tag, progressing the worker for up to a
given slice while it has not arrived, and receives it into the caller's frame.
Neither blocks beyond its slice: what is still in flight then comes back as a
request (:class:`NativeRequest`) that the engine's ordinary waits take over,
with their timeouts and liveness checks.

Built and cached by :mod:`transport._native`; when it or the extension cannot be
built (no C compiler, no ``Python.h``), or ``UCXKV_FAST_PATH=0``, :func:`lib`
returns None and the pipe keeps its Python path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

from . import _native, _tag_ext
from .errors import LocalUsageError, PeerDeadError

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#include <ucp/api/ucp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sched.h>

/* A spinning caller yields its core after this many idle progress calls: on a machine with more
   runnable threads than cores, the peer it waits for may need this core (measured in docs/bench.md). */
#define YIELD_EVERY 16

/* Progress once; every YIELD_EVERY idle calls in a row, yield the core. */
static unsigned progress(ucp_worker_h w, int *idle) {
    unsigned did = ucp_worker_progress(w);
    if (did) {
        *idle = 0;
    } else if (++*idle >= YIELD_EVERY) {
        *idle = 0;
        sched_yield();
    }
    return did;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void free_user_data(void *request, ucs_status_t status, void *user_data) {
    (void)request; (void)status;
    free(user_data);
}

/* Progress until request r completes or spin_ns passed (at least one progress).
   0: done and freed; < 0: failed (freed); 1: still in flight, *req = r (the caller owns it). */
static int finish(ucp_worker_h w, void *r, int64_t spin_ns, void **req, unsigned *progressed) {
    uint64_t end = now_ns() + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
    int idle = 0;
    for (;;) {
        *progressed += progress(w, &idle);
        ucs_status_t s = ucp_request_check_status(r);
        if (s != UCS_INPROGRESS) {
            ucp_request_free(r);
            return s == UCS_OK ? 0 : (int)s;
        }
        if (now_ns() >= end) {
            *req = r;
            return 1;
        }
    }
}

/* Send one frame on tag: u32 little-endian hdrlen | hdr | data, from a copy (the caller's
   memory is free again on return). 0: sent; 1: in flight, *req; < 0: UCS error. */
int ukv_send_frame(ucp_worker_h w, ucp_ep_h ep, uint64_t tag, const char *hdr, uint32_t hdrlen,
                   const void *data, size_t datalen, int64_t spin_ns, void **req, unsigned *progressed) {
    size_t n = 4 + (size_t)hdrlen + datalen;
    unsigned char *buf = malloc(n);
    *req = NULL;
    *progressed = 0;
    if (buf == NULL) return UCS_ERR_NO_MEMORY;
    buf[0] = hdrlen & 0xff; buf[1] = (hdrlen >> 8) & 0xff; buf[2] = (hdrlen >> 16) & 0xff; buf[3] = hdrlen >> 24;
    memcpy(buf + 4, hdr, hdrlen);
    if (datalen) memcpy(buf + 4 + hdrlen, data, datalen);
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = free_user_data;  /* not called on immediate completion */
    p.user_data = buf;
    ucs_status_ptr_t r = ucp_tag_send_nbx(ep, buf, n, tag, &p);
    if (r == NULL) { free(buf); return 0; }
    if (UCS_PTR_IS_ERR(r)) { free(buf); return UCS_PTR_STATUS(r); }
    return finish(w, r, spin_ns, req, progressed);
}

/* A frame received whole in buf[0..len): if it is exactly expect[0..expect_len) followed by dst_len bytes,
   copy those into dst and return 3 (landed), else 0 (the caller decodes it). */
static int land(const void *buf, size_t len, size_t cap, const void *expect, size_t expect_len, void *dst,
                size_t dst_len) {
    if (expect == NULL || len > cap || len != expect_len + dst_len || memcmp(buf, expect, expect_len) != 0)
        return 0;
    if (dst_len) memcpy(dst, (const char *)buf + expect_len, dst_len);
    return 3;
}

/* Receive the message on exactly tag into buf[0..cap), progressing the worker for up to spin_ns
   while it has not arrived. *len: its full length once matched (above cap: truncated).
   0: received; 1: matched, still arriving, *req (buf must stay alive until it completes);
   2: nothing arrived (nothing consumed); 3: received, and it was expect[0..expect_len) (a header the
   caller built for the frame it expects; NULL: none) followed by exactly dst_len bytes, which were
   copied to dst; < 0: UCS error of the matched receive. */
int ukv_recv_frame(ucp_worker_h w, uint64_t tag, void *buf, size_t cap, int64_t spin_ns, size_t *len,
                   void **req, unsigned *progressed, const void *expect, size_t expect_len, void *dst,
                   size_t dst_len) {
    ucp_tag_recv_info_t info;
    uint64_t end = 0;
    int started = 0, idle = 0;
    *req = NULL;
    *progressed = 0;
    *len = 0;
    for (;;) {
        ucp_tag_message_h m = ucp_tag_probe_nb(w, tag, (ucp_tag_t)-1, 1, &info);
        if (m != NULL) {
            ucp_request_param_t p;
            memset(&p, 0, sizeof(p));
            *len = info.length;
            ucs_status_ptr_t r = ucp_tag_msg_recv_nbx(w, buf, cap, m, &p);
            if (UCS_PTR_IS_ERR(r)) return UCS_PTR_STATUS(r);
            int rc = r == NULL ? 0 : finish(w, r, spin_ns, req, progressed);
            return rc == 0 ? land(buf, *len, cap, expect, expect_len, dst, dst_len) : rc;
        }
        if (!started) {
            end = now_ns() + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
            started = 1;
        } else if (now_ns() >= end) {
            return 2;
        }
        *progressed += progress(w, &idle);
    }
}

int ukv_wait_requests(ucp_worker_h w, void **r, int n, int64_t spin_ns, unsigned *progressed);
int ukv_reap_requests(void **r, int n, int *status);

/* Send a tensor: its header frame on tag_hdr from a copy (as ukv_send_frame) and its payload on tag_pay
   from the caller's memory, in place (it must stay alive until reqs[1] completes), then progress up to
   spin_ns (one progress at least). reqs[0], reqs[1]: the requests still in flight (NULL: done and freed;
   the caller frees the others with ukv_reap_requests once complete). 0: both posted; < 0: UCS error of the
   header (nothing posted), of posting the payload (reqs[0] may be in flight), or of a request that failed
   (freed). */
int ukv_send_tensor(ucp_worker_h w, ucp_ep_h ep, uint64_t tag_hdr, const char *hdr, uint32_t hdrlen,
                    uint64_t tag_pay, const void *pay, size_t paylen, int64_t spin_ns, void **reqs,
                    unsigned *progressed) {
    size_t n = 4 + (size_t)hdrlen;
    unsigned char *buf = malloc(n);
    reqs[0] = reqs[1] = NULL;
    *progressed = 0;
    if (buf == NULL) return UCS_ERR_NO_MEMORY;
    buf[0] = hdrlen & 0xff; buf[1] = (hdrlen >> 8) & 0xff; buf[2] = (hdrlen >> 16) & 0xff; buf[3] = hdrlen >> 24;
    memcpy(buf + 4, hdr, hdrlen);
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = free_user_data;
    p.user_data = buf;
    ucs_status_ptr_t r = ucp_tag_send_nbx(ep, buf, n, tag_hdr, &p);
    if (r == NULL) {
        free(buf);
    } else if (UCS_PTR_IS_ERR(r)) {
        free(buf);
        return UCS_PTR_STATUS(r);
    } else {
        reqs[0] = r;
    }
    ucp_request_param_t q;
    memset(&q, 0, sizeof(q));
    r = ucp_tag_send_nbx(ep, pay, paylen, tag_pay, &q);
    if (UCS_PTR_IS_ERR(r)) return UCS_PTR_STATUS(r);
    reqs[1] = r;
    int status = 0;
    ukv_wait_requests(w, reqs, 2, spin_ns, progressed);
    ukv_reap_requests(reqs, 2, &status);
    return status;
}

/* One receive of a tensor with a payload straight into the caller's memory (see ukv_recv_tensors). */
typedef struct {
    uint64_t hdr_tag, pay_tag;
    void *frame;
    uint64_t cap;
    const void *expect;   /* the exact header frame expected (length prefix included) */
    uint64_t expect_len;
    void *out;
    uint64_t out_len;
    uint64_t len;         /* the header's length once it arrived */
    int64_t state;
    int64_t status;       /* the UCS error of a failed receive (state UKV_FAILED_*) */
    void *req;            /* the receive in flight (states UKV_HDR_FLIGHT, UKV_PAY_FLIGHT) */
} ukv_rslot;

/* UKV_HDR_TAKEN, UKV_PAY_TAKEN: the caller receives this slot's header (payload) itself, having found
   the message parked outside the worker (the engine's stash); left alone here, but still waited for. */
enum { UKV_WAIT_HDR = 0, UKV_HDR_FLIGHT = 1, UKV_HDR_OTHER = 2, UKV_WAIT_PAY = 3, UKV_PAY_FLIGHT = 4,
       UKV_DONE = 5, UKV_PAY_OTHER = 6, UKV_FAILED_HDR = 7, UKV_FAILED_PAY = 8, UKV_HDR_TAKEN = 9,
       UKV_PAY_TAKEN = 10 };

/* Whether a slot is still waited for, here or by the caller (UKV_*_TAKEN). */
static int waiting(const ukv_rslot *s) {
    return (s->state <= UKV_PAY_FLIGHT && s->state != UKV_HDR_OTHER) || s->state >= UKV_HDR_TAKEN;
}

/* Whether data of the slot's message may be arriving now. */
static int arriving(const ukv_rslot *s) {
    return s->state == UKV_HDR_FLIGHT || s->state == UKV_PAY_FLIGHT || s->state >= UKV_HDR_TAKEN;
}

static void header_arrived(ukv_rslot *s) {
    s->state = (s->len == s->expect_len && s->len <= s->cap && memcmp(s->frame, s->expect, s->len) == 0)
               ? UKV_WAIT_PAY : UKV_HDR_OTHER;
}

/* Whether the slot's request finished; if so it is freed, and a failure sets state = failed. */
static int reaped(ukv_rslot *s, int64_t failed) {
    ucs_status_t st = ucp_request_check_status(s->req);
    if (st == UCS_INPROGRESS) return 0;
    ucp_request_free(s->req);
    s->req = NULL;
    if (st != UCS_OK) { s->status = st; s->state = failed; }
    return 1;
}

/* Receive the probed message m into buf[0..len): 1 if it completed at once, else 0 with the slot's
   state set to flight (its request in s->req) or, if UCX refused, to failed. */
static int take(ucp_worker_h w, ukv_rslot *s, void *buf, size_t len, ucp_tag_message_h m, int64_t flight,
                int64_t failed) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    ucs_status_ptr_t r = ucp_tag_msg_recv_nbx(w, buf, len, m, &p);
    if (r == NULL) return 1;
    if (UCS_PTR_IS_ERR(r)) {
        s->status = UCS_PTR_STATUS(r);
        s->state = failed;
    } else {
        s->req = r;
        s->state = flight;
    }
    return 0;
}

/* Take one slot as far as it goes without waiting; 1 if its state changed. */
static int advance(ucp_worker_h w, ukv_rslot *s) {
    ucp_tag_recv_info_t info;
    int64_t before = s->state;
    for (;;) {
        switch (s->state) {
        case UKV_WAIT_HDR: {
            ucp_tag_message_h m = ucp_tag_probe_nb(w, s->hdr_tag, (ucp_tag_t)-1, 1, &info);
            if (m == NULL) return s->state != before;
            s->len = info.length;
            if (take(w, s, s->frame, s->cap, m, UKV_HDR_FLIGHT, UKV_FAILED_HDR)) header_arrived(s);
            break;
        }
        case UKV_HDR_FLIGHT:
            if (!reaped(s, UKV_FAILED_HDR)) return s->state != before;
            if (s->state != UKV_FAILED_HDR) header_arrived(s);
            break;
        case UKV_WAIT_PAY: {
            /* look before taking: a payload of another length is left for the ordinary path's error */
            if (ucp_tag_probe_nb(w, s->pay_tag, (ucp_tag_t)-1, 0, &info) == NULL) return s->state != before;
            if (info.length != s->out_len) { s->state = UKV_PAY_OTHER; break; }
            ucp_tag_message_h m = ucp_tag_probe_nb(w, s->pay_tag, (ucp_tag_t)-1, 1, &info);
            if (take(w, s, s->out, s->out_len, m, UKV_PAY_FLIGHT, UKV_FAILED_PAY)) s->state = UKV_DONE;
            break;
        }
        case UKV_PAY_FLIGHT:
            if (!reaped(s, UKV_FAILED_PAY)) return s->state != before;
            if (s->state != UKV_FAILED_PAY) s->state = UKV_DONE;
            break;
        default:  /* nothing more to do here: done, or the caller's ordinary path takes it */
            return s->state != before;
        }
    }
}

/* Receive slots s[0..k) (a header each, compared with its expected bytes, then its payload into
   out), advancing every slot, so several payloads are in flight at once, and progressing the worker
   until each slot is past what this helper does (done, failed, or left to the ordinary path) or
   spin_ns passed (at least one pass). A slot's header is looked for once the slot before it has its own
   (headers arrive in order: no probe is spent on the later ones). Returns the number of slots still
   waiting or in flight; *changed: 1 if any slot moved on, 2 if the worker made progress while one of
   them was arriving. */
int ukv_recv_tensors(ucp_worker_h w, ukv_rslot *s, int k, int64_t spin_ns, unsigned *progressed, int *changed) {
    uint64_t end = now_ns() + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
    int idle = 0;
    *progressed = 0;
    *changed = 0;
    for (;;) {
        int open = 0;
        for (int i = 0; i < k; i++) {
            if (s[i].state == UKV_WAIT_HDR && i > 0 && s[i - 1].state == UKV_WAIT_HDR) {
                open++;
                continue;
            }
            *changed |= advance(w, &s[i]);
            open += waiting(&s[i]);
        }
        if (open == 0 || now_ns() >= end) return open;
        unsigned did = progress(w, &idle);
        *progressed += did;
        /* progress counts as movement only while one of ours is arriving (not another pipe's traffic) */
        for (int i = 0; did && i < k && !(*changed & 2); i++)
            if (arriving(&s[i])) *changed |= 2;
    }
}

/* Progress until every request of r[0..n) completed (NULL entries are skipped) or spin_ns passed
   (at least one progress). Returns how many are still in progress; completed ones are not freed. */
int ukv_wait_requests(ucp_worker_h w, void **r, int n, int64_t spin_ns, unsigned *progressed) {
    uint64_t end = now_ns() + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
    int idle = 0;
    *progressed = 0;
    for (;;) {
        *progressed += progress(w, &idle);
        int open = 0;
        for (int i = 0; i < n; i++)
            open += r[i] != NULL && ucp_request_check_status(r[i]) == UCS_INPROGRESS;
        if (open == 0 || now_ns() >= end) return open;
    }
}

/* Free every request of r[0..n) that finished and set its entry to NULL (NULL entries are skipped).
   *status: the first failure's UCS status, if it is still 0. Returns how many are still in progress. */
int ukv_reap_requests(void **r, int n, int *status) {
    int open = 0;
    for (int i = 0; i < n; i++) {
        if (r[i] == NULL) continue;
        ucs_status_t s = ucp_request_check_status(r[i]);
        if (s == UCS_INPROGRESS) {
            open++;
            continue;
        }
        if (s != UCS_OK && *status == 0) *status = s;
        ucp_request_free(r[i]);
        r[i] = NULL;
    }
    return open;
}

/* 1 while in progress, else the final status (0 or < 0). */
int ukv_tag_request_status(void *req) {
    ucs_status_t s = ucp_request_check_status(req);
    return s == UCS_INPROGRESS ? 1 : (int)s;
}

void ukv_tag_request_free(void *req) { ucp_request_free(req); }

const char *ukv_tag_status_string(int s) { return ucs_status_string((ucs_status_t)s); }
"""

P = ctypes.c_void_p


class RecvSlot(ctypes.Structure):
    """``ukv_rslot``: one receive of :func:`ukv_recv_tensors` (a header compared with ``expect``, then
    the payload into ``out``); ``state`` is one of the ``ST_*`` values."""

    _fields_ = [("hdr_tag", ctypes.c_uint64), ("pay_tag", ctypes.c_uint64), ("frame", P), ("cap", ctypes.c_uint64),
                ("expect", P), ("expect_len", ctypes.c_uint64), ("out", P), ("out_len", ctypes.c_uint64),
                ("len", ctypes.c_uint64), ("state", ctypes.c_int64), ("status", ctypes.c_int64), ("req", P)]


#: A :class:`RecvSlot` is this many 64-bit words, one per field in order (the extension's ``fill_window``
#: writes the first eight; Pipe._hand_over reads the states through a numpy view).
RECV_SLOT_WORDS = len(RecvSlot._fields_)
if ctypes.sizeof(RecvSlot) != 8 * RECV_SLOT_WORDS or any(
        getattr(RecvSlot, name).offset != 8 * i for i, (name, _) in enumerate(RecvSlot._fields_)):
    raise ImportError("transport._ucp_tag: RecvSlot is not a row of 64-bit words on this platform")


#: ``RecvSlot.state``: nothing taken yet; header in flight; header arrived but differs from the expected
#: bytes; header matched, payload not arrived; payload in flight; done; payload of another length (not
#: taken); header receive failed; payload receive failed; header, or payload, received by the caller itself
#: (found parked in the engine's stash, out of the helper's reach: the helper leaves the slot alone but
#: counts it as waiting).
(ST_WAIT_HDR, ST_HDR_FLIGHT, ST_HDR_OTHER, ST_WAIT_PAY, ST_PAY_FLIGHT, ST_DONE, ST_PAY_OTHER, ST_FAILED_HDR,
 ST_FAILED_PAY, ST_HDR_TAKEN, ST_PAY_TAKEN) = range(11)

_lock = threading.Lock()
_LIB: ctypes.CDLL | None = None
#: The extension of the hottest calls (:mod:`transport._tag_ext`), loaded with :data:`_LIB`.
EXT: Any = None
_tried = False


def enabled() -> bool:
    """Whether the fast path may be used: ``UCXKV_FAST_PATH`` is not ``0`` (read at each engine start)."""
    raw = os.environ.get("UCXKV_FAST_PATH", "1")
    if raw not in ("0", "1"):
        raise LocalUsageError(f"UCXKV_FAST_PATH={raw!r} must be 0 or 1")
    return raw == "1"


def cuda_enabled() -> bool:
    """Whether CUDA payload tensors may take the compiled path too: ``UCXKV_FAST_PATH_CUDA`` is ``1``
    (read at each engine start; off by default until the path has been checked on a GPU, see the README)."""
    raw = os.environ.get("UCXKV_FAST_PATH_CUDA", "0")
    if raw not in ("0", "1"):
        raise LocalUsageError(f"UCXKV_FAST_PATH_CUDA={raw!r} must be 0 or 1")
    return raw == "1"


def lib() -> ctypes.CDLL | None:
    """The compiled helper (built on first use, cached), or None when it or its extension (:data:`EXT`)
    cannot be built (logged once)."""
    global _LIB, _tried, EXT, NativeRequests
    if _LIB is not None:  # polled on every in-flight request: no lock once loaded
        return _LIB
    with _lock:
        if _LIB is not None or _tried:
            return _LIB
        _tried = True
        c_int, i64, up = ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint)
        # (ukv_send_frame, ukv_recv_frame, ukv_send_tensor and ukv_reap_requests are called by the extension,
        # through their addresses: no ctypes signature)
        sig = {
            "ukv_recv_tensors": (c_int, [P, ctypes.POINTER(RecvSlot), c_int, i64, up, ctypes.POINTER(c_int)]),
            "ukv_wait_requests": (c_int, [P, P, c_int, i64, up]),  # (an array, or the address of one)
            "ukv_tag_request_status": (c_int, [P]),
            "ukv_tag_request_free": (None, [P]),
            "ukv_tag_status_string": (ctypes.c_char_p, [c_int]),
        }
        try:
            helper = _native.load("ukv_tag", _C_SOURCE, sig, "UCX tag fast-path helper")
        except Exception as exc:  # noqa: BLE001 - any failure to build or load falls back, logged
            log.warning("small messages take the Python path (slower): %s", exc)
            return None
        ext = _tag_ext.load(helper)
        if ext is None:
            return None
        EXT, NativeRequests = ext, _requests_class(ext.Requests)
        _LIB = helper
        return _LIB


def status_string(status: int) -> str:
    """UCX's words for a status code."""
    h = lib()
    return h.ukv_tag_status_string(status).decode() if h is not None else f"UCS status {status}"


class NativeRequest:
    """A tag request the helper left in flight, shaped like a ucxx request for :class:`transport._engine.Op`.

    It is polled and freed under the engine's lock (``lock``); ``length`` is the
    matched message's length (receives). ``keep`` holds the buffer UCX may still
    touch until the request completes.
    """

    __slots__ = ("_req", "_status", "_what", "_lock", "length", "keep")

    def __init__(self, req: int, what: str, lock: Any, length: int = -1, keep: Any = None):
        self._req: int | None = req
        self._status = 0
        self._what, self._lock, self.length, self.keep = what, lock, length, keep

    @property
    def completed(self) -> bool:
        if self._req is None:
            return True
        with self._lock:
            if self._req is None:
                return True
            h = lib()
            assert h is not None
            s = h.ukv_tag_request_status(self._req)
            if s == 1:
                return False
            self._status = s
            h.ukv_tag_request_free(self._req)
            self._req = None
            self.keep = None
        return True

    def check_error(self) -> None:
        if self._status < 0:
            raise PeerDeadError(f"{self._what}: {status_string(self._status)}")


def _requests_class(base: type) -> type:
    """:class:`NativeRequests` on the extension's C type ``base`` (see :func:`lib`)."""

    class NativeRequests(base):  # type: ignore[misc, valid-type]
        """Requests the helper left in flight, held in one C array and reaped by one C call; shaped like a
        ucxx request for :class:`transport._engine.Op` (``completed`` once every one of them is).

        Created as ``NativeRequests(n, what, lock, keep)``. ``address`` is the array :func:`ukv_send_tensor`
        fills (two entries a tensor; NULL: done and freed); ``pending()`` lists those not yet freed. They are
        polled and freed under the engine's lock (``lock``); ``keep`` holds the memory UCX may still read
        until every request completed. The first failure (``status``) is kept for :meth:`check_error`.
        """

        __slots__ = ()

        def fail(self, status: int) -> None:
            """Record a failure the helper returned while posting (kept only if none was before)."""
            if not self.status:
                self.status = status

        def check_error(self) -> None:
            if self.status < 0:
                raise PeerDeadError(f"{self.what}: {status_string(self.status)}")

    return NativeRequests


#: The compiled path's batch of send requests (a class on the extension's C type), once :func:`lib` loaded it.
NativeRequests: Any = None
