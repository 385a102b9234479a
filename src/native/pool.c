/*
 * pool.c -- op records and port-owned receive buffers, reused instead of
 * allocated per operation.
 *
 * Op records live on free lists for the life of the port, so a server in
 * steady state submits millions of ops without touching malloc: one of
 * full records, one of short ones (no address or msghdr tail; an idle
 * connection's armed recv is one).  Receive
 * buffers (IOCP_OP_RECV, where the backend picks the memory only when data
 * arrives) come in power-of-two size classes from 128 B to 64 KiB with a
 * small free list per class; larger ones go straight to malloc.  Both pools
 * are protected by the port lock (none on a single-issuer port, whose
 * owner thread alone gets in: iocp__owner_check).  A batch's records and
 * buffers go back in one locked pass (iocp_port_release_batch in core.c
 * calls the _locked halves below).
 */
#include <stdlib.h>
#include <string.h>

#include "iocp_internal.h"

struct iocp__buf_hdr {
    struct iocp__buf_hdr *next;  /* free-list link while pooled */
    size_t cls;                  /* size class, or IOCP__BUF_CLASSES: malloc */
    union { long double ld; void *p; long long ll; } align[]; /* data */
};

static iocp_op *iocp__op_alloc(iocp_port *p, int short_record)
{
    iocp_op **free_list = short_record ? &p->free_short_ops : &p->free_ops;
    size_t size = short_record ? IOCP_OP_SHORT_SIZE : sizeof(iocp_op);
    iocp_op *op;

    if (iocp__forked(p) || iocp__owner_check(p) < 0)
        return NULL;
    iocp__lock(p);
    op = *free_list;
    if (op) {
        *free_list = op->next;
    }
    p->live_ops++;
    iocp__unlock(p);
    if (!op) {
        op = malloc(size);
        if (!op) {
            iocp__lock(p);
            p->live_ops--;
            iocp__unlock(p);
            return NULL;
        }
    }
    memset(op, 0, size);
    op->sock = IOCP_INVALID_SOCKET;
    op->aux_sock = IOCP_INVALID_SOCKET;
    op->short_record = (unsigned char)short_record;
    return op;
}

iocp_op *iocp_op_alloc(iocp_port *p)
{
    return iocp__op_alloc(p, 0);
}

iocp_op *iocp_op_alloc_short(iocp_port *p)
{
    return iocp__op_alloc(p, 1);
}

void iocp__op_free_locked(iocp_port *p, iocp_op *op)
{
    iocp_op **free_list = op->short_record ? &p->free_short_ops : &p->free_ops;

    op->next = *free_list;
    *free_list = op;
    p->live_ops--;
}

void iocp_op_free(iocp_port *p, iocp_op *op)
{
    if (!op || iocp__owner_check(p) < 0)
        return;
    iocp__lock(p);
    iocp__op_free_locked(p, op);
    iocp__unlock(p);
}

void iocp__pool_destroy(iocp_port *p)
{
    int i;

    while (p->free_ops) {
        iocp_op *op = p->free_ops;
        p->free_ops = op->next;
        free(op);
    }
    while (p->free_short_ops) {
        iocp_op *op = p->free_short_ops;
        p->free_short_ops = op->next;
        free(op);
    }
    for (i = 0; i < IOCP__BUF_CLASSES; i++) {
        while (p->free_bufs[i]) {
            struct iocp__buf_hdr *h = p->free_bufs[i];
            p->free_bufs[i] = h->next;
            free(h);
        }
        p->free_buf_count[i] = 0;
    }
}

static size_t iocp__buf_class(size_t size)
{
    size_t cls = 0;

    while (cls < IOCP__BUF_CLASSES && ((size_t)1 << (cls + IOCP__BUF_MIN_SHIFT)) < size)
        cls++;
    return cls;
}

char *iocp__buffer_get(iocp_port *p, size_t size)
{
    size_t cls = iocp__buf_class(size);
    struct iocp__buf_hdr *h = NULL;

    if (cls < IOCP__BUF_CLASSES) {
        h = p->free_bufs[cls];
        if (h) {
            p->free_bufs[cls] = h->next;
            p->free_buf_count[cls]--;
        } else {
            h = malloc(sizeof(*h) + ((size_t)1 << (cls + IOCP__BUF_MIN_SHIFT)));
        }
    } else {
        h = malloc(sizeof(*h) + size);
    }
    if (!h)
        return NULL;
    h->cls = cls;
    p->live_buffers++;
    return (char *)h->align;
}

void iocp__buffer_put(iocp_port *p, char *data)
{
    struct iocp__buf_hdr *h;

    if (!data)
        return;
    h = (struct iocp__buf_hdr *)(data - offsetof(struct iocp__buf_hdr, align));
    p->live_buffers--;
    if (h->cls < IOCP__BUF_CLASSES && p->free_buf_count[h->cls] < IOCP__BUF_KEEP) {
        h->next = p->free_bufs[h->cls];
        p->free_bufs[h->cls] = h;
        p->free_buf_count[h->cls]++;
    } else {
        free(h);
    }
}

void iocp__buffer_release_locked(iocp_port *p, char *data, uint32_t buf_id)
{
    if (buf_id != 0 && p->backend->release_buffer) {
        p->live_buffers--;
        p->backend->release_buffer(p, data, buf_id);
    }
    else
        iocp__buffer_put(p, data);
}

void iocp_buffer_release(iocp_port *p, char *data, uint32_t buf_id)
{
    if (iocp__owner_check(p) < 0)
        return;
    iocp__lock(p);
    iocp__buffer_release_locked(p, data, buf_id);
    iocp__unlock(p);
}
