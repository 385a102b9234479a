/*
 * uring.c -- the completion model on Linux io_uring.
 *
 * What the kernel gives: a real completion port.  A submission ring (SQ)
 * of 64-byte request records and a completion ring (CQ) of 16-byte results,
 * both shared with the kernel through mmap; each request carries a 64-bit
 * user_data that comes back in its completion.  The kernel performs the
 * socket operation itself (arming an internal poll when the socket is not
 * ready), so an op costs no syscall of its own: SQEs are batched and handed
 * over by the io_uring_enter() that also waits for completions.  Talking to
 * the kernel uses raw syscalls and ABI records under our own names
 * (uring_abi.h), so the backend needs neither liburing nor recent kernel
 * headers.  This file is the op state machine; the ring (setup, SQE
 * get/commit, flush, CQ primitives, one prep helper per SQE kind) is in
 * uring_ring.c, the feature probes in uring_probe.c, the provided-buffer
 * groups in uring_buf.c, and what they share in uring_internal.h; what it
 * does with a socket exactly as epoll.c does (descriptor table, O_NONBLOCK
 * at register, how a connect ended, the result of an op stopped early
 * after a partial send) is sock.c's.
 *
 * How ops map: user_data is the iocp_op pointer (records are at least
 * 8-byte aligned, so the low three bits are free for tags).  ACCEPT ->
 * IORING_OP_ACCEPT (multishot where the kernel has it, re-armed after every
 * connection where it does not), CONNECT -> IORING_OP_CONNECT, RECV ->
 * IORING_OP_RECV picking a buffer from a provided-buffer group when the
 * request fits (4 KiB buffers up to 4 KiB, 64 KiB ones up to 64 KiB; an
 * idle recv then pins no memory; the buffer goes to the caller with a
 * buf_id naming group and buffer and comes back through release_buffer),
 * else from the port pool at submit.  The groups grow with load up to
 * recv_pool_max, at most once per reap: when callers keep most of a group
 * past their batches, on a single-shot recv's -ENOBUFS (one that still
 * finds none moves to a pool buffer), and on a multishot recv's only
 * once the ring has run dry in 16 reaps since the last growth -- a burst
 * shorter than that waits in the sockets (see iocp__ms_grow).  A multishot RECV is one armed
 * IORING_RECV_MULTISHOT request, one completion with MORE per CQE, from
 * the group its socket's arrivals fit: the 512 B group first, one size
 * up (4 KiB, then 64 KiB) each time a buffer comes back full, one down again
 * after a run of small arrivals (iocp__ms_follow; the switch ends the armed
 * request with a cancel of our own and re-arms, so a 64 KiB message
 * costs 16 completions once, then about one); where the kernel lacks
 * it, or the cap is under a buffer, a single-shot recv from the group is
 * re-armed after each completion, and with no buffer ring at all a
 * POLL_ADD then a pool-buffer recv is.  -ENOBUFS ends a kernel multishot:
 * the op grows the group, or, with data waiting (MSG_PEEK), waits
 * (ST_PARKED) until buffers come back and is re-armed in waves no larger
 * than the ring can feed, or, idle, waits on a POLL_ADD; it never
 * surfaces.  While it is armed the socket's other
 * recvs get -EBUSY.  RECV_INTO -> IORING_OP_RECV into the
 * caller's buffer, SEND -> IORING_OP_SEND (IORING_OP_SENDMSG for a
 * gathered send, msghdr kept in the op) re-submitted for the remainder
 * after a short send, POST -> IORING_OP_NOP.  Should the kernel hand back
 * -EAGAIN (old kernels, O_NONBLOCK sockets) the op waits on a one-shot
 * IORING_OP_POLL_ADD tagged op|1 and is re-issued when it fires.  Internal
 * requests (wake-up NOPs, cancel requests, poll timeouts) carry tag 2 with
 * no pointer, so they are never mistaken for ops and never surface.
 *
 * Order: one SQE per op would let the kernel interleave the bytes of two
 * sends on a socket (a short send's remainder, or a send that got -EAGAIN,
 * goes behind the next one) and hand two recvs their bytes out of order.
 * So every socket has a read FIFO (recv, recv_into) and a write FIFO
 * (connect, send), linked through op->fifo_next, and only the head of each
 * has a request out; ops queued behind it cost no SQE and are issued one
 * by one as the head completes -- except that consecutive silent sends
 * queued behind a silent head go out as one linked chain
 * (IOSQE_IO_LINK + MSG_WAITALL, CQE_SKIP_SUCCESS on all but the last; see
 * iocp__try_chain), so a socket with many small sends queued pays one
 * round trip per chain, not per send.  All re-issues (remainder, poll, -ENOBUFS
 * fallback to a pool buffer, spurious cancel) are of the head itself.
 * Accept and post skip the FIFOs: they are no byte stream.
 *
 * Cancel and close: an op queued behind its FIFO head, or a multishot
 * recv waiting for buffers, has nothing in the kernel, so cancel unlinks
 * it and completes it cancelled at once.  For an
 * op with a request out, cancel submits IORING_OP_ASYNC_CANCEL for the op's
 * user_data; the op's own completion then arrives, -ECANCELED (or -EINTR
 * when an io-wq worker was interrupted), and is flagged cancelled -- or
 * with its real result if it had already finished.  Requests hold a
 * reference to their file, so closing a socket does not stop them:
 * unregister completes the socket's queued FIFO ops cancelled, cancels the
 * rest (IORING_ASYNC_CANCEL_FD|ALL, else one request per op) and submits at
 * once, before the caller closes
 * the descriptor.  Ops learn they were cancelled from a per-op flag or a
 * per-descriptor generation that unregister and register bump.  The kernel
 * also cancels the requests of a thread that exits; such an unrequested
 * -ECANCELED re-issues the op instead of failing it.
 *
 * Completions are never lost: the CQ is 4x the SQ, IORING_FEAT_NODROP is
 * required, poll() delivers at most `max` completions and leaves the rest
 * in the ring (a CQE that means more completions than fit -- a multishot
 * recv's last data and its cancel -- owes the rest, u->owed, delivered
 * first by the next reap); the kernel's overflow list absorbs more, and
 * io_uring_enter(GETEVENTS) flushes it back when the ring says so.  Submission happens under the
 * port lock from any thread.  SQEs made by a thread while it dispatches a
 * batch wait until that batch ends (the port's dispatch_done hook submits
 * them) or its next poll(), whichever is first; every other thread's go at
 * once (see iocp__submit_policy).  If the SQ is full we submit to make
 * room; if even that fails, ops wait on a backlog (op->fd_next).  The
 * descriptor table doubles up to IOCP__UFD_MAX; a larger descriptor is
 * refused with -EBADF.
 *
 * Single-issuer ports (iocp_port_options.single_issuer: one thread, an
 * event loop, and no port lock): the ring is set up SINGLE_ISSUER |
 * DEFER_TASKRUN where the kernel has them (then SINGLE_ISSUER |
 * COOP_TASKRUN, SINGLE_ISSUER, COOP_TASKRUN, plain), R_DISABLED so that
 * its owner -- the first thread that uses the port, not its creator -- is
 * the one that enables it and so the one the kernel lets submit; that
 * first call also registers the ring fd for the owner (every enter then
 * names a registered index).  A foreign thread may neither enter such a
 * ring nor lock, so wake() writes an eventfd the ring keeps a multishot
 * POLL_ADD on (tag IOCP__IN_EVENTFD, internal like the wake NOP of the
 * multi-thread mode); see uring_ring.c.  POLL -> IORING_OP_POLL_ADD with
 * the IOCP_POLL_* mask (POSIX bits), IORING_POLL_ADD_MULTI for a multishot
 * poll (re-armed one-shot, still delivered with MORE, where the kernel
 * ends it or lacks it); poll ops skip the FIFOs and cancel like any op.
 *
 * Environment, for tests: IOCP_URING_FAIL_SETUP=1 makes probe() and init()
 * fail with -EPERM as if io_uring were disabled (the default port then falls
 * back to epoll).  IOCP_URING_DISABLE="ext-arg,provided-buffers,
 * multishot-accept,recv-multishot,cancel-fd,submit-all,send-chain" (the
 * feature words of uring_probe.c) turns the named kernel features
 * off to exercise the fallback paths on a new kernel (also single-issuer,
 * defer-taskrun, coop-taskrun, registered-ring, poll-multishot).
 * IOCP_URING_TEST_STARVE=N makes every Nth op or cancel find the SQ full,
 * to exercise the backlogs.  IOCP_URING_STATS=1 prints counters (-ENOBUFS
 * seen, buffer-group growths and waits, idle recvs that found the ring
 * empty, send chains) to stderr when a port
 * closes; IOCP_URING_POOL_MAX=bytes bounds the buffer groups where the
 * port options leave recv_pool_max at 0.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "uring_internal.h"
#include "sock.h"

/* ---- per-descriptor state ------------------------------------------- */

/* Makes the table cover `fd` (the growth and zeroing are sock.h's, shared
 * with epoll.c) and returns its entry in *entry.  0, IOCP_EBADF for a
 * descriptor no table can hold (past IOCP__UFD_MAX: refused here as a bad
 * descriptor, where the shared helper would say ENOMEM), or IOCP_ENOMEM. */
static int iocp__ufd_reserve(struct iocp__uring *u, int fd, struct iocp__ufd **entry)
{
    void *t = u->fds, *slot;
    int r;

    if (fd < 0 || fd >= IOCP__UFD_MAX)
        return IOCP_EBADF;
    r = iocp__sock_table_reserve(&t, &u->nfds, fd, sizeof(*u->fds), &slot);
    if (r < 0)
        return r;
    u->fds = t;
    *entry = slot;
    return 0;
}

/* The descriptor's state; NULL if it has none (never registered). */
static struct iocp__ufd *iocp__ufd(struct iocp__uring *u, int fd)
{
    return iocp__sock_table_at(u->fds, u->nfds, fd, sizeof(*u->fds));
}

