/* The tcp lane's hot loop in C (optional; transport/backends/tcp.py falls back to Python without it).
 *
 * Wire: the 40-byte header `<BBHIQIIQQ` of tcp.py (type, flags, nshards, imm, tid, region, count, offset,
 * length), little-endian, unchanged: a native writer talks to a Python target and the other way round.
 *
 * What is here:
 * - `send_some(fd, bufs)`: one non-blocking `sendmsg` of a list of buffers; bytes taken.
 * - `wait_ack(fd, buf, pos, end, timeout_ns, spin_ns)`: the waiting writer's read of its acknowledgement into the
 *   lane reader's buffer: spin (`poll(0)` and `sched_yield`) up to `spin_ns`, then `poll` until `timeout_ns`; returns
 *   as soon as a whole ACK header (or any other message's first byte) is buffered.
 * - `Regions`: the engine's host regions (id -> address, size), each holding a buffer export of the region's view
 *   while registered (and while a receive into it is in flight after deregistration).
 * - `Lane.run(buf, pos, end, regions)`: a data lane's receiver loop while only the receiver sends on the socket:
 *   header, region and range checks, the payload `recv`'d straight into the region, acks coalesced and sent; any
 *   message it does not take (another type, an unknown region, a range outside it, a write with an immediate to
 *   count) goes back to Python with its header still buffered, as the Python loop would read it.
 * Every wait is a bounded `poll`; the GIL is released while waiting, reading and sending.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire header is little-endian; this build reads it in place"
#endif

#define HDR 40
#define T_WRITE 1
#define T_ACK 3
#define F_IMM 1
#define ACK_BATCH 64
#define IOV_MAX_N 512
#define SLICE_MS 200 /* the receiver loop returns to Python this often when idle */

/* Lane.run results */
#define R_IDLE 0   /* nothing arrived within the slice (or a kick): call again */
#define R_PY 1     /* a message for Python: its header is at `pos` */
#define R_SHARED 3 /* this side now sends on the lane: Python's loop takes over */
#define R_EOF 4    /* the peer closed the connection */
#define R_ACKS 5   /* acks that could not be sent here: Python sends them */

/* wait_ack results */
#define W_TIMEOUT 0
#define W_ACK 1
#define W_OTHER 2
#define W_EOF 3

typedef struct __attribute__((packed)) {
    uint8_t type, flags;
    uint16_t nshards;
    uint32_t imm;
    uint64_t tid;
    uint32_t region, count;
    uint64_t offset, length;
} header_t;

_Static_assert(sizeof(header_t) == HDR, "header is 40 bytes");

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static PyObject *os_error(int err) {
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* ------------------------------------------------------------------ send_some */
static PyObject *py_send_some(PyObject *self, PyObject *args) {
    int fd;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "iO", &fd, &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "send_some: bufs must be a sequence of buffers");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > IOV_MAX_N)
        n = IOV_MAX_N;
    Py_buffer views[8];
    Py_buffer *v = views;
    struct iovec iov_s[8];
    struct iovec *iov = iov_s;
    if (n > 8) {
        v = PyMem_Malloc(sizeof(Py_buffer) * n);
        iov = PyMem_Malloc(sizeof(struct iovec) * n);
        if (!v || !iov) {
            PyMem_Free(v == views ? NULL : v);
            PyMem_Free(iov == iov_s ? NULL : iov);
            Py_DECREF(fast);
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t got = 0;
    PyObject *ret = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &v[got], PyBUF_SIMPLE) < 0)
            goto done;
        iov[got].iov_base = v[got].buf;
        iov[got].iov_len = (size_t)v[got].len;
    }
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)n;
    ssize_t k;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        k = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (k < 0 && errno == EINTR);
    if (k < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (k < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            ret = PyLong_FromLong(0);
        else
            os_error(err);
    } else {
        ret = PyLong_FromSsize_t(k);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&v[i]);
    if (v != views)
        PyMem_Free(v);
    if (iov != iov_s)
        PyMem_Free(iov);
    Py_DECREF(fast);
    return ret;
}

