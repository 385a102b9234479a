/*
 * uring_ring.c -- the io_uring ring itself, with no op semantics.
 *
 * What it does: io_uring_setup with a CQ four times the SQ (so bursts of
 * completions stay in the ring, not on the kernel's overflow list), maps
 * the SQ, CQ and SQE array (one mapping for both rings where the kernel
 * has SINGLE_MMAP), and publishes SQEs: SQE slot i is always SQ array
 * entry i, so the indirection array is filled once and never touched
 * again.  Submission is a plain io_uring_enter(to_submit) loop; a full SQ
 * is submitted to make room.  The CQ side is two primitives: take the next
 * CQE (iocp__cqe_next, inline in uring_internal.h) and flush the kernel's
 * overflow list back into the ring when the SQ flags say it holds some.
 *
 * A single-issuer port's ring (see "single-issuer mode" below) is set up
 * with the best of the kernel's single-task flags, starts disabled, and
 * is enabled, its fd registered and its wake eventfd's poll armed by the
 * owner's first call; every enter goes through iocp__enter, which names
 * the registered index once there is one.
 *
 * Every SQE the backend makes is filled by one prep helper below, so the
 * layout of each request kind is written down once (the probes use the
 * same helpers).  None of this takes a lock: callers hold the port lock,
 * or own a private ring (the probes).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uring_internal.h"

/* ---- syscalls --------------------------------------------------------- */

int iocp__sys_setup(unsigned entries, struct iocp__uring_params *p)
{
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

int iocp__sys_enter(int fd, unsigned to_submit, unsigned min_complete,
                    unsigned flags, void *arg, size_t argsz)
{
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
    return r < 0 ? -errno : (int)r;
}

int iocp__sys_register(int fd, unsigned opcode, void *arg, unsigned nr)
{
    long r = syscall(__NR_io_uring_register, fd, opcode, arg, nr);
    return r < 0 ? -errno : (int)r;
}

/* ---- setup and teardown ------------------------------------------------ */

static void iocp__ring_unmap(struct iocp__uring *u)
{
    if (u->sqes)
        munmap(u->sqes, u->sqes_len);
    if (u->cq_map && u->cq_map != u->sq_map)
        munmap(u->cq_map, u->cq_map_len);
    if (u->sq_map)
        munmap(u->sq_map, u->sq_map_len);
    u->sqes = NULL;
    u->cq_map = u->sq_map = NULL;
}

int iocp__ring_open(struct iocp__uring *u, unsigned entries, unsigned setup_flags)
{
    struct iocp__uring_params prm;
    unsigned i, *array;
    void *m;
    int fd, r;

    memset(&prm, 0, sizeof(prm));
    prm.flags = IOCP__SETUP_CQSIZE | IOCP__SETUP_CLAMP | setup_flags;
    prm.cq_entries = entries * 4;
    fd = iocp__sys_setup(entries, &prm);
    if (fd < 0)
        return fd;
    u->fd = fd;
    u->enter_fd = fd;
    u->enter_flags = 0;
    u->features = prm.features;
    u->sq_map_len = prm.sq_off.array + prm.sq_entries * sizeof(unsigned);
    u->cq_map_len = prm.cq_off.cqes + prm.cq_entries * sizeof(iocp__uring_cqe);
    if ((prm.features & IOCP__FEAT_SINGLE_MMAP) && u->cq_map_len > u->sq_map_len)
        u->sq_map_len = u->cq_map_len;
    m = mmap(NULL, u->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
             fd, IOCP__OFF_SQ_RING);
    if (m == MAP_FAILED)
        goto fail;
    u->sq_map = m;
    if (prm.features & IOCP__FEAT_SINGLE_MMAP) {
        u->cq_map = m;
    } else {
        m = mmap(NULL, u->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                 fd, IOCP__OFF_CQ_RING);
        if (m == MAP_FAILED)
            goto fail;
        u->cq_map = m;
    }
    u->sqes_len = prm.sq_entries * sizeof(iocp__uring_sqe);
    m = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
             fd, IOCP__OFF_SQES);
    if (m == MAP_FAILED)
        goto fail;
    u->sqes = m;

    u->sq_khead = (unsigned *)((char *)u->sq_map + prm.sq_off.head);
    u->sq_ktail = (unsigned *)((char *)u->sq_map + prm.sq_off.tail);
    u->sq_kflags = (unsigned *)((char *)u->sq_map + prm.sq_off.flags);
    u->sq_mask = *(unsigned *)((char *)u->sq_map + prm.sq_off.ring_mask);
    u->sq_entries = prm.sq_entries;
    u->sq_tail = *u->sq_ktail;
    /* SQE slot i is always array entry i: the indirection is unused. */
    array = (unsigned *)((char *)u->sq_map + prm.sq_off.array);
    for (i = 0; i < prm.sq_entries; i++)
        array[i] = i;

    u->cq_khead = (unsigned *)((char *)u->cq_map + prm.cq_off.head);
    u->cq_ktail = (unsigned *)((char *)u->cq_map + prm.cq_off.tail);
    u->cq_mask = *(unsigned *)((char *)u->cq_map + prm.cq_off.ring_mask);
    u->cqes = (iocp__uring_cqe *)((char *)u->cq_map + prm.cq_off.cqes);
    return 0;

fail:
    r = -errno;
    iocp__ring_unmap(u);
    close(fd);
    u->fd = -1;
    return r;
}