/* The op's generation is kept in aux_sock (unused on Linux). */
static int iocp__cancelling(struct iocp__uring *u, iocp_op *op)
{
    struct iocp__ufd *st;

    if (op->state & IOCP__ST_CANCEL)
        return 1;
    if (op->kind == IOCP_OP_POST)
        return 0;
    st = iocp__ufd(u, op->sock);
    return !st || (unsigned)op->aux_sock != st->gen;
}

/* ---- arming ops ------------------------------------------------------- */

static void iocp__list_push(iocp_op **head, iocp_op *op)
{
    iocp_op **pp = head;
    /* FIFO: the backlog keeps submission order per socket. */
    while (*pp)
        pp = &(*pp)->fd_next;
    op->fd_next = NULL;
    *pp = op;
}

static int iocp__list_remove(iocp_op **head, iocp_op *op)
{
    iocp_op **pp;

    for (pp = head; *pp; pp = &(*pp)->fd_next) {
        if (*pp == op) {
            *pp = op->fd_next;
            op->fd_next = NULL;
            return 1;
        }
    }
    return 0;
}

/* Multishot recvs waiting for buffers of a group, oldest first. */
static void iocp__waiter_push(struct iocp__bgroup *b, iocp_op *op)
{
    op->fd_next = NULL;
    if (b->waiters_tail)
        b->waiters_tail->fd_next = op;
    else
        b->waiters = op;
    b->waiters_tail = op;
    op->state |= IOCP__ST_PARKED;
}

static void iocp__waiter_remove(struct iocp__bgroup *b, iocp_op *op)
{
    iocp_op *prev = NULL, *it;

    for (it = b->waiters; it && it != op; it = it->fd_next)
        prev = it;
    if (!it)
        return;
    if (prev)
        prev->fd_next = op->fd_next;
    else
        b->waiters = op->fd_next;
    if (b->waiters_tail == op)
        b->waiters_tail = prev;
    op->fd_next = NULL;
    op->state &= ~IOCP__ST_PARKED;
}

/*
 * Per-socket FIFOs.  Byte-stream ops wait in their socket's FIFO for their
 * direction and only the head has a request out, so a short send's
 * remainder, a re-issue after -EAGAIN or -ENOBUFS, or a re-issue after a
 * spurious cancel always goes before the ops behind it.  Accept and post
 * carry no byte stream and skip them.
 */
static struct iocp__fifo *iocp__fifo_for(struct iocp__ufd *st, int kind)
{
    switch (kind) {
    case IOCP_OP_RECV:
    case IOCP_OP_RECV_INTO:
        return &st->rq;
    case IOCP_OP_SEND:
    case IOCP_OP_CONNECT:
        return &st->wq;
    default:
        return NULL;
    }
}

/* Appends; returns 1 if the op is now the head. */
static int iocp__fifo_push(struct iocp__fifo *f, iocp_op *op)
{
    op->fifo_next = NULL;
    if (f->tail)
        f->tail->fifo_next = op;
    else
        f->head = op;
    f->tail = op;
    return f->head == op;
}

/* Unlinks the op wherever it is; returns 1 if it was the head. */
static int iocp__fifo_remove(struct iocp__fifo *f, iocp_op *op)
{
    iocp_op *prev = NULL, *it;

    for (it = f->head; it && it != op; it = it->fifo_next)
        prev = it;
    if (!it)
        return 0;
    if (prev)
        prev->fifo_next = op->fifo_next;
    else
        f->head = op->fifo_next;
    if (f->tail == op)
        f->tail = prev;
    op->fifo_next = NULL;
    return prev == NULL;
}

/* The op's user_data (tag 0: the op itself). */
static inline uint64_t iocp__ud_op(iocp_op *op)
{
    return (uint64_t)(uintptr_t)op | IOCP__UD_OP;
}

static inline int iocp__is_msrecv(const iocp_op *op)
{
    return op->kind == IOCP_OP_RECV && (op->flags & IOCP_OPF_MULTISHOT);
}

/* The buffer group a RINGBUF recv picks from. */
static inline int iocp__op_group(const iocp_op *op)
{
    if (op->state & IOCP__ST_BG_LARGE)
        return IOCP__BG_LARGE;
    return (op->state & IOCP__ST_BG_TINY) ? IOCP__BG_TINY : IOCP__BG_SMALL;
}

/* The op state bits that name group g. */
static inline int iocp__group_bits(int g)
{
    return g == IOCP__BG_LARGE ? IOCP__ST_BG_LARGE : g == IOCP__BG_TINY ? IOCP__ST_BG_TINY : 0;
}

/* Bytes a recv into a pool buffer asks for (a multishot one: its cap, or
 * 64 KiB). */
static inline size_t iocp__pool_recv_len(const iocp_op *op)
{
    if (iocp__is_msrecv(op) && op->len == 0)
        return 65536;
    return op->len;
}

/* Fills a SEND (a SENDMSG over the unsent segments of a gathered send). */
static void iocp__prep_send_op(iocp__uring_sqe *sqe, iocp_op *op, unsigned msg_flags,
                               uint64_t ud)
{
    if (op->iovcnt > 0) {
        /* The msghdr lives in the op, so it stays valid however long the
         * SQE waits in the ring. */
        int nseg;
        memset(&op->msg, 0, sizeof(op->msg));
        op->msg.msg_iov = (struct iovec *)iocp__iov_advance(op, 0, &nseg);
        op->msg.msg_iovlen = (size_t)nseg;
        iocp__prep_sendmsg(sqe, op->sock, &op->msg, msg_flags, ud);
    } else {
        iocp__prep_send(sqe, op->sock, op->buf + op->done, op->len - op->done, msg_flags, ud);
    }
}

/* Queues the SQE that (re)issues the op as its state says; -1 with no SQE
 * free (the caller puts the op on the backlog, drained by poll()). */
static int iocp__arm_now(struct iocp__uring *u, iocp_op *op)
{
    iocp__uring_sqe *sqe = iocp__sqe_get_op(u);
    uint64_t ud = iocp__ud_op(op);

    if (!sqe)
        return -1;
    switch (op->kind) {
    case IOCP_OP_ACCEPT:
        if (op->state & IOCP__ST_MULTI) {
            /* Every connection would write the same address buffer while
             * we read it: take the peer from getpeername() instead. */
            iocp__prep_accept(sqe, op->sock, NULL, NULL, 1, ud);
        } else {
            op->addrlen = sizeof(op->addr);
            iocp__prep_accept(sqe, op->sock, (struct sockaddr *)&op->addr, &op->addrlen,
                              0, ud);
        }
        break;
    case IOCP_OP_CONNECT:
        iocp__prep_connect(sqe, op->sock, (struct sockaddr *)&op->addr, op->addrlen, ud);
        break;
    case IOCP_OP_RECV:
        if (op->state & IOCP__ST_RINGBUF) {
            int g = iocp__op_group(op);
            size_t size = iocp__bg_size(&u->bg[g]);
            if (op->state & IOCP__ST_MULTI)
                iocp__prep_recv_select(sqe, op->sock, 0, (unsigned)g, 1, ud);
            else
                iocp__prep_recv_select(sqe, op->sock, op->len && op->len < size ? op->len : size,
                                       (unsigned)g, 0, ud);
        } else if (op->backend_data) {
            iocp__prep_recv(sqe, op->sock, op->backend_data, iocp__pool_recv_len(op), ud);
        } else {
            /* Multishot with no buffer ring: wait for data before taking a
             * pool buffer (iocp__complete_poll), so an idle socket pins
             * none. */
            iocp__prep_poll_add(sqe, op->sock, POLLIN, (uint64_t)(uintptr_t)op | IOCP__UD_POLL);
            iocp__sqe_commit(u);
            op->state |= IOCP__ST_POLL;
            return 0;
        }
        break;
    case IOCP_OP_RECV_INTO:
        iocp__prep_recv(sqe, op->sock, op->buf, op->len, ud);
        break;
    case IOCP_OP_SEND:
        iocp__prep_send_op(sqe, op, MSG_NOSIGNAL, ud);
        break;
    case IOCP_OP_POLL:
        /* `len` holds the IOCP_POLL_* events: POSIX poll bits, which is
         * what POLL_ADD takes. */
        if (op->state & IOCP__ST_MULTI)
            iocp__prep_poll_multishot(sqe, op->sock, (unsigned)op->len, ud);
        else
            iocp__prep_poll_add(sqe, op->sock, (unsigned)op->len, ud);
        break;
    default: /* IOCP_OP_POST */
        iocp__prep_nop(sqe, ud);
        break;
    }
    iocp__sqe_commit(u);
    op->state |= IOCP__ST_ARMED;
    return 0;
}

static void iocp__arm(struct iocp__uring *u, iocp_op *op)
{
    /* Behind a backlog it must wait its turn: order per socket matters. */
    if (u->backlog || iocp__arm_now(u, op) < 0) {
        op->state |= IOCP__ST_BACKLOG;
        iocp__list_push(&u->backlog, op);
    }
}

/* Waits for readiness before re-issuing (the kernel said -EAGAIN). */
static void iocp__arm_poll(struct iocp__uring *u, iocp_op *op, unsigned events)
{
    iocp__uring_sqe *sqe = u->backlog ? NULL : iocp__sqe_get_op(u);

    if (!sqe) {
        /* Re-issuing the op directly is just as correct, only busier. */
        op->state &= ~IOCP__ST_CONNWAIT;
        iocp__arm(u, op);
        return;
    }
    iocp__prep_poll_add(sqe, op->sock, events, (uint64_t)(uintptr_t)op | IOCP__UD_POLL);
    iocp__sqe_commit(u);
    op->state |= IOCP__ST_POLL;
}

/* Fills the cancel for whatever request of the op is out: its readiness
 * wait if one is, else the op's own request. */
static void iocp__prep_op_cancel(iocp__uring_sqe *sqe, iocp_op *op)
{
    unsigned tag = (op->state & IOCP__ST_POLL) ? IOCP__UD_POLL
                   : (op->state & IOCP__ST_CHAIN) ? IOCP__UD_CHAIN : IOCP__UD_OP;

    iocp__prep_cancel(sqe, (uint64_t)(uintptr_t)op | tag, IOCP__UD_IN(IOCP__IN_CANCEL, 0));
}