/* ------------------------------------------------------------------ buffered reads */
/* Append what the socket holds now to buf[*end:cap] (compacting first when needed); bytes read, 0: none yet,
 * -1: EOF, -2: error (errno in *err). `exact` > 0: read at most that many bytes more. */
static ssize_t fill_nowait(int fd, char *buf, Py_ssize_t cap, Py_ssize_t *pos, Py_ssize_t *end, Py_ssize_t exact,
                           int *err) {
    if (*pos == *end) {
        *pos = *end = 0;
    } else if (*end == cap || (exact && *end + exact > cap)) {
        Py_ssize_t n = *end - *pos;
        memmove(buf, buf + *pos, (size_t)n);
        *pos = 0;
        *end = n;
    }
    Py_ssize_t room = cap - *end;
    if (exact && exact < room)
        room = exact;
    ssize_t k;
    do {
        k = recv(fd, buf + *end, (size_t)room, MSG_DONTWAIT);
    } while (k < 0 && errno == EINTR);
    if (k == 0)
        return -1;
    if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        *err = errno;
        return -2;
    }
    *end += k;
    return k;
}

/* poll fd (and kick >= 0) for input up to ms (0: look only); 1 readable, 0 not, 2 kicked, -1 error (*err) */
static int wait_in(int fd, int kick, int ms, int *err) {
    struct pollfd p[2] = {{fd, POLLIN, 0}, {kick, POLLIN, 0}};
    int r;
    do {
        r = poll(p, kick >= 0 ? 2 : 1, ms);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        *err = errno;
        return -1;
    }
    if (p[0].revents & POLLNVAL) {
        *err = EBADF;
        return -1;
    }
    if (p[0].revents)
        return 1;  /* data, or an error / hang-up the next recv reports */
    if (kick >= 0 && p[1].revents) {
        uint64_t x;
        ssize_t unused = read(kick, &x, sizeof x);
        (void)unused;
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------ wait_ack */
static PyObject *py_wait_ack(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer b;
    Py_ssize_t pos, end;
    long long timeout_ns, spin_ns;
    if (!PyArg_ParseTuple(args, "iw*nnLL", &fd, &b, &pos, &end, &timeout_ns, &spin_ns))
        return NULL;
    char *buf = b.buf;
    Py_ssize_t cap = b.len;
    if (pos < 0 || end < pos || end > cap || cap < HDR) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "wait_ack: pos/end outside the buffer");
        return NULL;
    }
    int code = W_TIMEOUT, err = 0, fast = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t t0 = now_ns();
    int64_t deadline = t0 + (timeout_ns > 0 ? timeout_ns : 0);
    int64_t spin_end = t0 + (spin_ns > 0 ? spin_ns : 0);
    int looked = 0;
    for (;;) {
        if (end > pos) {
            if ((uint8_t)buf[pos] != T_ACK) {
                code = W_OTHER;
                break;
            }
            if (end - pos >= HDR) {
                code = W_ACK;
                break;
            }
        }
        int ready;
        int64_t now = now_ns();
        if (timeout_ns <= 0) {
            if (looked)
                break;
            looked = 1;
            ready = wait_in(fd, -1, 0, &err);
        } else if (now < spin_end) {
            ready = wait_in(fd, -1, 0, &err);
            if (ready == 0) {
                sched_yield();  /* the peer may share this core: let it run */
                continue;
            }
            fast = 1;
        } else {
            if (now >= deadline)
                break;
            int ms = (int)((deadline - now + 999999) / 1000000);
            ready = wait_in(fd, -1, ms, &err);
        }
        if (ready < 0) {
            code = -1;
            break;
        }
        if (ready == 0)
            continue;
        ssize_t k = fill_nowait(fd, buf, cap, &pos, &end, 0, &err);
        if (k == -1) {
            code = W_EOF;
            break;
        }
        if (k == -2) {
            code = -1;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (code < 0)
        return os_error(err);
    return Py_BuildValue("innO", code, pos, end, fast ? Py_True : Py_False);
}

/* ------------------------------------------------------------------ Regions */
typedef struct {
    uint32_t id;
    int live;        /* registered (dead: removed, released once no receive uses it) */
    int busy;        /* receives in flight into it */
    char *ptr;
    uint64_t nbytes;
    Py_buffer view;
} entry_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    entry_t **e;
    Py_ssize_t n, cap;
} RegionsObject;

static int regions_init(RegionsObject *self, PyObject *args, PyObject *kw) {
    pthread_mutex_init(&self->mu, NULL);
    self->e = NULL;
    self->n = self->cap = 0;
    return 0;
}

/* release dead entries no receive uses (holding the GIL) */
static void regions_reap(RegionsObject *self) {
    pthread_mutex_lock(&self->mu);
    Py_ssize_t j = 0;
    entry_t *gone[64];
    int ngone = 0;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        entry_t *x = self->e[i];
        if (!x->live && !x->busy && ngone < 64)
            gone[ngone++] = x;
        else
            self->e[j++] = x;
    }
    self->n = j;
    pthread_mutex_unlock(&self->mu);
    for (int i = 0; i < ngone; i++) {
        PyBuffer_Release(&gone[i]->view);
        PyMem_Free(gone[i]);
    }
}

