"""The access log: one line per inference request the ingress forwarded.

Each line, written when the request ends::

    2025-01-31T12:00:00.123Z add v1 OK 0.812 kserve_server-0-1234 req-7

time (UTC, when it ended), model, version, gRPC status name, milliseconds
from forwarding to answer, the worker's id and the request's id; ``-`` stands
for an empty field, and a field holding a space, a quote or a control
character is written as a JSON string, so a client's request id can't forge
a line.  The file is written through a buffer flushed every
``flush_interval`` seconds and on shutdown: a request costs one formatted
line, not a system call.  Rotate it with ``copytruncate`` (it is opened for
appending).

``-`` sends the lines to the twistd log instead, through twisted.logger
(namespace ``anyserve.access``), with its own timestamps.
"""
import json
import os
import re
import time

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: ``--access-log -``: the twistd log.
TO_LOG = "-"

#: Not a class attribute: a Logger read through an instance takes the class's
#: name as its namespace.
_to_twistd_log = Logger(namespace="anyserve.access")

_MAX_PARTS = 4096

_PLAIN = re.compile(r'[^\s"\\\x00-\x1f\x7f]+\Z')


def field(value):
    """``value`` as one space-free field of a line."""
    if value is None or value == "":
        return "-"
    if not isinstance(value, str):
        value = str(value)
    if _PLAIN.match(value):
        return value
    return json.dumps(value)


class AccessLog(Service):
    """Records requests to ``path_or_file``: a path (opened for appending
    when the service starts, closed when it stops), an open text file (left
    open), or ``"-"`` for the twistd log."""

    log = Logger()

    def __init__(self, path_or_file, clock, flush_interval=1.0):
        self.clock = clock
        self.flush_interval = flush_interval
        self.path = None
        self.file = None
        self.to_log = path_or_file == TO_LOG
        if isinstance(path_or_file, str):
            if not self.to_log:
                self.path = os.path.abspath(path_or_file)  # twistd may chdir later
        else:
            self.file = path_or_file
        self._flusher = None
        self._second = None
        self._stamp = ""
        self._parts = {}  # (name, version, code, worker id) -> formatted fields

    def startService(self):
        if self.path is not None:
            self.file = open(self.path, "a", buffering=1 << 16, encoding="utf-8")
        super().startService()
        if self.file is not None:
            self._flusher = LoopingCall(self.file.flush)
            self._flusher.clock = self.clock
            self._flusher.start(self.flush_interval, now=False).addErrback(
                lambda f: self.log.failure("flushing the access log", f))

    def stopService(self):
        super().stopService()
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        if self.file is not None:
            self.file.flush()
            if self.path is not None:
                self.file.close()
                self.file = None

    def record(self, name, version, code_name, seconds, worker_id, request_id):
        """One request for (name, version) ended with ``code_name`` after
        ``seconds``, answered (or not) by worker ``worker_id``."""
        if self.to_log:
            _to_twistd_log.info("{model} {version} {code} {ms:.3f} {worker} {request}",
                                model=field(name), version=field(version), code=code_name,
                                ms=seconds * 1000.0, worker=field(worker_id), request=field(request_id))
            return
        if self.file is None:
            return
        # All but the time, duration and request id repeat from request to
        # request: formatted once.
        key = (name, version, code_name, worker_id)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= _MAX_PARTS:  # worker ids change as workers restart
                self._parts.clear()
            parts = self._parts[key] = ("%s %s %s" % (field(name), field(version), code_name), field(worker_id))
        now = self.clock.seconds()
        second = int(now)
        if second != self._second:  # one strftime a second, not one a request
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self.file.write("%s.%03dZ %s %.3f %s %s\n" % (
            self._stamp, (now - second) * 1000.0, parts[0], seconds * 1000.0, parts[1],
            field(request_id) if request_id else "-"))
