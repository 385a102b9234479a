/*
 * core.c -- the platform-neutral half of a port: life cycle, backend
 * choice, the wrappers that keep the in-flight list, the single-issuer
 * owner checks, and iocp_port_wait(), which elects one thread at a time to
 * poll the backend while the others wait on a condition variable for
 * queued completions (a leader/followers scheme: one kernel wait, many
 * dispatchers).  A single-issuer port skips all of that: its one thread
 * polls whenever the queue is empty.  The mutex, condition variable,
 * clock and CPU count live in posix/thread.c and win/thread.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iocp_internal.h"

int iocp__queue_pop(iocp_port *p, iocp_completion *out, int max);
void iocp__pool_destroy(iocp_port *p);

/* The port whose batch this thread dispatches: set when a wait hands it
 * completions, cleared by iocp_port_dispatch_done (see
 * iocp__is_dispatching).  One per thread is enough: a thread that
 * dispatches two ports at once only loses some batching. */
static IOCP__TLS iocp_port *iocp__tls_dispatching;

int iocp__is_dispatching(iocp_port *p) { return iocp__tls_dispatching == p; }

/* Its address names the calling thread (iocp__owner_check). */
IOCP__TLS char iocp__tls_self;

/* ------------------------------------------------------------------ */
/* fork()                                                              */

/*
 * A port belongs to the process that created it.  A fork() child inherits
 * the descriptors of its kernel objects (the io_uring rings are even mapped
 * MAP_SHARED, an epoll set shares its interest list), so a child waiting on
 * the port would take the parent's completions or readiness, and a cancel
 * or EPOLL_CTL_DEL would act on the parent's operations.  Every entry point
 * below therefore checks iocp__forked() first -- before any lock, since a
 * mutex another parent thread held at fork time is held forever in the
 * child -- and refuses with IOCP_EFORKED.  glibc stopped caching getpid()
 * in 2.25, so the check compares a generation that a pthread_atfork child
 * handler bumps (registered once, with the first port) instead of making
 * a syscall per call.  A fork that bypasses the C library's fork() (a raw
 * clone) is not seen; Python's os.fork() and multiprocessing use fork().
 */
unsigned iocp__fork_gen;

int iocp_port_forked(const iocp_port *p)
{
    return iocp__forked(p);
}

int64_t iocp_port_owner_pid(const iocp_port *p)
{
    return p->owner_pid;
}

/* ------------------------------------------------------------------ */
/* Backend registry: best first.                                       */

static const iocp_backend *const iocp__backends[] = {
#ifdef _WIN32
    &iocp__backend_iocp,
#else
#  ifdef IOCP_WITH_URING
    &iocp__backend_uring,
#  endif
    &iocp__backend_epoll,
#endif
};
#define IOCP__NBACKENDS ((int)(sizeof(iocp__backends) / sizeof(iocp__backends[0])))

int iocp_backend_count(void) { return IOCP__NBACKENDS; }

const char *iocp_backend_name(int i)
{
    return (i >= 0 && i < IOCP__NBACKENDS) ? iocp__backends[i]->name : NULL;
}

int iocp_backend_probe(int i, char *features, size_t features_len)
{
    if (features && features_len)
        features[0] = '\0';
    if (i < 0 || i >= IOCP__NBACKENDS)
        return IOCP_EINVAL;
    return iocp__backends[i]->probe(features, features_len);
}

/*
 * Backends known to have a wake() that takes no port lock (an eventfd
 * write, a posted packet), so a single-issuer port on them can drop the
 * mutex.  Any other backend opts in by setting port->wake_lockfree in its
 * init; until then its single-issuer ports keep the mutex (the owner
 * checks still apply), so a foreign thread's wake cannot race the owner.
 */
static int iocp__wake_needs_no_lock(const iocp_backend *be)
{
#ifdef _WIN32
    return be == &iocp__backend_iocp;
#else
    return be == &iocp__backend_epoll;
#endif
}

