/*
 * uring_buf.c -- the provided-buffer groups receives pick from.
 *
 * What the kernel gives (5.19, IORING_REGISTER_PBUF_RING): a ring of
 * buffer descriptors in our memory, one ring per buffer group id.  A RECV
 * with IOSQE_BUFFER_SELECT takes a buffer from its group only when data
 * arrives, so an idle recv (single-shot or multishot) pins nothing; the
 * CQE says which buffer, and the buffer is ours until we put it back by
 * writing its descriptor at the ring's tail.  With the ring empty the
 * kernel answers -ENOBUFS (and a multishot recv stops).
 *
 * Here: three groups, set up on first use.  Group 0 holds 4 KiB buffers
 * (recvs of up to 4 KiB), group 1 64 KiB buffers (recvs up to 64 KiB;
 * larger recvs use the port pool), group 2 512 B buffers.  A multishot
 * recv starts on the 512 B group and climbs to the 4 KiB and 64 KiB ones
 * as its socket's arrivals fill buffers (uring.c's iocp__ms_follow moves
 * a socket along that ladder, both ways): small messages cost a small
 * buffer each.  That is what bounds the pool when thousands of mostly
 * idle connections each get a short message at once (every arrival
 * holds its own buffer until the caller has taken it).  Each starts small and grows with load:
 * uring.c calls iocp__bg_grow when a shortage lasts (-ENOBUFS over many
 * reaps, or callers keeping most of a group), and a group doubles until
 * all groups together reach the
 * port's bound (iocp_port_options.recv_pool_max, default 64 MiB; each
 * group may always have one chunk, 64 KiB, whatever the bound).  A group
 * never shrinks: ids handed out must stay valid, and the memory is
 * reserved with MAP_NORESERVE, so it costs only the pages receives have
 * written.  Growth maps one new region per step and addresses buffers
 * through a chunk table (64 KiB per chunk), so ids stay dense and an
 * address costs a shift and an index.  The kernel ring is sized once for
 * every id the group may ever have, so a put never overflows it.
 *
 * Lock: the port lock throughout.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "uring_internal.h"

#define IOCP__BG_RING_MAX 32768u   /* the kernel's largest buffer ring */
#define IOCP__CHUNK_SHIFT 16       /* 64 KiB of buffers per chunk */

/* Buffers a group starts with (then it doubles). */
static unsigned iocp__bg_initial(int g)
{
    /* 1 MiB each; 128 KiB for the 512 B group */
    return g == IOCP__BG_LARGE ? 16u : 256u;
}

void iocp__bg_put(struct iocp__uring *u, int g, unsigned bid)
{
    struct iocp__bgroup *b = &u->bg[g];
    struct iocp__uring_buf *d = &b->ring[b->tail & (b->entries - 1)];

    d->addr = (uint64_t)(uintptr_t)iocp__bg_addr(u, g, bid);
    d->len = iocp__bg_size(b);
    d->bid = (uint16_t)bid;
    b->tail++;
    /* The tail shares slot 0's last field; release so the kernel sees the
     * slot before the tail that covers it. */
    __atomic_store_n(&b->ring[0].resv, b->tail, __ATOMIC_RELEASE);
}