/* Longest linked chain of sends (SQ room permitting). */
#define IOCP__CHAIN_MAX 256u

/*
 * Silent sends, linked.  A socket's write FIFO runs one request at a time,
 * so many small sends queued on it would cost one ring round trip each.
 * When the head about to start is a silent send and more sends are queued
 * right behind it, they go out as one chain instead: IOSQE_IO_LINK makes
 * the kernel run them in order, one after the other; MSG_WAITALL makes it
 * finish each send (retrying short ones itself) or fail it, and a failed
 * or short member fails the rest of the link (-ECANCELED), so nothing can
 * overtake a short send; IOSQE_CQE_SKIP_SUCCESS on all but the last means
 * one CQE for the lot.  The chain is the maximal run of queued silent
 * sends, closed by the next send if that one is not silent (its CQE is
 * posted anyway).  Ends: the first CQE of any member (a member failing
 * with CQE_SKIP posts its own CQE, and the kernel then skips those of the
 * links it cancels -- all of them, the last one's too), so the members
 * before it succeeded, it has its own result, and those after it never
 * ran (iocp__complete_chain).  The SQEs are published together, after
 * SKIP'd NOP padding if poll()'s blocking io_uring_enter might still take
 * SQEs (u->poller_pending): it could otherwise submit a prefix of the
 * chain on its own, cutting the link.
 * Returns 1 if it issued a chain starting at `head` (not QUEUED any more).
 */
static int iocp__try_chain(struct iocp__uring *u, struct iocp__ufd *st, iocp_op *head)
{
    unsigned n = 0, i, pad = u->poller_pending, room = iocp__sq_space(u);
    iocp_op *m;

    if (!(u->caps & IOCP__CAP_CHAIN) || u->backlog || st->chain_n ||
        head->kind != IOCP_OP_SEND || !(head->flags & IOCP_OPF_SILENT) ||
        !(head->state & IOCP__ST_FIFO) || room < pad + 2)
        return 0;
    room -= pad;
    if (room > IOCP__CHAIN_MAX)
        room = IOCP__CHAIN_MAX;
    for (m = head; m && n < room; m = m->fifo_next) {
        if (m != head && (!(m->state & IOCP__ST_QUEUED) || m->kind != IOCP_OP_SEND ||
                          iocp__cancelling(u, m)))
            break;
        n++;
        if (!(m->flags & IOCP_OPF_SILENT))
            break;
    }
    if (n < 2 || (u->starve && ++u->starve_ctr % u->starve == 0))
        return 0;
    for (i = 0; i < pad; i++) {
        iocp__uring_sqe *sqe = iocp__sqe_at(u, i);
        iocp__prep_nop(sqe, IOCP__UD_IN(IOCP__IN_PAD, 0));
        sqe->flags = IOCP__SQE_CQE_SKIP;
    }
    for (m = head, i = 0; i < n; i++, m = m->fifo_next) {
        iocp__uring_sqe *sqe = iocp__sqe_at(u, pad + i);
        iocp__prep_send_op(sqe, m, MSG_NOSIGNAL | MSG_WAITALL,
                           (uint64_t)(uintptr_t)m | IOCP__UD_CHAIN);
        if (i + 1 < n)
            sqe->flags |= IOCP__SQE_IO_LINK | IOCP__SQE_CQE_SKIP;
        m->state &= ~IOCP__ST_QUEUED;
        m->state |= IOCP__ST_ARMED | IOCP__ST_CHAIN;
    }
    iocp__sqe_commit_n(u, pad + n);
    st->chain_n = n;
    u->n_chains++;
    u->n_chained += n;
    return 1;
}

/* Queues a cancel for whatever request of the op is out; with no SQE free
 * it waits on the cancel backlog. */
static void iocp__send_cancel(struct iocp__uring *u, iocp_op *op)
{
    iocp__uring_sqe *sqe = iocp__sqe_get_op(u);

    if (!sqe) {
        op->state |= IOCP__ST_CBACKLOG;
        iocp__list_push(&u->cbacklog, op);
        return;
    }
    iocp__prep_op_cancel(sqe, op);
    iocp__sqe_commit(u);
}

/* ---- delivering ------------------------------------------------------- */

static void iocp__submit_policy(iocp_port *p, struct iocp__uring *u);

static void iocp__fifo_start(iocp_port *p, struct iocp__uring *u, struct iocp__fifo *f);

static void iocp__finish_now(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                             int64_t result, int64_t error, unsigned flags,
                             char *data, uint32_t buf_id)
{
    struct iocp__fifo *next = NULL;

    if (!(flags & IOCP_CF_MORE)) {
        struct iocp__ufd *st = iocp__ufd(u, op->sock);
        if (st && st->msrecv == op)
            st->msrecv = NULL;
        if (op->state & IOCP__ST_PARKED)
            iocp__waiter_remove(&u->bg[iocp__op_group(op)], op);
        if ((op->state & IOCP__ST_FIFO) && st) {
            /* The head's successor may start now (after this delivery, so
             * completions of one direction come out in order). */
            struct iocp__fifo *f = iocp__fifo_for(st, op->kind);
            if (iocp__fifo_remove(f, op))
                next = f;
        }
        /* A pool buffer that is not being handed out goes back now. */
        if (op->backend_data && op->backend_data != data)
            iocp__buffer_put(p, op->backend_data);
        op->backend_data = NULL;
        /* Its cancel may still wait for SQ room: the record is about to be
         * freed and reused, so it must leave that list now. */
        if (op->state & IOCP__ST_CBACKLOG)
            iocp__list_remove(&u->cbacklog, op);
        op->state = 0;
        if (op->kind != IOCP_OP_POST && st && st->nops > 0)
            st->nops--;
    }
    iocp__deliver(p, op, result, error, flags, data, buf_id);
    u->ndelivered++;
    if (next)
        iocp__fifo_start(p, u, next);
}

/* Appends to the owed list; -1 if it cannot grow (out of memory). */
static int iocp__owe(struct iocp__uring *u, iocp_op *op, int64_t result, int64_t error,
                     unsigned flags, char *data, uint32_t buf_id)
{
    struct iocp__owed *o;

    if (u->owed_head + u->nowed == u->owed_cap) {
        if (u->owed_head > 0) {
            memmove(u->owed, u->owed + u->owed_head, u->nowed * sizeof(*u->owed));
            u->owed_head = 0;
        } else {
            unsigned cap = u->owed_cap ? u->owed_cap * 2 : 64;
            struct iocp__owed *n = realloc(u->owed, cap * sizeof(*n));
            if (!n)
                return -1;
            u->owed = n;
            u->owed_cap = cap;
        }
    }
    o = &u->owed[u->owed_head + u->nowed++];
    o->op = op;
    o->result = result;
    o->error = error;
    o->flags = flags;
    o->data = data;
    o->buf_id = buf_id;
    return 0;
}

/*
 * Delivers one outcome of the op -- or, when this reap has handed out its
 * `max` (or earlier outcomes already wait), owes it: the next reap delivers
 * it first.  Once anything is owed every later outcome is too, so order
 * holds.  An op whose final outcome is owed is ST_OWED: nothing of it is in
 * the kernel any more and cancel leaves it alone.
 */
static void iocp__finish(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                         int64_t result, int64_t error, unsigned flags,
                         char *data, uint32_t buf_id)
{
    if ((u->nowed || (u->reaping && u->ndelivered >= u->budget)) &&
        iocp__owe(u, op, result, error, flags, data, buf_id) == 0) {
        if (!(flags & IOCP_CF_MORE))
            op->state |= IOCP__ST_OWED;
        if (!u->reaping)
            p->kick = 1;             /* only poll() hands it out */
        return;
    }
    iocp__finish_now(p, u, op, result, error, flags, data, buf_id);
}

/* Hands out what earlier reaps owed, as far as this reap's budget goes. */
static void iocp__owed_drain(iocp_port *p, struct iocp__uring *u)
{
    while (u->nowed && u->ndelivered < u->budget) {
        struct iocp__owed o = u->owed[u->owed_head++];
        if (--u->nowed == 0)
            u->owed_head = 0;
        iocp__finish_now(p, u, o.op, o.result, o.error, o.flags, o.data, o.buf_id);
    }
}

/*
 * Ends an op stopped early by `err` with the result sock.h gives it (a send
 * that moved bytes reports them, the error beside them).  Through
 * iocp__finish, not iocp__sock_deliver_cancelled: a completion must respect
 * the reap's budget and the owed queue, which plain iocp__deliver does not.
 */
static void iocp__finish_stopped(iocp_port *p, struct iocp__uring *u, iocp_op *op, int err,
                                 unsigned flags)
{
    int64_t result, error;

    iocp__sock_stop_result(op, err, &result, &error);
    iocp__finish(p, u, op, result, error, flags, NULL, 0);
}

static void iocp__finish_cancelled(iocp_port *p, struct iocp__uring *u, iocp_op *op)
{
    iocp__finish_stopped(p, u, op, IOCP_ECANCELED, IOCP_CF_CANCELLED);
}

/*
 * Issues the FIFO's new head.  A head whose socket was unregistered since
 * it was queued completes cancelled instead (without recursing: it is
 * unlinked before it is finished), and the next one is tried.
 */
static void iocp__fifo_start(iocp_port *p, struct iocp__uring *u, struct iocp__fifo *f)
{
    iocp_op *op;

    while ((op = f->head) != NULL && (op->state & IOCP__ST_QUEUED)) {
        if (!iocp__cancelling(u, op)) {
            struct iocp__ufd *st = iocp__ufd(u, op->sock);
            if (st && f == &st->wq && iocp__try_chain(u, st, op))
                return;
            op->state &= ~IOCP__ST_QUEUED;
            iocp__arm(u, op);
            return;
        }
        op->state &= ~IOCP__ST_QUEUED;
        f->head = op->fifo_next;
        if (!f->head)
            f->tail = NULL;
        op->fifo_next = NULL;
        op->state &= ~IOCP__ST_FIFO;
        iocp__finish_cancelled(p, u, op);
    }
}

/* A request of the op ended without producing its outcome (-EAGAIN,
 * -ECONNABORTED, short send, spurious cancel...): go again unless the op
 * is being cancelled. */
