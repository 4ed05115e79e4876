/* The spliced stream's per-read path in C: whole chunks of token events passed from the engine's socket to the client's.
 *
 * While a stream's tokens flow, the engine connection's transport hands its reads to a ``Splice`` (it is the
 * transport's protocol then).  A read made only of whole HTTP chunks whose payloads are whole SSE token events
 * (every event has ``"finish_reason":null``: no comment, error, usage chunk, terminal chunk or ``[DONE]``) is
 * written to the client's transport as it came, chunk framing and all, its events counted and their gaps observed
 * for the inter-token histogram (kept here, put into it once a second and whenever the Python path takes the
 * connection back).  Anything else (a partial chunk, the last chunk, any other event, a client that cannot take
 * more: ``stall()``) goes to ``back(data)``, the Python path, which takes the connection back and handles it as
 * gateway/relay.py and gateway/client.py always do.  No Python frame runs and no Python object is made per token.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

static PyObject *s_sum;
static PyObject *s_connection_lost, *s_eof_received, *s_pause_writing, *s_resume_writing;

static const char NOT_FINISHED[] = "\"finish_reason\":null"; /* once in each token chunk, as relay.py's */
#define NOT_FINISHED_LEN (sizeof(NOT_FINISHED) - 1)
#define CHUNK_SIZE_DIGITS 8 /* a chunk of up to 4 GiB: far more than one read */
#define FLUSH_INTERVAL 1.0  /* seconds a scrape may see a spliced stream's gaps late; its end flushes them all */

typedef struct {
    PyObject_HEAD
    PyObject *write;  /* the client's transport's write */
    PyObject *owner;  /* the engine connection, the Python protocol this one stands in for */
    PyObject *back;   /* back(data or None): the Python path takes the connection back */
    PyObject *child;  /* the inter-token histogram's child: its ``counts`` and ``sum`` */
    PyObject *counts; /* child.counts: one count per bound, the last +Inf's */
    double *bounds;
    Py_ssize_t nbounds;
    long long *pending; /* observations not yet in ``child``: one count per bound and +Inf's, and their sum */
    long long npending;
    double pending_sum;
    double flushed;    /* when they last went into ``child`` (perf_counter's clock) */
    long long events;  /* token events written since arm() */
    long long written; /* their payload bytes (without the chunk framing) */
    double last;       /* when the last token event arrived, on perf_counter's clock */
    int active;
    int stalled; /* stall() was called: the client cannot take more now (its buffer is full, or it left) */
} Splice;

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Non-overlapping "\n\n" (an event's end) in ``p``, as bytes.count: memchr to each '\n' (glibc's memmem sets up
 * a search per call, and these scans run per token). */
static Py_ssize_t count_ends(const char *p, Py_ssize_t len) {
    Py_ssize_t found = 0;
    if (len < 2) return 0;
    const char *last = p + len - 1; /* a match starts before it */
    while (p < last) {
        const char *at = memchr(p, '\n', (size_t)(last - p));
        if (at == NULL) break;
        if (at[1] == '\n') {
            found++;
            p = at + 2;
        } else {
            p = at + 1;
        }
    }
    return found;
}

/* Non-overlapping NOT_FINISHED in ``p``, as bytes.count: memchr to each '_' (the marker's only one, at
 * NOT_FINISHED_AT) and a compare there; offsets, so that no pointer goes past the end. */
