/*
 * uring_probe.c -- what this kernel's io_uring can do, found once per
 * process.
 *
 * How: a throw-away 8-entry ring.  Its `features` word says NODROP,
 * FAST_POLL and EXT_ARG; IORING_REGISTER_PROBE says which opcodes exist;
 * flags that have no probe (multishot accept and recv, cancel by
 * descriptor, provided-buffer rings) are tried for real on a socketpair or
 * an abstract Unix listener: an old kernel rejects them at once with
 * -EINVAL, a new one leaves the request pending (or fails it for another
 * reason), and closing the ring cancels whatever is left.  NODROP and
 * FAST_POLL are required (without them completions can be lost, or every
 * idle socket op blocks a kernel worker): without them, or without the
 * opcodes, io_uring is reported unusable and the port falls back to epoll.
 *
 * Tests reach the fallbacks on a new kernel through the environment, read
 * whenever a port is made: IOCP_URING_FAIL_SETUP=1 (io_uring unusable,
 * -EPERM) and IOCP_URING_DISABLE="word,word" (ignore those features; the
 * words are the ones iocp__uring_probe reports).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "uring_internal.h"

static struct {
    pthread_once_t once;
    int err;                /* 0 or why io_uring cannot run */
    unsigned caps;
} iocp__uring_detected = { PTHREAD_ONCE_INIT, 0, 0 };

static int iocp__env_fail_setup(void)
{
    const char *v = getenv("IOCP_URING_FAIL_SETUP");
    return v && v[0] && strcmp(v, "0") != 0;
}

/* Waits for the CQE tagged `ud` on a private ring; returns its res, or
 * `absent` if it did not come (the request is pending). */
static int iocp__probe_result(struct iocp__uring *u, uint64_t ud, int absent)
{
    iocp__uring_cqe c;
    int res = absent;

    while (iocp__cqe_next(u, &c)) {
        if (c.user_data == ud)
            res = c.res;
    }
    return res;
}

/* 1 if io_uring_setup takes `flags` (an old kernel answers -EINVAL). */
static int iocp__probe_setup(unsigned flags)
{
    struct iocp__uring t;
    int r;

    memset(&t, 0, sizeof(t));
    t.fd = -1;
    r = iocp__ring_open(&t, 2, flags);
    if (r == 0)
        iocp__ring_close(&t);
    return r == 0;
}

/* Submits one prepared SQE on a private ring and reports its result. */
static int iocp__probe_one(struct iocp__uring *u, int absent)
{
    iocp__sqe_commit(u);
    if (iocp__flush(u) < 0)
        return absent;
    return iocp__probe_result(u, IOCP__UD_IN(IOCP__IN_PROBE, 0), absent);
}