static void iocp__again(iocp_port *p, struct iocp__uring *u, iocp_op *op)
{
    if (iocp__cancelling(u, op))
        iocp__finish_cancelled(p, u, op);
    else
        iocp__arm(u, op);
}

static void iocp__again_poll(iocp_port *p, struct iocp__uring *u, iocp_op *op, unsigned ev)
{
    if (iocp__cancelling(u, op))
        iocp__finish_cancelled(p, u, op);
    else
        iocp__arm_poll(u, op, ev);
}

static int iocp__is_cancel_res(int res)
{
    return res == -ECANCELED || res == -EINTR;
}

static void iocp__complete_accept(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                                  int res, unsigned cflags)
{
    int multi = (op->flags & IOCP_OPF_MULTISHOT) != 0;

    if (res >= 0) {
        /* A kernel multishot accept wrote no address (see iocp__arm_now):
         * the record's is meaningless for a multishot op, whose
         * connections would all share it, so none is read here either. */
        if (op->state & IOCP__ST_MULTI)
            op->addrlen = 0;
        if (!multi) {
            iocp__finish(p, u, op, res, 0, 0, NULL, 0);
            return;
        }
        iocp__finish(p, u, op, res, 0, IOCP_CF_MORE, NULL, 0);
        /* Kernel multishot goes on by itself while F_MORE is set; it ends
         * on CQ overflow, and emulation ends after every connection. */
        if (!(cflags & IOCP__CQE_F_MORE))
            iocp__again(p, u, op);
        return;
    }
    if (cflags & IOCP__CQE_F_MORE)
        return;                     /* a transient error; still armed */
    if (res == -EAGAIN)
        iocp__again_poll(p, u, op, POLLIN);
    else if (res == -ECONNABORTED || (iocp__is_cancel_res(res) && !iocp__cancelling(u, op)))
        iocp__again(p, u, op);      /* died in the backlog / thread exit */
    else if (iocp__is_cancel_res(res))
        iocp__finish_cancelled(p, u, op);
    else
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
}

/*
 * Re-arms, oldest first, at most `room` of the multishot recvs that wait
 * for buffers of group g: as many as the ring can feed.  Every waiter has
 * data (iocp__recv_starved parks no idle socket), so each one re-armed
 * takes a buffer and its completion brings the next wave with its
 * release; re-arming them all would be a herd of -ENOBUFS, one per waiter
 * per wave, while the ring holds fewer buffers than the socket queue has
 * arrivals.  `room` is the group less what callers hold and what the
 * waiters re-armed since the reap began are about to take; buffers still
 * in CQEs make it high, and the extra ones just wait again.
 */
static void iocp__unpark(iocp_port *p, struct iocp__uring *u, int g)
{
    struct iocp__bgroup *b = &u->bg[g];
    unsigned used = b->out + b->promised;
    unsigned room = b->nbufs > used ? b->nbufs - used : 0;
    iocp_op *op;

    while (room > 0 && (op = b->waiters) != NULL) {
        b->waiters = op->fd_next;
        if (!b->waiters)
            b->waiters_tail = NULL;
        op->fd_next = NULL;
        op->state &= ~IOCP__ST_PARKED;
        iocp__again(p, u, op);
        b->promised++;
        room--;
    }
}

/* Grows group g and re-arms the recvs that waited for its buffers.
 * Returns how many buffers it added. */
static unsigned iocp__grow(iocp_port *p, struct iocp__uring *u, int g)
{
    unsigned added = iocp__bg_grow(u, g);

    if (added > 0) {
        u->bg[g].grew_seq = u->reap_seq;
        u->bg[g].starved = 0;
        if (u->bg[g].waiters)
            iocp__unpark(p, u, g);
    }
    return added;
}

/*
 * After -ENOBUFS on a single-shot recv: may it go again on the ring?  One
 * shortage shows as a burst of -ENOBUFS in one batch of CQEs, so the group
 * grows (doubles) at most once per reap and the rest of the burst re-arms
 * on those buffers; a shortage that lasts grows it again at the next reap.
 */
static int iocp__refill(iocp_port *p, struct iocp__uring *u, int g)
{
    if (u->reaping && u->bg[g].grew_seq == u->reap_seq)
        return 1;
    return iocp__grow(p, u, g) > 0;
}

/* Reaps in which a group's multishot recvs may find its ring empty before
 * it grows, unless callers keep its buffers. */
#define IOCP__STARVE_REAPS 16u

/*
 * After -ENOBUFS on a multishot recv: grow the group now (1), or let the
 * recv wait for the buffers already on their way back (0)?  Where the
 * buffers are decides.  Callers keeping half the group past their batch
 * (`held`) are a shortage no release may end soon: grow.  Otherwise the
 * ring ran dry because arrivals outran the reaping: the buffers sit in
 * CQEs of this reap and the next, and come back when their batches are
 * done, while the data waits in its socket as it does under a readiness
 * loop.  Such a burst (ten thousand connections sending a first message
 * at once) lasts a few reaps; doubling the group once per reap would make
 * it 16 times larger for good, and every buffer the kernel has written
 * once stays resident.  So only a shortage seen in IOCP__STARVE_REAPS
 * reaps since the last growth grows it.  At most once per reap either
 * way; the rest of that reap's burst re-arms on the new buffers.
 */
static int iocp__ms_grow(iocp_port *p, struct iocp__uring *u, int g)
{
    struct iocp__bgroup *b = &u->bg[g];

    if (u->reaping && b->grew_seq == u->reap_seq)
        return 1;
    if (b->starved_seq != u->reap_seq) {
        b->starved_seq = u->reap_seq;
        b->starved++;
    }
    if (2 * b->held < b->nbufs && b->starved < IOCP__STARVE_REAPS)
        return 0;
    return iocp__grow(p, u, g) > 0;
}

/* A CQE gave us buffer `bid` of group g with `res` bytes: it goes to the
 * caller (ours until release_buffer).  When callers keep most of the
 * group past their batches, grow before the kernel runs dry.  What this
 * reap hands out does not count: a batch gives its buffers back when it
 * is done, and a burst larger than the ring waits in the sockets instead
 * (iocp__ms_grow). */
static void iocp__handout(iocp_port *p, struct iocp__uring *u, iocp_op *op, int g,
                          unsigned bid, int res, unsigned flags)
{
    struct iocp__bgroup *b = &u->bg[g];

    b->out++;
    p->live_buffers++;
    iocp__finish(p, u, op, res, 0, flags | IOCP_CF_BUFFER, iocp__bg_addr(u, g, bid),
                 iocp__bg_buf_id(g, bid));
    if (b->nbufs - b->held < b->nbufs / 4 && b->grew_seq != u->reap_seq)
        (void)iocp__grow(p, u, g);
}

/*
 * The kernel found no buffer for a multishot recv (which then stopped):
 * grow the group, else wait.  Never surfaces.  The kernel answers
 * -ENOBUFS whenever the ring is empty, data or not, so the socket is
 * asked first (MSG_PEEK, one byte, no wait): with data waiting it joins
 * the group's waiters, re-armed as buffers come back (iocp__unpark); idle,
 * it waits on a poll instead, as after -EAGAIN, and takes no buffer's
 * place in the queue; at its end of stream or on an error it finishes
 * as the recv would have.
 */
static void iocp__recv_starved(iocp_port *p, struct iocp__uring *u, iocp_op *op)
{
    int g = iocp__op_group(op);
    char byte;
    ssize_t n;

    u->n_enobufs++;
    if (iocp__cancelling(u, op)) {
        iocp__finish_cancelled(p, u, op);
        return;
    }
    if (iocp__ms_grow(p, u, g)) {
        iocp__arm(u, op);
        return;
    }
    do
        n = recv((int)op->sock, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        iocp__waiter_push(&u->bg[g], op);
        u->n_parks++;
    } else if (n == 0) {
        iocp__finish(p, u, op, 0, 0, 0, NULL, 0);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        u->n_idle_waits++;
        iocp__arm_poll(u, op, POLLIN);
    } else {
        iocp__finish(p, u, op, -errno, 0, 0, NULL, 0);
    }
}

static void iocp__complete_recv(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                                int res, unsigned cflags)
{
    char *data;

    if (cflags & IOCP__CQE_F_BUFFER) {
        /* A ring buffer came with it: ours until given away or put back. */
        unsigned bid = cflags >> IOCP__CQE_BUFFER_SHIFT;
        int g = iocp__op_group(op);
        if (bid < u->bg[g].nbufs) {
            if (res > 0) {
                iocp__handout(p, u, op, g, bid, res, 0);
                return;
            }
            iocp__bg_put(u, g, bid);
        }
    }
    if (res > 0) {
        data = op->backend_data;
        if (data) {
            op->backend_data = NULL;
            iocp__finish(p, u, op, res, 0, IOCP_CF_BUFFER, data, 0);
        } else {
            iocp__finish(p, u, op, IOCP_EINVAL, 0, 0, NULL, 0);
        }
        return;
    }
    if (res == 0) {
        iocp__finish(p, u, op, 0, 0, 0, NULL, 0);
    } else if (res == -ENOBUFS && (op->state & IOCP__ST_RINGBUF)) {
        u->n_enobufs++;
        if (iocp__cancelling(u, op)) {
            iocp__finish_cancelled(p, u, op);
            return;
        }
        if (iocp__refill(p, u, iocp__op_group(op))) {
            iocp__arm(u, op);
            return;
        }
        /* The groups are at their bound and every buffer is out: use
         * the pool. */
        op->state &= ~(IOCP__ST_RINGBUF | IOCP__ST_BG_MASK);
        op->backend_data = iocp__buffer_get(p, op->len);
        if (!op->backend_data)
            iocp__finish(p, u, op, IOCP_ENOMEM, 0, 0, NULL, 0);
        else
            iocp__arm(u, op);
    } else if (res == -EAGAIN) {
        iocp__again_poll(p, u, op, POLLIN);
    } else if (iocp__is_cancel_res(res)) {
        iocp__again(p, u, op);
    } else {
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
    }
}

