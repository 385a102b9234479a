/*
 * uring_internal.h -- what the files of the io_uring backend share.
 *
 *   uring_abi.h    kernel records and constants under our names
 *   uring_ring.c   the ring: setup, mmap, SQE get/commit, flush, CQ
 *                  primitives, and one prep helper per SQE kind
 *   uring_probe.c  what the kernel supports (feature probes, feature words)
 *   uring_buf.c    the provided-buffer ring receives pick from
 *   uring.c        the op state machine, per-socket FIFOs, the vtable
 *
 * uring.c also uses sock.h, shared with epoll.c: the descriptor table's
 * growth and lookup, O_NONBLOCK at register, how a connect ended, and the
 * result of an op stopped early after a partial send.
 *
 * All of it runs under the port lock (or on a ring private to the caller,
 * as the probes do): nothing here takes a lock of its own.  The tiny hot
 * ring accessors are static inline here; their slow paths live in
 * uring_ring.c.  Never included outside src/native/linux/uring*.c.
 */
#ifndef IOCP_URING_INTERNAL_H
#define IOCP_URING_INTERNAL_H

#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "../iocp_internal.h"
#include "uring_abi.h"

/* ---- user_data tags (low three bits; op records are 8-byte aligned) -- */

#define IOCP__UD_OP        0u     /* the op itself */
#define IOCP__UD_POLL      1u     /* the op's readiness wait */
#define IOCP__UD_INTERNAL  2u     /* no op: kind << 3 | payload << 8 */
#define IOCP__UD_CHAIN     3u     /* the op as a member of a linked chain */
#define IOCP__UD_MASK      7u
enum { IOCP__IN_WAKE = 1, IOCP__IN_CANCEL = 2, IOCP__IN_TIMEOUT = 3,
       IOCP__IN_TIMEOUT_REMOVE = 4, IOCP__IN_PROBE = 5, IOCP__IN_PAD = 6,
       IOCP__IN_EVENTFD = 16 /* the wake eventfd's POLL_ADD */ };
#define IOCP__UD_IN(kind, payload) \
    (IOCP__UD_INTERNAL | ((uint64_t)(kind) << 3) | ((uint64_t)(payload) << 8))

/* ---- capability bits (probe results, maskable by IOCP_URING_DISABLE) */

#define IOCP__CAP_EXT_ARG    (1u << 0)
#define IOCP__CAP_SUBMIT_ALL (1u << 1)
#define IOCP__CAP_PBUF       (1u << 2)
#define IOCP__CAP_MS_ACCEPT  (1u << 3)
#define IOCP__CAP_MS_RECV    (1u << 4)
#define IOCP__CAP_CANCEL_FD  (1u << 5)
#define IOCP__CAP_CHAIN      (1u << 6)   /* linked sends, CQE_SKIP_SUCCESS */
/* Single-issuer setups and the poll op (uring_ring.c, IOCP_OP_POLL). */
#define IOCP__CAP_SINGLE_ISSUER (1u << 16)  /* SINGLE_ISSUER | R_DISABLED */
#define IOCP__CAP_DEFER_TASKRUN (1u << 17)  /* ... | DEFER_TASKRUN | TASKRUN_FLAG */
#define IOCP__CAP_COOP_TASKRUN  (1u << 18)  /* COOP_TASKRUN | TASKRUN_FLAG */
#define IOCP__CAP_RING_FDS      (1u << 19)  /* IORING_REGISTER_RING_FDS */
#define IOCP__CAP_POLL_MULTI    (1u << 20)  /* IORING_POLL_ADD_MULTI */

/* ---- op->state bits (backend private) -------------------------------- */

