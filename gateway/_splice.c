/* The spliced stream's per-read path in C: whole chunks of token events passed from the engine's socket to the client's.
 *
 * While a stream's tokens flow, the engine connection's transport hands its reads to a ``Splice`` (it is the
 * transport's protocol then).  A read made only of whole HTTP chunks whose payloads are whole SSE token events
 * (every event has ``"finish_reason":null``: no comment, error, usage chunk, terminal chunk or ``[DONE]``) is
 * written to the client's transport as it came, chunk framing and all, its events counted and their gaps observed
 * into the inter-token histogram.  Anything else (a partial chunk, the last chunk, any other event, a client
 * that left or has bytes still unsent) goes to ``back(data)``, the Python path, which takes the connection back
 * and handles it as gateway/relay.py and gateway/client.py always do.  No Python frame runs per token.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

static PyObject *s_sum, *s_waiting_since;
static PyObject *s_connection_lost, *s_eof_received, *s_pause_writing, *s_resume_writing;

static const char NOT_FINISHED[] = "\"finish_reason\":null"; /* once in each token chunk, as relay.py's */
#define NOT_FINISHED_LEN (sizeof(NOT_FINISHED) - 1)
#define CHUNK_SIZE_DIGITS 8 /* a chunk of up to 4 GiB: far more than one read */

typedef struct {
    PyObject_HEAD
    PyObject *write;      /* the client's transport's write, is_closing and get_write_buffer_size */
    PyObject *is_closing;
    PyObject *unsent;
    PyObject *time;       /* loop.time: the read timeout's silence runs from the last byte */
    PyObject *owner;  /* the engine connection, the Python protocol this one stands in for */
    PyObject *back;   /* back(data or None): the Python path takes the connection back */
    PyObject *child;  /* the inter-token histogram's child: its ``counts`` and ``sum`` */
    PyObject *counts; /* child.counts: one count per bound, the last +Inf's */
    double *bounds;
    Py_ssize_t nbounds;
    long long events;  /* token events written since arm() */
    long long written; /* their payload bytes (without the chunk framing) */
    double last;       /* when the last token event arrived, on perf_counter's clock */
    int active;
} Splice;

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static Py_ssize_t count(const char *haystack, Py_ssize_t len, const char *needle, Py_ssize_t size) {
    Py_ssize_t found = 0;
    const char *end = haystack + len;
    while (haystack + size <= end) {
        const char *at = memmem(haystack, (size_t)(end - haystack), needle, (size_t)size);
        if (at == NULL) break;
        found++;
        haystack = at + size; /* non-overlapping, as bytes.count */
    }
    return found;
}

/* Whether ``p`` is one or more whole chunks, each holding whole token events only; their events and payload
 * bytes are added to ``*events`` and ``*payload`` then. */
static int whole_token_chunks(const char *p, Py_ssize_t len, Py_ssize_t *events, Py_ssize_t *payload) {
    Py_ssize_t pos = 0, n = 0, bytes = 0;
    if (len == 0) return 0;
    while (pos < len) {
        size_t size = 0;
        int digits = 0, v;
        while (pos < len && (v = hex_value(p[pos])) >= 0) {
            if (++digits > CHUNK_SIZE_DIGITS) return 0;
            size = size * 16 + (size_t)v;
            pos++;
        }
        /* no size, chunk extensions, a partial head or the last chunk: the Python path's */
        if (digits == 0 || size == 0 || len - pos < 2 || p[pos] != '\r' || p[pos + 1] != '\n') return 0;
        pos += 2;
        if ((size_t)(len - pos) < 2 || (size_t)(len - pos) - 2 < size) return 0; /* not complete in this read */
        const char *chunk = p + pos;
        if (chunk[size] != '\r' || chunk[size + 1] != '\n') return 0;
        if (size < 2 || chunk[size - 2] != '\n' || chunk[size - 1] != '\n') return 0; /* an event left open */
        Py_ssize_t ends = count(chunk, (Py_ssize_t)size, "\n\n", 2);
        if (ends != count(chunk, (Py_ssize_t)size, NOT_FINISHED, NOT_FINISHED_LEN)) return 0;
        n += ends;
        bytes += (Py_ssize_t)size;
        pos += (Py_ssize_t)size + 2;
    }
    *events = n;
    *payload = bytes;
    return 1;
}

