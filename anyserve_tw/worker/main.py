"""The worker process: its service tree, its log lines, and ``run()``."""
import os
import signal
import sys
import uuid

from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import FileLogObserver, Logger, eventAsText, textFileLogObserver

from anyserve_tw.allocator import keep_freed_memory
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.wire import defaults, supervision, tlsconfig
from anyserve_tw.worker.execution import Execution, make_pool
from anyserve_tw.worker.protocol import ModelServer
from anyserve_tw.worker.registration import Registrations, Withdrawal, ingress_addresses
from anyserve_tw.worker.supervised import tie_to_supervisor

log = Logger()


def make_worker_service(reactor, app, ingress, socket_path, worker_id, threads=4,
                        heartbeat_interval=2.0, max_payload=defaults.MAX_MESSAGE_SIZE,
                        listen=None, advertise=None, tls=None, environ=None):
    """The worker's service tree: serve, then register.  Shutdown withdraws the
    models, drains the requests in flight (heartbeats going on), then stops.

    ``ingress``: one ``host:port`` or several separated by commas (one
    registration each); ``listen``/``advertise``/``tls``: a worker on
    another host (see :class:`~anyserve_tw.worker.protocol.ModelServer`),
    ``tls`` also securing the management channels."""
    top = SequentialMultiService(stop_order=["withdrawal", "models", "registration"])
    execution = Execution(reactor, app, make_pool(threads), max_payload=max_payload, worker_id=worker_id)
    server = ModelServer(reactor, execution, socket_path, listen=listen, tls=tls, advertise=advertise)
    server.setName("models")
    server.setServiceParent(top)
    registration = Registrations(reactor, app, ingress_addresses(ingress), server.address, worker_id,
                                 heartbeat_interval, tls=tls, environ=environ,
                                 health=lambda: (execution.healthy(), execution.reason()))
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


class Shutdown:
    """Stops the reactor once, however often it is asked.

    Twisted's own SIGTERM handler calls ``reactor.stop()`` on every signal, so
    a second SIGTERM while the worker drains (one from a service manager and
    one from the ingress, or the parent-death signal after the ingress's own)
    raised ReactorNotRunning with a traceback.  Here the first signal starts
    the shutdown and later ones are only noted.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.requested = False

    def stop(self):
        """Stop the reactor unless a stop is already under way."""
        if self.requested:
            return
        self.requested = True
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # stopped by someone else (a handler calling reactor.stop())

    def signalled(self, number, frame=None):
        """A signal handler: only queues the work, as handlers must."""
        self.reactor.callFromThread(self._signalled, number)

    def _signalled(self, number):
        name = _signal_name(number)
        if self.requested:
            log.info("received {signal} again: already shutting down", signal=name)
        else:
            log.info("received {signal}, shutting down", signal=name)
            self.stop()

    def install(self, supervised):
        """Handle SIGTERM, and SIGINT unless ``supervised``.

        A terminal's Ctrl-C reaches the whole process group; a supervised
        worker leaves SIGINT to its ingress, which stops it with SIGTERM in
        the right order (after draining).
        """
        signal.signal(signal.SIGTERM, self.signalled)
        signal.signal(signal.SIGINT, signal.SIG_IGN if supervised else self.signalled)


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def report_registration(reactor, registration, supervised, interval=0.1):
    """Tell the supervising ingress once ``registration`` first succeeds.

    Polls the registration's public ``registered`` flag: cheap, and it keeps
    the registration module free of supervision concerns.
    """
    def check():
        if registration.registered:
            supervised.report(supervision.REGISTERED)
            loop.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=True)
    return loop


class LoadFailed(Exception):
    """An ``@app.on_load`` hook raised: the worker exits unregistered."""


def load_then_start(app, top, clock=None, stopping=lambda: False):
    """Run ``app``'s on_load hooks, then start the service tree ``top`` (so
    no model is registered, nor routed to, before it is loaded).  A Deferred
    firing once the worker listens; failing with :class:`LoadFailed`, the
    hook's error logged, if a hook raised (``top`` is then never started).

    After the hooks, with a ``clock``, one turn of the loop passes first: a
    SIGTERM that came during a long plain hook (the loop was blocked) is
    handled then, and if ``stopping()`` the worker never registers."""

    def load_failed(failure):
        log.failure("an on_load hook failed, so this worker exits without registering "
                    "{models}", failure, models=", ".join(sorted({n for n, _ in app.models})))
        raise LoadFailed(failure.getErrorMessage())

    def start(_):
        if stopping():
            log.info("stopped while loading: not registering")
            return None
        d = maybeDeferred(top.startService)
        return d.addCallback(lambda _: top.getServiceNamed("models").listening)

    d = app.load().addErrback(load_failed)
    if clock is not None and app.load_hooks:
        d.addCallback(lambda _: deferLater(clock, 0, lambda: None))
    return d.addCallback(start)


def run(app, ingress=None, socket_path=None, worker_id=None, threads=None, heartbeat_interval=None):
    """Serve ``app`` until SIGTERM/SIGINT.  Unset options come from the
    environment (ANYSERVE_INGRESS, ANYSERVE_SOCKET, ANYSERVE_WORKER_ID,
    ANYSERVE_THREADS, ANYSERVE_HEARTBEAT_INTERVAL, ANYSERVE_MAX_MESSAGE_SIZE), which is how a supervising
    ingress configures the workers it starts; a worker on another host also
    reads ANYSERVE_LISTEN, ANYSERVE_ADVERTISE and ANYSERVE_TLS_CA/CERT/KEY
    (:mod:`anyserve_tw.wire.tlsconfig`)."""
    env = os.environ
    # The token is the registration's alone: taken out of the environment
    # that the handlers' own subprocesses would inherit.
    private = {name: env.pop(name) for name in (defaults.ENV_TOKEN, defaults.ENV_TOKEN_FILE) if name in env}
    # First, before anything slow: a worker whose ingress is already gone
    # must exit now, not register with whatever listens there next.
    supervised = tie_to_supervisor(env)
    if supervised is not None:
        supervised.report(supervision.RUNNING)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

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
    listen = env.get(tlsconfig.ENV_LISTEN) or None
    try:
        tls = tlsconfig.MutualTls.from_environ(env)
        top = make_worker_service(reactor, app, ingress, socket_path, worker_id, threads,
                                  heartbeat_interval, max_payload, listen=listen,
                                  advertise=env.get(tlsconfig.ENV_ADVERTISE) or None, tls=tls,
                                  environ=private)
    except (tlsconfig.TlsError, ValueError) as e:
        log.error("worker not started: {error}", error=e)
        sys.exit(2)
    exit_code = []
    shutdown = Shutdown(reactor)

    def failed(failure):
        if not failure.check(LoadFailed):
            log.failure("worker failed to start", failure)
        exit_code.append(1)
        shutdown.stop()

    def start():
        d = load_then_start(app, top, reactor, lambda: shutdown.requested)
        d.addErrback(failed)
        if supervised is not None:
            report_registration(reactor, top.getServiceNamed("registration"), supervised)

    # After Twisted's own handlers are in place, which these replace.
    reactor.callWhenRunning(shutdown.install, bool(env.get(defaults.ENV_SUPERVISED)))
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: top.running and top.stopService())
    reactor.run()
    sys.exit(exit_code[0] if exit_code else 0)
