/*
 * iocp_internal.h -- what the platform-neutral core (core.c, pool.c,
 * queue.c) shares with the backends.  Never included by Cython.
 *
 * Locking contract: one mutex per port (port->lock).  The core calls the
 * backend's register/unregister/submit/cancel with the lock held.  It calls
 * poll(), wake() and destroy() without it; poll() takes the lock itself
 * (iocp__lock) around iocp__deliver().  At most one thread is inside poll()
 * at a time (the core elects it), so a backend's reaping state needs no lock
 * of its own.  Each vtable slot below says what it may assume.  Backends
 * fill their vtable with designated initializers (.name = ..., .poll =
 * ...), so a slot added here is NULL in a backend that does not know it.
 *
 * Single-issuer ports (port->owner_only, iocp_port_options): one
 * thread, the owner, does everything.  The owner is the first thread that
 * enters the port through one of the checked entry points (register,
 * unregister, op alloc/free, submit, cancel, wait, run_once, dispatch_done,
 * release_batch, buffer release, begin_close); from then on those return
 * IOCP_EWRONGTHREAD (or do nothing, where they return void; a visible leak
 * in the stats rather than a corrupted pool) on any other thread, checked
 * after the fork check.  Where the backend's wake() takes no port lock
 * (port->single_issuer, below), iocp__lock and iocp__unlock are no-ops
 * there (the backends call them all the same), the leader/followers
 * machinery and its condition variable are skipped, and nothing is ever
 * "another thread's" to wake.  What other threads may still call: iocp_port_wake
 * (wake_gen and polling are atomics, and the backend's wake() must be safe
 * from any thread in both modes), iocp_port_wake_gen, iocp_port_get_stats
 * (counters read without the lock: a snapshot, possibly torn between
 * fields), iocp_port_destroy once nothing is in flight, and the fork
 * checks.  A thread is named by the address of a thread-local variable, so
 * a new thread that reuses a dead owner's thread-local block is taken for
 * the owner (the owner is gone; nothing can race it).
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

/*
 * Platform primitives: posix/thread.c or win/thread.c (libuv's split).
 * iocp__mutex_trylock returns 1 when it took the mutex.  iocp__cond_wait
 * waits at most timeout_ms (< 0: forever) on a monotonic clock.
 * iocp__fork_watch arranges for iocp__fork_gen to change in a fork()
 * child (0, or a negative error); Windows has no fork().
 */
void iocp__mutex_init(iocp__mutex *m);
void iocp__mutex_destroy(iocp__mutex *m);
void iocp__mutex_lock(iocp__mutex *m);
void iocp__mutex_unlock(iocp__mutex *m);
int iocp__mutex_trylock(iocp__mutex *m);
void iocp__cond_init(iocp__cond *c);
void iocp__cond_destroy(iocp__cond *c);
void iocp__cond_broadcast(iocp__cond *c);
void iocp__cond_wait(iocp__cond *c, iocp__mutex *m, int timeout_ms);
int64_t iocp__now_ms(void);           /* monotonic milliseconds */
unsigned iocp__cpu_count(void);
int64_t iocp__process_id(void);
int iocp__fork_watch(void);

/*
 * The few fields other threads touch on a single-issuer port (wake_gen,
 * polling, owner) go through these, sequentially consistent: iocp_port_wake
 * bumps wake_gen then reads polling, the owner sets polling then re-reads
 * wake_gen, so one of the two always sees the other (no lost wake-up).
 */