static double perf_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter()'s clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ``times`` observations of ``value``: HistogramChild.observe's bisect_left, in C.  The count is changed last,
 * once the sum was: a failure to read or set the sum leaves the histogram as it was. */
static int observe(Splice *self, double value, Py_ssize_t times) {
    Py_ssize_t lo = 0, hi = self->nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (self->bounds[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    PyObject *counts = self->counts;
    if (lo >= PyList_GET_SIZE(counts)) goto resized;
    long long was = PyLong_AsLongLong(PyList_GET_ITEM(counts, lo));
    if (was == -1 && PyErr_Occurred()) return -1;
    PyObject *now = PyLong_FromLongLong(was + times);
    if (now == NULL) return -1;
    if (value != 0.0) {
        PyObject *sum = PyObject_GetAttr(self->child, s_sum);
        double total = sum == NULL ? -1.0 : PyFloat_AsDouble(sum);
        Py_XDECREF(sum);
        PyObject *updated = total == -1.0 && PyErr_Occurred() ? NULL
                                                               : PyFloat_FromDouble(total + value * (double)times);
        int rc = updated == NULL ? -1 : PyObject_SetAttr(self->child, s_sum, updated);
        Py_XDECREF(updated);
        if (rc < 0) {
            Py_DECREF(now);
            return -1;
        }
    }
    if (lo >= PyList_GET_SIZE(counts)) { /* (emptied by code the sum's attribute ran) */
        Py_DECREF(now);
        goto resized;
    }
    PyObject *old = PyList_GET_ITEM(counts, lo);
    PyList_SET_ITEM(counts, lo, now);
    Py_DECREF(old);
    return 0;
resized: /* the list was changed in place since __init__ checked its size */
    PyErr_SetString(PyExc_RuntimeError, "itl.counts: one count per bound and +Inf's expected");
    return -1;
}

/* 0 while the splice is open; -1 with RuntimeError once close() has let go of ``back``: nothing runs after it. */
static int check_open(Splice *self) {
    if (self->back != NULL) return 0;
    PyErr_SetString(PyExc_RuntimeError, "the splice is closed");
    return -1;
}

static PyObject *hand_back(Splice *self, PyObject *data) {
    self->active = 0;
    if (check_open(self) < 0) return NULL;
    PyObject *back = Py_NewRef(self->back); /* held for the call: back() may close the splice */
    PyObject *r = PyObject_CallOneArg(back, data);
    Py_DECREF(back);
    return r;
}

/* Whether the client's transport can take a write now without buffering it: open, nothing unsent. */
static int client_ready(Splice *self) {
    PyObject *r = PyObject_CallNoArgs(self->is_closing);
    if (r == NULL) return -1;
    int closing = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (closing) return closing < 0 ? -1 : 0;
    r = PyObject_CallNoArgs(self->unsent);
    if (r == NULL) return -1;
    Py_ssize_t unsent = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    if (unsent == -1 && PyErr_Occurred()) return -1;
    return unsent == 0;
}

static PyObject *Splice_data_received(Splice *self, PyObject *data) {
    Py_ssize_t events = 0, payload = 0;
    if (!self->active || !PyBytes_CheckExact(data) ||
        !whole_token_chunks(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &events, &payload))
        return hand_back(self, data);
    int ready = client_ready(self);
    if (ready < 0) return NULL;
    if (!ready) return hand_back(self, data);
    PyObject *r = PyObject_CallOneArg(self->write, data);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    double now = perf_now(), gap = now - self->last;
    self->last = now; /* counted first: the read was written, whatever fails after */
    self->events += events;
    self->written += payload;
    if (observe(self, gap, 1) < 0) return NULL;
    if (events > 1 && observe(self, 0.0, events - 1) < 0) return NULL; /* events that arrived together */
    r = PyObject_CallNoArgs(self->time);
    if (r == NULL) return NULL;
    int rc = PyObject_SetAttr(self->owner, s_waiting_since, r);
    Py_DECREF(r);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Splice_arm(Splice *self, PyObject *arg) {
    if (check_open(self) < 0) return NULL;
    double last = PyFloat_AsDouble(arg);
    if (last == -1.0 && PyErr_Occurred()) return NULL;
    self->last = last;
    self->events = self->written = 0;
    self->active = 1;
    Py_RETURN_NONE;
}

/* The splice is over: the connection handed back if it is still taken here, and ``back`` let go (it refers to
 * this object: no cycle is left for the garbage collector).  The other references stay until the object goes:
 * a call of this object's still running (the transport's, or a close from within one) goes on with them. */
static PyObject *Splice_close(Splice *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *r = self->active ? hand_back(self, Py_None) : Py_NewRef(Py_None);
    Py_CLEAR(self->back);
    self->active = 0; /* (re-armed by back() meanwhile or not) */
    return r;
}

/* The transport's other calls: the Python protocol takes the connection back first, then gets the call. */
static PyObject *delegate(Splice *self, PyObject *name, PyObject *arg) {
    if (check_open(self) < 0) return NULL;
    if (self->active) {
        PyObject *r = hand_back(self, Py_None);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    return arg == NULL ? PyObject_CallMethodNoArgs(self->owner, name) : PyObject_CallMethodOneArg(self->owner, name, arg);
}

static PyObject *Splice_connection_lost(Splice *self, PyObject *exc) { return delegate(self, s_connection_lost, exc); }
static PyObject *Splice_eof_received(Splice *self, PyObject *Py_UNUSED(ignored)) {
    return delegate(self, s_eof_received, NULL);
}
static PyObject *Splice_pause_writing(Splice *self, PyObject *Py_UNUSED(ignored)) {
    return delegate(self, s_pause_writing, NULL);
}
static PyObject *Splice_resume_writing(Splice *self, PyObject *Py_UNUSED(ignored)) {
    return delegate(self, s_resume_writing, NULL);
}

/* The histogram child's finite bounds as doubles, into ``self``; its ``counts`` list, or NULL on error. */
static PyObject *take_bounds(Splice *self, PyObject *child) {
    PyObject *bounds = PyObject_GetAttrString(child, "bounds");
    PyObject *counts = bounds == NULL ? NULL : PyObject_GetAttrString(child, "counts");
    if (counts == NULL) goto fail;
    if (!PyTuple_CheckExact(bounds) || !PyList_CheckExact(counts) ||
        PyList_GET_SIZE(counts) != PyTuple_GET_SIZE(bounds) + 1) {
        PyErr_SetString(PyExc_TypeError, "itl: a HistogramChild (bounds, and one more count than bounds)");
        goto fail;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    double *values = PyMem_Malloc(sizeof(double) * (size_t)(n ? n : 1));
    if (values == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        values[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (values[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(values);
            goto fail;
        }
    }
    Py_DECREF(bounds);
    PyMem_Free(self->bounds);
    self->bounds = values;
    self->nbounds = n;
    return counts;
fail:
    Py_XDECREF(bounds);
    Py_XDECREF(counts);
    return NULL;
}

static int Splice_init(Splice *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"out", "owner", "back", "loop", "itl", NULL};
    PyObject *out, *owner, *back, *loop, *child;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO", kwlist, &out, &owner, &back, &loop, &child)) return -1;
    PyObject *write = PyObject_GetAttrString(out, "write");
    PyObject *is_closing = write == NULL ? NULL : PyObject_GetAttrString(out, "is_closing");
    PyObject *unsent = is_closing == NULL ? NULL : PyObject_GetAttrString(out, "get_write_buffer_size");
    PyObject *time = unsent == NULL ? NULL : PyObject_GetAttrString(loop, "time");
    PyObject *counts = time == NULL ? NULL : take_bounds(self, child);
    if (counts == NULL) {
        Py_XDECREF(write);
        Py_XDECREF(is_closing);
        Py_XDECREF(unsent);
        Py_XDECREF(time);
        return -1;
    }
    Py_XSETREF(self->write, write);
    Py_XSETREF(self->is_closing, is_closing);
    Py_XSETREF(self->unsent, unsent);
    Py_XSETREF(self->time, time);
    Py_XSETREF(self->counts, counts);
    Py_XSETREF(self->owner, Py_NewRef(owner));
    Py_XSETREF(self->back, Py_NewRef(back));
    Py_XSETREF(self->child, Py_NewRef(child));
    self->active = 0;
    return 0;
}

static int Splice_traverse(Splice *self, visitproc visit, void *arg) {
    Py_VISIT(self->write);
    Py_VISIT(self->is_closing);
    Py_VISIT(self->unsent);
    Py_VISIT(self->time);
    Py_VISIT(self->owner);
    Py_VISIT(self->back);
    Py_VISIT(self->child);
    Py_VISIT(self->counts);
    return 0;
}

static int Splice_clear(Splice *self) {
    Py_CLEAR(self->write);
    Py_CLEAR(self->is_closing);
    Py_CLEAR(self->unsent);
    Py_CLEAR(self->time);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->back);
    Py_CLEAR(self->child);
    Py_CLEAR(self->counts);
    self->active = 0;
    return 0;
}

static void Splice_dealloc(Splice *self) {
    PyObject_GC_UnTrack(self);
    Splice_clear(self);
    PyMem_Free(self->bounds);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Splice_methods[] = {
    {"data_received", (PyCFunction)Splice_data_received, METH_O, "Relay a read, or hand it back."},
    {"arm", (PyCFunction)Splice_arm, METH_O, "Take the reads from here on; ``last`` is the last token's time."},
    {"close", (PyCFunction)Splice_close, METH_NOARGS, "Hand the connection back if it is taken here; let go."},
    {"connection_lost", (PyCFunction)Splice_connection_lost, METH_O, NULL},
    {"eof_received", (PyCFunction)Splice_eof_received, METH_NOARGS, NULL},
    {"pause_writing", (PyCFunction)Splice_pause_writing, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)Splice_resume_writing, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Splice_members[] = {
    {"events", T_LONGLONG, offsetof(Splice, events), READONLY, "Token events written since arm()."},
    {"written", T_LONGLONG, offsetof(Splice, written), READONLY, "Their payload bytes."},
    {"last", T_DOUBLE, offsetof(Splice, last), READONLY, "When the last token event arrived (perf_counter)."},
    {"active", T_INT, offsetof(Splice, active), READONLY, "Whether reads are taken here."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SpliceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._splice.Splice",
    .tp_doc = PyDoc_STR("Splice(out, owner, back, loop, itl): token chunks from the engine to the client, in C."),
    .tp_basicsize = sizeof(Splice),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Splice_init,
    .tp_dealloc = (destructor)Splice_dealloc,
    .tp_traverse = (traverseproc)Splice_traverse,
    .tp_clear = (inquiry)Splice_clear,
    .tp_methods = Splice_methods,
    .tp_members = Splice_members,
};

static struct PyModuleDef splice_module = {
    PyModuleDef_HEAD_INIT, .m_name = "gateway._splice", .m_doc = PyDoc_STR("The spliced stream's per-read path in C."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__splice(void) {
    if (PyType_Ready(&SpliceType) < 0) return NULL;
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_sum, "sum");
    INTERN(s_waiting_since, "_waiting_since");
    INTERN(s_connection_lost, "connection_lost");
    INTERN(s_eof_received, "eof_received");
    INTERN(s_pause_writing, "pause_writing");
    INTERN(s_resume_writing, "resume_writing");
#undef INTERN
    PyObject *module = PyModule_Create(&splice_module);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Splice", (PyObject *)&SpliceType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
