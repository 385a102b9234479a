/*
 * epoll.c -- the completion model emulated on readiness.
 *
 * What the kernel gives: readiness, not completion.  Each registered socket
 * is added once to an epoll set, edge-triggered for both directions, so
 * arming an op never costs a syscall.  The backend keeps, per socket, a FIFO
 * of read-side ops (accept, recv, recv_into) and one of write-side ops
 * (connect, send), and a "maybe ready" bit per direction.
 *
 * How ops map: submit tries the syscall at once when the direction may be
 * ready and nothing is queued ahead (most recv/send on a busy connection
 * complete right there, like IOCP's inline success); otherwise the op waits
 * in its FIFO.  An edge sets the bit and poll() runs the FIFO head until
 * EAGAIN clears it, the FIFO empties, or the bounded queue has no room
 * (then the socket goes on a ready list that the next poll() resumes
 * first, since the edge will not fire again).  One completion per op, in
 * order per socket and direction.  A send completes only when all of its
 * bytes are written or an error stops it (then it reports both the bytes
 * written and the error), as WSASend does.  On TCP a short read clears
 * "maybe readable" too (the queue is drained and the next arrival raises
 * an edge), so a recv re-posted after it waits for that edge instead of
 * trying recv -> EAGAIN first; iocp__read_done says when that holds.
 *
 * Multishot: an armed multishot accept or recv stays at its FIFO head and
 * runs only in poll(), within the budget poll() was given (what is left
 * goes on the ready list, and poll() resumes it next time).  A multishot
 * recv reads each arrival into a per-port scratch buffer and hands it out
 * in a pool buffer of the size that came (IOCP_CF_MORE | IOCP_CF_BUFFER),
 * or, on a socket whose arrivals are large, straight into a pool buffer
 * of its cap (no copy), so an idle socket pins nothing; EOF, an error or
 * a cancel is its final completion.  While one is armed, other recvs on
 * the socket are IOCP_EBUSY.  The bytes handed out and not yet released
 * are bounded by recv_pool_max (buf_id carries each buffer's size back
 * through release_buffer): at the bound the op waits, armed, on a starved
 * list that release_buffer moves to the ready list.
 *
 * Poll ops (IOCP_OP_POLL) sit on a third, unordered list per socket and
 * never hold up the FIFOs.  The set is edge-triggered, so a one-shot
 * (level) poll checks readiness at submit: the "maybe ready" bits answer
 * "not ready" for free, a "maybe" costs one poll(fd, 0).  After that, and
 * for multishot polls, every edge is noted in each poll op (op->done
 * holds the events seen and not yet delivered) and delivered within the
 * budget.  An edge carries every current event of the socket, so a
 * multishot poll for POLLOUT also hears when data arrives while the
 * socket is writable: more completions than io_uring would give, never
 * fewer.
 *
 * Cancel and close: an op still in a FIFO has not touched the kernel, so
 * cancel unlinks it and delivers a cancelled completion on the spot.
 * Unregister cancels every op of the socket and leaves the epoll set.  A
 * socket closed behind our back leaves stale FIFOs; registering its reused
 * descriptor cancels them first.  Wake-ups use an eventfd.
 *
 * Waking the poller: whatever a submitter leaves for poll() to run without
 * a new edge (a multishot accept goes on the ready list, since the
 * listener's edge may have come and gone already; so does a multishot recv
 * armed on a socket that may be readable) kicks the core, which
 * writes the eventfd if the poller sleeps in epoll_wait.  An op that waits
 * in its FIFO for EAGAIN to clear needs no kick: the edge wakes the poller.
 *
 * Threads: all backend state is touched under the port lock (by submit,
 * cancel, register and poll(), with one poller at a time), so on a
 * single-issuer port, where the core makes that lock a no-op, only the
 * owner thread touches it.  The backend takes no lock and keeps no
 * thread-local state of its own (test counters aside); wake() is an
 * eventfd write, safe from any
 * thread in either mode.  A silent send that succeeds inline on the
 * dispatching thread wakes nobody (that thread takes its record on its
 * next wait).
 *
 * fork(): the epoll set is shared with a child, interest list included, so
 * a child's EPOLL_CTL_DEL would drop the parent's sockets and its
 * epoll_wait would take the parent's edges.  The core never lets a child
 * call in here; forget() closes the child's two descriptors, nothing else.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4 */
#endif
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../iocp_internal.h"
#include "sock.h"

#define IOCP__EPOLL_BATCH 256

/* Most bytes one multishot recv completion carries (also its default). */
#define IOCP__MS_RECV_MAX 65536

/* Multishot recv sizing: a read of more than IOCP__MS_COPY_MAX bytes puts
 * the socket in "large" mode (reads land in a pool buffer of the op's cap,
 * no copy); IOCP__MS_DOWN_RUN reads in a row of at most
 * IOCP__MS_SMALL_READ bytes take it back to scratch + copy. */
#define IOCP__MS_COPY_MAX 4096
#define IOCP__MS_DOWN_RUN 16u
#define IOCP__MS_SMALL_READ 2048

/* Default bound of the bytes multishot recvs have handed out and not got
 * back (iocp_port_options.recv_pool_max). */