void iocp__ring_close(struct iocp__uring *u)
{
    iocp__ring_unmap(u);
    if (u->fd >= 0)
        close(u->fd);
    u->fd = u->enter_fd = -1;
    u->enter_flags = 0;
}

/* ---- single-issuer mode ------------------------------------------------ */

/*
 * The kernel ties a SINGLE_ISSUER ring to one task: the creator, or with
 * R_DISABLED the thread that enables it; any other thread's io_uring_enter
 * (and io_uring_register) gets -EEXIST.  A port's owner is the first
 * thread that uses it, which need not be its creator (an event loop is
 * often made on one thread and run on another), so the ring starts
 * disabled and the owner's first call enables it.  DEFER_TASKRUN (6.1)
 * runs completion task work only when the owner asks for events, never
 * interrupting it; COOP_TASKRUN (5.19) at least spares the IPI.  With
 * TASKRUN_FLAG the kernel flags pending task work in the SQ flags, so a
 * non-blocking poll can tell it has nothing to enter for.
 */
int iocp__ring_open_single(struct iocp__uring *u, unsigned entries, unsigned base_flags)
{
    static const struct { unsigned need, flags; } tries[] = {
        { IOCP__CAP_SINGLE_ISSUER | IOCP__CAP_DEFER_TASKRUN,
          IOCP__SETUP_SINGLE_ISSUER | IOCP__SETUP_R_DISABLED | IOCP__SETUP_DEFER_TASKRUN |
          IOCP__SETUP_TASKRUN_FLAG },
        { IOCP__CAP_SINGLE_ISSUER | IOCP__CAP_COOP_TASKRUN,
          IOCP__SETUP_SINGLE_ISSUER | IOCP__SETUP_R_DISABLED | IOCP__SETUP_COOP_TASKRUN |
          IOCP__SETUP_TASKRUN_FLAG },
        { IOCP__CAP_SINGLE_ISSUER, IOCP__SETUP_SINGLE_ISSUER | IOCP__SETUP_R_DISABLED },
        { IOCP__CAP_COOP_TASKRUN, IOCP__SETUP_COOP_TASKRUN | IOCP__SETUP_TASKRUN_FLAG },
        { 0, 0 },
    };
    unsigned i;
    int r = -EINVAL;

    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0)
        return -errno;
    for (i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        if ((u->caps & tries[i].need) != tries[i].need)
            continue;
        r = iocp__ring_open(u, entries, base_flags | tries[i].flags);
        if (r == 0) {
            u->setup_flags = tries[i].flags;
            return 0;
        }
        if (r != -EINVAL)
            break;
    }
    close(u->efd);
    u->efd = -1;
    return r;
}

/*
 * A ring that several threads submit to and wait on.  By default the
 * kernel interrupts a submitter running user code (an IPI) to run the
 * task work that finishes its op, because the thread waiting for the
 * completion may be another one.  A cooperative port promises that a
 * submitter either waits on the port itself or sleeps (which the task
 * work also wakes), so the IPI -- measured at 6 % of a one-loop-thread
 * server's CPU -- buys nothing; TASKRUN_FLAG lets a non-blocking look skip
 * the enter when no task work is pending.
 */
