"""This process's peak memory, which the server logs in each round's summary and when it stops."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (its high-water mark), for the round summaries.

    Linux: ``VmHWM`` from ``/proc/self/status``. Not ``getrusage``: its ``ru_maxrss`` survives ``exec``, so a server
    started by a big process (a test runner, a benchmark) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kibibytes