#if defined(_MSC_VER) && !defined(__clang__)
#  include <intrin.h>
static inline unsigned iocp__atomic_load_u(volatile unsigned *v)
{ return (unsigned)_InterlockedOr((volatile long *)v, 0); }
static inline void iocp__atomic_store_i(volatile int *v, int x)
{ _InterlockedExchange((volatile long *)v, x); }
static inline int iocp__atomic_load_i(volatile int *v)
{ return (int)_InterlockedOr((volatile long *)v, 0); }
static inline void iocp__atomic_inc_u(volatile unsigned *v)
{ _InterlockedIncrement((volatile long *)v); }
static inline void *iocp__atomic_load_ptr(void *volatile *v)
{ return _InterlockedCompareExchangePointer(v, NULL, NULL); }
static inline int iocp__atomic_cas_ptr(void *volatile *v, void *expect, void *x)
{ return _InterlockedCompareExchangePointer(v, x, expect) == expect; }
#  define IOCP__TLS __declspec(thread)
#else
static inline unsigned iocp__atomic_load_u(volatile unsigned *v)
{ return __atomic_load_n(v, __ATOMIC_SEQ_CST); }
static inline void iocp__atomic_store_i(volatile int *v, int x)
{ __atomic_store_n(v, x, __ATOMIC_SEQ_CST); }
static inline int iocp__atomic_load_i(volatile int *v)
{ return __atomic_load_n(v, __ATOMIC_SEQ_CST); }
static inline void iocp__atomic_inc_u(volatile unsigned *v)
{ __atomic_add_fetch(v, 1u, __ATOMIC_SEQ_CST); }
static inline void *iocp__atomic_load_ptr(void *volatile *v)
{ return __atomic_load_n(v, __ATOMIC_SEQ_CST); }
static inline int iocp__atomic_cas_ptr(void *volatile *v, void *expect, void *x)
{ return __atomic_compare_exchange_n(v, &expect, x, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
#  define IOCP__TLS __thread
#endif

/*
 * A backend.  "Lock held" below means the port lock is held by the
 * calling thread (on a single-issuer port: the owner thread, no lock).
 */
typedef struct iocp_backend {
    const char *name;
    /* 0 if the backend can run on this machine; fills a feature list.
     * No port, no lock; any thread, any time. */
    int (*probe)(char *features, size_t features_len);
    /* Sets up port->be (and the optional hooks dispatch_done, forget,
     * and port->wake_lockfree).  No lock: the port is not shared yet.
     * port->single_issuer is not set yet: read opts->single_issuer. */
    int (*init)(iocp_port *port, const iocp_port_options *opts);
    /* Frees port->be.  No lock; nothing is in flight and no thread is in
     * poll() or will call anything again.  Never called in a fork() child
     * (see forget). */
    void (*destroy)(iocp_port *port);
    /* Lock held.  May deliver (synchronously) and set port->kick. */
    int (*register_socket)(iocp_port *port, iocp_socket_t sock);
    /* Lock held.  Cancels the socket's ops (their completions may be
     * delivered here or come later from poll()). */
    int (*unregister_socket)(iocp_port *port, iocp_socket_t sock);
    /* Lock held; op is already on the in-flight list (core.c unlinks it
     * if this returns < 0 without having delivered it).  May deliver
     * inline; must refuse a kind or flag it does not implement with an
     * error rather than ignore it (core.c has already refused kinds and
     * flags outside the contract). */
    int (*submit)(iocp_port *port, iocp_op *op);
    /* Lock held; op is in flight.  0 if the request was made (the op
     * then completes, possibly right here), IOCP_ENOENT if it is not the
     * backend's to cancel any more. */
    int (*cancel)(iocp_port *port, iocp_op *op);
    /*
     * Reaps at most `max` completions (delivering each with iocp__deliver
     * under the lock), waiting up to timeout_ms (< 0: forever) for the
     * first.  Returns how many were delivered, 0 on timeout or wake-up,
     * IOCP_EINTR on a signal, or another negative error.  Called WITHOUT
     * the lock, by one thread at a time (port->polling is set); takes the
     * lock itself around its deliveries.  Must hand the kernel any
     * submission it holds back (SQEs left by a dispatching thread) with
     * the wait's own kernel entry: iocp_port_run_once relies on it.
     */
    int (*poll)(iocp_port *port, int max, int timeout_ms);
    /* Makes a thread blocked in poll() return soon, or the next poll()
     * return at once if none is in it yet.  No lock, ANY thread, in both
     * modes (a single-issuer port's foreign thread included), and may run
     * concurrently with poll() and with locked calls. */
    int (*wake)(iocp_port *port);
    /* Optional: takes back a buffer the backend handed out (buf_id != 0;
     * the backend counts it in port->live_buffers when it hands it out).
     * Lock held. */
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
    unsigned qsilent;                  /* IOCP_CF_SILENT entries in the queue
                                          and the overflow (see iocp__wait_single) */
    iocp_completion *ovf;
    unsigned ovfcap, ovfhead, ovflen;

    /* Op record pool and in-flight list. */
    iocp_op *free_ops;                 /* full records */
    iocp_op *free_short_ops;           /* short ones (iocp_op_alloc_short) */
    iocp_op inflight_head;             /* sentinel of a circular list */
    int64_t live_ops, inflight;

    /* Receive buffer pool. */
    struct iocp__buf_hdr *free_bufs[IOCP__BUF_CLASSES];
    unsigned free_buf_count[IOCP__BUF_CLASSES];
    int64_t live_buffers;

    /* Waiting and dispatch. */
    /* Single-issuer (see the top).  owner_only: the owner checks apply
     * (iocp_port_options.single_issuer).  single_issuer: also no mutex and
     * the one-thread wait -- only where the backend's wake() needs no port
     * lock (core.c knows epoll's and IOCP's; another backend's init sets
     * wake_lockfree once its wake is safe from any thread unlocked).  Both
     * are set after init; a backend's init reads opts->single_issuer. */
    int owner_only;
    int single_issuer;
    int wake_lockfree;
    void *owner;                       /* the owner's iocp__tls_self
                                          address (atomic) */
    int polling;                       /* a thread is inside backend->poll
                                          (atomic: iocp_port_wake reads it) */
    int poll_blocking;                 /* ... with a non-zero timeout */
    int delivered;                     /* set by iocp__deliver */
    unsigned wake_gen;                 /* atomic: bumped by iocp_port_wake */
    unsigned concurrency, active;
    int closing;                       /* iocp_port_begin_close was called */
    int kick;                          /* backend queued work for poll(); see top */
    /* Optional backend hook, called with the lock held when a thread ends
     * dispatching a batch (io_uring: submit what it held back).  Not
     * called when iocp_port_run_once ends the batch and goes straight
     * into poll(), which submits those with its own kernel entry. */
    void (*dispatch_done)(iocp_port *port);
    int64_t queue_peak, completions;

    /* fork(): the creator's pid and fork generation (see iocp__forked), and
     * the backend's way to let go of a forked child's copy: close its
     * descriptors with no other syscall on them, free its memory.  Set by
     * init; NULL leaks the backend state in the child. */
    int64_t owner_pid;
    unsigned fork_gen;
    void (*forget)(iocp_port *port);
#ifdef IOCP_LOCK_STATS
    int64_t lock_count;                /* debug builds: acquisitions, printed
                                          by destroy (setup.py IOCP_LOCK_STATS=1) */
#endif
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

/*
 * The port lock.  A no-op on a single-issuer port: only the owner thread
 * gets past the entry points, so there is nobody to exclude.
 */
static inline void iocp__lock(iocp_port *port)
{
    if (port->single_issuer)
        return;
    iocp__mutex_lock(&port->lock);
#ifdef IOCP_LOCK_STATS
    port->lock_count++;
#endif
}

static inline void iocp__unlock(iocp_port *port)
{
    if (!port->single_issuer)
        iocp__mutex_unlock(&port->lock);
}

/*
 * Single-issuer ports: 0 if the calling thread owns the port (claiming it
 * if nobody does yet), else IOCP_EWRONGTHREAD.  Other ports: 0.
 */
extern IOCP__TLS char iocp__tls_self;
static inline int iocp__owner_check(iocp_port *port)
{
    void *me, *owner;

    if (!port->owner_only)
        return 0;
    me = &iocp__tls_self;
    owner = iocp__atomic_load_ptr(&port->owner);
    if (owner == me)
        return 0;
    if (!owner && iocp__atomic_cas_ptr(&port->owner, NULL, me))
        return 0;
    return IOCP_EWRONGTHREAD;
}

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
/* iocp_buffer_release and iocp_op_free with the lock already held. */
void iocp__buffer_release_locked(iocp_port *port, char *data, uint32_t buf_id);
void iocp__op_free_locked(iocp_port *port, iocp_op *op);

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
