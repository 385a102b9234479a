/*
 * iocp_internal.h -- what the platform-neutral core (core.c, pool.c,
 * queue.c) shares with the backends.  Never included by Cython.
 *
 * Locking contract: one mutex per port (port->lock).  The core calls the
 * backend's register/unregister/submit/cancel with the lock held.  It calls
 * poll(), wake() and destroy() without it; poll() takes the lock itself
 * (iocp__lock) around iocp__deliver().  At most one thread is inside poll()
 * at a time (the core elects it), so a backend's reaping state needs no lock
 * of its own.
 *
 * Waking the poller: a backend that, outside poll(), queues work only
 * poll() will do (a socket put on its ready list, say) sets port->kick under
 * the lock; when the lock is released the core wakes a poller asleep in the
 * kernel, as it does after a synchronous delivery.  Work the kernel will
 * signal by itself (an edge, a CQE) needs no kick.
 *
 * fork(): a port belongs to the process that created it.  In a child the
 * core refuses every call (IOCP_EFORKED) before it takes any lock, and
 * destroy frees only the child's memory: it never calls the backend's
 * destroy (which would act on kernel objects the parent still uses), but
 * port->forget if the backend's init set it, else leaks the backend state.
 */
#ifndef IOCP_INTERNAL_H
#define IOCP_INTERNAL_H

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "iocp_native.h"

#ifdef _WIN32
typedef SRWLOCK iocp__mutex;
typedef CONDITION_VARIABLE iocp__cond;
#else
#include <pthread.h>
typedef pthread_mutex_t iocp__mutex;
typedef pthread_cond_t iocp__cond;
#endif

typedef struct iocp_backend {
    const char *name;
    /* 0 if the backend can run on this machine; fills a feature list. */
    int (*probe)(char *features, size_t features_len);
    int (*init)(iocp_port *port, const iocp_port_options *opts);
    void (*destroy)(iocp_port *port);
    int (*register_socket)(iocp_port *port, iocp_socket_t sock);
    int (*unregister_socket)(iocp_port *port, iocp_socket_t sock);
    int (*submit)(iocp_port *port, iocp_op *op);
    int (*cancel)(iocp_port *port, iocp_op *op);
    /*
     * Reaps at most `max` completions (delivering each with iocp__deliver
     * under the lock), waiting up to timeout_ms (< 0: forever) for the
     * first.  Returns how many were delivered, 0 on timeout or wake-up,
     * IOCP_EINTR on a signal, or another negative error.
     */
    int (*poll)(iocp_port *port, int max, int timeout_ms);
    /* Makes a thread blocked in poll() return soon.  Any thread. */
    int (*wake)(iocp_port *port);
    /* Optional: takes back a buffer the backend handed out (buf_id != 0;
     * the backend counts it in port->live_buffers when it hands it out). */
    void (*release_buffer)(iocp_port *port, char *data, uint32_t buf_id);
} iocp_backend;

/* Size classes of the port-owned receive buffer pool. */
#define IOCP__BUF_CLASSES 10          /* 128 B .. 64 KiB */
#define IOCP__BUF_MIN_SHIFT 7
#define IOCP__BUF_KEEP 256            /* free buffers kept per class */

struct iocp__buf_hdr;

struct iocp_port {
    const iocp_backend *backend;
    void *be;                          /* backend state */
    iocp__mutex lock;
    iocp__cond cond;

    /* Bounded completion queue (ring), then the overflow for completions
     * produced synchronously (inline success, cancel) while it is full. */
    iocp_completion *q;
    unsigned qcap, qhead, qlen;
    iocp_completion *ovf;
    unsigned ovfcap, ovfhead, ovflen;

    /* Op record pool and in-flight list. */
    iocp_op *free_ops;
    iocp_op inflight_head;             /* sentinel of a circular list */
    int64_t live_ops, inflight;

    /* Receive buffer pool. */
    struct iocp__buf_hdr *free_bufs[IOCP__BUF_CLASSES];
    unsigned free_buf_count[IOCP__BUF_CLASSES];
    int64_t live_buffers;

    /* Waiting and dispatch. */
    int polling;                       /* a thread is inside backend->poll */
    int poll_blocking;                 /* ... with a non-zero timeout */
    int delivered;                     /* set by iocp__deliver */
    unsigned wake_gen;
    unsigned concurrency, active;
    int closing;                       /* iocp_port_begin_close was called */
    int kick;                          /* backend queued work for poll(); see top */
    /* Optional backend hook, called with the lock held when a thread ends
     * dispatching a batch (io_uring: submit what it held back). */
    void (*dispatch_done)(iocp_port *port);
    int64_t queue_peak, completions;

