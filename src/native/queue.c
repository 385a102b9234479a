/*
 * queue.c -- the bounded completion queue between the backends and the
 * callers of iocp_port_wait().
 *
 * The queue is a ring of `qcap` records.  Backends reap from the kernel at
 * most as many completions as the ring has room for, so a slow consumer
 * leaves the rest in the kernel's own queue (IOCP queue, io_uring CQ,
 * unread socket readiness) and memory stays bounded.  Some completions are
 * produced synchronously -- an op that succeeded inline, a cancel the epoll
 * emulation carries out at once -- and must not be dropped even when the
 * ring is full: they go to the overflow list, which is bounded by the
 * number of ops in flight.  Once anything sits in the overflow every new
 * completion queues behind it, so delivery order is preserved.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iocp_internal.h"

static int iocp__overflow_push(iocp_port *p, const iocp_completion *c)
{
    if (p->ovflen == p->ovfcap) {
        unsigned ncap = p->ovfcap ? p->ovfcap * 2 : 64;
        iocp_completion *n;
        unsigned i;
        /* Bounded by the ops in flight, so this never trips in practice;
         * it keeps the doubling and the byte count from wrapping (2^26
         * records fit a 64-bit size_t many times; on 32 bits malloc says
         * no first). */
        if (ncap <= p->ovfcap || ncap > (1u << 26))
            return IOCP_ENOMEM;
        n = malloc((size_t)ncap * sizeof(*n));
        if (!n)
            return IOCP_ENOMEM;
        for (i = 0; i < p->ovflen; i++)
            n[i] = p->ovf[(p->ovfhead + i) % p->ovfcap];
        free(p->ovf);
        p->ovf = n;
        p->ovfcap = ncap;
        p->ovfhead = 0;
    }
    p->ovf[(p->ovfhead + p->ovflen) % p->ovfcap] = *c;
    p->ovflen++;
    return 0;
}

void iocp__deliver(iocp_port *p, iocp_op *op, int64_t result, int64_t error,
                   unsigned flags, char *data, uint32_t buf_id)
{
    iocp_completion c;

    /*
     * Silent sends, generically: a final, whole, error-free success is
     * flagged so the caller releases it without telling anyone.  Backends
     * may do better (post no packet, skip the CQE) and pass the flag
     * themselves; this makes it hold on every backend.
     */
    if ((op->flags & IOCP_OPF_SILENT) && op->kind == IOCP_OP_SEND &&
        !(flags & (IOCP_CF_MORE | IOCP_CF_CANCELLED)) && error == 0 &&
        result >= 0 && (uint64_t)result == (uint64_t)op->len)
        flags |= IOCP_CF_SILENT;
    if (flags & IOCP_CF_SILENT)
        p->qsilent++;
    c.op = op;
    c.result = result;
    c.error = error;
    c.flags = flags;
    c.data = data;
    c.buf_id = buf_id;
    if (!(flags & IOCP_CF_MORE) && op->inflight) {
        op->inflight = 0;
        op->prev->next = op->next;
        op->next->prev = op->prev;
        op->next = op->prev = NULL;
        p->inflight--;
    }
    if (p->ovflen == 0 && p->qlen < p->qcap) {
        p->q[(p->qhead + p->qlen) % p->qcap] = c;
        p->qlen++;
        if ((int64_t)p->qlen > p->queue_peak)
            p->queue_peak = p->qlen;
    } else if (iocp__overflow_push(p, &c) < 0) {
        /*
         * Dropping a completion would leak its op and pinned buffer and
         * break the no-loss promise; a malloc of a few KiB failing means
         * the process is already out of memory.  Stop loudly.
         */
        fprintf(stderr, "iocp: out of memory queueing a completion\n");
        abort();
    }
    p->delivered = 1;
}

/* Moves up to `max` completions out of the queue (lock held). */
int iocp__queue_pop(iocp_port *p, iocp_completion *out, int max)
{
    int n = 0;

    while (n < max && p->qlen > 0) {
        if (p->q[p->qhead].flags & IOCP_CF_SILENT)
            p->qsilent--;
        out[n++] = p->q[p->qhead];
        p->qhead = (p->qhead + 1) % p->qcap;
        p->qlen--;
    }
    /* Refill the ring from the overflow, oldest first. */
    while (p->ovflen > 0 && p->qlen < p->qcap) {
        p->q[(p->qhead + p->qlen) % p->qcap] = p->ovf[p->ovfhead];
        p->qlen++;
        p->ovfhead = (p->ovfhead + 1) % p->ovfcap;
        p->ovflen--;
    }
    p->completions += n;
    return n;
}