static void regions_dealloc(RegionsObject *self) {
    for (Py_ssize_t i = 0; i < self->n; i++) {
        PyBuffer_Release(&self->e[i]->view);
        PyMem_Free(self->e[i]);
    }
    PyMem_Free(self->e);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void mark_dead(RegionsObject *self, uint32_t id) {
    for (Py_ssize_t i = 0; i < self->n; i++)
        if (self->e[i]->live && self->e[i]->id == id)
            self->e[i]->live = 0;
}

static PyObject *regions_add(RegionsObject *self, PyObject *args) {
    unsigned long long id;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "KO", &id, &obj))
        return NULL;
    if (id > 0xFFFFFFFFULL) {
        PyErr_SetString(PyExc_ValueError, "Regions.add: region id beyond 32 bits");
        return NULL;
    }
    entry_t *x = PyMem_Calloc(1, sizeof(entry_t));
    if (!x)
        return PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, &x->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyMem_Free(x);
        return NULL;
    }
    x->id = (uint32_t)id;
    x->live = 1;
    x->ptr = x->view.buf;
    x->nbytes = (uint64_t)x->view.len;
    regions_reap(self);
    pthread_mutex_lock(&self->mu);
    if (self->n == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 8;
        entry_t **e = PyMem_Realloc(self->e, sizeof(entry_t *) * cap);
        if (!e) {
            pthread_mutex_unlock(&self->mu);
            PyBuffer_Release(&x->view);
            PyMem_Free(x);
            return PyErr_NoMemory();
        }
        self->e = e;
        self->cap = cap;
    }
    mark_dead(self, x->id);
    self->e[self->n++] = x;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *regions_remove(RegionsObject *self, PyObject *args) {
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id))
        return NULL;
    pthread_mutex_lock(&self->mu);
    mark_dead(self, (uint32_t)id);
    pthread_mutex_unlock(&self->mu);
    regions_reap(self);
    Py_RETURN_NONE;
}

static PyObject *regions_clear(RegionsObject *self, PyObject *unused) {
    pthread_mutex_lock(&self->mu);
    for (Py_ssize_t i = 0; i < self->n; i++)
        self->e[i]->live = 0;
    pthread_mutex_unlock(&self->mu);
    regions_reap(self);
    Py_RETURN_NONE;
}

static PyObject *regions_contains(RegionsObject *self, PyObject *args) {
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id))
        return NULL;
    int found = 0;
    pthread_mutex_lock(&self->mu);
    for (Py_ssize_t i = 0; i < self->n; i++)
        if (self->e[i]->live && self->e[i]->id == (uint32_t)id)
            found = 1;
    pthread_mutex_unlock(&self->mu);
    return PyBool_FromLong(found);
}

/* the live entry of `id`, marked busy (NULL: none); without the GIL */
static entry_t *regions_take(RegionsObject *self, uint32_t id) {
    entry_t *hit = NULL;
    pthread_mutex_lock(&self->mu);
    for (Py_ssize_t i = 0; i < self->n; i++) {
        entry_t *x = self->e[i];
        if (x->live && x->id == id) {
            hit = x;
            x->busy++;
            break;
        }
    }
    pthread_mutex_unlock(&self->mu);
    return hit;
}

