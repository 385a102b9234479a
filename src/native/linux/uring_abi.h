/*
 * uring_abi.h -- the io_uring kernel ABI (include/uapi/linux/io_uring.h),
 * declared under our own names.
 *
 * Why our own copy: wheels are built on old manylinux images whose kernel
 * headers predate most of these records and flags, and the backend must
 * build with no liburing.  Only what the backend uses is declared; layouts
 * are the kernel's and never change (the kernel extends them only at the
 * end or in reserved fields).  Nothing here has behaviour: the ring lives
 * in uring_ring.c, the probes in uring_probe.c.
 */
#ifndef IOCP_URING_ABI_H
#define IOCP_URING_ABI_H

#include <stdint.h>
#include <sys/syscall.h>

#ifndef __NR_io_uring_setup
#  define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#  define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#  define __NR_io_uring_register 427
#endif

/* One submission record (struct io_uring_sqe, 64 bytes). */
typedef struct iocp__uring_sqe {
    uint8_t opcode;
    uint8_t flags;          /* IOCP__SQE_* */
    uint16_t ioprio;        /* accept/recv: multishot bits */
    int32_t fd;
    uint64_t off;           /* connect: addrlen; accept: &addrlen */
    uint64_t addr;          /* buffer / sockaddr; cancel: target user_data */
    uint32_t len;
    uint32_t op_flags;      /* msg_flags, accept_flags, cancel_flags, poll32 */
    uint64_t user_data;
    uint16_t buf_group;
    uint16_t personality;
    uint32_t file_index;
    uint64_t addr3;
    uint64_t pad2;
} iocp__uring_sqe;

/* One completion record (struct io_uring_cqe, 16 bytes). */
typedef struct iocp__uring_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;         /* IOCP__CQE_F_* */
} iocp__uring_cqe;

struct iocp__uring_sq_offsets {
    uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
    uint64_t user_addr;
};

struct iocp__uring_cq_offsets {
    uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
    uint64_t user_addr;
};

struct iocp__uring_params {
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle;
    uint32_t features, wq_fd, resv[3];
    struct iocp__uring_sq_offsets sq_off;
    struct iocp__uring_cq_offsets cq_off;
};

/* io_uring_enter(IORING_ENTER_EXT_ARG) argument. */
struct iocp__uring_getevents_arg {
    uint64_t sigmask;
    uint32_t sigmask_sz;
    uint32_t pad;
    uint64_t ts;
};

/* struct __kernel_timespec */
struct iocp__uring_ts {
    int64_t tv_sec;
    long long tv_nsec;
};

struct iocp__uring_probe_op {
    uint8_t op, resv;
    uint16_t flags;
    uint32_t resv2;
};

struct iocp__uring_probe {
    uint8_t last_op, ops_len;
    uint16_t resv;
    uint32_t resv2[3];
    struct iocp__uring_probe_op ops[256];
};

/* One provided-buffer ring slot (struct io_uring_buf). */
struct iocp__uring_buf {
    uint64_t addr;
    uint32_t len;
    uint16_t bid;
    uint16_t resv;                /* slot 0: the ring tail lives here */
};

/* IORING_REGISTER_PBUF_RING argument (struct io_uring_buf_reg). */
struct iocp__uring_buf_reg {
    uint64_t ring_addr;
    uint32_t ring_entries;
    uint16_t bgid;
    uint16_t flags;
    uint64_t resv[3];
};

/* Opcodes (enum io_uring_op). */
enum {
    IOCP__OP_NOP = 0, IOCP__OP_POLL_ADD = 6, IOCP__OP_POLL_REMOVE = 7,
    IOCP__OP_SENDMSG = 9, IOCP__OP_TIMEOUT = 11, IOCP__OP_TIMEOUT_REMOVE = 12,
    IOCP__OP_ACCEPT = 13, IOCP__OP_ASYNC_CANCEL = 14, IOCP__OP_CONNECT = 16,
    IOCP__OP_SEND = 26, IOCP__OP_RECV = 27
};