#define IOCP__POOL_MAX_DEFAULT ((size_t)64 << 20)

/* What iocp__attempt says about an op. */
enum {
    IOCP__AT_WAIT = 0,      /* nothing to do until the next edge (EAGAIN) */
    IOCP__AT_DONE = 1,      /* final completion delivered: unlink the op */
    IOCP__AT_MORE = 2       /* multishot: the budget ran out, still ready */
};

struct iocp__fdstate {
    unsigned char registered;
    unsigned char readable, writable;  /* "maybe ready" after the last edge */
    unsigned char on_ready_list;
    unsigned char tcp;                 /* a short read drains (see iocp__read_done) */
    unsigned char rd_sticky;           /* an edge said HUP/ERR/RDHUP/PRI: only
                                          EAGAIN proves the socket drained */
    unsigned char starved;             /* on the starved list (pool bound) */
    unsigned char ms_large;            /* multishot recv reads straight into
                                          full-size pool buffers (see
                                          iocp__recv_multishot) */
    unsigned short ms_small;           /* small reads in a row while large */
    iocp_op *rq_head, *rq_tail;        /* accept / recv / recv_into */
    iocp_op *wq_head, *wq_tail;        /* connect / send */
    iocp_op *ms_recv;                  /* the armed multishot recv (in rq) */
    iocp_op *pl_head;                  /* poll ops, linked by fd_next; each
                                          keeps the events seen and not yet
                                          delivered in its `done` */
    int ready_next;                    /* ready list link (fd), -1 ends */
    int starved_next;                  /* starved list link (fd), -1 ends */
};

struct iocp__epoll {
    int epfd;
    int evfd;
    struct iocp__fdstate *fds;
    int nfds;
    int ready_head;                    /* sockets with work left over */
    /* Multishot recv reads here first, then copies the bytes into a pool
     * buffer of the size that arrived (poll() only, lock held: one
     * poller at a time).  Allocated with the first multishot recv. */
    char *scratch;
    /* Bytes multishot recvs have handed out and not yet got back through
     * release_buffer (each buffer's buf_id is its byte count), the bound
     * on them, and the sockets whose multishot recv waits for bytes to
     * come back under it. */
    size_t pool_used, pool_max;
    int starved_head;
};

/*
 * Test-only counters, per thread (so a test counts only the syscalls its
 * own thread made, whatever other ports and threads do meanwhile; bumped
 * only on paths that already cost a syscall): recv attempts that found
 * nothing to read, all of them and those made inline at submit, and
 * eventfd writes (wake).  iocp__epoll_test_counters copies the calling
 * thread's first `n` of them; the test suite finds it with ctypes.
 */
#define IOCP__NCOUNTERS 3
static __thread uint64_t iocp__cnt[IOCP__NCOUNTERS];
enum { IOCP__CNT_RECV_EAGAIN, IOCP__CNT_INLINE_RECV_EAGAIN, IOCP__CNT_WAKES };

__attribute__((visibility("default"))) int iocp__epoll_test_counters(uint64_t *out, int n);
int iocp__epoll_test_counters(uint64_t *out, int n)
{
    int i;

    for (i = 0; i < n && i < IOCP__NCOUNTERS; i++)
        out[i] = iocp__cnt[i];
    return i;
}

enum {
    IOCP__ST_NONE = 0,
    IOCP__ST_RQ = 1,
    IOCP__ST_WQ = 2,
    IOCP__ST_CONNECTING = 3,
    IOCP__ST_POLL = 4
};

#define IOCP__POLL_ALL (IOCP_POLL_IN | IOCP_POLL_OUT | IOCP_POLL_ERR | IOCP_POLL_HUP)

static int iocp__is_read_side(int kind)
{
    return kind == IOCP_OP_ACCEPT || kind == IOCP_OP_RECV || kind == IOCP_OP_RECV_INTO;
}

/* The descriptor's state; NULL if it was never registered. */
static inline struct iocp__fdstate *iocp__fd(struct iocp__epoll *e, int fd)
{
    return iocp__sock_table_at(e->fds, e->nfds, fd, sizeof(*e->fds));
}

/* ---- per-socket FIFOs ---------------------------------------------- */

static void iocp__fifo_push(iocp_op **head, iocp_op **tail, iocp_op *op)
{
    op->fd_next = NULL;
    if (*tail)
        (*tail)->fd_next = op;
    else
        *head = op;
    *tail = op;
}

static void iocp__fifo_pop(iocp_op **head, iocp_op **tail)
{
    iocp_op *op = *head;
    *head = op->fd_next;
    if (!*head)
        *tail = NULL;
    op->fd_next = NULL;
}

static int iocp__fifo_remove(iocp_op **head, iocp_op **tail, iocp_op *op)
{
    iocp_op *prev = NULL, *cur;

    for (cur = *head; cur; prev = cur, cur = cur->fd_next) {
        if (cur != op)
            continue;
        if (prev)
            prev->fd_next = cur->fd_next;
        else
            *head = cur->fd_next;
        if (*tail == cur)
            *tail = prev;
        cur->fd_next = NULL;
        return 1;
    }
    return 0;
}

/* ---- the syscalls ---------------------------------------------------- */

