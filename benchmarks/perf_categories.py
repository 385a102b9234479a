"""Self CPU time per message of a `perf record` profile, by category.

    python benchmarks/perf_categories.py PERF_DATA MESSAGES

Kernel symbols are sorted into io_uring, epoll, scheduling, interrupts,
system-call entry and the TCP/IP stack by name; user time is split by
shared object.  With perf's cpu-clock event a sample's period is in
nanoseconds, so the figures are ns per message.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys

RULES = [
    ("io_uring", r"^(io_|__io_|io_uring|tctx_|__do_sys_io_uring)"),
    ("epoll", r"^(ep_|__ep_|do_epoll|__x64_sys_epoll|epoll)"),
    ("sched/wake", r"(schedule|switch|wake|enqueue|dequeue|pick_next|update_curr|"
                   r"select_task|ttwu|sched|idle|__cond_resched)"),
    ("irq/ipi", r"(irqentry|sysvec|ipi|irq_)"),
    ("syscall", r"(do_syscall|entry_SYSCALL|syscall_exit|__x64_sys|ksys_|vfs_|fget|fput|"
                r"fdget|sock_write_iter|sock_read_iter|rw_verify|security_)"),
    ("tcp/ip/skb", r"(tcp|ip_|inet|skb|sk_|sock|net|dev_|napi|bbr|copy_|_copy|csum|"
                   r"kmem|kfree|alloc|page|memcg|mod_|refill|check_object|check_heap|"
                   r"raw_spin|rcu|local_bh|softirq)"),
]


def main(argv: list[str]) -> int:
    """Prints ns per message by category for argv = [perf_data, messages]."""
    data, msgs = argv[0], float(argv[1])
    out = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "-q",
         "-g", "none", "-F", "period,dso,sym", "--stdio"],
        capture_output=True, text=True, check=True).stdout
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        period, dso, sym = int(parts[0]), parts[1], parts[2].split("] ", 1)[-1].strip()
        total += period
        if "kernel" not in dso:
            cats["user: " + dso.rsplit("/", 1)[-1].split(".")[0]] += period
            continue
        name = next((n for n, rx in RULES if re.search(rx, sym)), "other")
        cats["kernel: " + name] += period
    print(f"total {total / msgs:,.0f} ns/msg")
    for k, v in cats.most_common():
        print(f"  {k:28s} {v / msgs:9,.0f} ns/msg  {100 * v / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