unsigned iocp__bg_grow(struct iocp__uring *u, int g)
{
    struct iocp__bgroup *b = &u->bg[g];
    unsigned add, i, per_chunk = 1u << b->chunk_shift;
    size_t left;
    char *mem;

    if (b->state <= 0)
        return 0;
    add = b->nbufs ? b->nbufs : iocp__bg_initial(g);
    if (add > b->max_bufs - b->nbufs)
        add = b->max_bufs - b->nbufs;
    left = u->pool_max > u->pool_bytes ? (u->pool_max - u->pool_bytes) >> b->shift : 0;
    if (add > left)
        add = (unsigned)left;
    add &= ~(per_chunk - 1);
    if (add == 0 && b->nbufs == 0)
        add = per_chunk;             /* every group may have one chunk */
    if (add == 0)
        return 0;
    mem = mmap(NULL, (size_t)add << b->shift, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        return 0;
    for (i = 0; i < add / per_chunk; i++)
        b->chunks[(b->nbufs >> b->chunk_shift) + i] = mem + ((size_t)i << IOCP__CHUNK_SHIFT);
    for (i = 0; i < add; i++)
        iocp__bg_put(u, g, b->nbufs + i);
    b->nbufs += add;
    u->pool_bytes += (size_t)add << b->shift;
    u->n_grows++;
    return add;
}

static void iocp__bg_unregister_one(struct iocp__uring *u, int g)
{
    struct iocp__uring_buf_reg reg;

    memset(&reg, 0, sizeof(reg));
    reg.bgid = (uint16_t)g;
    (void)iocp__sys_register(u->fd, IOCP__UNREGISTER_PBUF_RING, &reg, 1);
}

/* Registers group g's ring and makes its first buffers; 1 if usable. */
static int iocp__bg_setup(struct iocp__uring *u, int g)
{
    struct iocp__bgroup *b = &u->bg[g];
    struct iocp__uring_buf_reg reg;
    size_t max_bufs;
    unsigned entries = 1;
    void *ring;

    b->state = -1;
    if (!(u->caps & IOCP__CAP_PBUF))
        return 0;
    b->shift = g == IOCP__BG_SMALL   ? IOCP__BG_SMALL_SHIFT
               : g == IOCP__BG_TINY  ? IOCP__BG_TINY_SHIFT
                                     : IOCP__BG_LARGE_SHIFT;
    b->chunk_shift = IOCP__CHUNK_SHIFT - b->shift;
    max_bufs = u->pool_max >> b->shift;
    if (max_bufs > IOCP__BG_RING_MAX)
        max_bufs = IOCP__BG_RING_MAX;
    max_bufs &= ~(((size_t)1 << b->chunk_shift) - 1);
    if (max_bufs == 0)
        max_bufs = (size_t)1 << b->chunk_shift;
    while (entries < max_bufs)
        entries <<= 1;
    b->max_bufs = (unsigned)max_bufs;
    b->entries = entries;
    b->chunks = calloc(max_bufs >> b->chunk_shift, sizeof(*b->chunks));
    if (!b->chunks)
        return 0;
    ring = mmap(NULL, entries * sizeof(struct iocp__uring_buf), PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring == MAP_FAILED)
        goto fail;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)ring;
    reg.ring_entries = entries;
    reg.bgid = (uint16_t)g;
    if (iocp__sys_register(u->fd, IOCP__REGISTER_PBUF_RING, &reg, 1) < 0) {
        munmap(ring, entries * sizeof(struct iocp__uring_buf));
        goto fail;
    }
    b->ring = ring;
    b->tail = 0;
    b->state = 1;
    if (iocp__bg_grow(u, g) == 0) {
        /* Registered but empty: a recv would only ever get -ENOBUFS. */
        iocp__bg_unregister_one(u, g);
        munmap(b->ring, entries * sizeof(struct iocp__uring_buf));
        b->ring = NULL;
        goto fail;
    }
    return 1;

fail:
    free(b->chunks);
    b->chunks = NULL;
    b->state = -1;
    return 0;
}

int iocp__bg_pick(struct iocp__uring *u, size_t len)
{
    int g;

    if (len <= ((size_t)1 << IOCP__BG_SMALL_SHIFT))
        g = IOCP__BG_SMALL;
    else if (len <= ((size_t)1 << IOCP__BG_LARGE_SHIFT))
        g = IOCP__BG_LARGE;
    else
        return -1;
    if (u->bg[g].state == 0)
        (void)iocp__bg_setup(u, g);
    return u->bg[g].state > 0 ? g : -1;
}

int iocp__bg_tiny(struct iocp__uring *u)
{
    if (u->bg[IOCP__BG_TINY].state == 0)
        (void)iocp__bg_setup(u, IOCP__BG_TINY);
    return u->bg[IOCP__BG_TINY].state > 0 ? IOCP__BG_TINY : -1;
}

void iocp__bg_unregister(struct iocp__uring *u)
{
    int g;

    for (g = 0; g < IOCP__BG_COUNT; g++) {
        if (u->bg[g].state > 0)
            iocp__bg_unregister_one(u, g);
    }
}

void iocp__bg_free(struct iocp__uring *u)
{
    int g;
    unsigned k;

    for (g = 0; g < IOCP__BG_COUNT; g++) {
        struct iocp__bgroup *b = &u->bg[g];
        if (b->state <= 0)
            continue;
        for (k = 0; k < (b->nbufs >> b->chunk_shift); k++)
            munmap(b->chunks[k], (size_t)1 << IOCP__CHUNK_SHIFT);
        munmap(b->ring, b->entries * sizeof(struct iocp__uring_buf));
        free(b->chunks);
        memset(b, 0, sizeof(*b));
    }
}