/*
 * Multishot recv.  Kernel multishot (ST_MULTI) posts one CQE per arrival
 * with F_MORE while it stays armed; the emulations (a single-shot recv
 * from the buffer ring, or a poll then a pool-buffer recv) post one CQE per
 * request and are re-armed here.  Either way every arrival is delivered
 * with MORE; the final completion is EOF, an error or the cancel.
 */
/*
 * The buffer size follows the socket, on a ladder of three groups (rungs
 * 0, 1, 2: 512 B, 4 KiB, 64 KiB).  A multishot recv starts on the 512 B
 * group, so a short message costs 512 B of pool while it waits for the
 * caller -- what ten thousand mostly idle connections each answering at
 * once add up to.  A buffer that comes back full says the socket delivers
 * more than that size holds (one 64 KiB message would be 128 completions of
 * 512 B), so the socket climbs one rung; IOCP__MS_DOWN_RUN arrivals in a
 * row that would fit half a buffer of the rung below take it one rung down
 * (hysteresis: a mixed stream does not flip on every message).  A rung
 * counts only where its buffer is within the op's cap: kernel multishot
 * fills whole buffers (its SQE takes no length), so a capped recv stays
 * on the largest group its cap allows.  Called with the bytes of each
 * arrival from group g; says which rung the socket wants now.
 */
static const int iocp__ms_ladder[3] = {IOCP__BG_TINY, IOCP__BG_SMALL, IOCP__BG_LARGE};

/* The group a multishot recv on rung `level` picks from: the rung's, or
 * the nearest one below it that is set up and within the op's cap (its
 * current group if none is). */
static int iocp__ms_group(struct iocp__uring *u, const iocp_op *op, unsigned level)
{
    for (;;) {
        int g = iocp__ms_ladder[level];
        int shift = g == IOCP__BG_TINY    ? IOCP__BG_TINY_SHIFT
                    : g == IOCP__BG_SMALL ? IOCP__BG_SMALL_SHIFT
                                          : IOCP__BG_LARGE_SHIFT;
        size_t size = (size_t)1 << shift;
        if ((op->len == 0 || op->len >= size || !(op->state & IOCP__ST_MULTI)) &&
            (g == IOCP__BG_TINY ? iocp__bg_tiny(u) : iocp__bg_pick(u, size)) == g)
            return g;
        if (level == 0)
            return iocp__op_group(op);
        level--;
    }
}

static unsigned iocp__ms_follow(struct iocp__uring *u, struct iocp__ufd *st, const iocp_op *op,
                                int g, int res)
{
    unsigned level = g == IOCP__BG_TINY ? 0u : g == IOCP__BG_SMALL ? 1u : 2u;

    if (level < 2 && (unsigned)res >= iocp__bg_size(&u->bg[g])) {
        /* One rung: a socket of 1-4 KiB messages (HTTP requests) must not
         * take a 64 KiB buffer per arrival -- that would exhaust the pool
         * long before its bound serves its connections. */
        st->ms_small = 0;
        if (iocp__ms_group(u, op, level + 1) != g)
            st->ms_level = (unsigned char)(level + 1);
    } else if (level > 0 &&
               (unsigned)res <= iocp__bg_size(&u->bg[iocp__ms_ladder[level - 1]]) / 2 &&
               u->bg[iocp__ms_ladder[level - 1]].state > 0) {
        if (++st->ms_small >= IOCP__MS_DOWN_RUN) {
            st->ms_small = 0;
            st->ms_level = (unsigned char)(level - 1);
        }
    } else {
        st->ms_small = 0;
    }
    return st->ms_level;
}

/*
 * After an arrival: if the socket now wants another group, a kernel
 * multishot still armed (`more`) is ended with a cancel of our own (its
 * -ECANCELED then re-arms it, as a cancel nobody asked for does), at most
 * one at a time; a request that has ended takes the new group at once,
 * before it is armed again.  Its buffers are never misread: the group bits
 * change only when no request of the op is out.
 */
static void iocp__ms_regroup(struct iocp__uring *u, iocp_op *op, unsigned level, int more)
{
    int want = iocp__ms_group(u, op, level);

    if (!more) {
        op->state &= ~(IOCP__ST_REGROUP | IOCP__ST_BG_MASK);
        op->state |= iocp__group_bits(want);
    } else if (want != iocp__op_group(op) &&
               !(op->state & (IOCP__ST_REGROUP | IOCP__ST_CANCEL))) {
        op->state |= IOCP__ST_REGROUP;
        u->n_regroups++;
        iocp__send_cancel(u, op);
    }
}

static void iocp__complete_recv_ms(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                                   int res, unsigned cflags)
{
    int more = (cflags & IOCP__CQE_F_MORE) != 0;

    if (cflags & IOCP__CQE_F_BUFFER) {
        unsigned bid = cflags >> IOCP__CQE_BUFFER_SHIFT;
        int g = iocp__op_group(op);
        if (bid < u->bg[g].nbufs) {
            if (res > 0) {
                struct iocp__ufd *st = iocp__ufd(u, op->sock);
                iocp__handout(p, u, op, g, bid, res, IOCP_CF_MORE);
                if (st && st->msrecv == op)
                    iocp__ms_regroup(u, op, iocp__ms_follow(u, st, op, g, res), more);
            } else {
                iocp__bg_put(u, g, bid);
            }
        }
    } else if (res > 0 && op->backend_data) {
        char *data = op->backend_data;
        op->backend_data = NULL;
        iocp__finish(p, u, op, res, 0, IOCP_CF_MORE | IOCP_CF_BUFFER, data, 0);
    }
    if (more)
        return;                     /* still armed in the kernel */
    if (op->state & IOCP__ST_REGROUP) {
        /* The request our cancel was for has ended (by it or not). */
        struct iocp__ufd *st = iocp__ufd(u, op->sock);
        if (st)
            iocp__ms_regroup(u, op, st->ms_level, 0);
        else
            op->state &= ~IOCP__ST_REGROUP;
    }
    if (res > 0)
        iocp__again(p, u, op);      /* emulation, or the kernel stopped */
    else if (res == 0)
        iocp__finish(p, u, op, 0, 0, 0, NULL, 0);
    else if (res == -ENOBUFS && (op->state & IOCP__ST_RINGBUF))
        iocp__recv_starved(p, u, op);
    else if (res == -EAGAIN)
        iocp__again_poll(p, u, op, POLLIN);
    else if (iocp__is_cancel_res(res))
        iocp__again(p, u, op);
    else
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
}

static void iocp__complete_recv_into(iocp_port *p, struct iocp__uring *u, iocp_op *op, int res)
{
    if (res == -EAGAIN)
        iocp__again_poll(p, u, op, POLLIN);
    else if (iocp__is_cancel_res(res))
        iocp__again(p, u, op);
    else
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
}

static void iocp__complete_send(iocp_port *p, struct iocp__uring *u, iocp_op *op, int res)
{
    if (res >= 0) {
        op->done += (size_t)res;
        if (op->iovcnt > 0 && res > 0) {
            int nseg;
            (void)iocp__iov_advance(op, (size_t)res, &nseg);
        }
        if (op->done >= op->len)
            iocp__finish(p, u, op, (int64_t)op->done, 0, 0, NULL, 0);
        else
            iocp__again(p, u, op);      /* short send: the remainder */
    } else if (res == -EAGAIN) {
        iocp__again_poll(p, u, op, POLLOUT);
    } else if (iocp__is_cancel_res(res)) {
        iocp__again(p, u, op);
    } else {
        iocp__finish_stopped(p, u, op, res, 0);
    }
}

/*
 * The first CQE of a linked chain of sends (see iocp__try_chain) ends it:
 * the members before `op` were sent whole, `op` has its own result, and
 * those after it never ran.  They go back to being queued behind `op`,
 * in order -- re-issued after it if its result was short or a cancel
 * (which may be another member's own), completed cancelled if it failed
 * outright (the socket is broken; they would fail the same way).
 */
static void iocp__complete_chain(iocp_port *p, struct iocp__uring *u, iocp_op *op, int res)
{
    struct iocp__ufd *st = iocp__ufd(u, op->sock);
    iocp_op *m, *next;
    unsigned k = 0, i;
    int hard = res < 0 && res != -EAGAIN && !iocp__is_cancel_res(res);

    for (m = st ? st->wq.head : NULL; m && m != op && k < st->chain_n; m = m->fifo_next)
        k++;
    if (!m || m != op || k >= st->chain_n)
        return;                     /* not a member of the chain out */
    for (i = k + 1, m = op->fifo_next; i < st->chain_n && m; i++, m = m->fifo_next) {
        m->state &= ~(IOCP__ST_CHAIN | IOCP__ST_ARMED);
        m->state |= IOCP__ST_QUEUED | (hard ? IOCP__ST_CANCEL : 0);
    }
    st->chain_n = 0;
    for (m = st->wq.head; m != op; m = next) {
        next = m->fifo_next;
        m->state &= ~(IOCP__ST_CHAIN | IOCP__ST_ARMED);
        m->done = m->len;
        iocp__finish(p, u, m, (int64_t)m->len, 0, 0, NULL, 0);
    }
    op->state &= ~IOCP__ST_CHAIN;
    iocp__complete_send(p, u, op, res);
}

/* After a connect in progress became writable: how did it end?  Still
 * going (an early edge): wait for writability again. */
static void iocp__connect_check(iocp_port *p, struct iocp__uring *u, iocp_op *op)
{
    int r = iocp__sock_connect_status(op->sock);

    if (r > 0)
        iocp__again_poll(p, u, op, POLLOUT);
    else
        iocp__finish(p, u, op, r, 0, 0, NULL, 0);
}

static void iocp__complete_connect(iocp_port *p, struct iocp__uring *u, iocp_op *op, int res)
{
    if (res == -EINPROGRESS || res == -EALREADY || res == -EAGAIN) {
        /* Old kernels report a non-blocking socket's handshake like
         * connect(2) does: wait for writability, then read SO_ERROR. */
        op->state |= IOCP__ST_CONNWAIT;
        iocp__again_poll(p, u, op, POLLOUT);
    } else if (iocp__is_cancel_res(res)) {
        /* Never re-issued: a second connect() is not the same request. */
        iocp__finish_cancelled(p, u, op);
    } else {
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
    }
}

