/*
 * win/thread.c -- the platform primitives the core needs, Windows side
 * (posix/thread.c is the POSIX one; setup.py builds one of the two): an
 * SRW lock as the port mutex, a condition variable, a monotonic clock, the
 * CPU count and the process id.  Declared in iocp_internal.h.  Windows has
 * no fork(), so the fork watch has nothing to do.
 */
#include "iocp_internal.h"

void iocp__mutex_init(iocp__mutex *m) { InitializeSRWLock(m); }
void iocp__mutex_destroy(iocp__mutex *m) { (void)m; }
void iocp__mutex_lock(iocp__mutex *m) { AcquireSRWLockExclusive(m); }
void iocp__mutex_unlock(iocp__mutex *m) { ReleaseSRWLockExclusive(m); }
/* Only a fork() child tries the lock (iocp__port_forget), and Windows has
 * no fork(); "not taken" would leak rather than free, the safe answer.
 * (TryAcquireSRWLockExclusive is not declared for _WIN32_WINNT 0x0600.) */
int iocp__mutex_trylock(iocp__mutex *m) { (void)m; return 0; }

void iocp__cond_init(iocp__cond *c) { InitializeConditionVariable(c); }
void iocp__cond_destroy(iocp__cond *c) { (void)c; }
void iocp__cond_broadcast(iocp__cond *c) { WakeAllConditionVariable(c); }

void iocp__cond_wait(iocp__cond *c, iocp__mutex *m, int timeout_ms)
{
    SleepConditionVariableSRW(c, m, timeout_ms < 0 ? INFINITE : (DWORD)timeout_ms, 0);
}

/* GetTickCount64 is monotonic (not moved by clock changes), ms units. */
int64_t iocp__now_ms(void) { return (int64_t)GetTickCount64(); }

unsigned iocp__cpu_count(void)
{
    SYSTEM_INFO si;

    GetSystemInfo(&si);
    return si.dwNumberOfProcessors ? si.dwNumberOfProcessors : 1;
}

int64_t iocp__process_id(void) { return (int64_t)GetCurrentProcessId(); }

int iocp__fork_watch(void) { return 0; }