#define IOCP__ST_ARMED     0x01   /* an SQE with user_data == op is out */
#define IOCP__ST_POLL      0x02   /* a POLL_ADD with op|1 is out */
#define IOCP__ST_CANCEL    0x04   /* cancel requested */
#define IOCP__ST_BACKLOG   0x08   /* waiting for an SQE to be issued */
#define IOCP__ST_CBACKLOG  0x10   /* its cancel waits for an SQE */
#define IOCP__ST_RINGBUF   0x20   /* RECV picks from the buffer ring */
#define IOCP__ST_CONNWAIT  0x40   /* CONNECT in progress, polling POLLOUT */
#define IOCP__ST_MULTI     0x80   /* ACCEPT / RECV armed as kernel multishot */
#define IOCP__ST_FIFO      0x100  /* in its socket's read or write FIFO */
#define IOCP__ST_QUEUED    0x200  /* ... behind the head: nothing issued */
#define IOCP__ST_BG_LARGE  0x400  /* RINGBUF: picks from the 64 KiB group */
#define IOCP__ST_BG_TINY   0x8000 /* RINGBUF: picks from the 512 B group */
#define IOCP__ST_BG_MASK   (IOCP__ST_BG_LARGE | IOCP__ST_BG_TINY)
#define IOCP__ST_PARKED    0x800  /* multishot recv waiting for buffers */
#define IOCP__ST_OWED      0x1000 /* its final completion waits on u->owed */
#define IOCP__ST_CHAIN     0x2000 /* SEND out as a member of a linked chain */
#define IOCP__ST_REGROUP   0x4000 /* multishot recv: a cancel is out to end the
                                     request so it re-arms on the group
                                     its socket now wants (ufd.ms_level) */

#define IOCP__DEFAULT_ENTRIES 1024u

/* Largest length one RECV/SEND SQE carries (what read(2) caps at). */
#define IOCP__IO_MAX 0x7ffff000u

/* Ops of one socket and direction, in submission order (op->fifo_next).
 * Only the head has a request in the kernel. */
struct iocp__fifo {
    iocp_op *head, *tail;
};

struct iocp__ufd {
    unsigned registered;
    unsigned gen;          /* bumped by unregister/register: old ops cancel */
    unsigned nops;         /* ops in flight on this descriptor */
    dev_t dev;
    ino_t ino;             /* which socket: tells a reused descriptor apart */
    struct iocp__fifo rq;  /* recv, recv_into */
    struct iocp__fifo wq;  /* connect, send */
    iocp_op *msrecv;       /* the multishot recv of this registration */
    unsigned chain_n;      /* the first chain_n ops of wq are a linked
                              chain in the kernel (0: none) */
    /* Which buffer group this socket's multishot recv should pick from,
     * a rung of a ladder: 0 the 512 B group, 1 the 4 KiB one, 2 the
     * 64 KiB one.  One rung up as soon as a buffer comes back full (the
     * socket delivers more than that size holds; within the op's cap),
     * one rung down after
     * IOCP__MS_DOWN_RUN arrivals in a row of at most half the size of the
     * rung below (ms_small counts them).  Kept per socket, so a multishot
     * recv armed again on the socket starts where the last one ended;
     * reset at register. */
    unsigned char ms_level;
    unsigned short ms_small;
};

/* The hysteresis of ufd.ms_level: one rung down after this many small
 * arrivals in a row (at most half a buffer of the rung below each). */
#define IOCP__MS_DOWN_RUN 16u

/*
 * A completion owed to the queue: poll() may hand out at most `max`, and
 * one CQE can mean several completions (a multishot recv's last data and
 * its cancel; a linked chain of sends).  What does not fit waits here, in
 * order, and goes first at the next reap.
 */
struct iocp__owed {
    iocp_op *op;
    int64_t result, error;
    unsigned flags;
    uint32_t buf_id;
    char *data;
};

/* The table grows by doubling up to this many descriptors: doubling an int
 * past it would overflow, and no kernel hands out larger descriptors
 * (fs.nr_open tops out just below 2^31 and defaults to 2^20). */
#define IOCP__UFD_MAX (1 << 30)

/*
 * One provided-buffer group: a kernel ring of buffer descriptors plus the
 * buffers, all of one size.  Buffer ids [0, nbufs) exist; each is in the
 * ring, held by the kernel for a CQE we have not reaped, or out with the
 * caller (counted in `out`) until release_buffer puts it back.  The group
 * grows (more ids, never fewer) and the ring has room for every id it may
 * ever have, so putting a buffer back never overflows it.
 */
