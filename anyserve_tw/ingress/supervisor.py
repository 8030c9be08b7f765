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
- a count of restarts for the metrics;
- *recycling* (``max_requests``, ``max_rss_mb``): a worker past either
  limit is replaced without losing a request: its replacement starts first
  (on a socket of its own), and only once it has registered every model is
  the old one drained (the router stops routing to it) and sent SIGTERM,
  upon which it withdraws, finishes what it has in flight and exits;
- the interpreter each worker runs under (``python``: a path, or
  :data:`SHEBANG` for each script's own ``#!`` line), with a clear log line
  when it cannot import anyserve_tw;
- each worker's math-library threads (OMP_NUM_THREADS and its kin) sized so
  that the workers together do not oversubscribe the cores, and its GPU
  (CUDA_VISIBLE_DEVICES) given round-robin from ``gpus``.
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

#: ``python`` value: run each executable script by its own ``#!`` line.
SHEBANG = "shebang"

#: What a worker prints when its interpreter lacks the SDK.
NO_SDK = "No module named 'anyserve_tw'"

#: The variables the math libraries read for their thread count: OpenMP
#: (and so torch's intra-op pool), MKL, OpenBLAS, numexpr, Apple Accelerate.
MATH_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def available_cores():
    """The cores this process may use: its CPU affinity (taskset, cpusets),
    lowered by a cgroup v2 CPU quota (a container's ``--cpus``), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resident_bytes(pid):
    """Resident memory of process ``pid`` from /proc/<pid>/statm, or None
    if it cannot be read (gone, or not Linux)."""
    try:
        with open("/proc/%d/statm" % pid, "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def shebang_of(script):
    """The ``#!`` line of ``script`` (without ``#!``) if it is executable
    and has one, else None."""
    if not os.access(script, os.X_OK):
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    return first[2:].strip().decode("utf-8", "replace") or None


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
    worker_id = None  # the id it registers under: <socket name>-<pid>
    called_run = False  # its script called app.run()
    registered = False  # its models were registered with this ingress
    reported = False  # it reported every model registered (status pipe)
    missing_sdk = False  # its interpreter said it has no anyserve_tw
    retired = False  # recycled: drained and sent SIGTERM

    def __init__(self, service, name, socket=None, interpreter=None):
        self.service = service
        self.name = name
        self.socket = socket
        self.interpreter = interpreter
        self.started = None
        self._status = b""
        self._streams = {
            fd: OutputLines(lambda line, stream=stream: self._output(line, stream))
            for fd, stream in ((1, "stdout"), (2, "stderr"))
        }

    def _output(self, line, stream):
        if NO_SDK in line:
            self.missing_sdk = True
        self.service.log.info("[{tag}] {line}", tag=self.name, line=line, stream=stream)

    def connectionMade(self):
        self.pid = getattr(self.transport, "pid", None)
        if self.socket is not None:
            self.worker_id = "%s-%s" % (os.path.splitext(os.path.basename(self.socket))[0], self.pid)

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
                self.called_run = self.registered = self.reported = True
                self.service.worker_registered(self)

    def processEnded(self, reason):
        for stream in self._streams.values():
            stream.flush()
        self.service.worker_exited(self, reason)


class WorkerSupervisor(ProcessMonitor):
    """Runs ``copies`` of each worker script, restarting any that exits.

    ``python``: the interpreter of every worker, or :data:`SHEBANG`;
    ``max_requests``, ``max_rss_mb``: recycling limits (0: none), checked
    every ``check_interval`` seconds (and the request limit also when the
    router reports it through :meth:`request_limit`); ``math_threads``:
    each worker's math-library threads (0: the available cores divided by
    the number of workers, and only where the operator's environment does
    not set them); ``gpus``: device ids handed out round-robin as
    CUDA_VISIBLE_DEVICES (empty: left as inherited).

    ``drain(worker_id)`` and ``requests_served(worker_id)``, set by the
    service tree to the router's, are what recycling asks of the router.
    """

    #: A worker that ran this long and registered had a healthy run.
    threshold = 30
    #: First restart delay after an unhealthy run; doubles each time.
    minRestartDelay = 1
    #: Cap on the restart delay.
    maxRestartDelay = 60
    killTime = 10
    #: Seconds a recycled worker's replacement gets to register.
    replacement_timeout = 60

    def __init__(self, reactor, scripts, copies, ingress_address, heartbeat_interval,
                 socket_dir=None, max_message_size=None, python=sys.executable, metrics=None,
                 environ=None, max_requests=0, max_rss_mb=0, check_interval=1.0,
                 math_threads=0, gpus=(), cores=None):
        super().__init__(reactor)
        self.reactor = reactor
        self.scripts = list(scripts)
        self.copies = copies
        self.ingress_address = ingress_address
        self.heartbeat_interval = heartbeat_interval
        self.max_message_size = max_message_size
        self.python = python or sys.executable
        self.max_requests = max_requests
        self.max_rss_mb = max_rss_mb
        self.check_interval = check_interval
        self.math_threads = math_threads
        self.gpus = [str(g) for g in gpus]
        self.cores = cores
        #: The router's ``drain(worker_id)`` and ``requests_served(worker_id)``.
        self.drain = None
        self.requests_served = None
        #: More environment for every worker (e.g. its management token).
        self.environ = dict(environ or {})
        self._socket_dir = socket_dir
        self.socket_dir = None
        #: :class:`~anyserve_tw.ingress.metrics.Metrics` told of each restart.
        self.metrics = metrics
        self._started = set()  # process names started since the service started
        self._stopping = set()  # names we sent SIGTERM: their exit is expected
        self._replacing = set()  # names stopped by replace(): counted as a crash
        self._retiring = {}  # name -> the proto being recycled, while its replacement starts
        self._retired = {}  # recycled proto, drained and sent SIGTERM -> its delayed SIGKILL
        self._recycle_after = {}  # name -> no recycling before (after a failed one)
        self._generation = {}  # name -> how many times it was recycled (its socket's suffix)
        self._sockets = set()  # every socket path handed out
        self._interpreters = {}  # name -> what runs its script, for log lines
        self._checker = None

    def startService(self):
        self._add_processes()
        super().startService()
        if self.max_requests or self.max_rss_mb:
            self._checker = LoopingCall(self.check_limits)
            self._checker.clock = self.reactor
            self._checker.start(self.check_interval, now=False).addErrback(
                lambda f: self.log.failure("worker limit check stopped", f))

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

    def socket_path(self, name, generation=0):
        """Where worker ``name`` listens; a recycled worker's replacement
        (``generation`` 1, 2, ...) gets a path of its own, since the one it
        replaces still listens while it starts."""
        if generation:
            name = "%s-r%d" % (name, generation)
        return os.path.join(self.socket_dir, name + ".sock")

    def command(self, script):
        """(argv, interpreter for log lines) that run ``script``."""
        script = os.path.abspath(script)
        if self.python == SHEBANG:
            line = shebang_of(script)
            if line is not None:
                return [script], line
            return [sys.executable, script], sys.executable
        return [self.python, script], self.python

    def math_thread_count(self):
        """Math-library threads per worker: ``math_threads`` if set, else the
        available cores shared among every worker, at least 1."""
        if self.math_threads:
            return self.math_threads
        workers = max(1, self.copies * len(self.scripts))
        cores = self.cores or available_cores()
        return max(1, cores // workers)

    def _math_environment(self, threads):
        """The math-thread variables to set: all of them when ``math_threads``
        was given, else those the operator's environment leaves unset."""
        return {var: str(threads) for var in MATH_THREAD_VARIABLES
                if self.math_threads or var not in os.environ}

    def _add_processes(self):
        self.socket_dir = self._socket_dir or tempfile.mkdtemp(prefix="anyserve-")
        threads = self.math_thread_count()
        math_env = self._math_environment(threads)
        if math_env:
            self.log.info("each worker gets {threads} math-library threads ({variables})",
                          threads=threads, variables=", ".join(sorted(math_env)))
        for index, (name, script) in enumerate(self.slots()):
            env = dict(os.environ)  # ProcessMonitor's default environment is empty
            env.update(math_env)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[index % len(self.gpus)]
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
            args, self._interpreters[name] = self.command(script)
            self.addProcess(name, args, env=env)

    def startProcess(self, name):
        """Start process ``name`` with its lifeline and status pipes; a second
        start (after it exited) counts as a restart."""
        if name in self.protocols or name not in self._processes:
            return
        if name in self._started and self.metrics is not None and name not in self._retiring:
            self.metrics.worker_restarted(name)
        self._started.add(name)
        process = self._processes[name]
        socket = self.socket_path(name, self._generation.get(name, 0))
        self._sockets.add(socket)
        proto = WorkerProcessProtocol(self, name, socket, self._interpreters.get(name))
        self.protocols[name] = proto
        self.timeStarted[name] = proto.started = self._clock.seconds()
        env = dict(process.env)
        env[defaults.ENV_SOCKET] = socket
        try:
            self._reactor.spawnProcess(
                proto, process.args[0], process.args, uid=process.uid, gid=process.gid,
                env=env, path=process.cwd,
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
            if worker_id == proto.worker_id and address == defaults.UNIX_PREFIX + proto.socket:
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
            if worker_id == proto.worker_id:
                proto.registered = True
                return

    def all_registered(self):
        """True when every worker is running and has registered its models
        (a worker being recycled counts until its replacement has)."""
        return all((name in self.protocols and self.protocols[name].registered)
                   or name in self._retiring
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

    # -- recycling ---------------------------------------------------------

    def request_limit(self, worker_id, address, served):
        """The router's word that ``worker_id`` (at ``address``) has served
        ``served`` requests: recycle it if it is ours and over the limit."""
        for name, proto in list(self.protocols.items()):
            if worker_id == proto.worker_id and address == defaults.UNIX_PREFIX + proto.socket:
                if self.max_requests and served >= self.max_requests:
                    self.recycle(name, "served %d requests (--worker-max-requests %d)"
                                 % (served, self.max_requests), "requests")
                return

    def check_limits(self):
        """The periodic check: recycle each registered worker past a limit,
        and finish a recycle whose replacement was routed to but never
        reported (a wrapper that closed its status pipe)."""
        now = self._clock.seconds()
        for name, proto in list(self.protocols.items()):
            if name in self._retiring:
                if proto.registered and now - proto.started >= self.threshold:
                    self._retire(name)
                elif (not proto.registered and proto.pid is not None and name not in self._stopping
                      and now - proto.started >= self.replacement_timeout):
                    # Hung before registering (a load hook that never ends):
                    # stop it, and the recycle is abandoned when it exits.
                    self.log.warn("the replacement of worker {name} (pid {pid}) has not registered in "
                                  "{timeout}s: stopping it", name=name, pid=proto.pid,
                                  timeout=self.replacement_timeout)
                    self.stopProcess(name)
                continue
            if not proto.registered or proto.pid is None:
                continue
            if self.max_requests and self.requests_served is not None:
                served = self.requests_served(proto.worker_id)
                if served >= self.max_requests:
                    self.recycle(name, "served %d requests (--worker-max-requests %d)"
                                 % (served, self.max_requests), "requests")
                    continue
            if self.max_rss_mb:
                rss = resident_bytes(proto.pid)
                if rss is not None and rss > self.max_rss_mb * 1024 * 1024:
                    why = "resident memory %d MB is above --worker-max-rss %d MB" % (
                        rss // (1024 * 1024), self.max_rss_mb)
                    if self.requests_served is not None and not self.requests_served(proto.worker_id):
                        why += " before serving any request (is the limit below a fresh worker's size?)"
                    self.recycle(name, why, "rss")

    def recycle(self, name, why, limit="requests"):
        """Replace worker ``name`` gracefully: start its replacement now; the
        old one is drained and stopped once the replacement has registered
        (:meth:`worker_registered`).  False if it is not running, has not
        registered, or a recent recycle of it failed, or another worker's
        replacement is still starting: one at a time, so that workers that
        reach the limit together (as least-outstanding routing makes them)
        are not all replaced at once; the periodic check takes the next."""
        proto = self.protocols.get(name)
        if (not self.running or proto is None or not proto.registered or self._retiring
                or self._recycle_after.get(name, 0) > self._clock.seconds()):
            return False
        self.log.info("recycling worker {name} (pid {pid}): {why}; starting its replacement",
                      name=name, pid=proto.pid, why=why)
        if self.metrics is not None:
            self.metrics.worker_recycled(name, limit)
        del self.protocols[name]
        self._retiring[name] = proto
        self._generation[name] = self._generation.get(name, 0) + 1
        self.startProcess(name)  # a failure to spawn it abandons the recycle (worker_exited)
        return True

    def worker_registered(self, proto):
        """``proto`` reported every model registered: if it replaces a
        worker being recycled, that one can go now."""
        name = proto.name
        if name in self._retiring and self.protocols.get(name) is proto:
            self._retire(name)

    def _retire(self, name):
        """Drain the old worker of slot ``name`` and SIGTERM it (SIGKILL
        after ``killTime``); it withdraws and drains its requests in flight."""
        old = self._retiring.pop(name, None)
        if old is None:
            return
        new = self.protocols.get(name)
        self.log.info("worker {name}: replacement (pid {new}) registered; stopping pid {old}",
                      name=name, new=getattr(new, "pid", "-"), old=old.pid)
        if self.drain is not None:
            self.drain(old.worker_id)
        self._terminate(old)

    def _terminate(self, proto):
        """SIGTERM the recycled ``proto``, SIGKILL after ``killTime``."""
        proto.retired = True
        try:
            proto.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            self._retired[proto] = None
            return
        self._retired[proto] = self._clock.callLater(
            self.killTime, self._forceStopProcess, proto.transport)

    def _abandon(self, name, why):
        """The replacement of worker ``name`` failed: the old one serves on,
        and is recycled again no sooner than the crash-loop delay."""
        old = self._retiring.pop(name)
        delay = self.restart_delay(name, 0, False)
        self._recycle_after[name] = self._clock.seconds() + delay
        self.protocols[name] = old
        self.timeStarted[name] = old.started
        self._generation[name] = self._generation.get(name, 1) - 1  # the old one's socket
        self.log.warn("recycling worker {name} (pid {pid}) abandoned: {why}; it serves on "
                      "(next attempt in {delay}s at the earliest)",
                      name=name, pid=old.pid, why=why, delay=delay)

    def _retired_exited(self, proto, reason):
        """A recycled worker exited (normally after its drain)."""
        name = proto.name
        if self._retiring.get(name) is proto:
            del self._retiring[name]
        kill = self._retired.pop(proto, None)
        if kill is not None and kill.active():
            kill.cancel()
        how = describe_exit(reason.value) if reason.check(
            error.ProcessDone, error.ProcessTerminated) else "did not exit cleanly"
        ran = self._clock.seconds() - proto.started
        if proto.retired:
            if reason.check(error.ProcessTerminated) and reason.value.signal == signal.SIGKILL:
                how += " (still running %gs after SIGTERM)" % self.killTime
            self.log.info("recycled worker {name} (pid {pid}) {how} (ran {ran:.1f}s)",
                          name=name, pid=proto.pid, how=how, ran=ran)
        else:  # died while its replacement was starting, which carries on
            self.log.warn("worker {name} (pid {pid}) {how} while being recycled (ran {ran:.1f}s); "
                          "its replacement carries on", name=name, pid=proto.pid, how=how, ran=ran)

    def worker_exited(self, proto, reason):
        """Log how worker ``proto`` ended, and schedule its restart."""
        name = proto.name
        if proto in self._retired or self._retiring.get(name) is proto:
            return self._retired_exited(proto, reason)
        replacing = name in self._retiring and self.protocols.get(name) is proto
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
            if proto.missing_sdk:
                how += (": its interpreter (%s) cannot import anyserve_tw; install AnyServe "
                        "there or choose another with --worker-python" % proto.interpreter)
            elif reason.check(error.ProcessDone) and not proto.called_run:
                how += ": does the script call app.run()?"
        if asked and reason.check(error.ProcessTerminated) and reason.value.signal == signal.SIGKILL:
            how += " (still running %gs after SIGTERM)" % self.killTime

        if not (self.running and name in self._processes):
            self.log.info("worker {name} (pid {pid}) {how}", name=name, pid=pid, how=how)
            return
        if replacing:
            return self._abandon(name, "its replacement (pid %s) %s" % (pid, how))
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
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        super().stopService()
        for name, old in list(self._retiring.items()):  # their replacements were starting
            del self._retiring[name]
            self._terminate(old)

        def check_exited():
            if not self.protocols and not self._retiring and not self._retired:
                loop.stop()

        loop = LoopingCall(check_exited)
        loop.clock = self.reactor
        return loop.start(0.05, now=True).addCallback(self._remove_sockets)

    def _remove_sockets(self, _):
        if self._socket_dir is None and self.socket_dir:  # a temp dir of our own
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        elif self.socket_dir:
            for path in self._sockets:
                if os.path.exists(path):
                    os.unlink(path)
        self._sockets.clear()
        self._generation.clear()
        self._recycle_after.clear()
        for name in list(self._processes):  # all exited: a later start adds them anew
            self.removeProcess(name)
        self._started.clear()
