"""UCX's C RMA calls (memory maps, remote keys, get/put, flush) on ucxx's own handles.

ucxx 0.52's Python layer has no RMA, so a small C helper (built and cached by
:mod:`transport._native`) does the calls. It also posts many pieces in one call, so a
transfer of thousands of pieces costs one Python call, not thousands.

Every function here must be called with the engine's lock held.
"""

from __future__ import annotations

import ctypes
import threading

from . import _native

_C_SOURCE = r"""
#include <ucp/api/ucp.h>
#include <stdint.h>
#include <string.h>

int ukv_mem_map(ucp_context_h ctx, void *addr, size_t len, ucp_mem_h *out) {
    ucp_mem_map_params_t p;
    memset(&p, 0, sizeof(p));
    p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    p.address = addr;
    p.length = len;
    return ucp_mem_map(ctx, &p, out);
}

int ukv_mem_unmap(ucp_context_h ctx, ucp_mem_h memh) { return ucp_mem_unmap(ctx, memh); }

int ukv_rkey_pack(ucp_context_h ctx, ucp_mem_h memh, void **buf, size_t *len) {
    return ucp_rkey_pack(ctx, memh, buf, len);
}

void ukv_rkey_buffer_release(void *buf) { ucp_rkey_buffer_release(buf); }

int ukv_rkey_unpack(ucp_ep_h ep, const void *buf, ucp_rkey_h *out) { return ucp_ep_rkey_unpack(ep, buf, out); }

void ukv_rkey_destroy(ucp_rkey_h rkey) { ucp_rkey_destroy(rkey); }

/* Post n gets (put == 0) or puts of pieces local[loff[i]..+len[i]) <-> remote[roff[i]..+len[i]).
   Requests are handed back to UCX at once (completion is awaited with a flush).
   Returns 0, or the UCS status of the first piece that failed to post; *posted counts the posted ones. */
int ukv_post(ucp_ep_h ep, int put, char *lbase, ucp_mem_h lmemh, uint64_t rbase, ucp_rkey_h rkey, size_t n,
             const int64_t *loff, const int64_t *roff, const int64_t *len, size_t *posted) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    if (lmemh != NULL) {
        p.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
        p.memh = lmemh;
    }
    size_t i;
    for (i = 0; i < n; i++) {
        ucs_status_ptr_t r = put ? ucp_put_nbx(ep, lbase + loff[i], (size_t)len[i], rbase + (uint64_t)roff[i], rkey, &p)
                                 : ucp_get_nbx(ep, lbase + loff[i], (size_t)len[i], rbase + (uint64_t)roff[i], rkey, &p);
        if (UCS_PTR_IS_ERR(r)) {
            *posted = i;
            return UCS_PTR_STATUS(r);
        }
        if (r != NULL) ucp_request_free(r);
    }
    *posted = n;
    return 0;
}

/* 0: flushed already; 1: in progress, poll *req; < 0: UCS error. */
int ukv_flush(ucp_ep_h ep, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep, &p);
    *req = NULL;
    if (r == NULL) return 0;
    if (UCS_PTR_IS_ERR(r)) return UCS_PTR_STATUS(r);
    *req = r;
    return 1;
}

/* 1 while in progress, else the final status (0 or < 0). */
int ukv_request_status(void *req) {
    ucs_status_t s = ucp_request_check_status(req);
    return s == UCS_INPROGRESS ? 1 : (int)s;
}

void ukv_request_free(void *req) { ucp_request_free(req); }

unsigned ukv_worker_progress(ucp_worker_h w) { return ucp_worker_progress(w); }

const char *ukv_status_string(int s) { return ucs_status_string((ucs_status_t)s); }
"""

_lock = threading.Lock()
_LIB: ctypes.CDLL | None = None
P = ctypes.c_void_p
SZ = ctypes.c_size_t


def lib() -> ctypes.CDLL:
    """The compiled helper, built on first use (about 0.2 s) and cached across processes."""
    global _LIB
    with _lock:
        if _LIB is not None:
            return _LIB
        c_int, i64p = ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
        sig = {
            "ukv_mem_map": (c_int, [P, P, SZ, ctypes.POINTER(P)]),
            "ukv_mem_unmap": (c_int, [P, P]),
            "ukv_rkey_pack": (c_int, [P, P, ctypes.POINTER(P), ctypes.POINTER(SZ)]),
            "ukv_rkey_buffer_release": (None, [P]),
            "ukv_rkey_unpack": (c_int, [P, ctypes.c_char_p, ctypes.POINTER(P)]),
            "ukv_rkey_destroy": (None, [P]),
            "ukv_post": (c_int, [P, c_int, P, P, ctypes.c_uint64, P, SZ, i64p, i64p, i64p, ctypes.POINTER(SZ)]),
            "ukv_flush": (c_int, [P, ctypes.POINTER(P)]),
            "ukv_request_status": (c_int, [P]),
            "ukv_request_free": (None, [P]),
            "ukv_worker_progress": (ctypes.c_uint, [P]),
            "ukv_status_string": (ctypes.c_char_p, [c_int]),
        }
        _LIB = _native.load("ukv_rma", _C_SOURCE, sig, "UCX RMA helper")
        return _LIB


def status_string(status: int) -> str:
    """UCX's words for a status code."""
    return lib().ukv_status_string(status).decode()
