"""Worker processes started and restarted by the ingress.

Twisted's ProcessMonitor keeps the process table and stops workers (SIGTERM,
then SIGKILL after ``killTime``); this adds what the ingress needs on top:

- a private socket directory, and each worker told the management address
  by environment variables;
- a tie that makes every worker die with its ingress, and a status pipe on
  which it says when its script called ``app.run()`` and when its models
  were registered (:mod:`anyserve_tw.wire.supervision`);
- every exit logged with its exit code or signal, and a script that exits
  without ever calling ``app.run()`` named as such;
- a crash-loop back-off: a worker that exits before it has registered and
  run ``threshold`` seconds is restarted after a delay that doubles from
  ``minRestartDelay`` up to ``maxRestartDelay``; one that had a healthy run
  is restarted at once and its delay starts over (systemd's and Kubernetes'
  rule: a slow crash loop is still a crash loop);
- ``replace`` for a worker the ingress gave up on (evicted for silence);
- their output relayed to the log line by line, an over-long line cut
  (ProcessMonitor's relay closed the worker's stderr on one);
- a ``stopService`` that waits until every child has really exited
  (ProcessMonitor's own does not), then removes the sockets;
- a count of restarts for the metrics.
"""
import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from anyserve_tw.wire import defaults, supervision

#: Longest worker output line relayed whole, bytes (as ProcessMonitor's).
MAX_LINE = 16384


def describe_exit(reason):
    """``exited with code N`` or ``killed by SIGNAME`` for a process's end
    (ProcessDone or ProcessTerminated)."""
    sig = getattr(reason, "signal", None)
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "signal %d" % sig
        return "killed by %s" % name
    code = getattr(reason, "exitCode", None)
    return "exited with code %s" % ("?" if code is None else code)


class OutputLines:
    """Relays one output stream of a worker to the log, a line at a time.

    A line longer than ``max_line`` bytes is relayed cut at that length
    (ProcessMonitor's relay closed the pipe on one, so the worker died of
    EPIPE on its next log line and crash-looped).
    """

    def __init__(self, emit, max_line=MAX_LINE):
        self.emit = emit
        self.max_line = max_line
        self._line = b""
        self._cut = False  # the current line was relayed already, cut

    def feed(self, data):
        start = 0
        while start <= len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if not self._cut:
                self._line += data[start:end]
                if len(self._line) > self.max_line:
                    self._relay(self._line[:self.max_line] + b" [line cut]")
                    self._cut = True
            if newline < 0:
                return
            if not self._cut:
                self._relay(self._line)
            self._line, self._cut = b"", False
            start = newline + 1

    def flush(self):
        """The stream ended: relay what is left of its last line."""
        if self._line and not self._cut:
            self._relay(self._line)
        self._line, self._cut = b"", False

    def _relay(self, line):
        self.emit(line.decode("utf-8", "replace"))


class WorkerProcessProtocol(ProcessProtocol):
    """One worker process: relays its output lines, reads its status pipe."""

    pid = None
    called_run = False  # its script called app.run()
    registered = False  # its models were registered with this ingress

    def __init__(self, service, name):
        self.service = service
        self.name = name
        self._status = b""
        self._streams = {
            fd: OutputLines(lambda line, stream=stream: service.log.info(
                "[{tag}] {line}", tag=name, line=line, stream=stream))
            for fd, stream in ((1, "stdout"), (2, "stderr"))
        }

    def connectionMade(self):
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, fd, data):
        if fd in self._streams:
            self._streams[fd].feed(data)
        elif fd == supervision.STATUS_FD:
            self._status_received(data)

    def _status_received(self, data):
        *lines, self._status = (self._status + data).split(b"\n")
        if len(self._status) > supervision.MAX_STATUS_LINE:
            self._status = b""  # not our worker's writing; never buffer it
        for line in lines:
            if line == supervision.RUNNING:
                self.called_run = True
            elif line == supervision.REGISTERED:
                self.called_run = self.registered = True

    def processEnded(self, reason):
        for stream in self._streams.values():
            stream.flush()
        self.service.worker_exited(self, reason)