#define IOCP__BG_SMALL 0          /* 4 KiB: small recvs, multishot recv */
#define IOCP__BG_LARGE 1          /* 64 KiB: recvs up to 64 KiB */
#define IOCP__BG_TINY 2           /* 512 B: multishot recv of small messages */
#define IOCP__BG_COUNT 3

struct iocp__bgroup {
    int state;                     /* 0 not tried, 1 ready, -1 unavailable */
    unsigned shift;                /* log2 of the buffer size */
    struct iocp__uring_buf *ring;  /* `entries` descriptors (mmap) */
    unsigned entries;              /* ring size: power of two, >= max_bufs */
    unsigned short tail;           /* ours; published in slot 0's resv */
    unsigned nbufs, max_bufs;      /* ids made so far; most it may make */
    unsigned out;                  /* ids out with the caller */
    unsigned grew_seq;             /* u->reap_seq of the last growth */
    unsigned held;                 /* `out` when the current reap began:
                                      ids callers kept past their batch */
    unsigned starved;              /* reaps since the last growth in which
                                      a multishot recv found the ring empty */
    unsigned starved_seq;          /* u->reap_seq of the last of them */
    unsigned promised;             /* waiters re-armed since this reap
                                      began: each is about to take one */
    unsigned chunk_shift;          /* ids per chunk: 1 << chunk_shift */
    char **chunks;                 /* chunk k: ids [k << chunk_shift, ...) */
    iocp_op *waiters, *waiters_tail; /* multishot recvs waiting for
                                      buffers (op->fd_next), oldest first */
};

struct iocp__uring {
    int fd;
    unsigned caps;
    unsigned features;

    /* How the ring was set up and is entered (uring_ring.c).  A
     * single-issuer port's ring starts disabled and is enabled by the
     * first call from its owner (iocp__ring_own); every io_uring_enter
     * goes through iocp__enter with enter_fd/enter_flags (a registered
     * ring index once the owner registered it). */
    unsigned setup_flags;
    int enter_fd;
    unsigned enter_flags;
    int enabled;                   /* 0 until the owner's first call */
    int efd;                       /* single-issuer wake eventfd, else -1 */
    int efd_armed;                 /* its POLL_ADD is out */
    int wake_sent;                 /* atomic: a write not yet reaped */

    /* SQ */
    void *sq_map;
    size_t sq_map_len;
    unsigned *sq_khead, *sq_ktail, *sq_kflags;
    unsigned sq_mask, sq_entries;
    unsigned sq_tail;              /* ours; published to *sq_ktail */
    iocp__uring_sqe *sqes;
    size_t sqes_len;

    /* CQ */
    void *cq_map;                  /* == sq_map with SINGLE_MMAP */
    size_t cq_map_len;
    unsigned *cq_khead, *cq_ktail;
    unsigned cq_mask;
    iocp__uring_cqe *cqes;

    /* Provided-buffer groups (uring_buf.c), set up on first use, and the
     * bytes all of them may grow to. */
    struct iocp__bgroup bg[IOCP__BG_COUNT];
    size_t pool_max, pool_bytes;
    /* Counters for IOCP_URING_STATS (tests and measurements). */
    uint64_t n_enobufs, n_grows, n_parks, n_chains, n_chained, n_regroups;
    uint64_t n_idle_waits;        /* starved multishot recvs found idle */
    int print_stats;

    /* Descriptors. */
    struct iocp__ufd *fds;
    int nfds;

    /* Ops waiting for an SQE, and ops whose cancel waits (op->fd_next). */
    iocp_op *backlog, *cbacklog;

    int wake_pending;              /* a wake NOP is out */
    int woken;                     /* reaped a wake NOP in this poll() */
    unsigned starve, starve_ctr;   /* IOCP_URING_TEST_STARVE (tests only) */
    unsigned timeout_seq;          /* TIMEOUT SQE fallback */
    int timeout_armed;
    int ndelivered;                /* counts deliveries within one reap */
    int reaping, budget;           /* inside iocp__reap, and its `max` */
    unsigned poller_pending;       /* SQEs the blocking io_uring_enter of
                                      poll() may still take (see chains) */
    unsigned reap_seq;             /* bumped by every reap */
    struct iocp__owed *owed;       /* owed[owed_head .. +nowed) */
    unsigned owed_head, nowed, owed_cap;
    struct iocp__uring_ts ts;      /* TIMEOUT SQE: read when the kernel takes it */
};