/*
 * After a recv on the socket.  EAGAIN proves it drained.  So does a short
 * read on TCP: tcp_recvmsg returns less than asked only once the receive
 * queue (and the backlog) is empty, and every later arrival wakes the
 * epoll item again, so the next edge will come -- the re-posted recv
 * need not be tried (that try was one wasted recv -> EAGAIN per
 * ping-pong).  Two things stop a TCP read short with data still queued
 * and no new edge to come: the urgent mark (the edge said EPOLLPRI) and a
 * FIN or error already reported (the next recv must run to return 0 or
 * the error); rd_sticky holds off the rule after such an edge until an
 * EAGAIN.  Unix stream sockets also stop short at a message carrying
 * descriptors or other credentials, and datagrams are read one at a
 * time, so they keep the EAGAIN rule.  Lock held.
 */
static inline void iocp__read_done(struct iocp__fdstate *st, ssize_t n, size_t asked,
                                   int inline_try)
{
    if (n < 0) {
        st->rd_sticky = 0;             /* EAGAIN: drained, an edge will come */
        iocp__cnt[IOCP__CNT_RECV_EAGAIN]++;
        if (inline_try)
            iocp__cnt[IOCP__CNT_INLINE_RECV_EAGAIN]++;
    } else if (n > 0 && (size_t)n < asked && st->tcp && !st->rd_sticky) {
        st->readable = 0;
    }
}

/*
 * A multishot recv on a readable edge: reads until EAGAIN (or a short TCP
 * read), EOF, an error or the end of the budget, one completion with
 * IOCP_CF_MORE | IOCP_CF_BUFFER per read.  Each read lands in the port's
 * scratch buffer and is copied into a pool buffer of the size that came
 * (a 64-byte message pins a 128-byte buffer, not 64 KiB; the copy of a
 * small message costs less than the memory of a large buffer per queued
 * completion), so nothing is pinned while the socket is idle.  A socket
 * whose arrivals are larger than IOCP__MS_COPY_MAX (ms_large) reads
 * straight into a pool buffer of the cap instead: one read, one
 * completion per arrival of up to 64 KiB either way, but no 64 KiB copy;
 * a run of small reads takes it back (hysteresis, as io_uring's switch
 * between its 4 KiB and 64 KiB groups).  The bytes handed out and not
 * yet given back (the buffer's size when read in place) are bounded by
 * recv_pool_max: past it the op waits, armed, for release_buffer.  Lock
 * held.
 */
static int iocp__recv_multishot(iocp_port *p, struct iocp__fdstate *st, iocp_op *op,
                                int *budget)
{
    struct iocp__epoll *e = p->be;
    size_t cap = op->len > 0 && op->len < IOCP__MS_RECV_MAX ? op->len : IOCP__MS_RECV_MAX;

    for (;;) {
        ssize_t n;
        size_t held;
        char *buf;

        if (*budget <= 0)
            return IOCP__AT_MORE;
        if (e->pool_used >= e->pool_max) {
            /* Over the bound: wait, armed, until release_buffer gives
             * bytes back (it resumes the socket); nothing is read. */
            if (!st->starved) {
                st->starved = 1;
                st->starved_next = e->starved_head;
                e->starved_head = op->sock;
            }
            return IOCP__AT_WAIT;
        }
        if (st->ms_large) {
            /* In place: the buffer is the read's (given back below if the
             * read brings nothing to hand out). */
            buf = iocp__buffer_get(p, cap);
            if (!buf) {
                iocp__deliver(p, op, IOCP_ENOMEM, 0, 0, NULL, 0);
                return IOCP__AT_DONE;
            }
        } else {
            buf = e->scratch;
        }
        do
            n = recv(op->sock, buf, cap, 0);
        while (n < 0 && errno == EINTR);
        if (n <= 0) {
            int err = n < 0 ? errno : 0;
            if (buf != e->scratch)
                iocp__buffer_put(p, buf);
            if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
                iocp__read_done(st, -1, cap, 0);
                return IOCP__AT_WAIT;
            }
            /* EOF or an error: the final completion. */
            iocp__deliver(p, op, -err, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        }
        if (buf == e->scratch) {
            buf = iocp__buffer_get(p, (size_t)n);
            if (!buf) {
                /* Out of memory: those bytes cannot be handed out; end the
                 * op with the error rather than pretend nothing was read. */
                iocp__deliver(p, op, IOCP_ENOMEM, 0, 0, NULL, 0);
                return IOCP__AT_DONE;
            }
            memcpy(buf, e->scratch, (size_t)n);
            held = (size_t)n;
            if ((size_t)n > IOCP__MS_COPY_MAX) {
                st->ms_large = 1;
                st->ms_small = 0;
            }
        } else {
            held = cap;
            if ((size_t)n > IOCP__MS_SMALL_READ)
                st->ms_small = 0;
            else if (++st->ms_small >= IOCP__MS_DOWN_RUN)
                st->ms_large = 0;
        }
        e->pool_used += held;
        iocp__deliver(p, op, n, 0, IOCP_CF_MORE | IOCP_CF_BUFFER, buf, (uint32_t)held);
        (*budget)--;
        iocp__read_done(st, n, cap, 0);
        if (!st->readable)
            return IOCP__AT_WAIT;      /* a short TCP read: drained */
    }
}