/* ------------------------------------------------------------------ */
/* Port life cycle                                                     */

static int iocp__port_init_with(iocp_port *p, const iocp_backend *be,
                                const iocp_port_options *opts)
{
    int r;

    p->backend = be;
    r = be->init(p, opts);
    if (r < 0)
        p->backend = NULL;
    return r;
}

int iocp_port_create(const iocp_port_options *opts, iocp_port **out)
{
    iocp_port_options defaults;
    iocp_port *p;
    int r = IOCP_ENOSYS, i;

    *out = NULL;
    if (!opts) {
        memset(&defaults, 0, sizeof(defaults));
        opts = &defaults;
    }
    if (opts->queue_capacity > IOCP_QUEUE_CAPACITY_MAX)
        return IOCP_EINVAL;
    /* Without the fork watch a child could not tell it is one. */
    r = iocp__fork_watch();
    if (r < 0)
        return r;
    r = IOCP_ENOSYS;
    p = calloc(1, sizeof(*p));
    if (!p)
        return IOCP_ENOMEM;
    p->owner_pid = iocp__process_id();
    p->fork_gen = iocp__fork_gen;
    p->qcap = opts->queue_capacity ? opts->queue_capacity : 1024;
    p->q = malloc(p->qcap * sizeof(*p->q));
    if (!p->q) {
        free(p);
        return IOCP_ENOMEM;
    }
    p->concurrency = opts->concurrency ? opts->concurrency : iocp__cpu_count();
    p->inflight_head.next = p->inflight_head.prev = &p->inflight_head;
    iocp__mutex_init(&p->lock);
    iocp__cond_init(&p->cond);

    if (opts->backend && opts->backend[0]) {
        r = IOCP_ENOENT;
        for (i = 0; i < IOCP__NBACKENDS; i++) {
            if (strcmp(iocp__backends[i]->name, opts->backend) == 0) {
                r = iocp__port_init_with(p, iocp__backends[i], opts);
                break;
            }
        }
    } else {
        /* Best first; a backend the kernel refuses falls through. */
        for (i = 0; i < IOCP__NBACKENDS; i++) {
            r = iocp__port_init_with(p, iocp__backends[i], opts);
            if (r >= 0)
                break;
        }
    }
    if (r >= 0) {
        p->owner_only = opts->single_issuer != 0;
        p->single_issuer = p->owner_only &&
                           (p->wake_lockfree || iocp__wake_needs_no_lock(p->backend));
    }
    if (r < 0) {
        iocp__cond_destroy(&p->cond);
        iocp__mutex_destroy(&p->lock);
        free(p->q);
        free(p);
        return r;
    }
    *out = p;
    return 0;
}

/*
 * destroy() in a fork() child: frees this process's copy and nothing else.
 * The backend's destroy is never called (io_uring would unregister buffer
 * rings of the parent's ring, epoll would be asked to forget sockets);
 * port->forget closes the child's descriptors and frees the backend's
 * memory, or, without it, the backend state is left as it is (its
 * descriptors are close-on-exec and go away when the child exits).  The
 * mutex and condition variable are not destroyed: a parent thread may have
 * held the one and waited on the other at fork time (glibc's
 * pthread_cond_destroy waits for waiters that will never come back).  If
 * the lock was held, the state it guards may be half-updated: then the
 * whole copy is leaked.  Op records in flight at fork time are not on the
 * pool's free list: they stay with their owners (in Python, the child's
 * copies of the Operations, which keep them) and are leaked with them.
 */
static void iocp__port_forget(iocp_port *p)
{
    /* Held at fork time (single-issuer: the owner was inside poll(),
     * whose state may be half-updated): leak it all. */
    if (p->single_issuer ? p->polling != 0 : !iocp__mutex_trylock(&p->lock))
        return;
    if (p->forget)
        p->forget(p);
    iocp__pool_destroy(p);
    free(p->ovf);
    free(p->q);
    free(p);
}