static void regions_give(RegionsObject *self, entry_t *x) {
    pthread_mutex_lock(&self->mu);
    x->busy--;
    pthread_mutex_unlock(&self->mu);
}

static PyMethodDef regions_methods[] = {
    {"add", (PyCFunction)regions_add, METH_VARARGS, "add(id, view): register a writable contiguous buffer"},
    {"remove", (PyCFunction)regions_remove, METH_VARARGS, "remove(id): forget it (released once no receive uses it)"},
    {"clear", (PyCFunction)regions_clear, METH_NOARGS, "forget every region"},
    {"contains", (PyCFunction)regions_contains, METH_VARARGS, "contains(id): registered here"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject RegionsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "transport.backends._tcp_native.Regions",
    .tp_basicsize = sizeof(RegionsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "host regions a native receiver loop writes into: id -> (address, size)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)regions_init,
    .tp_dealloc = (destructor)regions_dealloc,
    .tp_methods = regions_methods,
};

/* ------------------------------------------------------------------ Lane */
typedef struct {
    uint8_t status;
    uint64_t tid;
    uint32_t count;
} ack_t;

typedef struct {
    PyObject_HEAD
    int fd;
    int kick;             /* eventfd: share() wakes a waiting run() */
    volatile int shared;  /* Python sends on the socket now: run() must not */
    pthread_mutex_t send_mu;  /* held by run() while it sends acks; share() waits it out */
    ack_t acks[ACK_BATCH];
    int nacks;
    unsigned long long landed;  /* writes landed by run() */
} LaneObject;

static int lane_init(LaneObject *self, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "i", &self->fd))
        return -1;
    self->kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->kick < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->shared = 0;
    self->nacks = 0;
    self->landed = 0;
    pthread_mutex_init(&self->send_mu, NULL);
    return 0;
}

static void lane_dealloc(LaneObject *self) {
    if (self->kick >= 0)
        close(self->kick);
    pthread_mutex_destroy(&self->send_mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lane_share(LaneObject *self, PyObject *unused) {
    if (!self->shared) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->send_mu);
        self->shared = 1;
        pthread_mutex_unlock(&self->send_mu);
        Py_END_ALLOW_THREADS
        uint64_t one = 1;
        ssize_t unused_w = write(self->kick, &one, sizeof one);
        (void)unused_w;
    }
    Py_RETURN_NONE;
}

static void add_ack(LaneObject *self, uint8_t status, uint64_t tid) {
    if (self->nacks) {
        ack_t *a = &self->acks[self->nacks - 1];
        if (a->status == status && a->tid == tid) {
            a->count++;
            return;
        }
    }
    ack_t *a = &self->acks[self->nacks++];
    a->status = status;
    a->tid = tid;
    a->count = 1;
}

/* send the queued acks (one send); 0 sent, 1 not here (shared: Python sends them), -1 error (*err). Without the GIL.
 * A partial send (the socket nearly full) finishes the tail here with bounded polls: the peer always reads acks. */
