"""The compiled fast path's hottest calls as a CPython extension instead of ctypes calls.

A ctypes call of :mod:`transport._ucp_tag`'s send costs about 0.9 µs of argument
conversion on top of the C it runs, and a stream's sender makes one a message, plus
one more to reap its requests; in a stream, with the payload's copies evicting the
caches, each costs several times that (docs/bench.md). This extension does the same
calls from C: :class:`Requests` holds a batch of send requests in its own C array,
is created, polled and reaped without ctypes; :func:`post_tensors` posts a batch of
sends through the helper's ``ukv_send_tensor`` (:func:`post_tensor` one, as a stream
posts them), and :func:`send_frame` and :func:`recv_frame` are the one-message path's
``ukv_send_frame`` and ``ukv_recv_frame`` (the helper's functions, reached by their
addresses); :func:`fill_window` writes a window of ``ukv_recv_tensors``' slots.

It needs the C compiler the helper needs and this Python's headers (``Python.h``, as
Triton's launchers do); it is built and cached like the helper (:mod:`transport._native`).
Where it cannot be built, :func:`load` returns None and the compiled path is off (the
engine logs why), so there is one compiled path, never a half of one.
"""

from __future__ import annotations

import ctypes
import logging
from types import ModuleType

from . import _native

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

typedef int (*send_tensor_fn)(void *, void *, uint64_t, const char *, uint32_t, uint64_t, const void *, size_t,
                              int64_t, void **, unsigned *);
typedef int (*reap_fn)(void **, int, int *);
typedef int (*send_frame_fn)(void *, void *, uint64_t, const char *, uint32_t, const void *, size_t, int64_t,
                             void **, unsigned *);
typedef int (*recv_frame_fn)(void *, uint64_t, void *, size_t, int64_t, size_t *, void **, unsigned *,
                             const void *, size_t, void *, size_t);

static send_tensor_fn send_tensor_c;  /* the helper's ukv_send_tensor */
static reap_fn reap_c;                /* the helper's ukv_reap_requests */
static send_frame_fn send_frame_c;    /* the helper's ukv_send_frame */
static recv_frame_fn recv_frame_c;    /* the helper's ukv_recv_frame */
static PyObject *s_acquire, *s_release;

/* Requests: n UCX requests in one C array (NULL: none, or done and freed), polled and freed under
   `lock` (the engine's); `keep` is the memory UCX may still read, held until every one completed;
   `status` the first failure's UCS status. */
typedef struct {
    PyObject_VAR_HEAD
    PyObject *what, *lock, *keep;
    int n, status, open;
    void *ptrs[1];
} Requests;

static PyObject *req_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"n", "what", "lock", "keep", NULL};
    int n;
    PyObject *what, *lock, *keep = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOO|O", names, &n, &what, &lock, &keep)) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "a negative number of requests");
        return NULL;
    }
    Requests *self = (Requests *)type->tp_alloc(type, n);  /* (zero-filled: every entry NULL) */
    if (self == NULL) return NULL;
    self->n = n;
    self->open = 1;
    Py_INCREF(what); self->what = what;
    Py_INCREF(lock); self->lock = lock;
    Py_INCREF(keep); self->keep = keep;
    return (PyObject *)self;
}

