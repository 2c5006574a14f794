"""Stand-in of modules/call_queue.py (v1.10.1): `queue_lock` serialises generations and checkpoint switches.

The real lock is a fifo_lock.FIFOLock (a Lock that wakes waiters in order); a
plain Lock behaves the same for one waiter.
"""
import threading
from functools import wraps

queue_lock = threading.Lock()


def wrap_queued_call(func):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f