void iocp_port_destroy(iocp_port *p)
{
    iocp_completion c;

    if (!p)
        return;
    if (iocp__forked(p)) {
        iocp__port_forget(p);
        return;
    }
    if (iocp__tls_dispatching == p)
        iocp__tls_dispatching = NULL;    /* closed from a callback */
    /* Completions nobody took: give their port buffers back. */
    iocp__lock(p);
    while (iocp__queue_pop(p, &c, 1) == 1) {
        if (c.flags & IOCP_CF_BUFFER) {
            if (c.buf_id && p->backend->release_buffer) {
                p->live_buffers--;
                p->backend->release_buffer(p, c.data, c.buf_id);
            } else {
                iocp__buffer_put(p, c.data);
            }
        }
    }
    iocp__unlock(p);
    p->backend->destroy(p);
#ifdef IOCP_LOCK_STATS
    fprintf(stderr, "iocp: port lock taken %lld times\n", (long long)p->lock_count);
#endif
    iocp__pool_destroy(p);
    iocp__cond_destroy(&p->cond);
    iocp__mutex_destroy(&p->lock);
    free(p->ovf);
    free(p->q);
    free(p);
}

const char *iocp_port_backend(const iocp_port *p)
{
    return p->backend->name;
}

/* ------------------------------------------------------------------ */
/* Wrappers around the backend                                         */

/*
 * After a synchronous path delivered completions: wake followers waiting
 * on the condition variable, and the leader too if it sleeps in the kernel
 * (it would not otherwise notice a completion that did not come from it).
 * A single-issuer port has neither: its only thread is this one.
 */
static void iocp__after_sync_delivery(iocp_port *p)
{
    int wake_kernel = 0;

    if (p->single_issuer) {
        p->delivered = 0;
        p->kick = 0;                   /* this thread polls next */
        return;
    }
    if (p->delivered) {
        p->delivered = 0;
        iocp__cond_broadcast(&p->cond);
        wake_kernel = p->poll_blocking;
    }
    if (p->kick) {
        /* Work only the poller will run: it must not sleep through it. */
        p->kick = 0;
        wake_kernel |= p->poll_blocking;
    }
    iocp__unlock(p);
    if (wake_kernel)
        p->backend->wake(p);
}

/* The checks every entry point that acts on the port makes first. */
static inline int iocp__entry_check(iocp_port *p)
{
    if (iocp__forked(p))
        return IOCP_EFORKED;
    return iocp__owner_check(p);
}