/* io_uring_setup flags. */
#define IOCP__SETUP_CQSIZE      (1u << 3)
#define IOCP__SETUP_CLAMP       (1u << 4)
#define IOCP__SETUP_SUBMIT_ALL  (1u << 7)
#define IOCP__SETUP_R_DISABLED  (1u << 6)   /* until REGISTER_ENABLE_RINGS */
#define IOCP__SETUP_COOP_TASKRUN (1u << 8)  /* task work without an IPI */
#define IOCP__SETUP_TASKRUN_FLAG (1u << 9)  /* ... flagged in sq flags */
#define IOCP__SETUP_SINGLE_ISSUER (1u << 12)
#define IOCP__SETUP_DEFER_TASKRUN (1u << 13) /* task work only in GETEVENTS */

/* io_uring_params.features. */
#define IOCP__FEAT_SINGLE_MMAP  (1u << 0)
#define IOCP__FEAT_NODROP       (1u << 1)
#define IOCP__FEAT_FAST_POLL    (1u << 5)
#define IOCP__FEAT_EXT_ARG      (1u << 8)
#define IOCP__FEAT_CQE_SKIP     (1u << 11)  /* IOSQE_CQE_SKIP_SUCCESS works */

/* io_uring_enter flags. */
#define IOCP__ENTER_GETEVENTS   (1u << 0)
#define IOCP__ENTER_EXT_ARG     (1u << 3)
#define IOCP__ENTER_REGISTERED_RING (1u << 4) /* fd is a registered index */

/* sq_ring flags. */
#define IOCP__SQ_CQ_OVERFLOW    (1u << 1)
#define IOCP__SQ_TASKRUN        (1u << 2)   /* task work waits for an enter */

/* sqe->flags (IOSQE_*). */
#define IOCP__SQE_IO_LINK       (1u << 2)
#define IOCP__SQE_BUFFER_SELECT (1u << 5)
#define IOCP__SQE_CQE_SKIP      (1u << 6)   /* IOSQE_CQE_SKIP_SUCCESS */

/* cqe->flags. */
#define IOCP__CQE_F_BUFFER      (1u << 0)
#define IOCP__CQE_F_MORE        (1u << 1)
#define IOCP__CQE_BUFFER_SHIFT  16

/* sqe->ioprio for accept and recv; sqe->op_flags for cancel. */
#define IOCP__ACCEPT_MULTISHOT  (1u << 0)
#define IOCP__RECV_MULTISHOT    (1u << 1)
#define IOCP__CANCEL_ALL        (1u << 0)
#define IOCP__CANCEL_FD         (1u << 1)
#define IOCP__POLL_ADD_MULTI    (1u << 0)   /* sqe->len of POLL_ADD */

/* mmap offsets of the rings. */
#define IOCP__OFF_SQ_RING       0ULL
#define IOCP__OFF_CQ_RING       0x8000000ULL
#define IOCP__OFF_SQES          0x10000000ULL

/* io_uring_register opcodes. */
#define IOCP__REGISTER_PROBE          8
#define IOCP__REGISTER_PBUF_RING      22
#define IOCP__UNREGISTER_PBUF_RING    23
#define IOCP__PROBE_OP_SUPPORTED      (1u << 0)
#define IOCP__REGISTER_ENABLE_RINGS   12
#define IOCP__REGISTER_RING_FDS       20
#define IOCP__UNREGISTER_RING_FDS     21

/* IORING_(UN)REGISTER_RING_FDS argument (struct io_uring_rsrc_update). */
struct iocp__uring_rsrc_update {
    uint32_t offset;              /* registered index; ~0 = any free one */
    uint32_t resv;
    uint64_t data;                /* the ring fd */
};

#endif /* IOCP_URING_ABI_H */
