"""Handler failures in the worker's log, paced per model.

A handler that raises is answered INTERNAL with its message, and its
traceback belongs in the worker's log (which a supervising ingress relays).
But a model failing on every request would write a traceback per request,
thousands a second: each model's traceback is logged at most once per
:data:`EVERY` seconds, and the next one says how many went unlogged.
"""
import threading
import time

from twisted.logger import Logger, LogLevel

#: Seconds between two tracebacks of the same model.
EVERY = 1.0


class FailureLog:
    """Logs failures by key (a model's name), at most one per ``every``
    seconds of ``clock`` per key.  Safe to call from handler threads."""

    log = Logger()

    def __init__(self, every=EVERY, clock=time.monotonic):
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        #: Key -> [when its last traceback was logged, failures since unlogged].
        self._keys = {}

    def failure(self, model, failure=None, what="failed"):
        """Log ``failure`` (default: the exception being handled) as model
        ``model``'s, unless one of its was logged less than ``every`` seconds
        ago; True if it was logged."""
        now = self.clock()
        with self._lock:
            state = self._keys.get(model)
            if state is not None and now - state[0] < self.every:
                state[1] += 1
                return False
            unlogged = state[1] if state is not None else 0
            self._keys[model] = [now, 0]
        more = (" (and %d more time(s) since its last traceback, not logged)" % unlogged
                if unlogged else "")
        self.log.failure("model {model} {what}{more}", failure, level=LogLevel.error,
                         model=model, what=what, more=more)
        return True
