"""The process's open-file limit: raised to its hard limit at start, and how close it is now.

Every client connection and every upstream connection is a file descriptor.  The usual soft
limit (1024) is far below what one relay holds (thousands of streams, two sockets each), while
the hard limit is typically much higher: a server that can raise its own soft limit should.
"""

from __future__ import annotations

import os
import resource


def raise_open_files() -> tuple[int, int]:
    """Set the soft RLIMIT_NOFILE to the hard one (when allowed); the (soft, hard) in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_files() -> tuple[int | None, int]:
    """(descriptors open now, or None where /proc is not there; the soft limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        count: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        count = None
    return count, soft