/* ---- uring_ring.c: syscalls ------------------------------------------ */

int iocp__sys_setup(unsigned entries, struct iocp__uring_params *p);
int iocp__sys_enter(int fd, unsigned to_submit, unsigned min_complete,
                    unsigned flags, void *arg, size_t argsz);
int iocp__sys_register(int fd, unsigned opcode, void *arg, unsigned nr);

/* ---- uring_ring.c: the ring ------------------------------------------ */

/* Creates the ring (CQ 4x the SQ) and maps it.  0 or -errno (nothing
 * left open). */
int iocp__ring_open(struct iocp__uring *u, unsigned entries, unsigned setup_flags);
/* Unmaps this process's view and closes the ring fd. */
void iocp__ring_close(struct iocp__uring *u);
/* io_uring_enter on this ring, through its registered index if it has one. */
static inline int iocp__enter(struct iocp__uring *u, unsigned to_submit, unsigned min_complete,
                              unsigned flags, void *arg, size_t argsz)
{
    return iocp__sys_enter(u->enter_fd, to_submit, min_complete, flags | u->enter_flags,
                           arg, argsz);
}
/*
 * Single-issuer mode.  iocp__ring_open_single sets the ring up with the
 * best of SINGLE_ISSUER|DEFER_TASKRUN, SINGLE_ISSUER|COOP_TASKRUN,
 * SINGLE_ISSUER, COOP_TASKRUN, nothing (as u->caps allows; -EINVAL moves
 * to the next), disabled where SINGLE_ISSUER is set, and opens the wake
 * eventfd.  iocp__ring_enable runs on the owner's first call: enables the
 * ring (the kernel then takes the calling thread as its only submitter),
 * registers the ring fd for that thread and arms the eventfd's poll.
 */
int iocp__ring_open_single(struct iocp__uring *u, unsigned entries, unsigned base_flags);
/* A ring any thread may use: with cooperative (iocp_port_options) and
 * where the kernel has it, COOP_TASKRUN | TASKRUN_FLAG, else plain. */
int iocp__ring_open_shared(struct iocp__uring *u, unsigned entries, unsigned base_flags,
                           int cooperative);
int iocp__ring_enable(struct iocp__uring *u);
static inline int iocp__ring_own(struct iocp__uring *u)
{
    return u->enabled ? 0 : iocp__ring_enable(u);
}
/* Drops the owner's registration of the ring fd, if this thread holds it
 * (a registration lives in the thread that made it; another thread's
 * index would name some other ring). */
void iocp__ring_unregister_fd(struct iocp__uring *u);
/* Ends a wait in the kernel from any thread without touching the ring:
 * writes the eventfd, at most once until the owner reaps its CQE. */
int iocp__efd_wake(struct iocp__uring *u);
/* (Re)arms the eventfd's POLL_ADD; the owner, ring enabled. */
void iocp__efd_arm(struct iocp__uring *u);
/* The eventfd's CQE was reaped (owner): clears wake_sent, re-arms. */
void iocp__efd_reaped(struct iocp__uring *u, unsigned cqe_flags);
/* Hands pending SQEs to the kernel without waiting; see uring_ring.c. */
int iocp__flush(struct iocp__uring *u);
/* The SQ is full: submit to make room.  Returns a zeroed SQE or NULL. */
iocp__uring_sqe *iocp__sqe_get_slow(struct iocp__uring *u);
/* Like iocp__sqe_get, but IOCP_URING_TEST_STARVE may refuse it. */
iocp__uring_sqe *iocp__sqe_get_op(struct iocp__uring *u);
/* The kernel flagged CQ overflow: flush it back into the ring.  Returns 1
 * if it did (the ring may hold new CQEs), 0 if there was nothing to do. */
int iocp__cq_flush_overflow(struct iocp__uring *u);

