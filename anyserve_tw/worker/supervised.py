"""The worker's side of being supervised (:mod:`anyserve_tw.wire.supervision`).

A supervised worker must not outlive its ingress: an orphan keeps its memory
and socket and registers with whichever ingress next listens on the
management port, unsupervised.  Two mechanisms, because each covers what the
other cannot:

- the *lifeline* pipe, watched by a daemon thread: end of file whenever the
  ingress is gone, however it died, whatever sits between the two processes,
  and already at end of file if it died before the worker started watching
  (no fork/exec race);
- Linux's parent-death signal, set when the ingress is the direct parent: a
  SIGTERM from the kernel that needs no thread to be scheduled, for a worker
  whose lifeline was closed by a wrapper such as ``sudo``.

Either way the worker gets SIGTERM, so it stops as it always does (and dies
at once if the reactor is not running yet, before it could register); if it
has not exited :data:`~anyserve_tw.wire.supervision.ORPHAN_GRACE` seconds
after the lifeline broke (a handler stuck in a thread), it exits outright.
"""
import ctypes
import os
import signal
import stat
import threading
import time

from anyserve_tw.wire import supervision

#: prctl(2) option: signal this process when its parent thread exits.
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum):
    """Ask Linux to send ``signum`` when the parent exits; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False


def _pipe_fd(environ, name):
    """The pipe descriptor named by ``environ[name]``, made non-inheritable
    (a handler's subprocess must not hold it); None if absent or not a pipe."""
    try:
        fd = int(environ[name])
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        os.set_inheritable(fd, False)
        return fd
    except (KeyError, ValueError, OSError):
        return None


def _say(message):
    """One line on stderr, before logging starts or after its reader died."""
    try:
        os.write(2, ("anyserve worker %d: %s\n" % (os.getpid(), message)).encode())
    except OSError:
        pass


class Supervised:
    """A worker process's tie to the ingress that started it."""

    def __init__(self, supervisor_pid, lifeline_fd=None, status_fd=None,
                 grace=supervision.ORPHAN_GRACE, kill=os.kill, exit=os._exit, say=_say):
        self.supervisor_pid = supervisor_pid
        self.lifeline_fd = lifeline_fd
        self.status_fd = status_fd
        self.grace = grace
        self._kill = kill
        self._exit = exit
        self._say = say
        self.watcher = None

    @classmethod
    def from_environ(cls, environ, **kwargs):
        """The tie described by ``environ``, or None for a standalone worker."""
        try:
            pid = int(environ[supervision.ENV_SUPERVISOR_PID])
        except (KeyError, ValueError):
            return None
        return cls(pid, _pipe_fd(environ, supervision.ENV_LIFELINE_FD),
                   _pipe_fd(environ, supervision.ENV_STATUS_FD), **kwargs)

    def start(self):
        """Die with the ingress from now on; exit at once if it is already gone."""
        if os.getppid() == self.supervisor_pid:
            set_parent_death_signal(signal.SIGTERM)
            # The ingress may have died between our fork and the prctl, in
            # which case no signal will ever come: we have a new parent.
            if os.getppid() != self.supervisor_pid:
                return self._gone_at_start()
        if self.lifeline_fd is not None:
            self.watcher = threading.Thread(target=self._watch, name="anyserve-lifeline", daemon=True)
            self.watcher.start()
        elif os.getppid() != self.supervisor_pid:
            if not _alive(self.supervisor_pid):
                return self._gone_at_start()
            self._say("no lifeline from the ingress (pid %d) and it is not this worker's parent: "
                 "this worker will not notice if the ingress dies" % self.supervisor_pid)

    def _gone_at_start(self):
        self._say("the ingress that started this worker (pid %d) is gone: exiting" % self.supervisor_pid)
        self._exit(1)

    def _watch(self):
        while True:
            try:
                if not os.read(self.lifeline_fd, 512):
                    break  # end of file: nobody holds the write end any more
            except OSError:
                return  # not ours to watch after all
        self.lost()

    def lost(self):
        """The ingress is gone: stop as for SIGTERM, outright after the grace."""
        self._say("the ingress (pid %d) is gone: shutting down" % self.supervisor_pid)
        self._kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace)
        self._say("still running %gs after the ingress went: exiting now" % self.grace)
        self._exit(1)

    def report(self, status):
        """Tell the ingress ``status`` (a wire.supervision status line)."""
        if self.status_fd is None:
            return
        try:
            os.write(self.status_fd, status + b"\n")
        except OSError:
            pass  # the ingress is gone; the lifeline says so too


_tie = []  # this process's Supervised (or None), once looked for


def tie_to_supervisor(environ=None, **kwargs):
    """This process's tie to its supervising ingress, started on the first
    call (None for a standalone worker).  ``run()`` calls it first thing;
    calling it earlier (before a slow model load) is safe and covers more."""
    if not _tie:
        tie = Supervised.from_environ(os.environ if environ is None else environ, **kwargs)
        if tie is not None:
            tie.start()
        _tie.append(tie)
    return _tie[0]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