static void req_dealloc(Requests *self) {
    Py_XDECREF(self->what);
    Py_XDECREF(self->lock);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int call_lock(PyObject *lock, PyObject *name) {
    PyObject *r = PyObject_CallMethodNoArgs(lock, name);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* True once every request completed (each freed as it is found done), else False. */
static PyObject *req_completed(Requests *self, void *closure) {
    (void)closure;
    if (!self->open) Py_RETURN_TRUE;
    if (call_lock(self->lock, s_acquire) < 0) return NULL;
    PyObject *keep = NULL;
    if (self->open && reap_c(self->ptrs, self->n, &self->status) == 0) {
        self->open = 0;
        keep = self->keep;  /* released once the lock is */
        Py_INCREF(Py_None);
        self->keep = Py_None;
    }
    int open = self->open;
    int rc = call_lock(self->lock, s_release);
    Py_XDECREF(keep);
    if (rc < 0) return NULL;
    return PyBool_FromLong(!open);
}

static PyObject *req_address(Requests *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr((void *)self->ptrs);
}

static PyObject *req_pending(Requests *self, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(0);
    for (int i = 0; out != NULL && i < self->n; i++) {
        if (self->ptrs[i] == NULL) continue;
        PyObject *p = PyLong_FromVoidPtr(self->ptrs[i]);
        if (p == NULL || PyList_Append(out, p) < 0) Py_CLEAR(out);
        Py_XDECREF(p);
    }
    return out;
}

static PyGetSetDef req_getset[] = {
    {"completed", (getter)req_completed, NULL, "True once every request completed (the done ones freed).", NULL},
    {"address", (getter)req_address, NULL, "The address of the C array of requests.", NULL},
    {NULL},
};

static PyMemberDef req_members[] = {
    {"n", T_INT, offsetof(Requests, n), READONLY, "How many requests the array holds."},
    {"status", T_INT, offsetof(Requests, status), 0, "The first failure's UCS status (0: none)."},
    {"what", T_OBJECT, offsetof(Requests, what), READONLY, "What the requests do, for errors."},
    {"keep", T_OBJECT, offsetof(Requests, keep), 0, "The memory UCX may still read."},
    {NULL},
};

static PyMethodDef req_methods[] = {
    {"pending", (PyCFunction)req_pending, METH_NOARGS, "The addresses of the requests not yet freed."},
    {NULL},
};

static PyTypeObject RequestsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ukv_tag_ext.Requests",
    .tp_basicsize = offsetof(Requests, ptrs),
    .tp_itemsize = sizeof(void *),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "UCX requests in one C array, reaped under a lock.",
    .tp_new = req_new,
    .tp_dealloc = (destructor)req_dealloc,
    .tp_getset = req_getset,
    .tp_members = req_members,
    .tp_methods = req_methods,
};

/* post_tensors(worker, ep, posts, reqs) -> (rc, progressed, inflight): each (tag, header, pay_tag, addr,
   nbytes) of the list posts through ukv_send_tensor, its two requests in reqs' entries 2i, 2i+1; stops at
   the first failure (rc < 0, kept in reqs.status if none was). The caller holds the engine's lock. */
static PyObject *post_tensors(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 4 || !PyList_Check(args[2]) || !PyObject_TypeCheck(args[3], &RequestsType)) {
        PyErr_SetString(PyExc_TypeError, "post_tensors(worker, ep, posts: list, reqs: Requests)");
        return NULL;
    }
    void *w = PyLong_AsVoidPtr(args[0]), *ep = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return NULL;
    PyObject *posts = args[2];
    Requests *reqs = (Requests *)args[3];
    Py_ssize_t k = PyList_GET_SIZE(posts);
    if (2 * k > reqs->n) {
        PyErr_SetString(PyExc_ValueError, "more sends than the requests' array holds");
        return NULL;
    }
    typedef struct { uint64_t tag, pay_tag; const char *hdr; uint32_t hdrlen; void *addr; size_t nbytes; } post_t;
    post_t few[8], *ps = k <= 8 ? few : PyMem_Malloc(sizeof(post_t) * (size_t)k);
    if (ps == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *t = PyList_GET_ITEM(posts, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5 || !PyBytes_Check(PyTuple_GET_ITEM(t, 1))) {
            PyErr_SetString(PyExc_TypeError, "a send is (tag, header: bytes, pay_tag, addr, nbytes)");
            goto fail;
        }
        PyObject *hdr = PyTuple_GET_ITEM(t, 1);
        ps[i].tag = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
        ps[i].pay_tag = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 2));
        ps[i].addr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 3));
        ps[i].nbytes = PyLong_AsSize_t(PyTuple_GET_ITEM(t, 4));
        if (PyErr_Occurred()) goto fail;
        if (PyBytes_GET_SIZE(hdr) > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a header above 4 GiB");
            goto fail;
        }
        ps[i].hdr = PyBytes_AS_STRING(hdr);  /* (alive: the caller's list holds it) */
        ps[i].hdrlen = (uint32_t)PyBytes_GET_SIZE(hdr);
    }
    unsigned total = 0;
    int rc = 0;
    PyThreadState *ts = PyEval_SaveThread();  /* as under ctypes: other threads run while UCX posts and progresses */
    for (Py_ssize_t i = 0; i < k; i++) {
        unsigned progressed = 0;
        rc = send_tensor_c(w, ep, ps[i].tag, ps[i].hdr, ps[i].hdrlen, ps[i].pay_tag, ps[i].addr, ps[i].nbytes, 0,
                           reqs->ptrs + 2 * i, &progressed);
        total += progressed;
        if (rc < 0) break;
    }
    PyEval_RestoreThread(ts);
    if (ps != few) PyMem_Free(ps);
    if (rc < 0 && reqs->status == 0) reqs->status = rc;
    int inflight = 0;
    for (int i = 0; i < reqs->n && !inflight; i++) inflight = reqs->ptrs[i] != NULL;
    return Py_BuildValue("(iIi)", rc, total, inflight);