/* SQEs not yet consumed by the kernel. */
static inline unsigned iocp__sq_pending(struct iocp__uring *u)
{
    return u->sq_tail - __atomic_load_n(u->sq_khead, __ATOMIC_ACQUIRE);
}

/*
 * Takes a free SQE slot, zeroed; NULL if the SQ stays full even after a
 * submit.  The caller fills it (a prep helper) and then calls
 * iocp__sqe_commit().
 */
static inline iocp__uring_sqe *iocp__sqe_get(struct iocp__uring *u)
{
    iocp__uring_sqe *sqe;

    if (iocp__sq_pending(u) >= u->sq_entries)
        return iocp__sqe_get_slow(u);
    sqe = &u->sqes[u->sq_tail & u->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    return sqe;
}

/* Publishes the SQE filled since iocp__sqe_get (release: the kernel, or
 * a poller's concurrent io_uring_enter, must see it whole). */
static inline void iocp__sqe_commit(struct iocp__uring *u)
{
    u->sq_tail++;
    __atomic_store_n(u->sq_ktail, u->sq_tail, __ATOMIC_RELEASE);
}

/* Free SQ slots (no submit needed to take this many). */
static inline unsigned iocp__sq_space(struct iocp__uring *u)
{
    return u->sq_entries - iocp__sq_pending(u);
}

/*
 * Several SQEs published at once (a linked chain: the kernel must never
 * see a prefix of it).  Take slot i of n with iocp__sqe_at (i < the
 * space), fill them all, then iocp__sqe_commit_n.
 */
static inline iocp__uring_sqe *iocp__sqe_at(struct iocp__uring *u, unsigned i)
{
    iocp__uring_sqe *sqe = &u->sqes[(u->sq_tail + i) & u->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    return sqe;
}

static inline void iocp__sqe_commit_n(struct iocp__uring *u, unsigned n)
{
    u->sq_tail += n;
    __atomic_store_n(u->sq_ktail, u->sq_tail, __ATOMIC_RELEASE);
}

/*
 * Takes the next CQE into *out and gives its slot back before the caller
 * acts on it (acting may submit, and a full CQ would only push the kernel
 * onto its overflow list).  Returns 0 when the ring is empty.
 */
static inline int iocp__cqe_next(struct iocp__uring *u, iocp__uring_cqe *out)
{
    unsigned head = *u->cq_khead;

    if (head == __atomic_load_n(u->cq_ktail, __ATOMIC_ACQUIRE))
        return 0;
    *out = u->cqes[head & u->cq_mask];
    __atomic_store_n(u->cq_khead, head + 1, __ATOMIC_RELEASE);
    return 1;
}

/* True when a non-blocking look needs no io_uring_enter: nothing to
 * submit, and the kernel flags no task work and no CQ overflow (rings
 * set up with TASKRUN_FLAG only; others always say 0). */
static inline int iocp__ring_quiet(struct iocp__uring *u)
{
    return (u->setup_flags & IOCP__SETUP_TASKRUN_FLAG) && iocp__sq_pending(u) == 0 &&
           !(__atomic_load_n(u->sq_kflags, __ATOMIC_ACQUIRE) &
             (IOCP__SQ_TASKRUN | IOCP__SQ_CQ_OVERFLOW));
}

/* ---- uring_ring.c: prep helpers, one per SQE kind --------------------
 * Each fills a zeroed SQE from iocp__sqe_get; none commits it. */

void iocp__prep_nop(iocp__uring_sqe *sqe, uint64_t ud);
/* The wake-up NOP (tag IOCP__IN_WAKE). */
void iocp__prep_wake(iocp__uring_sqe *sqe);
/* ASYNC_CANCEL of the request whose user_data is `target`. */
void iocp__prep_cancel(iocp__uring_sqe *sqe, uint64_t target, uint64_t ud);
/* ASYNC_CANCEL of every request on descriptor `fd` (CANCEL_FD|ALL). */
void iocp__prep_cancel_fd(iocp__uring_sqe *sqe, int fd, uint64_t ud);
void iocp__prep_poll_add(iocp__uring_sqe *sqe, int fd, unsigned events, uint64_t ud);
/* The same, multishot: a CQE (F_MORE) per readiness event until cancelled. */
void iocp__prep_poll_multishot(iocp__uring_sqe *sqe, int fd, unsigned events, uint64_t ud);
void iocp__prep_timeout(iocp__uring_sqe *sqe, struct iocp__uring_ts *ts, uint64_t ud);
void iocp__prep_timeout_remove(iocp__uring_sqe *sqe, uint64_t target, uint64_t ud);
/* addr/alen NULL: no peer address (multishot: one buffer for all). */
void iocp__prep_accept(iocp__uring_sqe *sqe, int fd, struct sockaddr *addr,
                       socklen_t *alen, int multishot, uint64_t ud);
void iocp__prep_connect(iocp__uring_sqe *sqe, int fd, const struct sockaddr *addr,
                        socklen_t alen, uint64_t ud);
void iocp__prep_recv(iocp__uring_sqe *sqe, int fd, void *buf, size_t len, uint64_t ud);
/* RECV picking its buffer from provided-buffer group `group`. */
void iocp__prep_recv_select(iocp__uring_sqe *sqe, int fd, size_t len, unsigned group,
                            int multishot, uint64_t ud);
void iocp__prep_send(iocp__uring_sqe *sqe, int fd, const void *buf, size_t len,
                     unsigned msg_flags, uint64_t ud);
void iocp__prep_sendmsg(iocp__uring_sqe *sqe, int fd, const struct msghdr *msg,
                        unsigned msg_flags, uint64_t ud);

/* ---- uring_probe.c ---------------------------------------------------- */

/* Capabilities after IOCP_URING_DISABLE, or a negative error (io_uring
 * cannot run here; IOCP_URING_FAIL_SETUP=1 says -EPERM). */
int iocp__uring_caps(unsigned *caps);
/* The backend's probe slot: 0 and the feature words, or an error. */
int iocp__uring_probe(char *features, size_t len);

/* ---- uring_buf.c: provided-buffer groups ----------------------------- */

#define IOCP__BG_TINY_SHIFT 9             /* 512 B */
#define IOCP__BG_SMALL_SHIFT 12           /* 4 KiB */
#define IOCP__BG_LARGE_SHIFT 16           /* 64 KiB */
#define IOCP__POOL_MAX_DEFAULT ((size_t)64 << 20)

/* The group a receive of up to `len` bytes picks from (len 0: the small
 * one), set up on first use; -1 if none fits or the kernel has none. */
int iocp__bg_pick(struct iocp__uring *u, size_t len);
/* The 512 B group, set up on first use; -1 if the kernel has none. */
int iocp__bg_tiny(struct iocp__uring *u);
/* Adds buffers to group g (doubling, within the pool bound).  Returns how
 * many were added (0: at the bound, or out of memory). */
unsigned iocp__bg_grow(struct iocp__uring *u, int g);
/* Puts buffer `bid` of group g (back) in its ring. */
void iocp__bg_put(struct iocp__uring *u, int g, unsigned bid);
/* Tells the kernel the rings are gone (not in a fork() child). */
void iocp__bg_unregister(struct iocp__uring *u);
/* Frees rings and buffers (after iocp__bg_unregister, or in a child). */
void iocp__bg_free(struct iocp__uring *u);

static inline unsigned iocp__bg_size(const struct iocp__bgroup *b)
{
    return 1u << b->shift;
}

/* Address of buffer `bid` of group g (bid < nbufs). */
static inline char *iocp__bg_addr(struct iocp__uring *u, int g, unsigned bid)
{
    struct iocp__bgroup *b = &u->bg[g];
    return b->chunks[bid >> b->chunk_shift] +
           ((size_t)(bid & ((1u << b->chunk_shift) - 1)) << b->shift);
}

/* buf_id handed to the caller: nonzero, says group and id. */
static inline uint32_t iocp__bg_buf_id(int g, unsigned bid)
{
    return ((uint32_t)(g + 1) << 16) | bid;
}

#endif /* IOCP_URING_INTERNAL_H */