int iocp__ring_open_shared(struct iocp__uring *u, unsigned entries, unsigned base_flags,
                           int cooperative)
{
    static const unsigned coop = IOCP__SETUP_COOP_TASKRUN | IOCP__SETUP_TASKRUN_FLAG;
    int r;

    if (cooperative && (u->caps & IOCP__CAP_COOP_TASKRUN)) {
        r = iocp__ring_open(u, entries, base_flags | coop);
        if (r == 0) {
            u->setup_flags = coop;
            return 0;
        }
        if (r != -EINVAL)
            return r;
    }
    u->setup_flags = 0;
    return iocp__ring_open(u, entries, base_flags);
}

/* Which ring each registered index of this thread holds: a registration
 * belongs to the thread that made it (the kernel keeps it in the task),
 * so only a thread that finds its port here may drop it. */
#define IOCP__RING_FDS_MAX 16        /* the kernel's per-task table */
static __thread struct iocp__uring *iocp__tls_ring_fds[IOCP__RING_FDS_MAX];

int iocp__ring_enable(struct iocp__uring *u)
{
    struct iocp__uring_rsrc_update up;
    int r;

    if (u->setup_flags & IOCP__SETUP_R_DISABLED) {
        r = iocp__sys_register(u->fd, IOCP__REGISTER_ENABLE_RINGS, NULL, 0);
        if (r < 0)
            return r;
    }
    u->enabled = 1;
    if (u->caps & IOCP__CAP_RING_FDS) {
        /* Each enter then skips the fd table lookup and its reference. */
        memset(&up, 0, sizeof(up));
        up.offset = UINT32_MAX;
        up.data = (uint64_t)u->fd;
        if (iocp__sys_register(u->fd, IOCP__REGISTER_RING_FDS, &up, 1) == 1) {
            if (up.offset < IOCP__RING_FDS_MAX) {
                iocp__tls_ring_fds[up.offset] = u;
                u->enter_fd = (int)up.offset;
                u->enter_flags = IOCP__ENTER_REGISTERED_RING;
            } else {
                (void)iocp__sys_register(u->fd, IOCP__UNREGISTER_RING_FDS, &up, 1);
            }
        }
    }
    if (u->efd >= 0)
        iocp__efd_arm(u);
    return 0;
}

void iocp__ring_unregister_fd(struct iocp__uring *u)
{
    struct iocp__uring_rsrc_update up;

    if (!(u->enter_flags & IOCP__ENTER_REGISTERED_RING))
        return;
    /* Another thread (a port freed by the garbage collector elsewhere)
     * cannot: the registration then lasts until the owner thread exits,
     * which keeps the kernel's ring object, not a descriptor, alive. */
    if (iocp__tls_ring_fds[u->enter_fd] == u) {
        memset(&up, 0, sizeof(up));
        up.offset = (uint32_t)u->enter_fd;
        (void)iocp__sys_register(u->fd, IOCP__UNREGISTER_RING_FDS, &up, 1);
        iocp__tls_ring_fds[u->enter_fd] = NULL;
    }
    u->enter_fd = u->fd;
    u->enter_flags = 0;
}

/*
 * Wake-up from any thread.  A foreign thread may neither enter a
 * single-issuer ring nor take the port lock (there is none on that path),
 * so it writes an eventfd on which the ring keeps a POLL_ADD; the CQE ends
 * the owner's wait (with DEFER_TASKRUN the poll's task work wakes the
 * waiter) and is consumed internally.  wake_sent keeps it to one write
 * until the owner reaps that CQE: a waker that finds it set is covered,
 * since its generation bump (made before the call) is seen by the owner
 * when its poll() returns for the pending CQE.
 */
int iocp__efd_wake(struct iocp__uring *u)
{
    uint64_t one = 1;

    if (__atomic_exchange_n(&u->wake_sent, 1, __ATOMIC_SEQ_CST))
        return 0;
    for (;;) {
        if (write(u->efd, &one, sizeof(one)) >= 0 || errno == EAGAIN)
            return 0;           /* EAGAIN: the counter is full, so readable */
        if (errno != EINTR) {
            int r = -errno;
            __atomic_store_n(&u->wake_sent, 0, __ATOMIC_SEQ_CST);
            return r;
        }
    }
}

