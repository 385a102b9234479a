/*
 * core.c -- the platform-neutral half of a port: life cycle, backend
 * choice, the lock, the wrappers that keep the in-flight list, and
 * iocp_port_wait(), which elects one thread at a time to poll the backend
 * while the others wait on a condition variable for queued completions
 * (a leader/followers scheme: one kernel wait, many dispatchers).
 */
#include <stdlib.h>
#include <string.h>

#include "iocp_internal.h"

#ifdef _WIN32
#else
#include <time.h>
#include <unistd.h>
#endif

int iocp__queue_pop(iocp_port *p, iocp_completion *out, int max);
void iocp__pool_destroy(iocp_port *p);

/* ------------------------------------------------------------------ */
/* Platform primitives                                                 */

#ifdef _WIN32
static void iocp__mutex_init(iocp__mutex *m) { InitializeSRWLock(m); }
static void iocp__mutex_destroy(iocp__mutex *m) { (void)m; }
void iocp__lock(iocp_port *p) { AcquireSRWLockExclusive(&p->lock); }
void iocp__unlock(iocp_port *p) { ReleaseSRWLockExclusive(&p->lock); }
static void iocp__cond_init(iocp__cond *c) { InitializeConditionVariable(c); }
static void iocp__cond_destroy(iocp__cond *c) { (void)c; }
static void iocp__cond_broadcast(iocp__cond *c) { WakeAllConditionVariable(c); }
static void iocp__cond_wait(iocp_port *p, int timeout_ms)
{
    SleepConditionVariableSRW(&p->cond, &p->lock,
                              timeout_ms < 0 ? INFINITE : (DWORD)timeout_ms, 0);
}
int64_t iocp__now_ms(void) { return (int64_t)GetTickCount64(); }
static unsigned iocp__cpu_count(void)
{
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwNumberOfProcessors ? si.dwNumberOfProcessors : 1;
}
#else
static void iocp__mutex_init(iocp__mutex *m) { pthread_mutex_init(m, NULL); }
static void iocp__mutex_destroy(iocp__mutex *m) { pthread_mutex_destroy(m); }
void iocp__lock(iocp_port *p) { pthread_mutex_lock(&p->lock); }
void iocp__unlock(iocp_port *p) { pthread_mutex_unlock(&p->lock); }
static void iocp__cond_init(iocp__cond *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}
static void iocp__cond_destroy(iocp__cond *c) { pthread_cond_destroy(c); }
static void iocp__cond_broadcast(iocp__cond *c) { pthread_cond_broadcast(c); }
static void iocp__cond_wait(iocp_port *p, int timeout_ms)
{
    struct timespec ts;

    if (timeout_ms < 0) {
        pthread_cond_wait(&p->cond, &p->lock);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&p->cond, &p->lock, &ts);
}
int64_t iocp__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
static unsigned iocp__cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}
#endif

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
    p = calloc(1, sizeof(*p));
    if (!p)
        return IOCP_ENOMEM;
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

void iocp_port_destroy(iocp_port *p)
{
    iocp_completion c;

    if (!p)
        return;
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
 */
static void iocp__after_sync_delivery(iocp_port *p)
{
    int wake_kernel = 0;

    if (p->delivered) {
        p->delivered = 0;
        iocp__cond_broadcast(&p->cond);
        wake_kernel = p->poll_blocking;
    }
    iocp__unlock(p);
    if (wake_kernel)
        p->backend->wake(p);
}

int iocp_register(iocp_port *p, iocp_socket_t sock)
{
    int r;

    if (sock == IOCP_INVALID_SOCKET)
        return IOCP_EBADF;
    iocp__lock(p);
    r = p->backend->register_socket(p, sock);
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_unregister(iocp_port *p, iocp_socket_t sock)
{
    int r;

    iocp__lock(p);
    r = p->backend->unregister_socket(p, sock);
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_submit(iocp_port *p, iocp_op *op)
{
    int r;

    if (op->inflight)
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
    int r;

    iocp__lock(p);
    r = op->inflight ? p->backend->cancel(p, op) : IOCP_ENOENT;
    iocp__after_sync_delivery(p);
    return r;
}

int iocp_cancel_all(iocp_port *p)
{
    iocp_op *op, *next;
    int n = 0;

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
    unsigned gen;

    iocp__lock(p);
    gen = p->wake_gen;
    iocp__unlock(p);
    return gen;
}

int iocp_port_wait(iocp_port *p, iocp_completion *out, int max, int timeout_ms)
{
    return iocp_port_wait_since(p, out, max, timeout_ms, iocp_port_wake_gen(p));
}

int iocp_port_wait_since(iocp_port *p, iocp_completion *out, int max,
                         int timeout_ms, unsigned gen)
{
    int64_t deadline = timeout_ms > 0 ? iocp__now_ms() + timeout_ms : 0;
    int n = 0, remaining = timeout_ms, r;

    if (max <= 0)
        return IOCP_EINVAL;
    iocp__lock(p);
    for (;;) {
        if (p->wake_gen != gen)
            break;
        if (p->qlen > 0 && (p->active < p->concurrency || p->closing)) {
            n = iocp__queue_pop(p, out, max);
            p->active++;
            /* Others may take what is left, or a freed poll slot. */
            if (p->qlen > 0)
                iocp__cond_broadcast(&p->cond);
            break;
        }
        if (timeout_ms > 0) {
            int64_t left = deadline - iocp__now_ms();
            remaining = left > 0 ? (int)left : 0;
        }
        if (!p->polling && p->qlen == 0) {
            p->polling = 1;
            p->poll_blocking = remaining != 0;
            iocp__unlock(p);
            r = p->backend->poll(p, (int)p->qcap, remaining);
            iocp__lock(p);
            p->polling = 0;
            p->poll_blocking = 0;
            p->delivered = 0;
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
        iocp__cond_wait(p, remaining);
    }
    iocp__unlock(p);
    return n;
}

void iocp_port_dispatch_done(iocp_port *p)
{
    iocp__lock(p);
    if (p->active > 0)
        p->active--;
    if (p->qlen > 0)
        iocp__cond_broadcast(&p->cond);
    iocp__unlock(p);
}

int iocp_port_wake(iocp_port *p)
{
    int kernel;

    iocp__lock(p);
    p->wake_gen++;
    kernel = p->polling;
    iocp__cond_broadcast(&p->cond);
    iocp__unlock(p);
    return kernel ? p->backend->wake(p) : 0;
}

void iocp_port_begin_close(iocp_port *p)
{
    iocp__lock(p);
    p->closing = 1;
    iocp__unlock(p);
    iocp_port_wake(p);
}

void iocp_port_get_stats(iocp_port *p, iocp_port_stats *st)
{
    iocp__lock(p);
    st->live_ops = p->live_ops;
    st->inflight = p->inflight;
    st->live_buffers = p->live_buffers;
    st->queued = (int64_t)p->qlen + p->ovflen;
    st->queue_capacity = p->qcap;
    st->queue_peak = p->queue_peak;
    st->completions = p->completions;
    iocp__unlock(p);
}
