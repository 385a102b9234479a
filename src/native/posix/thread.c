/*
 * posix/thread.c -- the platform primitives the core needs, POSIX side
 * (win/thread.c is the Windows one; setup.py builds one of the two):
 * the port mutex and condition variable, a monotonic clock, the CPU count,
 * the process id, and the fork() watch that lets a child tell it is one.
 * Declared in iocp_internal.h.  Nothing here knows about ports.
 */
#include <time.h>
#include <unistd.h>

#include "iocp_internal.h"

void iocp__mutex_init(iocp__mutex *m) { pthread_mutex_init(m, NULL); }
void iocp__mutex_destroy(iocp__mutex *m) { pthread_mutex_destroy(m); }
void iocp__mutex_lock(iocp__mutex *m) { pthread_mutex_lock(m); }
void iocp__mutex_unlock(iocp__mutex *m) { pthread_mutex_unlock(m); }
int iocp__mutex_trylock(iocp__mutex *m) { return pthread_mutex_trylock(m) == 0; }

/* Timed waits measure a monotonic clock, so a wall-clock step (NTP, the
 * user setting the date) neither cuts a wait short nor stretches it. */
void iocp__cond_init(iocp__cond *c)
{
    pthread_condattr_t a;

    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

void iocp__cond_destroy(iocp__cond *c) { pthread_cond_destroy(c); }
void iocp__cond_broadcast(iocp__cond *c) { pthread_cond_broadcast(c); }

void iocp__cond_wait(iocp__cond *c, iocp__mutex *m, int timeout_ms)
{
    struct timespec ts;

    if (timeout_ms < 0) {
        pthread_cond_wait(c, m);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(c, m, &ts);
}

int64_t iocp__now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

unsigned iocp__cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n > 0 ? (unsigned)n : 1;
}

int64_t iocp__process_id(void) { return (int64_t)getpid(); }

/*
 * fork(): a pthread_atfork child handler bumps iocp__fork_gen (see
 * iocp__forked in iocp_internal.h), registered once, with the first port.
 */
static pthread_once_t iocp__atfork_once = PTHREAD_ONCE_INIT;
static int iocp__atfork_err;

static void iocp__atfork_child(void) { iocp__fork_gen++; }

static void iocp__atfork_register(void)
{
    iocp__atfork_err = pthread_atfork(NULL, NULL, iocp__atfork_child);
}

int iocp__fork_watch(void)
{
    pthread_once(&iocp__atfork_once, iocp__atfork_register);
    return iocp__atfork_err ? -iocp__atfork_err : 0;
}