static void iocp__complete_poll(iocp_port *p, struct iocp__uring *u, iocp_op *op, int res)
{
    if (iocp__cancelling(u, op)) {
        iocp__finish_cancelled(p, u, op);
    } else if (res < 0 && !iocp__is_cancel_res(res)) {
        iocp__finish_stopped(p, u, op, res, 0);
    } else if (op->state & IOCP__ST_CONNWAIT) {
        if (res < 0)
            iocp__arm_poll(u, op, POLLOUT);
        else
            iocp__connect_check(p, u, op);
    } else {
        if (iocp__is_msrecv(op) && !(op->state & IOCP__ST_RINGBUF) && !op->backend_data) {
            /* Multishot with no buffer ring: data is there, take a buffer. */
            op->backend_data = iocp__buffer_get(p, iocp__pool_recv_len(op));
            if (!op->backend_data) {
                iocp__finish(p, u, op, IOCP_ENOMEM, 0, 0, NULL, 0);
                return;
            }
        }
        iocp__arm(u, op);
    }
}

/*
 * The poll op (IOCP_OP_POLL, not the readiness wait of another op).  A
 * multishot poll the kernel ended (or that it cannot keep armed: before
 * 5.13 every poll is one-shot) is re-armed here and its event still
 * delivered with MORE, so the caller sees one armed op either way.
 */
static void iocp__complete_pollop(iocp_port *p, struct iocp__uring *u, iocp_op *op,
                                  int res, unsigned cflags)
{
    if (res >= 0) {
        int64_t ev = res & (IOCP_POLL_IN | IOCP_POLL_OUT | IOCP_POLL_ERR | IOCP_POLL_HUP);
        if (res & POLLNVAL)
            ev |= IOCP_POLL_ERR;
        if (!(op->flags & IOCP_OPF_MULTISHOT)) {
            iocp__finish(p, u, op, ev, 0, 0, NULL, 0);
            return;
        }
        iocp__finish(p, u, op, ev, 0, IOCP_CF_MORE, NULL, 0);
        if (!(cflags & IOCP__CQE_F_MORE))
            iocp__again(p, u, op);      /* completes it if being cancelled */
        return;
    }
    if (cflags & IOCP__CQE_F_MORE)
        return;
    if (iocp__is_cancel_res(res) && !iocp__cancelling(u, op))
        iocp__again(p, u, op);          /* the kernel's own (thread exit) */
    else if (iocp__is_cancel_res(res))
        iocp__finish_cancelled(p, u, op);
    else
        iocp__finish(p, u, op, res, 0, 0, NULL, 0);
}

/* ---- provided buffers ------------------------------------------------- */

/* A buffer the caller got from a CQE comes back (lock held): into its
 * ring.  Recvs waiting for buffers of that group go again once half the
 * group is back (a wave, not one re-arm per buffer), or when nothing is
 * out any more (no later release would wake them). */
static void iocp__uring_release_buffer(iocp_port *p, char *data, uint32_t buf_id)
{
    struct iocp__uring *u = p->be;
    int g = (int)(buf_id >> 16) - 1;
    unsigned bid = buf_id & 0xffffu;
    struct iocp__bgroup *b;

    (void)data;
    if (g < 0 || g >= IOCP__BG_COUNT)
        return;
    b = &u->bg[g];
    if (b->state <= 0 || bid >= b->nbufs)
        return;
    iocp__bg_put(u, g, bid);
    if (b->out > 0)
        b->out--;
    if (b->waiters && b->out <= b->nbufs / 2) {
        iocp__unpark(p, u, g);
        iocp__submit_policy(p, u);
    }
}

static void iocp__complete(iocp_port *p, struct iocp__uring *u, const iocp__uring_cqe *c)
{
    uint64_t ud = c->user_data;
    unsigned tag = (unsigned)(ud & IOCP__UD_MASK);
    iocp_op *op;

    if (tag == IOCP__UD_INTERNAL) {
        unsigned kind = (unsigned)((ud >> 3) & 31);
        if (kind == IOCP__IN_WAKE) {
            u->wake_pending = 0;
            u->woken = 1;
        } else if (kind == IOCP__IN_EVENTFD) {
            u->woken = 1;
            iocp__efd_reaped(u, c->flags);
        }
        else if (kind == IOCP__IN_TIMEOUT && (unsigned)(ud >> 8) == u->timeout_seq)
            u->timeout_armed = 0;
        /* Cancel and timeout-remove results say nothing the op's own
         * completion will not. */
        return;
    }
    op = (iocp_op *)(uintptr_t)(ud & ~(uint64_t)IOCP__UD_MASK);
    if (tag == IOCP__UD_POLL) {
        op->state &= ~IOCP__ST_POLL;
        iocp__complete_poll(p, u, op, c->res);
        return;
    }
    if (tag == IOCP__UD_CHAIN) {
        if (op->state & IOCP__ST_CHAIN) {
            op->state &= ~IOCP__ST_ARMED;
            iocp__complete_chain(p, u, op, c->res);
        }
        return;
    }
    if (!(c->flags & IOCP__CQE_F_MORE))
        op->state &= ~IOCP__ST_ARMED;
    switch (op->kind) {
    case IOCP_OP_ACCEPT:
        iocp__complete_accept(p, u, op, c->res, c->flags);
        break;
    case IOCP_OP_CONNECT:
        iocp__complete_connect(p, u, op, c->res);
        break;
    case IOCP_OP_RECV:
        if (op->flags & IOCP_OPF_MULTISHOT)
            iocp__complete_recv_ms(p, u, op, c->res, c->flags);
        else
            iocp__complete_recv(p, u, op, c->res, c->flags);
        break;
    case IOCP_OP_RECV_INTO:
        iocp__complete_recv_into(p, u, op, c->res);
        break;
    case IOCP_OP_SEND:
        iocp__complete_send(p, u, op, c->res);
        break;
    case IOCP_OP_POLL:
        iocp__complete_pollop(p, u, op, c->res, c->flags);
        break;
    default:
        iocp__finish(p, u, op, (int64_t)op->len, 0, 0, NULL, 0);
        break;
    }
}

/* Issues what waited for SQ room.  Lock held. */
static void iocp__drain_backlogs(struct iocp__uring *u)
{
    iocp__uring_sqe *sqe;

    while (u->cbacklog && (sqe = iocp__sqe_get_op(u)) != NULL) {
        iocp_op *op = u->cbacklog;
        u->cbacklog = op->fd_next;
        op->fd_next = NULL;
        op->state &= ~IOCP__ST_CBACKLOG;
        iocp__prep_op_cancel(sqe, op);
        iocp__sqe_commit(u);
    }
    while (u->backlog) {
        iocp_op *op = u->backlog;
        if (iocp__arm_now(u, op) < 0)
            break;                  /* still full */
        u->backlog = op->fd_next;
        op->fd_next = NULL;
        op->state &= ~IOCP__ST_BACKLOG;
    }
}

/*
 * Reaps up to `max` deliveries from the CQ.  Lock held.  When the ring is
 * empty but the kernel holds overflowed CQEs, flushes them in and goes on.
 */
static int iocp__reap(iocp_port *p, struct iocp__uring *u, int max)
{
    iocp__uring_cqe c;
    int flushed = 0, g;

    u->ndelivered = 0;
    u->reap_seq++;
    u->reaping = 1;
    u->budget = max;
    for (g = 0; g < IOCP__BG_COUNT; g++) {
        u->bg[g].held = u->bg[g].out;
        u->bg[g].promised = 0;
    }
    iocp__owed_drain(p, u);
    for (;;) {
        /* A CQE may mean several completions: whatever does not fit is
         * owed (iocp__finish), and nothing more is reaped while it is. */
        while (u->ndelivered < max && !u->nowed && iocp__cqe_next(u, &c))
            iocp__complete(p, u, &c);
        if (u->ndelivered >= max || u->nowed || flushed)
            break;
        if (!iocp__cq_flush_overflow(u))
            break;
        flushed = 1;
    }
    u->reaping = 0;
    for (g = 0; g < IOCP__BG_COUNT; g++) {
        /* The next wave of recvs that wait for buffers: the releases
         * may all have come before their -ENOBUFS was reaped, and a wave
         * is bounded by what callers do not hold. */
        if (u->bg[g].waiters)
            iocp__unpark(p, u, g);
    }
    if (u->backlog || u->cbacklog)
        iocp__drain_backlogs(u);
    return u->ndelivered;
}

/* ---- backend interface ------------------------------------------------ */

static void iocp__uring_dispatch_done(iocp_port *p);
static void iocp__uring_forget(iocp_port *p);

static int iocp__uring_init(iocp_port *p, const iocp_port_options *opts)
{
    struct iocp__uring *u;
    unsigned caps, entries, flags;
    int r;

    r = iocp__uring_caps(&caps);
    if (r < 0)
        return r;
    u = calloc(1, sizeof(*u));
    if (!u)
        return IOCP_ENOMEM;
    u->fd = u->enter_fd = u->efd = -1;
    u->enabled = 1;
    u->caps = caps;
    u->pool_max = opts && opts->recv_pool_max ? opts->recv_pool_max : IOCP__POOL_MAX_DEFAULT;
    if (!(opts && opts->recv_pool_max) && getenv("IOCP_URING_POOL_MAX"))
        u->pool_max = (size_t)strtoull(getenv("IOCP_URING_POOL_MAX"), NULL, 10);
    if (u->pool_max == 0)
        u->pool_max = IOCP__POOL_MAX_DEFAULT;
    u->print_stats = getenv("IOCP_URING_STATS") != NULL;
    if (getenv("IOCP_URING_TEST_STARVE"))
        u->starve = (unsigned)atoi(getenv("IOCP_URING_TEST_STARVE"));
    if (u->starve == 1)
        u->starve = 2;              /* 1 would starve forever */
    entries = opts && opts->ring_entries ? opts->ring_entries : IOCP__DEFAULT_ENTRIES;
    if (entries > 32768)
        entries = 32768;
    /* SUBMIT_ALL: one bad SQE must not hold back the ones behind it. */
    flags = (caps & IOCP__CAP_SUBMIT_ALL) ? IOCP__SETUP_SUBMIT_ALL : 0;
    if (opts && opts->single_issuer) {
        /* Enabled, registered and armed by the owner's first call. */
        u->enabled = 0;
        r = iocp__ring_open_single(u, entries, flags);
    } else {
        r = iocp__ring_open_shared(u, entries, flags, opts && opts->cooperative);
    }
    if (r < 0) {
        free(u);
        return r;
    }
    p->be = u;
    /* Single-issuer: wake() only writes the eventfd, so the port may drop
     * its mutex. */
    p->wake_lockfree = u->efd >= 0;
    p->dispatch_done = iocp__uring_dispatch_done;
    p->forget = iocp__uring_forget;
    return 0;
}