#define NOT_FINISHED_AT 7
static Py_ssize_t count_not_finished(const char *p, Py_ssize_t len) {
    Py_ssize_t found = 0, i = NOT_FINISHED_AT; /* where the '_' of a marker at the start would be */
    while (i < len) {
        const char *at = memchr(p + i, '_', (size_t)(len - i));
        if (at == NULL) break;
        Py_ssize_t start = (at - p) - NOT_FINISHED_AT;
        if (len - start >= (Py_ssize_t)NOT_FINISHED_LEN && memcmp(p + start, NOT_FINISHED, NOT_FINISHED_LEN) == 0) {
            found++;
            i = start + (Py_ssize_t)NOT_FINISHED_LEN + NOT_FINISHED_AT; /* the next one starts after this one */
        } else {
            i = (at - p) + 1;
        }
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
        Py_ssize_t ends = count_ends(chunk, (Py_ssize_t)size);
        if (ends != count_not_finished(chunk, (Py_ssize_t)size)) return 0;
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

/* ``times`` observations of ``value``: HistogramChild.observe's bisect_left, in C, kept here until flush(). */
static void observe(Splice *self, double value, long long times) {
    Py_ssize_t lo = 0, hi = self->nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (self->bounds[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    self->pending[lo] += times;
    self->npending += times;
    self->pending_sum += value * (double)times;
}

/* The observations kept here, into the histogram child: its sum first, then its counts.  A failure to read or set
 * the sum leaves the child as it was and keeps them here.  Each part is taken out of ``pending`` before the Python
 * code it may run (the sum's attribute, a count's ``__index__``): a flush from within that code (a close, a hand
 * back) cannot add it twice, and it is put back if it did not go in. */
static int flush(Splice *self, double now) {
    self->flushed = now;
    if (self->npending == 0 || self->child == NULL) return 0;
    PyObject *child = Py_NewRef(self->child), *counts = Py_NewRef(self->counts); /* held: that code may re-init */
    if (PyList_GET_SIZE(counts) != self->nbounds + 1) goto resized;
    PyObject *sum = PyObject_GetAttr(child, s_sum);
    double total = sum == NULL ? -1.0 : PyFloat_AsDouble(sum);
    Py_XDECREF(sum);
    if (total == -1.0 && PyErr_Occurred()) goto fail;
    double add_sum = self->pending_sum;
    self->pending_sum = 0.0;
    PyObject *updated = PyFloat_FromDouble(total + add_sum);
    int rc = updated == NULL ? -1 : PyObject_SetAttr(child, s_sum, updated);
    Py_XDECREF(updated);
    if (rc < 0) {
        self->pending_sum += add_sum;
        goto fail;
    }
    for (Py_ssize_t i = 0; i <= self->nbounds; i++) {
        long long add = self->pending[i];
        if (add == 0) continue;
        if (i >= PyList_GET_SIZE(counts)) goto resized; /* (emptied by code the sum's attribute ran) */
        self->pending[i] = 0;
        self->npending -= add;
        PyObject *item = Py_NewRef(PyList_GET_ITEM(counts, i));
        long long was = PyLong_AsLongLong(item);
        Py_DECREF(item);
        PyObject *count = was == -1 && PyErr_Occurred() ? NULL : PyLong_FromLongLong(was + add);
        int emptied = count != NULL && i >= PyList_GET_SIZE(counts); /* (by the count's own code) */
        if (count == NULL || emptied) {
            Py_XDECREF(count);
            if (i <= self->nbounds) { /* (a re-init meanwhile may have left fewer) */
                self->pending[i] += add;
                self->npending += add;
            }
            if (emptied) goto resized;
            goto fail;
        }
        PyObject *old = PyList_GET_ITEM(counts, i);
        PyList_SET_ITEM(counts, i, count);
        Py_DECREF(old);
    }
    Py_DECREF(child);
    Py_DECREF(counts);
    return 0;
resized: /* the list was changed in place since __init__ checked its size */
    PyErr_SetString(PyExc_RuntimeError, "itl.counts: one count per bound and +Inf's expected");
fail:
    Py_DECREF(child);
    Py_DECREF(counts);
    return -1;
}

/* 0 while the splice is open; -1 with RuntimeError once close() has let go of ``back``: nothing runs after it. */
static int check_open(Splice *self) {
    if (self->back != NULL) return 0;
    PyErr_SetString(PyExc_RuntimeError, "the splice is closed");
    return -1;
}

/* The Python path takes the connection back; the caller then puts the gaps kept here into the histogram
 * (``after_flush``), once what the hand-back was for has been done. */
static PyObject *hand_back(Splice *self, PyObject *data) {
    self->active = 0;
    if (check_open(self) < 0) return NULL;
    PyObject *back = Py_NewRef(self->back); /* held for the call: back() may close the splice */
    PyObject *r = PyObject_CallOneArg(back, data);
    Py_DECREF(back);
    return r;
}

/* ``r`` (a call's result, or NULL), after the gaps kept here went into the histogram (NULL if they could not). */
static PyObject *after_flush(Splice *self, PyObject *r) {
    if (r != NULL && flush(self, perf_now()) < 0) Py_CLEAR(r);
    return r;
}

static PyObject *Splice_data_received(Splice *self, PyObject *data) {
    Py_ssize_t events = 0, payload = 0;
    if (!self->active || self->stalled || !PyBytes_CheckExact(data) ||
        !whole_token_chunks(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &events, &payload))
        return after_flush(self, hand_back(self, data));
    PyObject *r = PyObject_CallOneArg(self->write, data);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    double now = perf_now();
    observe(self, now - self->last, 1);
    if (events > 1) observe(self, 0.0, events - 1); /* events that arrived together */
    self->last = now; /* also the read timeout's: the engine's silence runs from here */
    self->events += events;
    self->written += payload;
    if (now - self->flushed >= FLUSH_INTERVAL && flush(self, now) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Splice_arm(Splice *self, PyObject *arg) {
    if (check_open(self) < 0) return NULL;
    double last = PyFloat_AsDouble(arg);
    if (last == -1.0 && PyErr_Occurred()) return NULL;
    self->last = last;
    self->flushed = perf_now();
    self->events = self->written = 0;
    self->active = 1;
    self->stalled = 0;
    Py_RETURN_NONE;
}

/* The client's side says it cannot take more now (pause_writing, connection_lost): the next read is handed back,
 * and the Python path waits for the client as it always does.  No call per read asks the client's transport. */
static PyObject *Splice_stall(Splice *self, PyObject *Py_UNUSED(ignored)) {
    self->stalled = 1;
    Py_RETURN_NONE;
}

/* The splice is over: the connection handed back if it is still taken here, and ``back`` let go (it refers to
 * this object: no cycle is left for the garbage collector).  The other references stay until the object goes:
 * a call of this object's still running (the transport's, or a close from within one) goes on with them. */
static PyObject *Splice_close(Splice *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *r = self->active ? hand_back(self, Py_None) : Py_NewRef(Py_None);
    Py_CLEAR(self->back);
    self->active = 0; /* (re-armed by back() meanwhile or not) */
    return after_flush(self, r);
}

/* The transport's other calls: the Python protocol takes the connection back first, then gets the call (whatever
 * becomes of the gaps kept here: a connection_lost that did not arrive would leave the request waiting). */
static PyObject *delegate(Splice *self, PyObject *name, PyObject *arg) {
    if (check_open(self) < 0) return NULL;
    if (self->active) {
        PyObject *r = hand_back(self, Py_None);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    return after_flush(self, arg == NULL ? PyObject_CallMethodNoArgs(self->owner, name)
                                     : PyObject_CallMethodOneArg(self->owner, name, arg));
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
    long long *pending = PyMem_Calloc((size_t)n + 1, sizeof(long long));
    if (pending == NULL) {
        PyMem_Free(values);
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(bounds);
    PyMem_Free(self->bounds);
    PyMem_Free(self->pending);
    self->bounds = values;
    self->nbounds = n;
    self->pending = pending;
    self->npending = 0;
    self->pending_sum = 0.0;
    return counts;
fail:
    Py_XDECREF(bounds);
    Py_XDECREF(counts);
    return NULL;
}

static int Splice_init(Splice *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"out", "owner", "back", "itl", NULL};
    PyObject *out, *owner, *back, *child;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO", kwlist, &out, &owner, &back, &child)) return -1;
    PyObject *write = PyObject_GetAttrString(out, "write");
    PyObject *counts = write == NULL ? NULL : take_bounds(self, child);
    if (counts == NULL) {
        Py_XDECREF(write);
        return -1;
    }
    Py_XSETREF(self->write, write);
    Py_XSETREF(self->counts, counts);
    Py_XSETREF(self->owner, Py_NewRef(owner));
    Py_XSETREF(self->back, Py_NewRef(back));
    Py_XSETREF(self->child, Py_NewRef(child));
    self->active = 0;
    return 0;
}

static int Splice_traverse(Splice *self, visitproc visit, void *arg) {
    Py_VISIT(self->write);
    Py_VISIT(self->owner);
    Py_VISIT(self->back);
    Py_VISIT(self->child);
    Py_VISIT(self->counts);
    return 0;
}

static int Splice_clear(Splice *self) {
    Py_CLEAR(self->write);
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
    PyMem_Free(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Splice_methods[] = {
    {"data_received", (PyCFunction)Splice_data_received, METH_O, "Relay a read, or hand it back."},
    {"arm", (PyCFunction)Splice_arm, METH_O, "Take the reads from here on; ``last`` is the last token's time."},
    {"stall", (PyCFunction)Splice_stall, METH_NOARGS, "The client cannot take more now: hand the next read back."},
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
    .tp_doc = PyDoc_STR("Splice(out, owner, back, itl): token chunks from the engine to the client, in C."),
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