/*
 * Runs one op's syscall: IOCP__AT_DONE when the op finished (its final
 * completion delivered), IOCP__AT_WAIT when it must wait for readiness
 * (EAGAIN, or a short TCP read: see iocp__read_done), IOCP__AT_MORE when a
 * multishot op used up the budget while the socket may still be ready.
 * Lock held.  `budget` bounds how many completions a multishot op may
 * deliver (the final one is counted by the caller); `inline_try` is 1 at
 * submit.
 */
static int iocp__attempt(iocp_port *p, struct iocp__fdstate *st, iocp_op *op, int *budget,
                         int inline_try)
{
    ssize_t n;

    switch (op->kind) {
    case IOCP_OP_ACCEPT:
        for (;;) {
            socklen_t alen = sizeof(op->addr);
            int fd;
            if (*budget <= 0)
                return IOCP__AT_MORE;  /* multishot: more next time */
            fd = accept4(op->sock, (struct sockaddr *)&op->addr, &alen,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                int err = errno;
                if (err == EINTR)
                    continue;
                if (err == EAGAIN || err == EWOULDBLOCK)
                    return IOCP__AT_WAIT;
                /* A connection that died in the backlog is not the
                 * listener's error: accept the next one. */
                if (err == ECONNABORTED)
                    continue;
                iocp__deliver(p, op, -err, 0, 0, NULL, 0);
                return IOCP__AT_DONE;
            }
            op->addrlen = alen;
            if (op->flags & IOCP_OPF_MULTISHOT) {
                iocp__deliver(p, op, fd, 0, IOCP_CF_MORE, NULL, 0);
                (*budget)--;
                continue;
            }
            iocp__deliver(p, op, fd, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        }
    case IOCP_OP_RECV: {
        char *buf;
        if (op->flags & IOCP_OPF_MULTISHOT)
            return iocp__recv_multishot(p, st, op, budget);
        buf = iocp__buffer_get(p, op->len);
        if (!buf) {
            iocp__deliver(p, op, IOCP_ENOMEM, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        }
        do
            n = recv(op->sock, buf, op->len, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            iocp__read_done(st, -1, op->len, inline_try);
            iocp__buffer_put(p, buf);
            return IOCP__AT_WAIT;
        }
        if (n > 0)
            iocp__read_done(st, n, op->len, inline_try);
        if (n <= 0) {
            int err = n < 0 ? -errno : 0;
            iocp__buffer_put(p, buf);
            iocp__deliver(p, op, err, 0, 0, NULL, 0);
        } else {
            iocp__deliver(p, op, n, 0, IOCP_CF_BUFFER, buf, 0);
        }
        return IOCP__AT_DONE;
    }
    case IOCP_OP_RECV_INTO:
        do
            n = recv(op->sock, op->buf, op->len, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            iocp__read_done(st, -1, op->len, inline_try);
            return IOCP__AT_WAIT;
        }
        if (n < 0) {
            iocp__deliver(p, op, -errno, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        }
        iocp__read_done(st, n, op->len, inline_try);
        iocp__deliver(p, op, n, 0, 0, NULL, 0);
        return IOCP__AT_DONE;
    case IOCP_OP_SEND:
        while (op->done < op->len) {
            if (op->iovcnt > 0) {
                /* Gathered: one sendmsg over the segments still unsent. */
                struct msghdr m;
                int left;
                memset(&m, 0, sizeof(m));
                m.msg_iov = (struct iovec *)iocp__iov_advance(op, 0, &left);
                m.msg_iovlen = (size_t)left;
                n = sendmsg(op->sock, &m, MSG_NOSIGNAL);
                if (n > 0)
                    iocp__iov_advance(op, (size_t)n, &left);
            } else {
                n = send(op->sock, op->buf + op->done, op->len - op->done, MSG_NOSIGNAL);
            }
            if (n >= 0) {
                op->done += (size_t)n;
                continue;
            }
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return IOCP__AT_WAIT;
            {
                int64_t result, error;
                iocp__sock_stop_result(op, -errno, &result, &error);
                iocp__deliver(p, op, result, error, 0, NULL, 0);
            }
            return IOCP__AT_DONE;
        }
        if (op->flags & IOCP_OPF_SILENT) {
            /*
             * A silent send that went out whole: its record goes back
             * flagged, and nobody is waiting to hear of it.  Inline on the
             * thread that dispatches this port (an event loop's callback)
             * that thread waits on the port next and takes it then, so the
             * delivery must not count as news: no broadcast, no eventfd
             * write to a poller.  Any other thread keeps the wake, so a
             * sleeping loop still drains what such sends leave queued.
             */
            int news = p->delivered;
            iocp__deliver(p, op, (int64_t)op->done, 0, IOCP_CF_SILENT, NULL, 0);
            if (inline_try && iocp__is_dispatching(p))
                p->delivered = news;
            return IOCP__AT_DONE;
        }
        iocp__deliver(p, op, (int64_t)op->done, 0, 0, NULL, 0);
        return IOCP__AT_DONE;
    case IOCP_OP_CONNECT:
        if (op->state != IOCP__ST_CONNECTING) {
            /* EINTR from a non-blocking connect means it goes on. */
            int r = connect(op->sock, (struct sockaddr *)&op->addr, op->addrlen);
            if (r == 0) {
                iocp__deliver(p, op, 0, 0, 0, NULL, 0);
                return IOCP__AT_DONE;
            }
            if (errno == EINPROGRESS || errno == EINTR) {
                /* The handshake goes on; writability reports its end. */
                op->state = IOCP__ST_CONNECTING;
                return IOCP__AT_WAIT;
            }
            iocp__deliver(p, op, -errno, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        } else {
            int r = iocp__sock_connect_status(op->sock);
            if (r > 0)
                return IOCP__AT_WAIT;       /* spurious edge: the handshake goes on */
            iocp__deliver(p, op, r, 0, 0, NULL, 0);
            return IOCP__AT_DONE;
        }
    default:
        iocp__deliver(p, op, IOCP_EINVAL, 0, 0, NULL, 0);
        return IOCP__AT_DONE;
    }
}

/* An op left its socket's queues for good (completed or cancelled). */
static inline void iocp__unlinked(struct iocp__fdstate *st, iocp_op *op)
{
    op->state = IOCP__ST_NONE;
    if (st->ms_recv == op)
        st->ms_recv = NULL;
}

/*
 * Runs one direction's FIFO while it may be ready and the budget lasts.
 * Returns 1 if work is left that only budget (not readiness) stopped.
 */
static int iocp__run_fifo(iocp_port *p, struct iocp__fdstate *st, iocp_op **head,
                          iocp_op **tail, unsigned char *ready, int *budget)
{
    while (*head && *ready) {
        iocp_op *op = *head;
        int r;
        if (*budget <= 0)
            return 1;
        r = iocp__attempt(p, st, op, budget, 0);
        if (r == IOCP__AT_DONE) {
            iocp__fifo_pop(head, tail);
            iocp__unlinked(st, op);
            (*budget)--;
        } else if (r == IOCP__AT_MORE) {
            return 1;           /* multishot stopped by budget, not EAGAIN */
        } else {
            *ready = 0;
        }
    }
    return 0;
}

/* Lock held.  Only poll() runs the ready list, so whoever adds to it
 * outside poll() must not let the poller sleep through it: kick. */
static void iocp__ready_list_add(iocp_port *p, struct iocp__epoll *e, int fd)
{
    struct iocp__fdstate *st = &e->fds[fd];
    p->kick = 1;
    if (st->on_ready_list)
        return;
    st->on_ready_list = 1;
    st->ready_next = e->ready_head;
    e->ready_head = fd;
}

/* ---- poll ops -------------------------------------------------------- */

/* The events a poll op reports: those it asked for, and ERR/HUP always. */
static inline unsigned iocp__poll_want(const iocp_op *op)
{
    return ((unsigned)op->len & (IOCP_POLL_IN | IOCP_POLL_OUT)) | IOCP_POLL_ERR | IOCP_POLL_HUP;
}

/* An edge's epoll events as IOCP_POLL_* (EOF, RDHUP, is readable). */
static inline unsigned iocp__poll_from_epoll(uint32_t ev)
{
    unsigned m = 0;

    if (ev & (EPOLLIN | EPOLLRDHUP))
        m |= IOCP_POLL_IN;
    if (ev & EPOLLOUT)
        m |= IOCP_POLL_OUT;
    if (ev & EPOLLERR)
        m |= IOCP_POLL_ERR;
    if (ev & EPOLLHUP)
        m |= IOCP_POLL_HUP;
    return m;
}

/*
 * Level check at submit: what of `want` the socket is ready for now.  The
 * "maybe ready" bits answer "no" for free (they fall only on proof: EAGAIN,
 * a drained TCP read, or the poll() below; an ERR or HUP edge raises
 * both); a "maybe" costs one poll(fd, 0), whose "no" lowers the bits,
 * since any later arrival raises an edge.  Lock held.
 */
static unsigned iocp__poll_level(struct iocp__fdstate *st, int fd, unsigned want)
{
    struct pollfd pfd;
    int r, only_errors = !(want & (IOCP_POLL_IN | IOCP_POLL_OUT));

    memset(&pfd, 0, sizeof(pfd));
    pfd.fd = fd;
    if ((want & IOCP_POLL_IN) && st->readable)
        pfd.events |= POLLIN;
    if ((want & IOCP_POLL_OUT) && st->writable)
        pfd.events |= POLLOUT;
    if (!pfd.events && !(only_errors && (st->readable || st->writable)))
        return 0;
    do
        r = poll(&pfd, 1, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return 0;                      /* ENOMEM: the edge will tell */
    if (pfd.revents & POLLNVAL)
        return IOCP_POLL_ERR;          /* closed behind the port's back */
    if (!(pfd.revents & (POLLERR | POLLHUP))) {
        if ((pfd.events & POLLIN) && !(pfd.revents & POLLIN) && !st->rd_sticky)
            st->readable = 0;
        if ((pfd.events & POLLOUT) && !(pfd.revents & POLLOUT))
            st->writable = 0;
    }
    return ((pfd.revents & POLLIN ? IOCP_POLL_IN : 0u) |
            (pfd.revents & POLLOUT ? IOCP_POLL_OUT : 0u) |
            (pfd.revents & POLLERR ? IOCP_POLL_ERR : 0u) |
            (pfd.revents & POLLHUP ? IOCP_POLL_HUP : 0u)) & want;
}

/* An edge: every poll op of the socket notes what it wants of it. */
static void iocp__poll_note(struct iocp__fdstate *st, uint32_t ev)
{
    unsigned m = iocp__poll_from_epoll(ev);
    iocp_op *op;

    for (op = st->pl_head; op; op = op->fd_next)
        op->done |= m & iocp__poll_want(op);
}

/*
 * Delivers what the socket's poll ops have seen: a one-shot op completes
 * and leaves, a multishot one completes with IOCP_CF_MORE and stays.
 * Returns 1 if the budget stopped it with events left.  Lock held.
 */
static int iocp__run_polls(iocp_port *p, struct iocp__fdstate *st, int *budget)
{
    iocp_op **link = &st->pl_head;

    while (*link) {
        iocp_op *op = *link;
        unsigned seen = (unsigned)op->done;

        if (!seen) {
            link = &op->fd_next;
            continue;
        }
        if (*budget <= 0)
            return 1;
        (*budget)--;
        op->done = 0;
        if (op->flags & IOCP_OPF_MULTISHOT) {
            iocp__deliver(p, op, seen, 0, IOCP_CF_MORE, NULL, 0);
            link = &op->fd_next;
        } else {
            *link = op->fd_next;       /* unlink before the record goes */
            op->fd_next = NULL;
            op->state = IOCP__ST_NONE;
            iocp__deliver(p, op, seen, 0, 0, NULL, 0);
        }
    }
    return 0;
}

static int iocp__poll_remove(struct iocp__fdstate *st, iocp_op *op)
{
    iocp_op **link;

    for (link = &st->pl_head; *link; link = &(*link)->fd_next) {
        if (*link == op) {
            *link = op->fd_next;
            op->fd_next = NULL;
            return 1;
        }
    }
    return 0;
}

/*
 * A poll op: one-shot completes at once if the socket is ready (level),
 * else on the next edge with what it wants; multishot completes (with
 * IOCP_CF_MORE) at once if ready and then once per edge.  Lock held.
 */
static int iocp__poll_submit(iocp_port *p, struct iocp__fdstate *st, iocp_op *op)
{
    unsigned seen;

    if (op->len & ~(size_t)IOCP__POLL_ALL)
        return IOCP_EINVAL;
    seen = iocp__poll_level(st, op->sock, iocp__poll_want(op));
    op->done = 0;
    if (seen && !(op->flags & IOCP_OPF_MULTISHOT)) {
        iocp__deliver(p, op, seen, 0, 0, NULL, 0);
        return 0;
    }
    if (seen)
        iocp__deliver(p, op, seen, 0, IOCP_CF_MORE, NULL, 0);
    op->fd_next = st->pl_head;
    st->pl_head = op;
    op->state = IOCP__ST_POLL;
    return 0;
}

static void iocp__process_fd(iocp_port *p, struct iocp__epoll *e, int fd, int *budget)
{
    struct iocp__fdstate *st = &e->fds[fd];
    int left = 0;

    /* Polls first: they report the edge as it came, before a recv below
     * may drain what it announced. */
    if (st->pl_head)
        left |= iocp__run_polls(p, st, budget);
    left |= iocp__run_fifo(p, st, &st->rq_head, &st->rq_tail, &st->readable, budget);
    left |= iocp__run_fifo(p, st, &st->wq_head, &st->wq_tail, &st->writable, budget);
    if (left)
        iocp__ready_list_add(p, e, fd);
}

/* ---- backend interface --------------------------------------------- */

static int iocp__epoll_probe(char *features, size_t len)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0)
        return -errno;
    close(fd);
    if (features && len)
        snprintf(features, len, "edge-triggered inline-completion");
    return 0;
}

/* fork() child: close this process's descriptors (no epoll_ctl, no
 * eventfd write: the set and the eventfd are the parent's too), free. */
static void iocp__epoll_forget(iocp_port *p)
{
    struct iocp__epoll *e = p->be;
    close(e->evfd);
    close(e->epfd);
    free(e->fds);
    free(e->scratch);
    free(e);
    p->be = NULL;
}

static int iocp__epoll_init(iocp_port *p, const iocp_port_options *opts)
{
    struct iocp__epoll *e;
    struct epoll_event ev;
    int r;

    e = calloc(1, sizeof(*e));
    if (!e)
        return IOCP_ENOMEM;
    e->ready_head = -1;
    e->starved_head = -1;
    e->pool_max = opts && opts->recv_pool_max ? opts->recv_pool_max : IOCP__POOL_MAX_DEFAULT;
    /* A knob for tests, as io_uring's IOCP_URING_POOL_MAX. */
    if (!(opts && opts->recv_pool_max) && getenv("IOCP_EPOLL_POOL_MAX"))
        e->pool_max = (size_t)strtoull(getenv("IOCP_EPOLL_POOL_MAX"), NULL, 10);
    if (e->pool_max == 0)
        e->pool_max = IOCP__POOL_MAX_DEFAULT;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0) {
        r = -errno;
        free(e);
        return r;
    }
    e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->evfd < 0) {
        r = -errno;
        close(e->epfd);
        free(e);
        return r;
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.fd = -1;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->evfd, &ev) < 0) {
        r = -errno;
        close(e->evfd);
        close(e->epfd);
        free(e);
        return r;
    }
    p->be = e;
    p->forget = iocp__epoll_forget;
    return 0;
}

