"""``twistd anyserve``: command-line options and the service they build.

This is the one place that imports the global reactor; everything below it
takes the reactor as a parameter.  Under a plain ``twistd -n anyserve`` no
reactor is installed yet when ``makeService`` runs, so it installs Twisted's
asyncio reactor, on which the default front serves gRPC; ``--reactor=asyncio``
gives it the same.  Any other ``--reactor`` gets the thread front.
"""
import importlib.util
import os
import shutil
import sys

from twisted.logger import Logger
from twisted.python import usage

from anyserve_tw.ingress.interfaces import FRONTS
from anyserve_tw.wire import defaults

#: Event loops the asyncio reactor may run on (``--loop``).
LOOPS = ("asyncio", "uvloop")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serves the KServe v2 gRPC protocol on --port and routes each ModelInfer "
        "to a Python worker that registered the model on --mgmt. --worker SCRIPT "
        "(repeatable) starts and supervises worker scripts."
    )
    optParameters = [
        ["port", "p", 8000, "KServe v2 gRPC port.", int],
        ["host", None, "0.0.0.0", "Address the KServe v2 gRPC server binds."],
        ["mgmt", "m", 9000, "Worker management gRPC port.", int],
        ["mgmt-host", None, "127.0.0.1", "Address the management server binds."],
        ["workers", "n", 1, "Processes to start for each --worker script.", int],
        ["pool-size", None, 2, "Unix-socket connections kept open to each worker.", int],
        ["heartbeat-timeout", None, 6.0, "Seconds without a heartbeat before a worker is evicted (checked every quarter of it).", float],
        ["grace", None, 10.0, "Seconds in-flight requests get to finish on shutdown.", float],
        ["max-message-size", None, defaults.MAX_MESSAGE_SIZE, "Largest request or response, bytes.", int],
        ["threads", None, defaults.DEFAULT_FRONT_THREADS, "gRPC server threads (one per RPC in flight).", int],
        ["max-concurrent-rpcs", None, defaults.DEFAULT_MAX_CONCURRENT_RPCS, "RPCs in flight before RESOURCE_EXHAUSTED.", int],
        ["request-timeout", None, 600.0, "Longest wait for a worker when the client sets no deadline.", float],
        ["socket-dir", None, None, "Directory for supervised workers' sockets (default: a new temp dir)."],
        ["http-port", None, 8080, "KServe v2 REST and Prometheus /metrics port (0: no HTTP server, no metrics).", int],
        ["http-host", None, None, "Address the HTTP server binds (default: --host)."],
        ["access-log", None, None, "Write one line per inference request to this file ('-': the twistd log)."],
        ["forget-after", None, 60.0, "Seconds a model whose last worker was lost (crashed, evicted) stays known "
         "but unavailable before it is forgotten (one withdrawn by its last worker goes at once).", float],
        ["max-inflight-per-model", None, 1024, "Requests in flight to one model before RESOURCE_EXHAUSTED "
         "(0: no cap).", int],
        ["startup-window", None, 10.0, "Seconds after start, while supervised workers are still registering, "
         "in which an unknown model is UNAVAILABLE rather than NOT_FOUND.", float],
        ["mgmt-token-file", None, None, "File holding the token management calls must carry; created with a "
         "random token if missing (default: $XDG_RUNTIME_DIR/anyserve/mgmt-PORT.token, else "
         "/tmp/anyserve-UID/mgmt-PORT.token). Must be readable by its owner only."],
        ["tls-cert", None, None, "PEM certificate chain: serve the inference ports (gRPC and REST) over TLS."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["tls-ca", None, None, "PEM CA for workers on other hosts (with --tls-cert/--tls-key, the ingress's "
         "identity): the management server requires client certificates it signed, and tls:// workers "
         "are connected to with mutual TLS."],
        ["worker-max-requests", None, 0, "Recycle a supervised worker after it has served this many requests: "
         "its replacement starts and registers first, then it is drained and stopped (0: never).", int],
        ["worker-max-rss", None, 0, "Recycle a supervised worker whose resident memory exceeds this many MB, "
         "checked every second (0: never).", int],
        ["worker-python", None, None, "Interpreter for supervised workers (default: the ingress's own), or "
         "'shebang' to run each executable script by its #! line."],
        ["worker-math-threads", None, 0, "OMP/MKL/OpenBLAS/numexpr/vecLib threads per supervised worker "
         "(0: the available cores divided by the number of workers, unless already set in the environment).", int],
        ["gpus", None, None, "Comma-separated GPU ids handed to supervised workers round-robin as "
         "CUDA_VISIBLE_DEVICES (default: CUDA_VISIBLE_DEVICES left as inherited)."],
        ["max-unread-per-client", None, 64, "MiB of responses one client connection may leave unread "
         "before its inference calls get RESOURCE_EXHAUSTED.", int],
        ["max-unread-total", None, 256, "MiB of unread responses of all clients together, likewise.", int],
        ["unread-timeout", None, 30.0, "Seconds a call's responses may go unread before it is cancelled; "
         "a client that answers no ping within it is disconnected.", float],
        ["front", None, "aio", "How gRPC is served: aio (grpc.aio on the reactor's asyncio loop, one thread), "
         "threads (a grpcio thread pool bridged into the reactor; always so under a non-asyncio --reactor) "
         "or h2 (the inference port served by our own HTTP/2 protocol on the reactor; not with --tls-cert)."],
        ["loop", None, "uvloop", "The event loop under the asyncio reactor this plugin installs: uvloop "
         "(less CPU per request on every front) or asyncio (the standard library's)."],
    ]

    optFlags = [
        ["insecure-mgmt", None, "Let any local process call the management API without the token."],
        ["insecure-workers", None, "Accept workers at plain tcp://host:port addresses (no TLS)."],
    ]

    def __init__(self):
        super().__init__()
        self["worker"] = []

    def opt_worker(self, script):
        """Worker script to start and supervise (repeatable)."""
        self["worker"].append(script)

    def postOptions(self):
        for name in ("workers", "pool-size", "threads", "max-concurrent-rpcs", "max-message-size"):
            if self[name] < 1:
                raise usage.UsageError("--%s must be at least 1" % name)
        for name in ("heartbeat-timeout", "grace", "request-timeout", "unread-timeout",
                     "max-unread-per-client", "max-unread-total"):
            if self[name] <= 0:
                raise usage.UsageError("--%s must be positive" % name)
        for name in ("forget-after", "max-inflight-per-model", "startup-window"):
            if self[name] < 0:
                raise usage.UsageError("--%s must not be negative" % name)
        if not 0 <= self["http-port"] <= 65535:
            raise usage.UsageError("--http-port must be a port number, or 0 for none")
        for name in ("worker-max-requests", "worker-max-rss", "worker-math-threads"):
            if self[name] < 0:
                raise usage.UsageError("--%s must not be negative" % name)
        if self["gpus"] is not None:
            self["gpus"] = [gpu.strip() for gpu in self["gpus"].split(",")]
            if not all(self["gpus"]):
                raise usage.UsageError("--gpus must be a comma-separated list of GPU ids, e.g. 0,1")
        if self["worker-python"] not in (None, "shebang"):
            found = shutil.which(self["worker-python"])
            if found is None:
                raise usage.UsageError("--worker-python: %s is not an executable" % self["worker-python"])
            self["worker-python"] = os.path.abspath(found)
        if self["front"] not in FRONTS:
            raise usage.UsageError("--front must be one of: %s" % ", ".join(FRONTS))
        if self["loop"] not in LOOPS:
            raise usage.UsageError("--loop must be one of: %s" % ", ".join(LOOPS))
        if self["loop"] == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise usage.UsageError("--loop uvloop: the uvloop package is not installed")
        if self["front"] == "h2" and self["tls-cert"]:
            raise usage.UsageError("--front h2 serves no TLS: use --front aio with --tls-cert")
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["insecure-mgmt"] and self["mgmt-token-file"]:
            raise usage.UsageError("--insecure-mgmt and --mgmt-token-file contradict each other")
        if self["tls-ca"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-ca needs --tls-cert and --tls-key (the ingress's identity)")
        self["worker-tls"] = None
        if self["tls-ca"]:
            from anyserve_tw.wire.tlsconfig import MutualTls, TlsError

            try:
                self["worker-tls"] = MutualTls.from_files(self["tls-ca"], self["tls-cert"], self["tls-key"])
            except TlsError as e:
                raise usage.UsageError("--tls-ca/--tls-cert/--tls-key: %s" % (e,))
        self["tls"] = None
        if self["tls-cert"]:
            from anyserve_tw.ingress.tls import ServerTls, TlsError

            try:
                self["tls"] = ServerTls.from_files(self["tls-cert"], self["tls-key"])
            except TlsError as e:
                raise usage.UsageError("--tls-cert/--tls-key: %s" % (e,))
        self["mgmt-token"] = None
        if not self["insecure-mgmt"]:
            from anyserve_tw.wire import credentials

            path = self["mgmt-token-file"] or credentials.default_token_path(self["mgmt"])
            try:
                if self["mgmt-token-file"]:  # the operator's: kept as given
                    self["mgmt-token"] = credentials.load_or_create_token(path)
                else:  # ours: a new one each start (see anyserve_tw.wire.credentials)
                    self["mgmt-token"] = credentials.new_token(path)
            except credentials.TokenFileError as e:
                raise usage.UsageError("--mgmt-token-file: %s" % (e,))
            self["mgmt-token-file"] = path


log = Logger()


def install_reactor(loop_name="uvloop"):
    """The global reactor: asyncio's, installed here on a new event loop
    (``loop_name``: uvloop's, as ``--loop`` defaults, or asyncio's own)
    unless a reactor was installed already (``twistd --reactor=...``, or
    trial).  On uvloop, see :func:`keep_child_wakeups`."""
    import asyncio

    from twisted.internet import asyncioreactor
    from twisted.internet.error import ReactorAlreadyInstalledError

    on_uvloop = False
    if "twisted.internet.reactor" not in sys.modules:
        if loop_name == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            asyncioreactor.install(loop)
        except ReactorAlreadyInstalledError:
            loop.close()
        else:
            asyncio.set_event_loop(loop)
            on_uvloop = loop_name == "uvloop"
    from twisted.internet import reactor

    if on_uvloop:
        keep_child_wakeups(reactor, loop)
    return reactor


def keep_child_wakeups(reactor, loop):
    """Give SIGCHLD back to the reactor once uvloop's ``loop`` runs.

    The reactor learns that a child exited from a byte ``signal.set_wakeup_fd``
    writes to its pipe; it points the wakeup fd there while it starts, but
    uvloop's ``run_forever`` then points it at uvloop's own pipe, and uvloop
    only runs the (no-op) Python handler for SIGCHLD.  A worker whose pipes
    closed a moment before it exited was then never reaped, and ``twistd``
    waited for it for ever at SIGTERM.  The reactor's pipe wakes the loop for
    every signal as uvloop's did (Python runs the handlers whatever the fd);
    only ``loop.add_signal_handler``, which nothing here uses, would miss it."""
    import signal

    from twisted.internet import process

    def started():
        fd = signal.set_wakeup_fd(-1)  # only reads it back: the reactor's
        signal.set_wakeup_fd(fd)
        if fd != -1:
            loop.call_soon(restore, fd)

    def restore(fd):
        signal.set_wakeup_fd(fd)
        process.reapAllProcesses()  # any child that exited while uvloop held it

    reactor.callWhenRunning(started)


def choose_front(reactor, asked):
    """The front to serve with: aio needs the reactor to run on asyncio."""
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if asked == "aio" and not isinstance(reactor, AsyncioSelectorReactor):
        log.info("{reactor} is not the asyncio reactor: serving gRPC from threads (--front threads)",
                 reactor=type(reactor).__name__)
        return "threads"
    return asked


def makeService(options):
    reactor = install_reactor(options["loop"])
    if options["mgmt-token"] is None:
        log.warn("--insecure-mgmt: any local process may register, withdraw and heartbeat workers")
    else:
        log.info("management calls need the token in {path}", path=options["mgmt-token-file"])
    from anyserve_tw.wire.credentials import is_loopback

    if not is_loopback(options["mgmt-host"]) and not options["tls-ca"]:
        log.warn("--mgmt-host {host} without --tls-ca: management calls and their token cross the "
                 "network in clear text", host=options["mgmt-host"])

    from anyserve_tw.allocator import keep_freed_memory
    from anyserve_tw.ingress.service import make_ingress_service

    keep_freed_memory()

    return make_ingress_service(
        reactor,
        port=options["port"],
        host=options["host"],
        mgmt_port=options["mgmt"],
        mgmt_host=options["mgmt-host"],
        worker_scripts=options["worker"],
        copies=options["workers"],
        pool_size=options["pool-size"],
        heartbeat_timeout=options["heartbeat-timeout"],
        grace=options["grace"],
        max_message_size=options["max-message-size"],
        threads=options["threads"],
        max_concurrent_rpcs=options["max-concurrent-rpcs"],
        request_timeout=options["request-timeout"],
        socket_dir=options["socket-dir"],
        front=choose_front(reactor, options["front"]),
        http_port=options["http-port"],
        http_host=options["http-host"],
        access_log=options["access-log"],
        forget_after=options["forget-after"],
        max_inflight_per_model=options["max-inflight-per-model"],
        startup_window=options["startup-window"],
        worker_max_requests=options["worker-max-requests"],
        worker_max_rss=options["worker-max-rss"],
        worker_python=options["worker-python"],
        worker_math_threads=options["worker-math-threads"],
        gpus=options["gpus"] or (),
        mgmt_token=options["mgmt-token"],
        max_unread_per_client=options["max-unread-per-client"] * 1024 * 1024,
        max_unread_total=options["max-unread-total"] * 1024 * 1024,
        unread_timeout=options["unread-timeout"],
        tls=options["tls"],
        worker_tls=options["worker-tls"],
        insecure_workers=options["insecure-workers"],
    )
