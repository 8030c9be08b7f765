"""The worker process: its service tree, its log lines, and ``run()``."""
import os
import signal
import sys
import uuid

from twisted.internet.defer import maybeDeferred
from twisted.logger import FileLogObserver, Logger, eventAsText, textFileLogObserver

from anyserve_tw.allocator import keep_freed_memory
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.wire import defaults
from anyserve_tw.worker.execution import Execution, make_pool
from anyserve_tw.worker.protocol import ModelServer
from anyserve_tw.worker.registration import Registration, Withdrawal

log = Logger()


def make_worker_service(reactor, app, ingress, socket_path, worker_id, threads=4,
                        heartbeat_interval=2.0, max_payload=defaults.MAX_MESSAGE_SIZE):
    """The worker's service tree: serve, then register.  Shutdown withdraws the
    models, drains the requests in flight (heartbeats going on), then stops."""
    top = SequentialMultiService(stop_order=["withdrawal", "models", "registration"])
    execution = Execution(reactor, app, make_pool(threads), max_payload=max_payload, worker_id=worker_id)
    server = ModelServer(reactor, execution, socket_path)
    server.setName("models")
    server.setServiceParent(top)
    registration = Registration(reactor, app, ingress, server.address, worker_id, heartbeat_interval)
    registration.setName("registration")
    registration.setServiceParent(top)
    withdrawal = Withdrawal(registration)
    withdrawal.setName("withdrawal")
    withdrawal.setServiceParent(top)
    return top


def _untimed_log_line(event):
    """Twisted's classic log line, without its timestamp."""
    text = eventAsText(event, includeTimestamp=False)
    return text.replace("\n", "\n\t") + "\n" if text else None


def log_observer(out, environ):
    """Where the worker logs: timestamped lines on its own; without a
    timestamp under a supervising ingress, which stamps every line it relays."""
    if environ.get(defaults.ENV_SUPERVISED):
        return FileLogObserver(out, _untimed_log_line)
    return textFileLogObserver(out)


def run(app, ingress=None, socket_path=None, worker_id=None, threads=None, heartbeat_interval=None):
    """Serve ``app`` until SIGTERM/SIGINT.  Unset options come from the
    environment (ANYSERVE_INGRESS, ANYSERVE_SOCKET, ANYSERVE_WORKER_ID,
    ANYSERVE_THREADS, ANYSERVE_HEARTBEAT_INTERVAL, ANYSERVE_MAX_MESSAGE_SIZE), which is how a supervising
    ingress configures the workers it starts."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    env = os.environ
    ingress = ingress or env.get(defaults.ENV_INGRESS, defaults.DEFAULT_INGRESS)
    socket_path = socket_path or env.get(defaults.ENV_SOCKET) or "/tmp/anyserve-worker-%s.sock" % uuid.uuid4().hex[:12]
    worker_id = worker_id or env.get(defaults.ENV_WORKER_ID) or "%s-%d" % (
        os.path.splitext(os.path.basename(socket_path))[0], os.getpid())
    threads = threads or int(env.get(defaults.ENV_THREADS, defaults.DEFAULT_WORKER_THREADS))
    heartbeat_interval = heartbeat_interval or float(
        env.get(defaults.ENV_HEARTBEAT_INTERVAL, defaults.DEFAULT_HEARTBEAT_INTERVAL))

    globalLogBeginner.beginLoggingTo([log_observer(sys.stderr, env)])
    keep_freed_memory()
    max_payload = int(env.get(defaults.ENV_MAX_MESSAGE_SIZE, defaults.MAX_MESSAGE_SIZE))
    top = make_worker_service(reactor, app, ingress, socket_path, worker_id, threads,
                              heartbeat_interval, max_payload)
    exit_code = []

    def failed(failure):
        log.failure("worker failed to start", failure)
        exit_code.append(1)
        reactor.stop()

    def start():
        d = maybeDeferred(top.startService)
        d.addCallback(lambda _: top.getServiceNamed("models").listening)
        d.addErrback(failed)

    if env.get(defaults.ENV_SUPERVISED):
        # A terminal's Ctrl-C reaches the whole process group; a supervised
        # worker leaves SIGINT to its ingress, which stops it with SIGTERM in
        # the right order (after draining).
        reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: top.running and top.stopService())
    reactor.run()
    sys.exit(exit_code[0] if exit_code else 0)