/* Closing the epoll fd drops every registration at once, so destroy needs
 * nothing more than what a fork() child does (ops were drained before). */
static void iocp__epoll_destroy(iocp_port *p)
{
    iocp__epoll_forget(p);
}

static void iocp__cancel_fifo(iocp_port *p, struct iocp__fdstate *st, iocp_op **head,
                              iocp_op **tail)
{
    while (*head) {
        iocp_op *op = *head;
        iocp__fifo_pop(head, tail);
        iocp__unlinked(st, op);
        iocp__sock_deliver_cancelled(p, op);
    }
}

/* Every op of the socket completes cancelled (unregister, reuse). */
static void iocp__cancel_fd(iocp_port *p, struct iocp__fdstate *st)
{
    iocp__cancel_fifo(p, st, &st->rq_head, &st->rq_tail);
    iocp__cancel_fifo(p, st, &st->wq_head, &st->wq_tail);
    while (st->pl_head) {
        iocp_op *op = st->pl_head;
        st->pl_head = op->fd_next;
        op->fd_next = NULL;
        op->state = IOCP__ST_NONE;
        iocp__sock_deliver_cancelled(p, op);
    }
}

static int iocp__epoll_register(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__epoll *e = p->be;
    struct iocp__fdstate *st;
    struct epoll_event ev;
    void *t = e->fds, *slot;
    int r;

    /* A descriptor that is not open (a made-up fileno) is EBADF before
     * the table grows for it. */
    r = iocp__sock_prepare(sock);
    if (r < 0)
        return r;
    /* Overflow-safe for any fd; a huge one is ENOMEM, not a wrap. */
    r = iocp__sock_table_reserve(&t, &e->nfds, sock, sizeof(*e->fds), &slot);
    if (r < 0)
        return r;
    e->fds = t;
    st = slot;
    memset(&ev, 0, sizeof(ev));
    /* EPOLLPRI: an urgent mark stops a TCP read short (iocp__read_done). */
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET;
    ev.data.fd = sock;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, sock, &ev) < 0)
        return -errno;   /* EEXIST: this very socket is registered already */
    if (st->registered) {
        /* The descriptor was closed without unregister and reused. */
        iocp__cancel_fd(p, st);
    }
    st->registered = 1;
    st->ms_large = 0;
    st->ms_small = 0;
    st->readable = st->writable = 1;
    st->tcp = (unsigned char)iocp__sock_is_tcp(sock);
    st->rd_sticky = 0;
    return 0;
}