fail:
    if (ps != few) PyMem_Free(ps);
    return NULL;
}

/* post_tensor(worker, ep, tag, header: bytes, addr, nbytes, reqs) -> (rc, progressed, inflight): post_tensors of
   the one send (tag, header, tag | 1, addr, nbytes), without its list and tuple (a stream's sender posts one a
   message). The caller holds the engine's lock. */
static PyObject *post_tensor(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 7 || !PyBytes_Check(args[3]) || !PyObject_TypeCheck(args[6], &RequestsType)) {
        PyErr_SetString(PyExc_TypeError, "post_tensor(worker, ep, tag, header: bytes, addr, nbytes, reqs: Requests)");
        return NULL;
    }
    Requests *reqs = (Requests *)args[6];
    if (reqs->n < 2) {
        PyErr_SetString(PyExc_ValueError, "a send needs two entries in the requests' array");
        return NULL;
    }
    void *w = PyLong_AsVoidPtr(args[0]), *ep = PyLong_AsVoidPtr(args[1]), *addr = PyLong_AsVoidPtr(args[4]);
    uint64_t tag = PyLong_AsUnsignedLongLong(args[2]);
    size_t nbytes = PyLong_AsSize_t(args[5]);
    if (PyErr_Occurred()) return NULL;
    PyObject *hdr = args[3];
    if (PyBytes_GET_SIZE(hdr) > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a header above 4 GiB");
        return NULL;
    }
    unsigned progressed = 0;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = send_tensor_c(w, ep, tag, PyBytes_AS_STRING(hdr), (uint32_t)PyBytes_GET_SIZE(hdr), tag | 1, addr, nbytes,
                           0, reqs->ptrs, &progressed);
    PyEval_RestoreThread(ts);
    if (rc < 0 && reqs->status == 0) reqs->status = rc;
    return Py_BuildValue("(iIi)", rc, progressed, reqs->ptrs[0] != NULL || reqs->ptrs[1] != NULL);
}

/* An address argument: an int, or None for NULL. */
static int as_address(PyObject *o, void **out) {
    *out = o == Py_None ? NULL : PyLong_AsVoidPtr(o);
    return PyErr_Occurred() ? -1 : 0;
}

/* send_frame(worker, ep, tag, header: bytes, data: int | bytes | None, nbytes, spin_ns) -> (rc, req, progressed):
   ukv_send_frame (the frame u32 len | header | data[:nbytes], from a copy); req: the request still in flight
   (rc 1), else 0. The caller holds the engine's lock. */
static PyObject *send_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 7 || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "send_frame(worker, ep, tag, header: bytes, data, nbytes, spin_ns)");
        return NULL;
    }
    void *w, *ep, *data = NULL;
    if (as_address(args[0], &w) < 0 || as_address(args[1], &ep) < 0) return NULL;
    uint64_t tag = PyLong_AsUnsignedLongLong(args[2]);
    size_t nbytes = PyLong_AsSize_t(args[5]);
    int64_t spin_ns = PyLong_AsLongLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (PyBytes_Check(args[4])) {
        if ((size_t)PyBytes_GET_SIZE(args[4]) < nbytes) {
            PyErr_SetString(PyExc_ValueError, "data holds fewer than nbytes bytes");
            return NULL;
        }
        data = PyBytes_AS_STRING(args[4]);
    } else if (as_address(args[4], &data) < 0) {
        return NULL;
    }
    if (data == NULL && nbytes) {
        PyErr_SetString(PyExc_ValueError, "nbytes without data");
        return NULL;
    }
    if (PyBytes_GET_SIZE(args[3]) > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a header above 4 GiB");
        return NULL;
    }
    void *req = NULL;
    unsigned progressed = 0;
    const char *hdr = PyBytes_AS_STRING(args[3]);
    uint32_t hdrlen = (uint32_t)PyBytes_GET_SIZE(args[3]);
    int rc;
    Py_BEGIN_ALLOW_THREADS  /* it spins up to spin_ns: other threads run meanwhile, as under ctypes */
    rc = send_frame_c(w, ep, tag, hdr, hdrlen, data, nbytes, spin_ns, &req, &progressed);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(iNI)", rc, PyLong_FromVoidPtr(req), progressed);
}

