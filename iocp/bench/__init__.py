"""`iocp bench`: iocp side by side with asyncio, uvloop, threads and plain C.

    pip install '.[bench]' && iocp bench --quick

The load generator and the C echo server are native (iocp._benchtools,
Linux); every server under test runs in its own process.  See
benchmarks/README.md.
"""