static void iocp__detect(void)
{
    static const uint8_t needed[] = {
        IOCP__OP_NOP, IOCP__OP_POLL_ADD, IOCP__OP_TIMEOUT, IOCP__OP_TIMEOUT_REMOVE,
        IOCP__OP_ACCEPT, IOCP__OP_ASYNC_CANCEL, IOCP__OP_CONNECT, IOCP__OP_SEND,
        IOCP__OP_RECV, IOCP__OP_SENDMSG
    };
    const uint64_t ud = IOCP__UD_IN(IOCP__IN_PROBE, 0);
    struct iocp__uring u;
    struct iocp__uring_probe *pr;
    struct iocp__uring_buf_reg reg;
    iocp__uring_sqe *sqe;
    unsigned caps = 0, i;
    void *ring_mem = MAP_FAILED;
    int r, sv[2] = { -1, -1 }, lfd = -1;

    memset(&u, 0, sizeof(u));
    u.fd = -1;
    r = iocp__ring_open(&u, 8, IOCP__SETUP_SUBMIT_ALL);
    if (r == -EINVAL)
        r = iocp__ring_open(&u, 8, 0);
    else if (r == 0)
        caps |= IOCP__CAP_SUBMIT_ALL;
    if (r < 0) {
        iocp__uring_detected.err = r;
        return;
    }
    if ((u.features & (IOCP__FEAT_NODROP | IOCP__FEAT_FAST_POLL)) !=
        (IOCP__FEAT_NODROP | IOCP__FEAT_FAST_POLL)) {
        iocp__uring_detected.err = -ENOSYS;
        goto out;
    }
    if (u.features & IOCP__FEAT_EXT_ARG)
        caps |= IOCP__CAP_EXT_ARG;
    /* Linked chains of sends that post only their last CQE: CQE_SKIP
     * (5.17; the link fails on a short MSG_WAITALL send since before).
     * Tried for real: a skipped NOP linked to one that posts. */
    if ((u.features & IOCP__FEAT_CQE_SKIP) && iocp__sq_space(&u) >= 2) {
        iocp__uring_sqe *a = iocp__sqe_at(&u, 0), *b = iocp__sqe_at(&u, 1);
        iocp__uring_cqe c;
        int seen = 0, last = 0;
        iocp__prep_nop(a, IOCP__UD_IN(IOCP__IN_PROBE, 1));
        a->flags = IOCP__SQE_IO_LINK | IOCP__SQE_CQE_SKIP;
        iocp__prep_nop(b, IOCP__UD_IN(IOCP__IN_PROBE, 2));
        iocp__sqe_commit_n(&u, 2);
        if (iocp__sys_enter(u.fd, 2, 1, IOCP__ENTER_GETEVENTS, NULL, 0) >= 0) {
            /* NOPs complete inline: both are done once one CQE is in. */
            while (iocp__cqe_next(&u, &c)) {
                seen++;
                last = c.user_data == IOCP__UD_IN(IOCP__IN_PROBE, 2) && c.res == 0;
            }
        }
        if (seen == 1 && last)
            caps |= IOCP__CAP_CHAIN;
    }
    pr = calloc(1, sizeof(*pr));
    if (!pr) {
        iocp__uring_detected.err = -ENOMEM;
        goto out;
    }
    r = iocp__sys_register(u.fd, IOCP__REGISTER_PROBE, pr, 256);
    for (i = 0; r >= 0 && i < sizeof(needed); i++) {
        if (needed[i] > pr->last_op || !(pr->ops[needed[i]].flags & IOCP__PROBE_OP_SUPPORTED))
            r = -ENOSYS;
    }
    free(pr);
    if (r < 0) {
        iocp__uring_detected.err = r == -EINVAL ? -ENOSYS : r;
        goto out;
    }

    /* Single-issuer setups (6.0, 6.1, 5.19), each tried as the port will. */
    if (iocp__probe_setup(IOCP__SETUP_SINGLE_ISSUER | IOCP__SETUP_R_DISABLED)) {
        caps |= IOCP__CAP_SINGLE_ISSUER;
        if (iocp__probe_setup(IOCP__SETUP_SINGLE_ISSUER | IOCP__SETUP_R_DISABLED |
                              IOCP__SETUP_DEFER_TASKRUN | IOCP__SETUP_TASKRUN_FLAG))
            caps |= IOCP__CAP_DEFER_TASKRUN;
    }
    if (iocp__probe_setup(IOCP__SETUP_COOP_TASKRUN | IOCP__SETUP_TASKRUN_FLAG))
        caps |= IOCP__CAP_COOP_TASKRUN;
    {
        /* A registered ring fd (5.18); dropped again at once, since the
         * registration would keep this throw-away ring alive. */
        struct iocp__uring_rsrc_update up;
        memset(&up, 0, sizeof(up));
        up.offset = UINT32_MAX;
        up.data = (uint64_t)u.fd;
        if (iocp__sys_register(u.fd, IOCP__REGISTER_RING_FDS, &up, 1) == 1) {
            caps |= IOCP__CAP_RING_FDS;
            (void)iocp__sys_register(u.fd, IOCP__UNREGISTER_RING_FDS, &up, 1);
        }
    }

    /* Provided-buffer ring: one slot is enough to see it register. */
    ring_mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring_mem != MAP_FAILED) {
        memset(&reg, 0, sizeof(reg));
        reg.ring_addr = (uint64_t)(uintptr_t)ring_mem;
        reg.ring_entries = 1;
        reg.bgid = 0;
        if (iocp__sys_register(u.fd, IOCP__REGISTER_PBUF_RING, &reg, 1) == 0)
            caps |= IOCP__CAP_PBUF;
    }

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0) {
        /* Multishot recv needs a buffer group: the ring registered above.
         * With no buffer in it a new kernel answers -ENOBUFS. */
        if ((caps & IOCP__CAP_PBUF) && (sqe = iocp__sqe_get(&u)) != NULL) {
            iocp__prep_recv_select(sqe, sv[0], 0, 0, 1, ud);
            if (iocp__probe_one(&u, 1) != -EINVAL)
                caps |= IOCP__CAP_MS_RECV;
        }
        if ((sqe = iocp__sqe_get(&u)) != NULL) {
            iocp__prep_cancel_fd(sqe, sv[0], ud);
            if (iocp__probe_one(&u, -EINVAL) >= 0)
                caps |= IOCP__CAP_CANCEL_FD;
        }
        /* Multishot poll (5.13): nothing was written to sv[1], so a new
         * kernel leaves it pending (after the cancel above, which would
         * otherwise answer for it too). */
        if ((sqe = iocp__sqe_get(&u)) != NULL) {
            iocp__prep_poll_multishot(sqe, sv[1], POLLIN, ud);
            if (iocp__probe_one(&u, 1) != -EINVAL)
                caps |= IOCP__CAP_POLL_MULTI;
        }
    }
    /* A Unix listener with an autobound abstract name: no file system. */
    lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lfd >= 0) {
        struct sockaddr_un sa;
        memset(&sa, 0, sizeof(sa));
        sa.sun_family = AF_UNIX;
        if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa.sun_family)) == 0 &&
            listen(lfd, 1) == 0 && (sqe = iocp__sqe_get(&u)) != NULL) {
            iocp__prep_accept(sqe, lfd, NULL, NULL, 1, ud);
            if (iocp__probe_one(&u, 1) != -EINVAL)
                caps |= IOCP__CAP_MS_ACCEPT;
        }
    }