/* recv_frame(worker, tag, addr, cap, spin_ns, expect: bytes | None, dst, dst_len) -> (rc, len, req, progressed):
   ukv_recv_frame into addr[0..cap); req: the request still in flight (rc 1), else 0. The caller holds the
   engine's lock, and the memory at addr and dst alive. */
static PyObject *recv_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 8 || (args[5] != Py_None && !PyBytes_Check(args[5]))) {
        PyErr_SetString(PyExc_TypeError, "recv_frame(worker, tag, addr, cap, spin_ns, expect, dst, dst_len)");
        return NULL;
    }
    void *w, *addr, *dst;
    if (as_address(args[0], &w) < 0 || as_address(args[2], &addr) < 0 || as_address(args[6], &dst) < 0)
        return NULL;
    uint64_t tag = PyLong_AsUnsignedLongLong(args[1]);
    size_t cap = PyLong_AsSize_t(args[3]);
    int64_t spin_ns = PyLong_AsLongLong(args[4]);
    size_t dst_len = PyLong_AsSize_t(args[7]);
    if (PyErr_Occurred()) return NULL;
    const char *expect = args[5] == Py_None ? NULL : PyBytes_AS_STRING(args[5]);
    size_t expect_len = args[5] == Py_None ? 0 : (size_t)PyBytes_GET_SIZE(args[5]);
    if (addr == NULL || (expect != NULL && dst_len && dst == NULL)) {
        PyErr_SetString(PyExc_ValueError, "a NULL buffer");
        return NULL;
    }
    size_t len = 0;
    void *req = NULL;
    unsigned progressed = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS  /* it spins up to spin_ns: other threads run meanwhile, as under ctypes */
    rc = recv_frame_c(w, tag, addr, cap, spin_ns, &len, &req, &progressed, expect, expect_len, dst, dst_len);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(inNI)", rc, (Py_ssize_t)len, PyLong_FromVoidPtr(req), progressed);
}

/* fill_window(slots, words, tag0, seq0, seq_mask, frames, frame_size, expect: bytes, expect_lens, out_addrs,
   out_lens): the first eight 64-bit words of each of len(expect_lens) receive slots (ukv_rslot, `words` words
   each, in `slots`, a writable buffer such as a ctypes array of them) for ukv_recv_tensors: slot i waits for send #seq0 + i (its header on
   tag0 | ((seq0 + i) & seq_mask) << 1, its payload on that | 1), its header into frames + i * frame_size
   (frame_size bytes), compared with the next expect_lens[i] bytes of expect, its payload into out_addrs[i]
   (out_lens[i] bytes). The caller keeps expect, the frames and the outs alive while the slots are used. */