/* Unmaps and closes this process's view of the ring and frees the state.
 * The kernel objects live on in any other process that holds the ring. */
static void iocp__uring_release(iocp_port *p)
{
    struct iocp__uring *u = p->be;

    iocp__ring_close(u);
    if (u->efd >= 0)
        close(u->efd);              /* after the ring: its poll holds it */
    iocp__bg_free(u);
    free(u->owed);
    free(u->fds);
    free(u);
    p->be = NULL;
}

static void iocp__uring_destroy(iocp_port *p)
{
    struct iocp__uring *u = p->be;

    if (u->print_stats) {
        /* Tests and measurements read this (IOCP_URING_STATS=1). */
        fprintf(stderr, "iocp-uring-stats enobufs=%llu grows=%llu parks=%llu "
                "pool_bytes=%zu small_bufs=%u large_bufs=%u chains=%llu chained=%llu "
                "regroups=%llu tiny_bufs=%u setup_flags=%u idle_waits=%llu\n",
                (unsigned long long)u->n_enobufs, (unsigned long long)u->n_grows,
                (unsigned long long)u->n_parks, u->pool_bytes, u->bg[IOCP__BG_SMALL].nbufs,
                u->bg[IOCP__BG_LARGE].nbufs, (unsigned long long)u->n_chains,
                (unsigned long long)u->n_chained, (unsigned long long)u->n_regroups,
                u->bg[IOCP__BG_TINY].nbufs, u->setup_flags,
                (unsigned long long)u->n_idle_waits);
    }
    iocp__ring_unregister_fd(u);
    iocp__bg_unregister(u);
    iocp__uring_release(p);
}

/*
 * fork() child: the rings are MAP_SHARED with the parent, so a child must
 * neither unregister the buffer ring nor submit, cancel or reap.  Dropping
 * its mappings and its descriptor is invisible to the parent.
 */
static void iocp__uring_forget(iocp_port *p)
{
    iocp__uring_release(p);
}

/*
 * Submission batching rule (lock held).  SQEs wait only for a thread that
 * is sure to hand them over soon: the submitter itself while it dispatches
 * a batch (iocp__uring_dispatch_done submits when the batch ends, and its
 * next wait would anyway), or a non-blocking poll in progress (it submits
 * before it returns).  Any other thread's SQEs go to the kernel at once:
 * a poller asleep in io_uring_enter would not see them, a thread busy in
 * a long callback may not poll for a long time, and an IOCP op runs from
 * the moment it is posted.
 */
static void iocp__submit_policy(iocp_port *p, struct iocp__uring *u)
{
    if (p->poll_blocking && (u->backlog || u->cbacklog) && !u->wake_pending) {
        /* Only a poll() drains the backlogs: end the sleeping one's wait. */
        iocp__uring_sqe *sqe = iocp__sqe_get(u);
        if (sqe) {
            iocp__prep_wake(sqe);
            iocp__sqe_commit(u);
            u->wake_pending = 1;
        }
    }
    if (p->poll_blocking || !(p->polling || iocp__is_dispatching(p)))
        (void)iocp__flush(u);
}

/* A thread ended dispatching a batch (lock held): what its callbacks
 * submitted starts now, whether or not it ever waits on the port again. */
static void iocp__uring_dispatch_done(iocp_port *p)
{
    struct iocp__uring *u = p->be;

    if (iocp__ring_own(u) == 0 && iocp__sq_pending(u))
        (void)iocp__flush(u);
}

/* Asks for every op on `fd` issued before generation `gen` to stop.
 * Lock held.  `by_fd`: the kernel can match them by descriptor. */
static void iocp__cancel_fd_ops(iocp_port *p, struct iocp__uring *u, int fd, unsigned gen,
                                int by_fd)
{
    iocp_op *op, *next;
    iocp__uring_sqe *sqe;
    struct iocp__ufd *st = iocp__ufd(u, fd);
    struct iocp__fifo *fifos[2];
    int i;

    /* Ops queued behind a FIFO head never reached the kernel: done here,
     * before the heads, so no head that finishes below starts one. */
    fifos[0] = st ? &st->rq : NULL;
    fifos[1] = st ? &st->wq : NULL;
    for (i = 0; i < 2 && st; i++) {
        for (op = fifos[i]->head; op; op = next) {
            next = op->fifo_next;
            if ((op->state & IOCP__ST_QUEUED) && (unsigned)op->aux_sock == gen)
                iocp__finish_cancelled(p, u, op);
        }
    }
    /* Ops still on the backlog never reached the kernel either, nor did
     * multishot recvs waiting for buffers. */
    for (op = u->backlog; op; op = next) {
        next = op->fd_next;
        if (op->sock == fd && (unsigned)op->aux_sock == gen && op->kind != IOCP_OP_POST) {
            iocp__list_remove(&u->backlog, op);
            iocp__finish_cancelled(p, u, op);
        }
    }
    for (i = 0; i < IOCP__BG_COUNT; i++) {
        for (op = u->bg[i].waiters; op; op = next) {
            next = op->fd_next;
            if (op->sock == fd && (unsigned)op->aux_sock == gen) {
                iocp__waiter_remove(&u->bg[i], op);
                iocp__finish_cancelled(p, u, op);
            }
        }
    }
    if (by_fd && (sqe = iocp__sqe_get_op(u)) != NULL) {
        iocp__prep_cancel_fd(sqe, fd, IOCP__UD_IN(IOCP__IN_CANCEL, 0));
        iocp__sqe_commit(u);
        return;
    }
    for (op = p->inflight_head.next; op != &p->inflight_head; op = op->next) {
        if (op->sock == fd && op->kind != IOCP_OP_POST && (unsigned)op->aux_sock == gen &&
            !(op->state & (IOCP__ST_CANCEL | IOCP__ST_BACKLOG | IOCP__ST_OWED))) {
            op->state |= IOCP__ST_CANCEL;
            iocp__send_cancel(u, op);
        }
    }
}

static int iocp__uring_register(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__uring *u = p->be;
    struct iocp__ufd *st;
    struct stat sb;
    int r;

    if ((r = iocp__ring_own(u)) < 0)
        return r;
    if (fstat(sock, &sb) < 0)
        return -errno;
    if ((r = iocp__ufd_reserve(u, sock, &st)) < 0)
        return r;
    if (st->registered && st->dev == sb.st_dev && st->ino == sb.st_ino)
        return IOCP_EEXIST;
    /* io_uring does not need O_NONBLOCK, but the epoll emulation sets it
     * and callers may rely on that; old kernels also treat a blocking
     * socket's accept as a worker-thread job. */
    if ((r = iocp__sock_prepare(sock)) < 0)
        return r;
    if (st->nops > 0) {
        /* The descriptor was closed without unregister and reused: the old
         * socket's ops still run (they hold its file) -- stop them.  The
         * kernel cannot find them by this descriptor any more. */
        iocp__cancel_fd_ops(p, u, sock, st->gen, 0);
        iocp__submit_policy(p, u);
    }
    st->msrecv = NULL;              /* the old socket's, if any */
    st->ms_level = 0;
    st->ms_small = 0;
    st->gen++;
    st->registered = 1;
    st->dev = sb.st_dev;
    st->ino = sb.st_ino;
    return 0;
}

static int iocp__uring_unregister(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__uring *u = p->be;
    struct iocp__ufd *st = iocp__ufd(u, sock);
    unsigned gen;
    int r;

    if ((r = iocp__ring_own(u)) < 0)
        return r;
    if (!st || !st->registered)
        return IOCP_ENOENT;
    gen = st->gen;
    st->registered = 0;
    st->gen++;
    st->msrecv = NULL;              /* it completes cancelled, as the rest */
    if (st->nops > 0) {
        iocp__cancel_fd_ops(p, u, sock, gen, (u->caps & IOCP__CAP_CANCEL_FD) != 0);
        /* Submit now: the caller closes the descriptor next, and both the
         * by-descriptor cancel and any op SQE still queued look it up when
         * the kernel takes them. */
        (void)iocp__flush(u);
    }
    return 0;
}