static int iocp__epoll_unregister(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__epoll *e = p->be;
    struct iocp__fdstate *st = iocp__fd(e, sock);

    if (!st || !st->registered)
        return IOCP_ENOENT;
    iocp__cancel_fd(p, st);
    /* EBADF/ENOENT: already closed by the caller; the set forgot it. */
    (void)epoll_ctl(e->epfd, EPOLL_CTL_DEL, sock, NULL);
    st->registered = 0;
    return 0;
}

static int iocp__epoll_submit(iocp_port *p, iocp_op *op)
{
    struct iocp__epoll *e = p->be;
    struct iocp__fdstate *st;
    int budget = 1;

    if (op->kind == IOCP_OP_POST) {
        iocp__deliver(p, op, (int64_t)op->len, 0, 0, NULL, 0);
        return 0;
    }
    st = iocp__fd(e, op->sock);
    if (!st || !st->registered)
        return IOCP_EBADF;
    op->state = IOCP__ST_NONE;
    if (op->kind == IOCP_OP_POLL)
        return iocp__poll_submit(p, st, op);
    if (iocp__is_read_side(op->kind)) {
        int multishot = (op->flags & IOCP_OPF_MULTISHOT) != 0;
        /* An armed multishot recv owns the socket's incoming bytes. */
        if (st->ms_recv && op->kind != IOCP_OP_ACCEPT)
            return IOCP_EBUSY;
        if (multishot && op->kind == IOCP_OP_RECV && !e->scratch) {
            e->scratch = malloc(IOCP__MS_RECV_MAX);
            if (!e->scratch)
                return IOCP_ENOMEM;
        }
        if (!st->rq_head && st->readable && !multishot &&
            iocp__attempt(p, st, op, &budget, 1) == IOCP__AT_DONE)
            return 0;
        if (multishot) {
            /* Multishot ops run in poll() only, within its budget.  An
             * accept's edge may have come and gone already; a recv goes
             * there when the socket may be readable now. */
            if (op->kind == IOCP_OP_ACCEPT || (!st->rq_head && st->readable))
                iocp__ready_list_add(p, e, op->sock);
            if (op->kind == IOCP_OP_RECV)
                st->ms_recv = op;
        } else if (!st->rq_head) {
            st->readable = 0;
        }
        iocp__fifo_push(&st->rq_head, &st->rq_tail, op);
        op->state = IOCP__ST_RQ;
    } else {
        if (!st->wq_head && (st->writable || op->kind == IOCP_OP_CONNECT) &&
            iocp__attempt(p, st, op, &budget, 1) == IOCP__AT_DONE)
            return 0;
        if (!st->wq_head)
            st->writable = 0;
        iocp__fifo_push(&st->wq_head, &st->wq_tail, op);
        if (op->state != IOCP__ST_CONNECTING)
            op->state = IOCP__ST_WQ;
    }
    return 0;
}

