"""Work that must not compete with a round's critical path: one low-priority thread.

Linux threads carry their own nice value, so a pool thread niced once stays low while
the rest of the process (downloads, aggregation, the Celery loop) keeps its priority.
On a busy machine the scheduler then gives the CPU to the federation's critical path
first; on an idle one nothing changes. Nice ranks threads within one scheduler
autogroup (one session, where autogrouping is on): processes sharing a host should
share a session (``LocalFederation`` does), or each takes an equal share whatever its
threads' nice values.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

NICE = 10


def lower_thread_priority() -> None:
    """Nice the calling thread only (not Linux, or not allowed: left as it is)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass


def low_priority_pool(name: str) -> ThreadPoolExecutor:
    """One niced worker thread, for work done in order in the background."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=lower_thread_priority
    )