static int iocp__uring_submit(iocp_port *p, iocp_op *op)
{
    struct iocp__uring *u = p->be;
    struct iocp__ufd *st = NULL;
    int r;

    if ((r = iocp__ring_own(u)) < 0)
        return r;
    op->state = 0;
    op->backend_data = NULL;
    op->fd_next = NULL;
    if (op->kind < IOCP_OP_ACCEPT || op->kind > IOCP_OP_POLL)
        return IOCP_EINVAL;
    if (op->kind == IOCP_OP_POLL) {
        if (op->len & ~(size_t)(IOCP_POLL_IN | IOCP_POLL_OUT | IOCP_POLL_ERR | IOCP_POLL_HUP))
            return IOCP_EINVAL;
        if ((op->flags & IOCP_OPF_MULTISHOT) && (u->caps & IOCP__CAP_POLL_MULTI))
            op->state |= IOCP__ST_MULTI;
    }
    if (op->kind != IOCP_OP_POST) {
        st = iocp__ufd(u, op->sock);
        if (!st || !st->registered)
            return IOCP_EBADF;
        op->aux_sock = (iocp_socket_t)st->gen;
    }
    if (op->kind == IOCP_OP_SEND && op->iovcnt > 0) {
        if (!op->iov || op->iovcnt > IOCP_IOV_MAX)
            return IOCP_EINVAL;
    } else
    if ((op->kind == IOCP_OP_RECV_INTO || op->kind == IOCP_OP_SEND) && op->len && !op->buf)
        return IOCP_EINVAL;
    if (op->kind == IOCP_OP_ACCEPT && (op->flags & IOCP_OPF_MULTISHOT) &&
        (u->caps & IOCP__CAP_MS_ACCEPT))
        op->state |= IOCP__ST_MULTI;
    /* While a multishot recv is armed it owns the socket's read side. */
    if (st && st->msrecv && (op->kind == IOCP_OP_RECV || op->kind == IOCP_OP_RECV_INTO))
        return IOCP_EBUSY;
    if (iocp__is_msrecv(op)) {
        /* The group of the socket's rung (iocp__ms_follow: 512 B for a
         * socket that has not shown larger arrivals) whatever the cap
         * (`len` bounds a completion, it asks for nothing).  Kernel
         * multishot delivers up to a buffer per CQE, within any cap of
         * a buffer or more (or none); a smaller cap re-arms a
         * single-shot recv of that size from the ring. */
        int g = iocp__bg_pick(u, 0);
        if (g >= 0) {
            op->state |= IOCP__ST_RINGBUF;
            if (st->ms_level == 0 && iocp__bg_tiny(u) == IOCP__BG_TINY)
                g = IOCP__BG_TINY;
            if ((u->caps & IOCP__CAP_MS_RECV) &&
                (op->len == 0 || op->len >= iocp__bg_size(&u->bg[g])))
                op->state |= IOCP__ST_MULTI;
            /* Within the same cap rule, a socket that has been delivering
             * large arrivals stays on the 64 KiB group. */
            op->state |= iocp__group_bits(iocp__ms_group(u, op, st->ms_level));
        }
        /* Else a poll, then a pool buffer, per arrival (arm_now). */
        st->msrecv = op;
    } else if (op->kind == IOCP_OP_RECV) {
        int g = op->len > 0 ? iocp__bg_pick(u, op->len) : -1;
        if (g >= 0) {
            op->state |= IOCP__ST_RINGBUF | (g == IOCP__BG_LARGE ? IOCP__ST_BG_LARGE : 0);
        } else {
            op->backend_data = iocp__buffer_get(p, op->len ? op->len : 1);
            if (!op->backend_data)
                return IOCP_ENOMEM;
        }
    }
    if (st) {
        struct iocp__fifo *f = iocp__fifo_for(st, op->kind);
        st->nops++;
        if (f) {
            op->state |= IOCP__ST_FIFO;
            if (!iocp__fifo_push(f, op)) {
                /* Behind the head: costs no SQE until its turn. */
                op->state |= IOCP__ST_QUEUED;
                return 0;
            }
        }
    }
    iocp__arm(u, op);
    iocp__submit_policy(p, u);
    return 0;
}

static int iocp__uring_cancel(iocp_port *p, iocp_op *op)
{
    struct iocp__uring *u = p->be;
    int r;

    if ((r = iocp__ring_own(u)) < 0)
        return r;
    if (op->state & IOCP__ST_QUEUED) {
        /* Queued behind its FIFO head: nothing of it is in the kernel. */
        iocp__finish_cancelled(p, u, op);
        return 0;
    }
    if (op->state & IOCP__ST_BACKLOG) {
        /* Never reached the kernel: done here. */
        iocp__list_remove(&u->backlog, op);
        iocp__finish_cancelled(p, u, op);
        return 0;
    }
    if (op->state & IOCP__ST_OWED)
        return 0;                   /* its final completion is on its way */
    if (op->state & IOCP__ST_PARKED) {
        /* A multishot recv waiting for buffers: nothing in the kernel. */
        iocp__waiter_remove(&u->bg[iocp__op_group(op)], op);
        iocp__finish_cancelled(p, u, op);
        return 0;
    }
    if (op->state & IOCP__ST_CANCEL)
        return 0;
    op->state |= IOCP__ST_CANCEL;
    iocp__send_cancel(u, op);
    iocp__submit_policy(p, u);
    return 0;
}

/*
 * poll() found completions and made SQEs while reaping them (re-arms,
 * remainders).  Those may wait for the next kernel entry when this thread
 * is sure to make one soon: it takes the batch it delivered (the core's
 * wait takes a batch when a dispatch slot is free), and its dispatch_done
 * or its next wait submits them -- the event loop's next turn then costs
 * one io_uring_enter, not two.  SQEs that were pending when poll() began
 * (held back by a dispatching thread) go now, as does everything when
 * nothing was delivered.  Lock held.
 */
static void iocp__flush_after_reap(iocp_port *p, struct iocp__uring *u, int n, int held)
{
    if (!iocp__sq_pending(u))
        return;
    if (n > 0 && !held && (p->single_issuer || p->active < p->concurrency || p->closing))
        return;
    (void)iocp__flush(u);
}

static int iocp__uring_poll(iocp_port *p, int max, int timeout_ms)
{
    struct iocp__uring *u = p->be;
    struct iocp__uring_getevents_arg arg;
    struct iocp__uring_ts ts;
    unsigned flags = IOCP__ENTER_GETEVENTS, pending;
    void *argp = NULL;
    size_t argsz = 0;
    int n, r, held;

    if ((r = iocp__ring_own(u)) < 0)
        return r;
    iocp__lock(p);
    if (u->backlog || u->cbacklog)
        iocp__drain_backlogs(u);
    if (u->efd >= 0 && !u->efd_armed)
        iocp__efd_arm(u);           /* the SQ was full when it ended */
    u->woken = 0;
    held = iocp__sq_pending(u) > 0;
    n = iocp__reap(p, u, max);
    /* A wake-up already in the CQ is this call's reason to return: going
     * to sleep after eating it would lose it. */
    if (n > 0 || timeout_ms == 0 || u->woken) {
        if (n == 0 && !u->woken && iocp__ring_quiet(u)) {
            /* The kernel says an enter would find nothing: save it. */
        } else if (n == 0) {
            /* Non-blocking: submit, run pending task work, look again. */
            r = iocp__enter(u, iocp__sq_pending(u), 0, IOCP__ENTER_GETEVENTS, NULL, 0);
            held = 0;
            n = iocp__reap(p, u, max);
            if (n == 0 && r == -EINTR) {
                iocp__unlock(p);
                return IOCP_EINTR;
            }
        }
        iocp__flush_after_reap(p, u, n, held);
        iocp__unlock(p);
        return n;
    }
    if (timeout_ms > 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000LL;
        if (u->caps & IOCP__CAP_EXT_ARG) {
            memset(&arg, 0, sizeof(arg));
            arg.ts = (uint64_t)(uintptr_t)&ts;
            argp = &arg;
            argsz = sizeof(arg);
            flags |= IOCP__ENTER_EXT_ARG;
        } else {
            /* Before 5.11 a wait cannot carry a timeout: a TIMEOUT request
             * completes instead.  The kernel copies `ts` while it takes the
             * SQE, in the io_uring_enter below. */
            iocp__uring_sqe *sqe = iocp__sqe_get(u);
            if (sqe) {
                u->timeout_seq = (u->timeout_seq + 1) & 0xffffff;
                u->ts = ts;
                iocp__prep_timeout(sqe, &u->ts, IOCP__UD_IN(IOCP__IN_TIMEOUT, u->timeout_seq));
                iocp__sqe_commit(u);
                u->timeout_armed = 1;
            }
        }
    }
    pending = iocp__sq_pending(u);
    u->poller_pending = pending;
    iocp__unlock(p);

    r = iocp__enter(u, pending, 1, flags, argp, argsz);

    iocp__lock(p);
    u->poller_pending = 0;
    n = iocp__reap(p, u, max);
    if (u->timeout_armed) {
        /* Woken before the timer: remove it so timers do not pile up. */
        iocp__uring_sqe *sqe = iocp__sqe_get(u);
        if (sqe) {
            iocp__prep_timeout_remove(sqe, IOCP__UD_IN(IOCP__IN_TIMEOUT, u->timeout_seq),
                                      IOCP__UD_IN(IOCP__IN_TIMEOUT_REMOVE, 0));
            iocp__sqe_commit(u);
            /* Now, so its two CQEs are in the ring before the next poll()
             * reaps: otherwise they would end that poll's wait at once. */
            (void)iocp__flush(u);
        }
        u->timeout_armed = 0;
    }
    /* Re-issues made while reaping (short sends, re-armed accepts, recvs
     * moved to the pool) start with this thread's next kernel entry. */
    iocp__flush_after_reap(p, u, n, 0);
    iocp__unlock(p);
    if (n > 0)
        return n;
    if (r == -EINTR)
        return IOCP_EINTR;
    if (r >= 0 || r == -ETIME || r == -EBUSY || r == -EAGAIN)
        return 0;
    return r;
}

static int iocp__uring_wake(iocp_port *p)
{
    struct iocp__uring *u = p->be;
    iocp__uring_sqe *sqe;
    int r = 0;

    /* Single-issuer: this thread may not enter the ring (nor lock). */
    if (u->efd >= 0)
        return iocp__efd_wake(u);
    iocp__lock(p);
    if (!u->wake_pending) {
        /* A NOP's completion is all it takes to end a wait in the kernel;
         * one outstanding is enough for any number of wake-ups. */
        sqe = iocp__sqe_get(u);
        if (!sqe) {
            r = -EBUSY;
        } else {
            iocp__prep_wake(sqe);
            iocp__sqe_commit(u);
            r = iocp__flush(u);
            if (r >= 0) {
                u->wake_pending = 1;
                r = 0;
            }
        }
    }
    iocp__unlock(p);
    return r;
}

const iocp_backend iocp__backend_uring = {
    .name = "io_uring",
    .probe = iocp__uring_probe,
    .init = iocp__uring_init,
    .destroy = iocp__uring_destroy,
    .register_socket = iocp__uring_register,
    .unregister_socket = iocp__uring_unregister,
    .submit = iocp__uring_submit,
    .cancel = iocp__uring_cancel,
    .poll = iocp__uring_poll,
    .wake = iocp__uring_wake,
    .release_buffer = iocp__uring_release_buffer,
};