void iocp__efd_arm(struct iocp__uring *u)
{
    iocp__uring_sqe *sqe = iocp__sqe_get(u);
    uint64_t ud = IOCP__UD_IN(IOCP__IN_EVENTFD, 0);

    if (!sqe)
        return;                 /* SQ full: poll() tries again */
    if (u->caps & IOCP__CAP_POLL_MULTI)
        iocp__prep_poll_multishot(sqe, u->efd, POLLIN, ud);
    else
        iocp__prep_poll_add(sqe, u->efd, POLLIN, ud);
    iocp__sqe_commit(u);
    u->efd_armed = 1;
}

void iocp__efd_reaped(struct iocp__uring *u, unsigned cqe_flags)
{
    if (!(cqe_flags & IOCP__CQE_F_MORE)) {
        /* One-shot (or a multishot the kernel ended): empty the counter,
         * or the new poll would fire at once for old wake-ups. */
        uint64_t v;
        u->efd_armed = 0;
        if (read(u->efd, &v, sizeof(v)) < 0) {
            /* EAGAIN: already empty. */
        }
    }
    __atomic_store_n(&u->wake_sent, 0, __ATOMIC_SEQ_CST);
    if (!u->efd_armed)
        iocp__efd_arm(u);
}

/* ---- submission -------------------------------------------------------- */

/*
 * Hands pending SQEs to the kernel without waiting.  Leaves them pending
 * on EBUSY/EAGAIN (old kernels refuse submission while the CQ overflows;
 * the next poll() reaps and retries).
 */
int iocp__flush(struct iocp__uring *u)
{
    /* DEFER_TASKRUN posts completions only when asked for events: ask in
     * the same entry (never waiting), so the next reap sees them without
     * an io_uring_enter of its own. */
    unsigned flags = (u->setup_flags & IOCP__SETUP_DEFER_TASKRUN) ? IOCP__ENTER_GETEVENTS : 0;

    for (;;) {
        unsigned pending = iocp__sq_pending(u);
        int r;
        if (pending == 0)
            return 0;
        r = iocp__enter(u, pending, 0, flags, NULL, 0);
        if (r == -EINTR)
            continue;
        if (r <= 0)
            return r;
    }
}