static int iocp__epoll_cancel(iocp_port *p, iocp_op *op)
{
    struct iocp__epoll *e = p->be;
    struct iocp__fdstate *st = iocp__fd(e, op->sock);
    int found;

    if (!st || op->state == IOCP__ST_NONE)
        return IOCP_ENOENT;
    if (op->state == IOCP__ST_POLL)
        found = iocp__poll_remove(st, op);
    else if (op->state == IOCP__ST_RQ)
        found = iocp__fifo_remove(&st->rq_head, &st->rq_tail, op);
    else
        found = iocp__fifo_remove(&st->wq_head, &st->wq_tail, op);
    if (!found)
        return IOCP_ENOENT;
    iocp__unlinked(st, op);
    iocp__sock_deliver_cancelled(p, op);
    return 0;
}

static int iocp__epoll_poll(iocp_port *p, int max, int timeout_ms)
{
    struct iocp__epoll *e = p->be;
    struct epoll_event evs[IOCP__EPOLL_BATCH];
    int n, i, budget = max, start;

    /* Sockets with work left over from last time come first, and mean
     * there is something to do now: do not block. */
    iocp__lock(p);
    if (e->ready_head >= 0)
        timeout_ms = 0;
    iocp__unlock(p);

    /* EINTR is returned, not retried: the caller checks for Ctrl-C. */
    n = epoll_wait(e->epfd, evs, IOCP__EPOLL_BATCH, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return IOCP_EINTR;
        return -errno;
    }
    iocp__lock(p);
    start = budget;
    while (e->ready_head >= 0 && budget > 0) {
        int fd = e->ready_head;
        struct iocp__fdstate *st = &e->fds[fd];
        e->ready_head = st->ready_next;
        st->on_ready_list = 0;
        if (st->registered)
            iocp__process_fd(p, e, fd, &budget);
    }
    for (i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        uint32_t ev = evs[i].events;
        struct iocp__fdstate *st;
        if (fd < 0) {
            uint64_t v;
            ssize_t rr = read(e->evfd, &v, sizeof(v));
            (void)rr;
            continue;
        }
        st = iocp__fd(e, fd);
        if (!st || !st->registered)
            continue;
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI))
            st->readable = 1;
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI))
            st->rd_sticky = 1;
        if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
            st->writable = 1;
        if (st->pl_head)
            iocp__poll_note(st, ev);
        if (budget > 0)
            iocp__process_fd(p, e, fd, &budget);
        else if (st->rq_head || st->wq_head || st->pl_head)
            iocp__ready_list_add(p, e, fd);
    }
    iocp__unlock(p);
    return start - budget;
}