static int flush_acks(LaneObject *self, int *err) {
    if (!self->nacks)
        return 0;
    header_t h[ACK_BATCH];
    memset(h, 0, sizeof(header_t) * self->nacks);
    for (int i = 0; i < self->nacks; i++) {
        h[i].type = T_ACK;
        h[i].flags = self->acks[i].status;
        h[i].nshards = 1;
        h[i].tid = self->acks[i].tid;
        h[i].count = self->acks[i].count;
    }
    pthread_mutex_lock(&self->send_mu);
    if (self->shared) {
        pthread_mutex_unlock(&self->send_mu);
        return 1;
    }
    const char *p = (const char *)h;
    size_t left = (size_t)self->nacks * HDR;
    int64_t deadline = now_ns() + 15000000000LL;
    int rc = 0;
    while (left) {
        ssize_t k = send(self->fd, p, left, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k > 0) {
            p += k;
            left -= (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            *err = errno;
            rc = -1;
            break;
        }
        if (now_ns() > deadline) {
            *err = ETIMEDOUT;
            rc = -1;
            break;
        }
        struct pollfd q = {self->fd, POLLOUT, 0};
        poll(&q, 1, 100);
    }
    pthread_mutex_unlock(&self->send_mu);
    if (rc == 0)
        self->nacks = 0;
    return rc;
}

/* wait (bounded slices) until the socket is readable; 1 ready, 0 idle slice or kicked, -1 error */
static int lane_wait(LaneObject *self, int *err) {
    int r = wait_in(self->fd, self->kick, SLICE_MS, err);
    if (r == 2)
        return 0;
    return r;
}

/* Lane.run(buf, pos, end, regions) -> (code, pos, end, acks or None) */
static PyObject *lane_run(LaneObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t pos, end;
    RegionsObject *regions;
    if (!PyArg_ParseTuple(args, "w*nnO!", &b, &pos, &end, &RegionsType, &regions))
        return NULL;
    char *buf = b.buf;
    Py_ssize_t cap = b.len;
    if (pos < 0 || end < pos || end > cap || cap < 4 * HDR) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "Lane.run: pos/end outside the buffer");
        return NULL;
    }
    int code = R_IDLE, err = 0, lean = 0;
    header_t h;
    memset(&h, 0, sizeof h);
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (self->shared) {
            code = R_SHARED;
            break;
        }
        /* a whole header buffered */
        if (end - pos < HDR) {
            if (self->nacks) {  /* nothing more is here: the acks go now */
                int f = flush_acks(self, &err);
                if (f < 0) {
                    code = -1;
                    break;
                }
                if (f > 0) {
                    code = R_ACKS;
                    break;
                }
            }
            int w = lane_wait(self, &err);
            if (w < 0) {
                code = -1;
                break;
            }
            if (w == 0) {
                if (self->shared) {
                    code = R_SHARED;
                    break;
                }
                code = R_IDLE;
                break;
            }
            ssize_t k = fill_nowait(self->fd, buf, cap, &pos, &end, lean ? HDR - (end - pos) : 0, &err);
            if (k == -1) {
                code = R_EOF;
                break;
            }
            if (k == -2) {
                code = -1;
                break;
            }
            continue;
        }
        memcpy(&h, buf + pos, HDR);
        if (h.type != T_WRITE || (h.flags & F_IMM)) {
            code = R_PY;  /* another message, or a write whose immediate Python counts: all of it is Python's */
            break;
        }
        entry_t *x = regions_take(regions, h.region);
        if (!x) {
            code = R_PY;  /* unknown here: Python looks it up (and registers it) or rejects it */
            break;
        }
        if (h.length > x->nbytes || h.offset > x->nbytes - h.length) {
            regions_give(regions, x);
            code = R_PY;  /* out of range: Python drains it and answers OUT_OF_RANGE */
            break;
        }
        pos += HDR;
        char *dst = x->ptr + h.offset;
        uint64_t n = h.length;
        Py_ssize_t have = end - pos;
        uint64_t k0 = (uint64_t)have < n ? (uint64_t)have : n;
        if (k0) {
            memcpy(dst, buf + pos, k0);
            pos += (Py_ssize_t)k0;
        }
        uint64_t got = k0;
        lean = n >= (uint64_t)cap / 4;
        int failed = 0;
        while (got < n) {
            uint64_t rest = n - got;
            if (rest >= (uint64_t)cap / 4) {  /* straight into the region */
                ssize_t k;
                do {
                    k = recv(self->fd, dst + got, rest, MSG_DONTWAIT | MSG_WAITALL);
                } while (k < 0 && errno == EINTR);
                if (k > 0) {
                    got += (uint64_t)k;
                    continue;
                }
                if (k == 0) {
                    failed = R_EOF;
                    break;
                }
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    err = errno;
                    failed = -1;
                    break;
                }
            } else {  /* small rest: through the buffer (one read may take the next headers too) */
                if (pos == end)
                    pos = end = 0;
                ssize_t k = fill_nowait(self->fd, buf, cap, &pos, &end, 0, &err);
                if (k == -1) {
                    failed = R_EOF;
                    break;
                }
                if (k == -2) {
                    failed = -1;
                    break;
                }
                if (k > 0) {
                    Py_ssize_t c = end - pos;
                    if ((uint64_t)c > rest)
                        c = (Py_ssize_t)rest;
                    memcpy(dst + got, buf + pos, (size_t)c);
                    pos += c;
                    got += (uint64_t)c;
                    continue;
                }
            }
            int w;
            do {  /* mid-message: wait on, in bounded slices, until the bytes come or the peer is gone */
                w = wait_in(self->fd, -1, SLICE_MS, &err);
            } while (w == 0);
            if (w < 0) {
                failed = -1;
                break;
            }
        }
        regions_give(regions, x);
        if (failed) {
            code = failed;
            break;
        }
        self->landed++;
        add_ack(self, 0, h.tid);
        /* acks wait while more is here (buffered, or after a large payload in the socket) */
        int more = end - pos > 0;
        if (!more && lean) {
            int e2 = 0;
            more = wait_in(self->fd, -1, 0, &e2) == 1;
        }
        if (self->nacks >= ACK_BATCH || !more) {
            int f = flush_acks(self, &err);
            if (f < 0) {
                code = -1;
                break;
            }
            if (f > 0) {
                code = R_ACKS;
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    regions_reap(regions);
    if (code < 0)
        return os_error(err);
    PyObject *acks = Py_None;
    Py_INCREF(Py_None);
    if (self->nacks) {  /* not sent here (shared now, or the loop ended): Python sends them */
        Py_DECREF(acks);
        acks = PyList_New(self->nacks);
        if (!acks)
            return NULL;
        for (int i = 0; i < self->nacks; i++)
            PyList_SET_ITEM(acks, i, Py_BuildValue("(iKi)", self->acks[i].status,
                                                   (unsigned long long)self->acks[i].tid, self->acks[i].count));
        self->nacks = 0;
    }
    return Py_BuildValue("innN", code, pos, end, acks);
}

static PyMemberDef lane_members[] = {
    {"fd", T_INT, offsetof(LaneObject, fd), READONLY, "the socket"},
    {"shared", T_INT, offsetof(LaneObject, shared), READONLY, "Python sends on the socket (set by share())"},
    {"landed", T_ULONGLONG, offsetof(LaneObject, landed), READONLY, "writes landed by run()"},
    {NULL, 0, 0, 0, NULL}};

static PyMethodDef lane_methods[] = {
    {"run", (PyCFunction)lane_run, METH_VARARGS,
     "run(buf, pos, end, regions) -> (code, pos, end, acks): the receiver loop until Python is needed"},
    {"share", (PyCFunction)lane_share, METH_NOARGS,
     "from now on Python sends on this socket: run() sends nothing more and returns"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "transport.backends._tcp_native.Lane",
    .tp_basicsize = sizeof(LaneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lane(fd): a data lane's native receiver loop",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_members = lane_members,
    .tp_methods = lane_methods,
};

/* ------------------------------------------------------------------ module */
static PyMethodDef module_methods[] = {
    {"send_some", py_send_some, METH_VARARGS, "send_some(fd, bufs) -> bytes taken (non-blocking sendmsg)"},
    {"wait_ack", py_wait_ack, METH_VARARGS,
     "wait_ack(fd, buf, pos, end, timeout_ns, spin_ns) -> (code, pos, end, within_spin)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_tcp_native",
                                       "the tcp lane's hot loop in C (see transport/backends/tcp.py)", -1,
                                       module_methods};

PyMODINIT_FUNC PyInit__tcp_native(void) {
    if (PyType_Ready(&RegionsType) < 0 || PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&RegionsType);
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Regions", (PyObject *)&RegionsType) < 0 ||
        PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "R_IDLE", R_IDLE);
    PyModule_AddIntConstant(m, "R_PY", R_PY);
    PyModule_AddIntConstant(m, "R_SHARED", R_SHARED);
    PyModule_AddIntConstant(m, "R_EOF", R_EOF);
    PyModule_AddIntConstant(m, "R_ACKS", R_ACKS);
    PyModule_AddIntConstant(m, "W_TIMEOUT", W_TIMEOUT);
    PyModule_AddIntConstant(m, "W_ACK", W_ACK);
    PyModule_AddIntConstant(m, "W_OTHER", W_OTHER);
    PyModule_AddIntConstant(m, "W_EOF", W_EOF);
    return m;
}