static PyObject *fill_window(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 11 || !PyBytes_Check(args[7]) || !PyList_Check(args[8]) || !PyList_Check(args[9]) ||
        !PyList_Check(args[10])) {
        PyErr_SetString(PyExc_TypeError, "fill_window(slots, words, tag0, seq0, seq_mask, frames, frame_size, "
                                         "expect: bytes, expect_lens: list, out_addrs: list, out_lens: list)");
        return NULL;
    }
    void *frames;
    if (as_address(args[5], &frames) < 0) return NULL;
    Py_ssize_t words = PyLong_AsSsize_t(args[1]);
    uint64_t tag0 = PyLong_AsUnsignedLongLong(args[2]), seq0 = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t mask = PyLong_AsUnsignedLongLong(args[4]), fs = PyLong_AsUnsignedLongLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t k = PyList_GET_SIZE(args[8]);
    if (frames == NULL || words < 8 || PyList_GET_SIZE(args[9]) != k || PyList_GET_SIZE(args[10]) != k) {
        PyErr_SetString(PyExc_ValueError, "fill_window: NULL frames, slots of fewer than 8 words, or lists of "
                                          "different lengths");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) return NULL;
    void *slots = view.buf;
    int small = view.len < k * words * (Py_ssize_t)sizeof(uint64_t);
    PyBuffer_Release(&view);  /* (the caller keeps the slots alive: they are its receive's) */
    if (small) {
        PyErr_SetString(PyExc_ValueError, "fill_window: more slots than the buffer holds");
        return NULL;
    }
    const char *expect = PyBytes_AS_STRING(args[7]);
    size_t have = (size_t)PyBytes_GET_SIZE(args[7]), off = 0;
    for (int pass = 0; pass < 2; pass++, off = 0) {  /* every argument checked before a word is written */
        for (Py_ssize_t i = 0; i < k; i++) {
            size_t elen = PyLong_AsSize_t(PyList_GET_ITEM(args[8], i));
            void *out = PyLong_AsVoidPtr(PyList_GET_ITEM(args[9], i));
            uint64_t olen = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(args[10], i));
            if (PyErr_Occurred()) return NULL;
            if (elen > have - off) {
                PyErr_SetString(PyExc_ValueError, "fill_window: expect_lens add up to more than expect holds");
                return NULL;
            }
            if (pass == 1) {
                uint64_t *w = (uint64_t *)slots + (size_t)i * (size_t)words;
                uint64_t tag = tag0 | (((seq0 + (uint64_t)i) & mask) << 1);
                w[0] = tag;
                w[1] = tag | 1;
                w[2] = (uint64_t)(uintptr_t)((char *)frames + (size_t)i * fs);
                w[3] = fs;
                w[4] = (uint64_t)(uintptr_t)(expect + off);
                w[5] = elen;
                w[6] = (uint64_t)(uintptr_t)out;
                w[7] = olen;
            }
            off += elen;
        }
    }
    Py_RETURN_NONE;
}

/* init(send_tensor, reap_requests, send_frame, recv_frame): the addresses of the helper's functions this
   module calls. */
static PyObject *init(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *a[4];
    void *p[4];
    if (!PyArg_ParseTuple(args, "OOOO", &a[0], &a[1], &a[2], &a[3])) return NULL;
    for (int i = 0; i < 4; i++) {
        if (as_address(a[i], &p[i]) < 0) return NULL;
        if (p[i] == NULL) {
            PyErr_SetString(PyExc_ValueError, "a NULL function address");
            return NULL;
        }
    }
    send_tensor_c = (send_tensor_fn)p[0];
    reap_c = (reap_fn)p[1];
    send_frame_c = (send_frame_fn)p[2];
    recv_frame_c = (recv_frame_fn)p[3];
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"init", init, METH_VARARGS, "Set the helper's functions (addresses) this module calls."},
    {"post_tensors", (PyCFunction)(void (*)(void))post_tensors, METH_FASTCALL, "Post a batch of tensor sends."},
    {"post_tensor", (PyCFunction)(void (*)(void))post_tensor, METH_FASTCALL, "Post one tensor send."},
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL, "Send one frame (ukv_send_frame)."},
    {"fill_window", (PyCFunction)(void (*)(void))fill_window, METH_FASTCALL, "Fill a window's receive slots."},
    {"recv_frame", (PyCFunction)(void (*)(void))recv_frame, METH_FASTCALL, "Receive one frame (ukv_recv_frame)."},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ukv_tag_ext", NULL, -1, methods};

PyMODINIT_FUNC PyInit_ukv_tag_ext(void) {
    if (PyType_Ready(&RequestsType) < 0) return NULL;
    s_acquire = PyUnicode_InternFromString("acquire");
    s_release = PyUnicode_InternFromString("release");
    if (s_acquire == NULL || s_release == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RequestsType);
    if (PyModule_AddObject(m, "Requests", (PyObject *)&RequestsType) < 0) {
        Py_DECREF(&RequestsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
"""


def load(helper: ctypes.CDLL) -> ModuleType | None:
    """The extension, built on first use (cached) and pointed at ``helper``'s functions; None (logged)
    when it cannot be built or loaded."""
    try:
        mod = _native.load_extension("ukv_tag_ext", _C_SOURCE, "UCX tag fast-path extension")
        addr = ctypes.cast
        mod.init(*(addr(getattr(helper, name), ctypes.c_void_p).value
                   for name in ("ukv_send_tensor", "ukv_reap_requests", "ukv_send_frame", "ukv_recv_frame")))
        return mod
    except Exception as exc:  # noqa: BLE001 - any failure to build or load turns the compiled path off, logged
        log.warning("the compiled path is off: %s", exc)
        return None

