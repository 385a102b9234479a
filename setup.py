"""Build script: the Cython core `iocp._core` on top of the native library.

The native C code (src/native) is built first as a static library with its
own strict warning flags (build_clib), then linked into the extension, so
the generated Cython C is not held to -Wextra.  Platform sources are chosen
here (libuv's pattern): Windows gets win/thread.c and the IOCP backend,
Linux posix/thread.c, the io_uring backend and the epoll emulation, picked
at run time.

Environment knobs for developers (see the Makefile):
  IOCP_DEBUG=1   -O0 -g, assertions, Cython line tracing
  IOCP_ASAN=1    AddressSanitizer + UndefinedBehaviorSanitizer
  IOCP_LOCK_STATS=1  count port-mutex acquisitions (printed when a port is freed)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib as _build_clib
from setuptools.command.build_ext import build_ext as _build_ext

WINDOWS = sys.platform == "win32"
DEBUG = os.environ.get("IOCP_DEBUG") == "1"
ASAN = os.environ.get("IOCP_ASAN") == "1"
LOCK_STATS = os.environ.get("IOCP_LOCK_STATS") == "1"

COMMON_SOURCES = [
    "src/native/core.c",
    "src/native/pool.c",
    "src/native/queue.c",
    "src/native/addr.c",
]
if WINDOWS:
    COMMON_SOURCES.append("src/native/win/thread.c")
    BACKEND_SOURCES = ["src/native/win/iocp.c"]
    MACROS: list[tuple[str, str]] = [("WIN32_LEAN_AND_MEAN", "1"), ("_WIN32_WINNT", "0x0600")]
    SYSTEM_LIBS = ["ws2_32"]
else:
    COMMON_SOURCES.append("src/native/posix/thread.c")
    BACKEND_SOURCES = ["src/native/linux/sock.c", "src/native/linux/epoll.c"]
    MACROS = [("_GNU_SOURCE", "1")]
    if os.path.exists("src/native/linux/uring.c"):
        BACKEND_SOURCES += [
            "src/native/linux/uring.c",
            "src/native/linux/uring_ring.c",
            "src/native/linux/uring_probe.c",
            "src/native/linux/uring_buf.c",
        ]
        MACROS.append(("IOCP_WITH_URING", "1"))
    SYSTEM_LIBS = ["pthread"]
if LOCK_STATS:
    MACROS.append(("IOCP_LOCK_STATS", "1"))

if WINDOWS and "GCC" not in sys.version:
    NATIVE_CFLAGS = ["/W3"]
    EXT_CFLAGS: list[str] = []
    LINK_FLAGS: list[str] = []
else:
    NATIVE_CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden"]
    EXT_CFLAGS = []
    LINK_FLAGS = []
    if DEBUG or ASAN:
        dbg = ["-O0", "-g3", "-UNDEBUG"]
        NATIVE_CFLAGS += dbg
        EXT_CFLAGS += dbg
    else:
        NATIVE_CFLAGS += ["-O2"]
    if ASAN:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        NATIVE_CFLAGS += san
        EXT_CFLAGS += san
        LINK_FLAGS += san

native_lib = (
    "iocp_native",
    {
        "sources": COMMON_SOURCES + BACKEND_SOURCES,
        "macros": MACROS,
        "include_dirs": ["src/native"],
        "cflags": NATIVE_CFLAGS,
    },
)

# build_ext knows nothing of the static library it links: without these it
# keeps a stale iocp/_core*.so when only native C changed (a test then runs
# the old backend).  Every native source and header relinks the module.
NATIVE_DEPENDS = sorted(
    glob.glob("src/native/**/*.[ch]", recursive=True) + glob.glob("src/includes/*.pxd")
    + glob.glob("src/*.pxi")
)

core = Extension(
    "iocp._core",
    sources=["src/iocp_core.pyx"],
    depends=NATIVE_DEPENDS,
    include_dirs=["src/native", "src/includes"],
    define_macros=MACROS + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
    libraries=["iocp_native", *SYSTEM_LIBS],
    extra_compile_args=EXT_CFLAGS,
    extra_link_args=LINK_FLAGS,
)

extensions = [core]
if not WINDOWS and os.path.exists("src/native/bench/benchtools.c"):
    # Load generator and C echo server for `iocp bench`: shipped in the
    # wheel so benchmarks run without a compiler.
    extensions.append(
        Extension(
            "iocp._benchtools",
            sources=["src/native/bench/benchtools.c"],
            define_macros=[("_GNU_SOURCE", "1")],
            extra_compile_args=["-O2"],
            libraries=["pthread"],
        )
    )

# Objects built with other flags (an ASan or debug build) must never be
# linked into this one: setuptools tracks neither flags nor header
# dependencies, and build_clib ignores --force.
FLAVOR = "asan" if ASAN else "debug" if DEBUG else "release"
_STAMP = os.path.join("build", "iocp-flavor")
FLAVOR_CHANGED = not os.path.exists(_STAMP) or open(_STAMP).read() != FLAVOR


class build_clib(_build_clib):
    """Rebuilds the native library from scratch every time (a few seconds):
    a stale object compiled against an older header or other flags is a
    memory-corruption bug waiting to happen."""

    def build_libraries(self, libraries):  # type: ignore[no-untyped-def]
        shutil.rmtree(os.path.join(self.build_temp, "src", "native"), ignore_errors=True)
        super().build_libraries(libraries)


class build_ext(_build_ext):
    """Recompiles the extension when the build flavor changed."""

    def run(self) -> None:
        if FLAVOR_CHANGED:
            self.force = True
        super().run()
        os.makedirs("build", exist_ok=True)
        with open(_STAMP, "w") as f:
            f.write(FLAVOR)


directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update({"linetrace": True, "boundscheck": True})
else:
    directives.update({"boundscheck": False, "wraparound": False})

setup(
    cmdclass={"build_clib": build_clib, "build_ext": build_ext},
    libraries=[native_lib],
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["src/includes"],
    ),
)