int iocp_register(iocp_port *p, iocp_socket_t sock)
{
    int r = iocp__entry_check(p);

    if (r < 0)
        return r;
    if (sock == IOCP_INVALID_SOCKET)
        return IOCP_EBADF;
    iocp__lock(p);
    r = p->backend->register_socket(p, sock);
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_unregister(iocp_port *p, iocp_socket_t sock)
{
    int r = iocp__entry_check(p);

    if (r < 0)
        return r;
    iocp__lock(p);
    r = p->backend->unregister_socket(p, sock);
    iocp__after_sync_delivery(p);
    return r;
}

/*
 * Kinds and flags the contract defines: anything else is refused here, so
 * no backend ever sees a kind its switch does not know.  IOCP_OP_POLL
 * passes; a backend that has not implemented it answers an error.
 */
static int iocp__op_valid(const iocp_op *op)
{
    if (op->kind < IOCP_OP_ACCEPT || op->kind > IOCP_OP_POLL)
        return 0;
    if (op->flags & ~(IOCP_OPF_MULTISHOT | IOCP_OPF_SILENT))
        return 0;
    if ((op->flags & IOCP_OPF_MULTISHOT) && op->kind != IOCP_OP_ACCEPT &&
        op->kind != IOCP_OP_RECV && op->kind != IOCP_OP_POLL)
        return 0;
    if ((op->flags & IOCP_OPF_SILENT) && op->kind != IOCP_OP_SEND)
        return 0;
    return 1;
}

int iocp_submit(iocp_port *p, iocp_op *op)
{
    int r = iocp__entry_check(p);

    if (r < 0)
        return r;
    if (op->inflight)
        return IOCP_EINVAL;
    if (!iocp__op_valid(op))
        return IOCP_EINVAL;
    iocp__lock(p);
    op->inflight = 1;
    op->done = 0;
    op->next = &p->inflight_head;
    op->prev = p->inflight_head.prev;
    op->prev->next = op;
    p->inflight_head.prev = op;
    p->inflight++;
    r = p->backend->submit(p, op);
    if (r < 0 && op->inflight) {
        /* Refused before it started: it never was in flight. */
        op->inflight = 0;
        op->prev->next = op->next;
        op->next->prev = op->prev;
        op->next = op->prev = NULL;
        p->inflight--;
    }
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_cancel(iocp_port *p, iocp_op *op)
{
    int r = iocp__entry_check(p);

    if (r < 0)
        return r;
    iocp__lock(p);
    r = op->inflight ? p->backend->cancel(p, op) : IOCP_ENOENT;
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_cancel_all(iocp_port *p)
{
    iocp_op *op, *next;
    int n = 0, r = iocp__entry_check(p);

    if (r < 0)
        return r;
    iocp__lock(p);
    for (op = p->inflight_head.next; op != &p->inflight_head; op = next) {
        next = op->next;
        if (p->backend->cancel(p, op) >= 0)
            n++;
        /* A synchronous cancel unlinked `op`; `next` is still linked
         * unless the backend completed it too (it never does: cancel
         * touches only the op it is given). */
    }
    iocp__after_sync_delivery(p);
    return n;
}

/* ------------------------------------------------------------------ */
/* Waiting                                                             */

unsigned iocp_port_wake_gen(iocp_port *p)
{
    /* An atomic: any thread, no lock (a wake is a bump of it). */
    return iocp__atomic_load_u(&p->wake_gen);
}

int iocp_port_wait(iocp_port *p, iocp_completion *out, int max, int timeout_ms)
{
    return iocp_port_wait_since(p, out, max, timeout_ms, iocp_port_wake_gen(p));
}

/*
 * Ends the calling thread's dispatch of `p`, if it has one (lock held).
 * Returns 1 if it did and the backend's dispatch_done hook is still owed:
 * the caller runs it unless it goes into poll() first (see run_once).
 */
static int iocp__end_dispatch(iocp_port *p)
{
    if (iocp__tls_dispatching != p)
        return 0;
    iocp__tls_dispatching = NULL;
    if (p->active > 0)
        p->active--;
    if (!p->single_issuer && p->qlen > 0)
        iocp__cond_broadcast(&p->cond);  /* a dispatch slot is free */
    return p->dispatch_done != NULL;
}

/* Takes a batch off the queue for the calling thread (lock held). */
static int iocp__take(iocp_port *p, iocp_completion *out, int max)
{
    int n = iocp__queue_pop(p, out, max);

    p->active++;
    iocp__tls_dispatching = p;
    /* Others may take what is left, or a freed poll slot. */
    if (!p->single_issuer && p->qlen > 0)
        iocp__cond_broadcast(&p->cond);
    return n;
}

/*
 * The single-issuer wait: one thread, so no election and no condition
 * variable -- take what is queued, else poll.  `owed_hook`: the backend's
 * dispatch_done hook is owed (run_once ended a batch); going into poll()
 * pays it, any other way out runs it.
 */
static int iocp__wait_single(iocp_port *p, iocp_completion *out, int max,
                             int timeout_ms, unsigned gen, int owed_hook)
{
    int64_t deadline = timeout_ms > 0 ? iocp__now_ms() + timeout_ms : 0;
    int n = 0, remaining = timeout_ms, r;
    unsigned held;

    for (;;) {
        if (iocp__atomic_load_u(&p->wake_gen) != gen)
            break;
        if (timeout_ms > 0) {
            int64_t left = deadline - iocp__now_ms();
            remaining = left > 0 ? (int)left : 0;
        }
        /*
         * Silent successes only (a loop's echo: its send completed inline,
         * the next arrival has not come yet) tell the caller nothing: keep
         * them queued and wait on, so a loop turn costs one return to the
         * caller per event it can act on, not one more per silent send.
         * They go out with the next batch, or when the wait ends.  Not
         * while closing (close() drains until the queue is empty), and
         * only while the queue has room to spare, so a burst of silent
         * successes never fills it.
         */
        if (p->qlen > 0 && !(p->qlen == p->qsilent && p->ovflen == 0 && remaining != 0 &&
                             !p->closing && p->qlen < p->qcap / 2)) {
            n = iocp__take(p, out, max);
            break;
        }
        /* Announce the poll, then look at wake_gen again: a foreign
         * iocp_port_wake bumps it, then reads polling, so either it sees
         * us polling (and wakes the kernel) or we see its bump here. */
        iocp__atomic_store_i(&p->polling, 1);
        if (iocp__atomic_load_u(&p->wake_gen) != gen) {
            iocp__atomic_store_i(&p->polling, 0);
            break;
        }
        p->poll_blocking = remaining != 0;
        owed_hook = 0;                 /* poll() submits what was held back */
        held = p->qlen;                /* silent successes kept (above) */
        r = p->backend->poll(p, (int)(p->qcap - held), remaining);
        iocp__atomic_store_i(&p->polling, 0);
        p->poll_blocking = 0;
        p->delivered = 0;
        p->kick = 0;
        if (r < 0 && r != IOCP_ETIMEDOUT && p->qlen == held) {
            if (held == 0) {
                n = r;
                break;
            }
            remaining = 0;             /* hand out what is held, then the error */
        }
        if (p->qlen > held)
            continue;
        if (remaining == 0) {
            if (held > 0)
                n = iocp__take(p, out, max);
            break;
        }
    }
    if (owed_hook)
        p->dispatch_done(p);
    return n;
}

/* The shared wait (leader/followers); see iocp__wait_single for owed_hook. */
static int iocp__wait(iocp_port *p, iocp_completion *out, int max,
                      int timeout_ms, unsigned gen, int owed_hook)
{
    int64_t deadline = timeout_ms > 0 ? iocp__now_ms() + timeout_ms : 0;
    int n = 0, remaining = timeout_ms, r;

    for (;;) {
        if (p->wake_gen != gen)
            break;
        if (p->qlen > 0 && (p->active < p->concurrency || p->closing)) {
            n = iocp__take(p, out, max);
            break;
        }
        if (timeout_ms > 0) {
            int64_t left = deadline - iocp__now_ms();
            remaining = left > 0 ? (int)left : 0;
        }
        if (!p->polling && p->qlen == 0) {
            iocp__atomic_store_i(&p->polling, 1);
            p->poll_blocking = remaining != 0;
            owed_hook = 0;             /* poll() submits what was held back */
            iocp__unlock(p);
            r = p->backend->poll(p, (int)p->qcap, remaining);
            iocp__lock(p);
            iocp__atomic_store_i(&p->polling, 0);
            p->poll_blocking = 0;
            p->delivered = 0;
            p->kick = 0;               /* the poller did (or will redo) it */
            iocp__cond_broadcast(&p->cond);
            if (r < 0 && r != IOCP_ETIMEDOUT && p->qlen == 0) {
                n = r;
                break;
            }
            if (p->qlen > 0)
                continue;
            if (remaining == 0)
                break;
            continue;
        }
        if (remaining == 0)
            break;
        if (owed_hook) {
            /* Another thread polls, in a kernel entry that began before
             * these submissions: hand them over now. */
            owed_hook = 0;
            p->dispatch_done(p);
        }
        iocp__cond_wait(&p->cond, &p->lock, remaining);
    }
    if (owed_hook)
        p->dispatch_done(p);
    return n;
}

int iocp_port_wait_since(iocp_port *p, iocp_completion *out, int max,
                         int timeout_ms, unsigned gen)
{
    int n = iocp__entry_check(p);

    if (n < 0)
        return n;
    if (max <= 0)
        return IOCP_EINVAL;
    if (p->single_issuer)
        return iocp__wait_single(p, out, max, timeout_ms, gen, 0);
    iocp__lock(p);
    n = iocp__wait(p, out, max, timeout_ms, gen, 0);
    iocp__unlock(p);
    return n;
}

int iocp_port_run_once(iocp_port *p, iocp_completion *out, int max,
                       int timeout_ms, unsigned gen)
{
    int n = iocp__entry_check(p), owed;

    if (n < 0)
        return n;
    if (max <= 0)
        return IOCP_EINVAL;
    iocp__lock(p);
    owed = iocp__end_dispatch(p);
    if (p->single_issuer)
        n = iocp__wait_single(p, out, max, timeout_ms, gen, owed);
    else
        n = iocp__wait(p, out, max, timeout_ms, gen, owed);
    iocp__unlock(p);
    return n;
}

void iocp_port_dispatch_done(iocp_port *p)
{
    if (iocp__entry_check(p) < 0)
        return;
    iocp__lock(p);
    if (p->active > 0)
        p->active--;
    if (iocp__tls_dispatching == p)
        iocp__tls_dispatching = NULL;
    if (p->dispatch_done)
        p->dispatch_done(p);
    if (!p->single_issuer && p->qlen > 0)
        iocp__cond_broadcast(&p->cond);
    iocp__unlock(p);
}

void iocp_port_release_batch(iocp_port *p, iocp_completion *batch, int n)
{
    int i;

    if (iocp__entry_check(p) < 0 || n <= 0)
        return;
    iocp__lock(p);
    for (i = 0; i < n; i++) {
        iocp_completion *c = &batch[i];
        if (!c->op)
            continue;
        if (c->flags & IOCP_CF_BUFFER)
            iocp__buffer_release_locked(p, c->data, c->buf_id);
        if (!(c->flags & IOCP_CF_MORE))
            iocp__op_free_locked(p, c->op);
        c->op = NULL;
    }
    iocp__unlock(p);
}

int iocp_port_wake(iocp_port *p)
{
    if (iocp__forked(p))
        return IOCP_EFORKED;           /* the eventfd / ring is the parent's */
    if (p->single_issuer) {
        /* No lock: the owner may be anywhere.  See iocp__wait_single for
         * why bump-then-read cannot lose the wake-up. */
        iocp__atomic_inc_u(&p->wake_gen);
        return iocp__atomic_load_i(&p->polling) ? p->backend->wake(p) : 0;
    }
    {
        int kernel;

        iocp__lock(p);
        iocp__atomic_inc_u(&p->wake_gen);
        kernel = p->polling;
        iocp__cond_broadcast(&p->cond);
        iocp__unlock(p);
        return kernel ? p->backend->wake(p) : 0;
    }
}

void iocp_port_begin_close(iocp_port *p)
{
    if (iocp__forked(p)) {
        p->closing = 1;                /* nobody else here to tell */
        return;
    }
    if (iocp__owner_check(p) < 0)
        return;
    iocp__lock(p);
    p->closing = 1;
    iocp__unlock(p);
    iocp_port_wake(p);
}

void iocp_port_get_stats(iocp_port *p, iocp_port_stats *st)
{
    /* In a fork() child no lock (a parent thread may have held it at fork
     * time): the counters as the fork left them.  On a single-issuer port
     * iocp__lock is a no-op, so another thread reads a snapshot. */
    int forked = iocp__forked(p);

    if (!forked)
        iocp__lock(p);
    st->live_ops = p->live_ops;
    st->inflight = p->inflight;
    st->live_buffers = p->live_buffers;
    st->queued = (int64_t)p->qlen + p->ovflen;
    st->queue_capacity = p->qcap;
    st->queue_peak = p->queue_peak;
    st->completions = p->completions;
    if (!forked)
        iocp__unlock(p);
}