    /* fork(): the creator's pid and fork generation (see iocp__forked), and
     * the backend's way to let go of a forked child's copy: close its
     * descriptors with no other syscall on them, free its memory.  Set by
     * init; NULL leaks the backend state in the child. */
    int64_t owner_pid;
    unsigned fork_gen;
    void (*forget)(iocp_port *port);
};

/*
 * How many fork() children deep this process is: bumped by a
 * pthread_atfork child handler, so telling whether a port was inherited
 * costs a load and a compare, no getpid() syscall and no lock (a lock some
 * parent thread held at fork time stays held forever in the child).
 */
extern unsigned iocp__fork_gen;
static inline int iocp__forked(const iocp_port *port)
{
#ifdef _WIN32
    (void)port;
    return 0;
#else
    return port->fork_gen != iocp__fork_gen;
#endif
}

/*
 * Grows a table indexed by descriptor so that `fd` is a valid index: a
 * power of two at least 64, computed without overflow for any fd up to
 * INT_MAX; new entries are zeroed.  Returns 0, IOCP_EBADF (fd < 0) or
 * IOCP_ENOMEM (including a size that does not fit in memory).
 */
static inline int iocp__table_grow(void **table, int *len, int fd, size_t elem)
{
    size_t n = *len > 0 ? (size_t)*len : 64, old = *len > 0 ? (size_t)*len : 0;
    char *nt;

    if (fd < 0)
        return IOCP_EBADF;
    if ((size_t)fd < old)
        return 0;
    while (n <= (size_t)fd)
        n *= 2;                        /* fd <= INT_MAX: n <= 2^31, no wrap */
    if (n > (size_t)INT_MAX)
        n = (size_t)INT_MAX;           /* the length is an int; so fd ==
                                          INT_MAX cannot fit: ENOMEM below */
    if (n <= (size_t)fd || n > SIZE_MAX / elem)
        return IOCP_ENOMEM;
    nt = realloc(*table, n * elem);
    if (!nt)
        return IOCP_ENOMEM;
    memset(nt + old * elem, 0, (n - old) * elem);
    *table = nt;
    *len = (int)n;
    return 0;
}

void iocp__lock(iocp_port *port);
void iocp__unlock(iocp_port *port);

/*
 * Hands one outcome of `op` to the queue.  Lock held.  Without
 * IOCP_CF_MORE in flags this is the op's final completion: it leaves the
 * in-flight list.  Never fails: when the bounded queue is full the
 * completion goes to the overflow list, which keeps order.
 */
void iocp__deliver(iocp_port *port, iocp_op *op, int64_t result,
                   int64_t error, unsigned flags, char *data, uint32_t buf_id);

/* Port-owned receive buffers (lock held). */
char *iocp__buffer_get(iocp_port *port, size_t size);
void iocp__buffer_put(iocp_port *port, char *data);

/*
 * Gathered sends: skips the segments (or the part of one) that `sent`
 * bytes covered, in place, and returns the first segment still to send.
 * `*left` receives how many segments remain.
 */
static inline iocp_iovec *iocp__iov_advance(iocp_op *op, size_t sent, int *left)
{
    iocp_iovec *v = op->iov;
    int n = op->iovcnt;

    while (n > 0 && (sent >= v->len || v->len == 0)) {
        sent -= v->len;
        v->len = 0;
        v++;
        n--;
    }
    if (n > 0 && sent > 0) {
        v->base = (char *)v->base + sent;
        v->len -= sent;
    }
    *left = n;
    return v;
}

/*
 * True if the calling thread is dispatching a batch of `port` (a wait gave
 * it completions and it has not called iocp_port_dispatch_done yet).  Such
 * a thread waits on the port again soon, so a backend may hold its
 * submissions back until then; any other thread's must go at once.
 */
int iocp__is_dispatching(iocp_port *port);

/* Monotonic milliseconds, for deadlines. */
int64_t iocp__now_ms(void);

/* Backends compiled into this build (defined by their files). */
#ifdef _WIN32
extern const iocp_backend iocp__backend_iocp;
#else
extern const iocp_backend iocp__backend_epoll;
#  ifdef IOCP_WITH_URING
extern const iocp_backend iocp__backend_uring;
#  endif
#endif

#endif /* IOCP_INTERNAL_H */