out:
    /* Closing the ring cancels whatever the tests left pending. */
    iocp__ring_close(&u);
    if (ring_mem != MAP_FAILED)
        munmap(ring_mem, 4096);
    if (sv[0] >= 0) {
        close(sv[0]);
        close(sv[1]);
    }
    if (lfd >= 0)
        close(lfd);
    iocp__uring_detected.caps = caps;
}

static const struct { unsigned cap; const char *word; } iocp__cap_words[] = {
    { IOCP__CAP_EXT_ARG, "ext-arg" },
    { IOCP__CAP_SUBMIT_ALL, "submit-all" },
    { IOCP__CAP_MS_ACCEPT, "multishot-accept" },
    { IOCP__CAP_PBUF, "provided-buffers" },
    { IOCP__CAP_MS_RECV, "recv-multishot" },
    { IOCP__CAP_CANCEL_FD, "cancel-fd" },
    { IOCP__CAP_CHAIN, "send-chain" },
    { IOCP__CAP_SINGLE_ISSUER, "single-issuer" },
    { IOCP__CAP_DEFER_TASKRUN, "defer-taskrun" },
    { IOCP__CAP_COOP_TASKRUN, "coop-taskrun" },
    { IOCP__CAP_RING_FDS, "registered-ring" },
    { IOCP__CAP_POLL_MULTI, "poll-multishot" },
};
#define IOCP__NCAPWORDS (sizeof(iocp__cap_words) / sizeof(iocp__cap_words[0]))

int iocp__uring_caps(unsigned *caps)
{
    const char *dis = getenv("IOCP_URING_DISABLE");
    unsigned c, i;

    if (iocp__env_fail_setup())
        return -EPERM;
    pthread_once(&iocp__uring_detected.once, iocp__detect);
    if (iocp__uring_detected.err < 0)
        return iocp__uring_detected.err;
    c = iocp__uring_detected.caps;
    for (i = 0; dis && i < IOCP__NCAPWORDS; i++) {
        if (strstr(dis, iocp__cap_words[i].word))
            c &= ~iocp__cap_words[i].cap;
    }
    *caps = c;
    return 0;
}

int iocp__uring_probe(char *features, size_t len)
{
    unsigned caps = 0, i;
    size_t used;
    int r = iocp__uring_caps(&caps);

    if (r < 0)
        return r;
    if (features && len) {
        snprintf(features, len, "nodrop fast-poll");
        for (i = 0; i < IOCP__NCAPWORDS; i++) {
            if (!(caps & iocp__cap_words[i].cap))
                continue;
            used = strlen(features);
            snprintf(features + used, len - used, " %s", iocp__cap_words[i].word);
        }
    }
    return 0;
}