class WorkerSupervisor(ProcessMonitor):
    """Runs ``copies`` of each worker script, restarting any that exits."""

    #: A worker that ran this long and registered had a healthy run.
    threshold = 30
    #: First restart delay after an unhealthy run; doubles each time.
    minRestartDelay = 1
    #: Cap on the restart delay.
    maxRestartDelay = 60
    killTime = 10

    def __init__(self, reactor, scripts, copies, ingress_address, heartbeat_interval,
                 socket_dir=None, max_message_size=None, python=sys.executable, metrics=None,
                 environ=None):
        super().__init__(reactor)
        self.reactor = reactor
        self.scripts = list(scripts)
        self.copies = copies
        self.ingress_address = ingress_address
        self.heartbeat_interval = heartbeat_interval
        self.max_message_size = max_message_size
        self.python = python
        #: More environment for every worker (e.g. its management token).
        self.environ = dict(environ or {})
        self._socket_dir = socket_dir
        self.socket_dir = None
        #: :class:`~anyserve_tw.ingress.metrics.Metrics` told of each restart.
        self.metrics = metrics
        self._started = set()  # process names started since the service started
        self._stopping = set()  # names we sent SIGTERM: their exit is expected
        self._replacing = set()  # names stopped by replace(): counted as a crash

    def startService(self):
        self._add_processes()
        super().startService()

    def slots(self):
        """(process name, script) for each worker; names are unique even when
        two scripts share a file name."""
        used = set()
        for index, script in enumerate(self.scripts):
            base = os.path.splitext(os.path.basename(script))[0]
            if base in used:
                base = "%s.%d" % (base, index)
            used.add(base)
            for copy in range(self.copies):
                yield "%s-%d" % (base, copy), script

    def socket_path(self, name):
        """Where worker ``name`` listens."""
        return os.path.join(self.socket_dir, name + ".sock")

    def _add_processes(self):
        self.socket_dir = self._socket_dir or tempfile.mkdtemp(prefix="anyserve-")
        for name, script in self.slots():
            env = dict(os.environ)  # ProcessMonitor's default environment is empty
            env.update({
                defaults.ENV_INGRESS: self.ingress_address,
                defaults.ENV_SOCKET: self.socket_path(name),
                defaults.ENV_HEARTBEAT_INTERVAL: str(self.heartbeat_interval),
                defaults.ENV_SUPERVISED: "1",
                supervision.ENV_SUPERVISOR_PID: str(os.getpid()),
                supervision.ENV_LIFELINE_FD: str(supervision.LIFELINE_FD),
                supervision.ENV_STATUS_FD: str(supervision.STATUS_FD),
                "PYTHONUNBUFFERED": "1",
            })
            env.update(self.environ)
            if self.max_message_size:
                env[defaults.ENV_MAX_MESSAGE_SIZE] = str(self.max_message_size)
            env.pop(defaults.ENV_WORKER_ID, None)
            self.addProcess(name, [self.python, os.path.abspath(script)], env=env)

    def startProcess(self, name):
        """Start process ``name`` with its lifeline and status pipes; a second
        start (after it exited) counts as a restart."""
        if name in self.protocols or name not in self._processes:
            return
        if name in self._started and self.metrics is not None:
            self.metrics.worker_restarted(name)
        self._started.add(name)
        process = self._processes[name]
        proto = WorkerProcessProtocol(self, name)
        self.protocols[name] = proto
        self.timeStarted[name] = self._clock.seconds()
        try:
            self._reactor.spawnProcess(
                proto, process.args[0], process.args, uid=process.uid, gid=process.gid,
                env=process.env, path=process.cwd,
                # The lifeline is a pipe we write to and never do: the worker
                # reads end of file once this process is gone.
                childFDs={0: "w", 1: "r", 2: "r",
                          supervision.LIFELINE_FD: "w", supervision.STATUS_FD: "r"},
            )
        except OSError:
            self.worker_exited(proto, Failure())

    def stopProcess(self, name):
        """SIGTERM worker ``name`` (SIGKILL after ``killTime``); its exit is expected."""
        if name in self.protocols:
            self._stopping.add(name)
        super().stopProcess(name)

    def replace(self, worker_id, address, why):
        """Stop the supervised worker ``worker_id`` listening at ``address``
        (``unix://...``) so that it starts anew, its exit counted as a crash;
        False if it is not one of ours.

        Both must match (a supervised worker's id is ``<slot>-<pid>``), so a
        stranger registering under our worker's address or id cannot get
        our worker killed by going silent.
        """
        for name, proto in list(self.protocols.items()):
            if (worker_id == "%s-%s" % (name, proto.pid)
                    and address == defaults.UNIX_PREFIX + self.socket_path(name)):
                self.log.warn("replacing worker {name} (pid {pid}): {why}",
                              name=name, pid=proto.pid, why=why)
                self._replacing.add(name)
                self.stopProcess(name)
                return True
        return False

    def note_registered(self, worker_id):
        """The router registered a model of ``worker_id``: if that is one of
        ours (``<slot>-<pid>``), it counts as registered now, without
        waiting for its status report."""
        for name, proto in self.protocols.items():
            if worker_id == "%s-%s" % (name, proto.pid):
                proto.registered = True
                return

    def all_registered(self):
        """True when every worker is running and has registered its models."""
        return all(name in self.protocols and self.protocols[name].registered
                   for name in self._processes)

    def restart_delay(self, name, ran_for, healthy):
        """Seconds before worker ``name`` starts again, and the next delay.

        A healthy run restarts at once and resets the delay; any other exit
        waits the current delay, which then doubles up to the cap.
        """
        if healthy and ran_for >= self.threshold:
            self.delay[name] = self.minRestartDelay
            return 0
        delay = self.delay.get(name, self.minRestartDelay)
        self.delay[name] = min(delay * 2, self.maxRestartDelay)
        return delay

    def worker_exited(self, proto, reason):
        """Log how worker ``proto`` ended, and schedule its restart."""
        name = proto.name
        murder = self.murder.pop(name, None)
        if murder is not None and murder.active():
            murder.cancel()
        if self.protocols.get(name) is proto:
            del self.protocols[name]
        ran_for = self._clock.seconds() - self.timeStarted.get(name, self._clock.seconds())
        asked = name in self._stopping  # we sent SIGTERM
        replaced = name in self._replacing
        expected = asked and not replaced
        self._stopping.discard(name)
        self._replacing.discard(name)

        if not reason.check(error.ProcessDone, error.ProcessTerminated):
            self.log.failure("cannot start worker {name}", reason, name=name)
            how, pid = "did not start", "-"
        else:
            how, pid = describe_exit(reason.value), proto.pid
        if not proto.registered and not expected and how != "did not start":
            how += " before registering"
            if reason.check(error.ProcessDone) and not proto.called_run:
                how += ": does the script call app.run()?"
        if asked and reason.check(error.ProcessTerminated) and reason.value.signal == signal.SIGKILL:
            how += " (still running %gs after SIGTERM)" % self.killTime

        if not (self.running and name in self._processes):
            self.log.info("worker {name} (pid {pid}) {how}", name=name, pid=pid, how=how)
            return
        if expected:  # restartAll(): start again at once, no crash counted
            delay = 0
        else:
            delay = self.restart_delay(name, ran_for, proto.registered and not replaced)
        emit = self.log.info if expected else self.log.warn
        emit("worker {name} (pid {pid}) {how} (ran {ran:.1f}s; restarting {when})",
             name=name, pid=pid, how=how, ran=ran_for,
             when="in %gs" % delay if delay else "now")
        self.restart[name] = self._clock.callLater(delay, self.startProcess, name)

    def stopService(self):
        """SIGTERM every worker (SIGKILL after ``killTime``); fire when all have exited."""
        super().stopService()

        def check_exited():
            if not self.protocols:
                loop.stop()

        loop = LoopingCall(check_exited)
        loop.clock = self.reactor
        return loop.start(0.05, now=True).addCallback(self._remove_sockets)

    def _remove_sockets(self, _):
        if self._socket_dir is None and self.socket_dir:  # a temp dir of our own
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        elif self.socket_dir:
            for name in self._processes:
                path = self.socket_path(name)
                if os.path.exists(path):
                    os.unlink(path)
        for name in list(self._processes):  # all exited: a later start adds them anew
            self.removeProcess(name)
        self._started.clear()
