"""Worker processes started and restarted by the ingress.

Twisted's ProcessMonitor does the supervising (restart on exit, doubling
back-off for processes that die at once); this adds what the ingress needs on
top: a private socket directory, each worker told the management address by
environment variables, and a ``stopService`` that waits until every child has
really exited (ProcessMonitor's own does not) and then removes the sockets,
and a count of restarts for the metrics.
"""
import os
import shutil
import sys
import tempfile

from twisted.internet.task import LoopingCall
from twisted.runner.procmon import ProcessMonitor

from anyserve_tw.wire import defaults


class WorkerSupervisor(ProcessMonitor):
    """Runs ``copies`` of each worker script, restarting any that exits."""

    maxRestartDelay = 10
    killTime = 10

    def __init__(self, reactor, scripts, copies, ingress_address, heartbeat_interval,
                 socket_dir=None, max_message_size=None, python=sys.executable, metrics=None):
        super().__init__(reactor)
        self.reactor = reactor
        self.scripts = list(scripts)
        self.copies = copies
        self.ingress_address = ingress_address
        self.heartbeat_interval = heartbeat_interval
        self.max_message_size = max_message_size
        self.python = python
        self._socket_dir = socket_dir
        self.socket_dir = None
        #: :class:`~anyserve_tw.ingress.metrics.Metrics` told of each restart.
        self.metrics = metrics
        self._started = set()  # process names started since the service started

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

    def _add_processes(self):
        self.socket_dir = self._socket_dir or tempfile.mkdtemp(prefix="anyserve-")
        for name, script in self.slots():
            env = dict(os.environ)  # ProcessMonitor's default environment is empty
            env.update({
                defaults.ENV_INGRESS: self.ingress_address,
                defaults.ENV_SOCKET: os.path.join(self.socket_dir, name + ".sock"),
                defaults.ENV_HEARTBEAT_INTERVAL: str(self.heartbeat_interval),
                defaults.ENV_SUPERVISED: "1",
                "PYTHONUNBUFFERED": "1",
            })
            if self.max_message_size:
                env[defaults.ENV_MAX_MESSAGE_SIZE] = str(self.max_message_size)
            env.pop(defaults.ENV_WORKER_ID, None)
            self.addProcess(name, [self.python, os.path.abspath(script)], env=env)

    def startProcess(self, name):
        """Start process ``name``; a second start (ProcessMonitor restarting
        it after it exited) counts as a restart."""
        if name not in self.protocols and name in self._processes:
            if name in self._started and self.metrics is not None:
                self.metrics.worker_restarted(name)
            self._started.add(name)
        super().startProcess(name)

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
                path = os.path.join(self.socket_dir, name + ".sock")
                if os.path.exists(path):
                    os.unlink(path)
        for name in list(self._processes):  # all exited: a later start adds them anew
            self.removeProcess(name)
        self._started.clear()