iocp__uring_sqe *iocp__sqe_get_slow(struct iocp__uring *u)
{
    iocp__uring_sqe *sqe;

    (void)iocp__flush(u);
    if (iocp__sq_pending(u) >= u->sq_entries)
        return NULL;
    sqe = &u->sqes[u->sq_tail & u->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    return sqe;
}

/*
 * SQE for an op or a cancel.  With IOCP_URING_TEST_STARVE=N (tests only)
 * every Nth request finds the SQ "full", as when an old kernel refuses
 * submission during a CQ overflow, so the backlog paths run.
 */
iocp__uring_sqe *iocp__sqe_get_op(struct iocp__uring *u)
{
    if (u->starve && ++u->starve_ctr % u->starve == 0)
        return NULL;
    return iocp__sqe_get(u);
}

/* ---- completion -------------------------------------------------------- */

int iocp__cq_flush_overflow(struct iocp__uring *u)
{
    if (!(__atomic_load_n(u->sq_kflags, __ATOMIC_ACQUIRE) & IOCP__SQ_CQ_OVERFLOW))
        return 0;
    (void)iocp__enter(u, 0, 0, IOCP__ENTER_GETEVENTS, NULL, 0);
    return 1;
}

/* ---- prep helpers ------------------------------------------------------ */

void iocp__prep_nop(iocp__uring_sqe *sqe, uint64_t ud)
{
    sqe->opcode = IOCP__OP_NOP;
    sqe->fd = -1;
    sqe->user_data = ud;
}

void iocp__prep_wake(iocp__uring_sqe *sqe)
{
    iocp__prep_nop(sqe, IOCP__UD_IN(IOCP__IN_WAKE, 0));
}

void iocp__prep_cancel(iocp__uring_sqe *sqe, uint64_t target, uint64_t ud)
{
    sqe->opcode = IOCP__OP_ASYNC_CANCEL;
    sqe->fd = -1;
    sqe->addr = target;
    sqe->user_data = ud;
}

void iocp__prep_cancel_fd(iocp__uring_sqe *sqe, int fd, uint64_t ud)
{
    sqe->opcode = IOCP__OP_ASYNC_CANCEL;
    sqe->fd = fd;
    sqe->op_flags = IOCP__CANCEL_FD | IOCP__CANCEL_ALL;
    sqe->user_data = ud;
}

void iocp__prep_poll_add(iocp__uring_sqe *sqe, int fd, unsigned events, uint64_t ud)
{
    sqe->opcode = IOCP__OP_POLL_ADD;
    sqe->fd = fd;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    events = (events << 16) | (events >> 16);   /* the kernel swaps halves */
#endif
    sqe->op_flags = events;
    sqe->user_data = ud;
}

void iocp__prep_poll_multishot(iocp__uring_sqe *sqe, int fd, unsigned events, uint64_t ud)
{
    iocp__prep_poll_add(sqe, fd, events, ud);
    sqe->len = IOCP__POLL_ADD_MULTI;
}

void iocp__prep_timeout(iocp__uring_sqe *sqe, struct iocp__uring_ts *ts, uint64_t ud)
{
    /* The kernel copies *ts while it takes the SQE (io_uring_enter). */
    sqe->opcode = IOCP__OP_TIMEOUT;
    sqe->fd = -1;
    sqe->addr = (uint64_t)(uintptr_t)ts;
    sqe->len = 1;
    sqe->user_data = ud;
}

void iocp__prep_timeout_remove(iocp__uring_sqe *sqe, uint64_t target, uint64_t ud)
{
    sqe->opcode = IOCP__OP_TIMEOUT_REMOVE;
    sqe->fd = -1;
    sqe->addr = target;
    sqe->user_data = ud;
}

void iocp__prep_accept(iocp__uring_sqe *sqe, int fd, struct sockaddr *addr,
                       socklen_t *alen, int multishot, uint64_t ud)
{
    sqe->opcode = IOCP__OP_ACCEPT;
    sqe->fd = fd;
    sqe->op_flags = SOCK_CLOEXEC | SOCK_NONBLOCK;
    if (multishot)
        sqe->ioprio = IOCP__ACCEPT_MULTISHOT;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->off = (uint64_t)(uintptr_t)alen;
    sqe->user_data = ud;
}

void iocp__prep_connect(iocp__uring_sqe *sqe, int fd, const struct sockaddr *addr,
                        socklen_t alen, uint64_t ud)
{
    sqe->opcode = IOCP__OP_CONNECT;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->off = (uint64_t)alen;
    sqe->user_data = ud;
}

void iocp__prep_recv(iocp__uring_sqe *sqe, int fd, void *buf, size_t len, uint64_t ud)
{
    sqe->opcode = IOCP__OP_RECV;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len > IOCP__IO_MAX ? IOCP__IO_MAX : (uint32_t)len;
    sqe->user_data = ud;
}

void iocp__prep_recv_select(iocp__uring_sqe *sqe, int fd, size_t len, unsigned group,
                            int multishot, uint64_t ud)
{
    sqe->opcode = IOCP__OP_RECV;
    sqe->fd = fd;
    sqe->len = len > IOCP__IO_MAX ? IOCP__IO_MAX : (uint32_t)len;
    sqe->flags = IOCP__SQE_BUFFER_SELECT;
    sqe->buf_group = (uint16_t)group;
    if (multishot)
        sqe->ioprio = IOCP__RECV_MULTISHOT;
    sqe->user_data = ud;
}

void iocp__prep_send(iocp__uring_sqe *sqe, int fd, const void *buf, size_t len,
                     unsigned msg_flags, uint64_t ud)
{
    sqe->opcode = IOCP__OP_SEND;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len > IOCP__IO_MAX ? IOCP__IO_MAX : (uint32_t)len;
    sqe->op_flags = msg_flags;
    sqe->user_data = ud;
}

void iocp__prep_sendmsg(iocp__uring_sqe *sqe, int fd, const struct msghdr *msg,
                        unsigned msg_flags, uint64_t ud)
{
    /* The kernel reads *msg when it takes the SQE, not before: it must
     * stay valid while the SQE waits in the ring. */
    sqe->opcode = IOCP__OP_SENDMSG;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)msg;
    sqe->len = 1;
    sqe->op_flags = msg_flags;
    sqe->user_data = ud;
}