static int iocp__epoll_wake(iocp_port *p);

/*
 * A multishot recv's buffer comes back (lock held; the core has already
 * taken it off live_buffers, which iocp__buffer_put counts down too).
 * Sockets starved by the bound resume once bytes are back under it: they
 * go on the ready list, "maybe readable" again (their last read was
 * skipped, not drained), and a poller asleep in epoll_wait is woken, since
 * no edge will come for bytes already queued.
 */
static void iocp__epoll_release_buffer(iocp_port *p, char *data, uint32_t buf_id)
{
    struct iocp__epoll *e = p->be;

    e->pool_used -= buf_id <= e->pool_used ? buf_id : e->pool_used;
    p->live_buffers++;
    iocp__buffer_put(p, data);
    if (e->starved_head < 0 || e->pool_used >= e->pool_max)
        return;
    while (e->starved_head >= 0) {
        int fd = e->starved_head;
        struct iocp__fdstate *st = &e->fds[fd];
        e->starved_head = st->starved_next;
        st->starved = 0;
        if (st->registered && st->ms_recv) {
            st->readable = 1;
            iocp__ready_list_add(p, e, fd);
        }
    }
    if (p->poll_blocking)
        (void)iocp__epoll_wake(p);
}

static int iocp__epoll_wake(iocp_port *p)
{
    struct iocp__epoll *e = p->be;
    uint64_t one = 1;

    iocp__cnt[IOCP__CNT_WAKES]++;
    /* An eventfd write is safe from any thread, in every mode. */
    if (write(e->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}

const iocp_backend iocp__backend_epoll = {
    .name = "epoll",
    .probe = iocp__epoll_probe,
    .init = iocp__epoll_init,
    .destroy = iocp__epoll_destroy,
    .register_socket = iocp__epoll_register,
    .unregister_socket = iocp__epoll_unregister,
    .submit = iocp__epoll_submit,
    .cancel = iocp__epoll_cancel,
    .poll = iocp__epoll_poll,
    .wake = iocp__epoll_wake,
    .release_buffer = iocp__epoll_release_buffer,  /* multishot recv buffers */
};
