/*
 * uring_buf.c -- the provided-buffer ring receives pick from.
 *
 * What the kernel gives (5.19, IORING_REGISTER_PBUF_RING): a ring of
 * buffer descriptors in our memory.  A RECV with IOSQE_BUFFER_SELECT takes
 * a buffer from it only when data arrives, so an idle recv pins nothing;
 * the CQE says which buffer (its id), and the buffer is ours until we put
 * it back by writing its descriptor at the ring's tail.  With the ring
 * empty the kernel answers -ENOBUFS.
 *
 * Here: one group (id 0) of IOCP__PBUF_COUNT buffers of IOCP__PBUF_SIZE,
 * set up on the first receive that fits.  The memory is reserved, not
 * touched (MAP_NORESERVE), so it costs only what receives write.  Lock
 * held throughout (port lock).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "uring_internal.h"

#define IOCP__PBUF_RING_LEN (IOCP__PBUF_COUNT * sizeof(struct iocp__uring_buf))
#define IOCP__PBUF_MEM_LEN  ((size_t)IOCP__PBUF_COUNT * IOCP__PBUF_SIZE)

void iocp__pbuf_add(struct iocp__uring *u, unsigned bid)
{
    struct iocp__uring_buf *b = &u->pbuf_ring[u->pbuf_tail & (IOCP__PBUF_COUNT - 1)];

    b->addr = (uint64_t)(uintptr_t)iocp__pbuf_addr(u, bid);
    b->len = IOCP__PBUF_SIZE;
    b->bid = (uint16_t)bid;
    u->pbuf_tail++;
    /* The tail shares slot 0's last field; release so the kernel sees the
     * slot before the tail that covers it. */
    __atomic_store_n(&u->pbuf_ring[0].resv, u->pbuf_tail, __ATOMIC_RELEASE);
}

int iocp__pbuf_ready(struct iocp__uring *u)
{
    struct iocp__uring_buf_reg reg;
    void *ring, *mem;
    unsigned i;

    if (u->pbuf_state)
        return u->pbuf_state > 0;
    u->pbuf_state = -1;
    if (!(u->caps & IOCP__CAP_PBUF))
        return 0;
    ring = mmap(NULL, IOCP__PBUF_RING_LEN, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring == MAP_FAILED)
        return 0;
    mem = mmap(NULL, IOCP__PBUF_MEM_LEN, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        munmap(ring, IOCP__PBUF_RING_LEN);
        return 0;
    }
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)ring;
    reg.ring_entries = IOCP__PBUF_COUNT;
    reg.bgid = 0;
    if (iocp__sys_register(u->fd, IOCP__REGISTER_PBUF_RING, &reg, 1) < 0) {
        munmap(mem, IOCP__PBUF_MEM_LEN);
        munmap(ring, IOCP__PBUF_RING_LEN);
        return 0;
    }
    u->pbuf_ring = ring;
    u->pbuf_mem = mem;
    u->pbuf_tail = 0;
    for (i = 0; i < IOCP__PBUF_COUNT; i++)
        iocp__pbuf_add(u, i);
    u->pbuf_state = 1;
    return 1;
}

void iocp__pbuf_unregister(struct iocp__uring *u)
{
    struct iocp__uring_buf_reg reg;

    if (u->pbuf_state <= 0)
        return;
    memset(&reg, 0, sizeof(reg));
    reg.bgid = 0;
    (void)iocp__sys_register(u->fd, IOCP__UNREGISTER_PBUF_RING, &reg, 1);
}

void iocp__pbuf_free(struct iocp__uring *u)
{
    if (u->pbuf_state <= 0)
        return;
    munmap(u->pbuf_mem, IOCP__PBUF_MEM_LEN);
    munmap(u->pbuf_ring, IOCP__PBUF_RING_LEN);
    u->pbuf_state = 0;
}
