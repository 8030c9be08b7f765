"""Ray places AnyServe workers: one actor per replica, started with the
resources its model asks for, on whichever node Ray picks.

Each actor runs the worker *script* as its child process rather than the
worker inside the actor process, because a worker is a whole program: it runs
Twisted's reactor, installs its own SIGTERM handling and drains on shutdown,
none of which may happen inside Ray's worker process (its main thread and
signals are Ray's).  The actor supervises the child the way a supervising
ingress does (:mod:`anyserve_tw.wire.supervision`): the child holds the read
end of a lifeline pipe, so it dies with the actor however the actor dies
(``ray.kill``, a lost node), and reports on a status pipe when its models are
registered, which is when :meth:`WorkerReplica.start` returns.

Ray reserves the resources (``num_cpus``, ``num_gpus``, custom ones) for the
actor; the child inherits what Ray sets for it (``CUDA_VISIBLE_DEVICES``).
Scaling a model is :meth:`RayWorkers.scale`: more actors, each registering
with every ingress it is given; fewer, each withdrawn and drained first.

Only the driver side imports ``ray``; neither the ingress nor the worker
process does.  ``python -m anyserve_tw.ray --help`` runs it from a shell.
"""
import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid

import ray

from anyserve_tw.wire import defaults, supervision

# The worker's environment for the network hop (anyserve_tw.wire.tlsconfig).
ENV_LISTEN = "ANYSERVE_LISTEN"
ENV_ADVERTISE = "ANYSERVE_ADVERTISE"
ENV_TLS_CA = "ANYSERVE_TLS_CA"
ENV_TLS_CERT = "ANYSERVE_TLS_CERT"
ENV_TLS_KEY = "ANYSERVE_TLS_KEY"

#: How a replica's worker is reached by the ingresses.
TRANSPORTS = ("unix", "tls", "tcp")


class WorkerFailed(Exception):
    """A replica's worker exited, or did not register in time."""


def _free_port(host):
    """A TCP port free on ``host`` now, for the worker to listen on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WorkerReplica:
    """One worker process, supervised by the Ray actor this class becomes.

    Plain Python so that :class:`RayWorkers` can give each replica its own
    resource options (``ray.remote(**options)(WorkerReplica)``).
    """

    def __init__(self, script, ingress, worker_id, env=None, transport="unix",
                 tls=None, python=None):
        if transport not in TRANSPORTS:
            raise ValueError("transport must be one of %s, not %r" % (", ".join(TRANSPORTS), transport))
        self.script = script
        self.ingress = ingress
        self.worker_id = worker_id
        self.extra_env = dict(env or {})
        self.transport = transport
        self.tls = tls
        self.python = python or sys.executable
        self.process = None
        self._lifeline = None
        self._status = None
        self.address = None

    def _environment(self):
        env = dict(os.environ)
        env.update(self.extra_env)
        env[defaults.ENV_INGRESS] = self.ingress
        env[defaults.ENV_WORKER_ID] = self.worker_id
        if self.transport != "unix":
            # The address Ray knows this node by is the one other nodes reach.
            host = ray.util.get_node_ip_address()
            self.address = "%s://%s:%d" % (self.transport, host, _free_port(host))
            env[ENV_LISTEN] = self.address
            env[ENV_ADVERTISE] = self.address
        if self.tls is not None:
            ca, cert, key = self.tls
            env.update({ENV_TLS_CA: ca, ENV_TLS_CERT: cert, ENV_TLS_KEY: key})
        return env

    def start(self, timeout=60.0):
        """Start the worker; return :meth:`info` once its models are
        registered.  Raises :class:`WorkerFailed` if it exits first or takes
        longer than ``timeout`` seconds (it is then stopped)."""
        lifeline_read, self._lifeline = os.pipe()
        self._status, status_write = os.pipe()
        env = self._environment()
        env.update({
            supervision.ENV_SUPERVISOR_PID: str(os.getpid()),
            supervision.ENV_LIFELINE_FD: str(lifeline_read),
            supervision.ENV_STATUS_FD: str(status_write),
        })
        try:
            self.process = subprocess.Popen(
                [self.python, self.script], env=env, stdin=subprocess.DEVNULL,
                pass_fds=(lifeline_read, status_write), start_new_session=True)
        finally:
            os.close(lifeline_read)
            os.close(status_write)
        if not self._wait_registered(timeout):
            code = self.process.poll()
            if code is None:
                self.stop()
                raise WorkerFailed("%s (%s) did not register within %gs"
                                   % (self.worker_id, self.script, timeout))
            raise WorkerFailed("%s (%s) exited with %s before registering"
                               % (self.worker_id, self.script, code))
        return self.info()

    def _wait_registered(self, timeout):
        deadline = time.monotonic() + timeout
        pending = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self._status], [], [], min(left, 0.5))
            if not readable:
                continue
            data = os.read(self._status, 512)
            if not data:
                return False  # the worker closed its end: it exited
            pending += data
            lines = pending.split(b"\n")
            pending = lines.pop()[-supervision.MAX_STATUS_LINE:]
            if supervision.REGISTERED in lines:
                return True

    def info(self):
        """Where this replica runs: node id and address, pid, worker id."""
        context = ray.get_runtime_context()
        return {
            "worker_id": self.worker_id,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "actor_pid": os.getpid(),
            "pid": self.process.pid if self.process else None,
            "address": self.address,
            "gpu_ids": ray.get_gpu_ids(),
            "returncode": self.process.poll() if self.process else None,
        }

    def stop(self, grace=15.0):
        """SIGTERM the worker (it withdraws its models and drains), SIGKILL
        after ``grace`` seconds; its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for fd in (self._lifeline, self._status):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._lifeline = self._status = None
        return self.process.returncode


class RayWorkers:
    """The replicas of one worker script, each a Ray actor holding
    ``num_cpus`` / ``num_gpus`` / ``resources`` while it lives.

    ``ingress`` is what the workers get as ANYSERVE_INGRESS (``a:9000`` or
    ``a:9000,b:9000``); ``script`` must exist at that path on every node Ray
    may pick (an image, a shared file system, or Ray's ``runtime_env``
    ``working_dir`` with a relative path).  ``transport``: ``unix`` when Ray
    and the ingress share one host, ``tls`` (with ``tls=(ca, cert, key)``,
    paths on every node) or ``tcp`` (the ingress's --insecure-workers) across
    hosts.  Use from a driver connected with ``ray.init``.
    """

    def __init__(self, script, ingress, name=None, num_cpus=1, num_gpus=0, resources=None,
                 memory=None, env=None, transport="unix", tls=None, runtime_env=None,
                 start_timeout=60.0, grace=15.0):
        if transport not in TRANSPORTS:
            raise ValueError("transport must be one of %s, not %r" % (", ".join(TRANSPORTS), transport))
        self.script = script
        self.ingress = ingress
        self.name = name or os.path.splitext(os.path.basename(script))[0]
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus,
                        "resources": dict(resources or {}), "max_restarts": 0}
        if memory is not None:
            self.options["memory"] = memory
        if runtime_env is not None:
            self.options["runtime_env"] = runtime_env
        self.env = dict(env or {})
        self.transport = transport
        self.tls = tls
        self.start_timeout = start_timeout
        self.grace = grace
        #: (actor, info dict) of the running replicas, oldest first.
        self.replicas = []
        self._serial = 0
        # Worker ids must be unique at the ingress: another driver may run
        # replicas of the same script.
        self._prefix = "%s-ray-%s" % (self.name, uuid.uuid4().hex[:6])
        self._actor_class = None

    def _new_actor(self):
        self._serial += 1
        worker_id = "%s-%d" % (self._prefix, self._serial)
        if self._actor_class is None:
            self._actor_class = ray.remote(**self.options)(WorkerReplica)
        actor = self._actor_class.remote(
            self.script, self.ingress, worker_id, self.env, self.transport, self.tls)
        return actor, actor.start.remote(self.start_timeout)

    def scale(self, replicas):
        """Run exactly ``replicas`` workers: start the missing ones (in
        parallel, waiting until each registered), or stop the newest extra
        ones.  Returns the info dicts of all running replicas.  A replica
        Ray cannot place waits in Ray's queue; bound the wait with
        ``start_timeout`` per batch (then :class:`WorkerFailed`)."""
        started = [self._new_actor() for _ in range(replicas - len(self.replicas))]
        if started:
            refs = [ref for _, ref in started]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout * 2)
            failures = []
            for actor, ref in started:
                if ref not in ready:
                    failures.append("a replica was not placed and registered within %gs "
                                    "(resources %s)" % (self.start_timeout * 2, self.options))
                    ray.kill(actor)
                    continue
                try:
                    self.replicas.append((actor, ray.get(ref)))
                except Exception as e:  # the actor's WorkerFailed, wrapped by Ray
                    failures.append(str(e))
                    ray.kill(actor)
            if failures:
                raise WorkerFailed("; ".join(failures))
        while len(self.replicas) > max(replicas, 0):
            self._retire(*self.replicas.pop())
        return [info for _, info in self.replicas]

    def _retire(self, actor, info):
        try:
            ray.get(actor.stop.remote(self.grace), timeout=self.grace + 10)
        finally:
            ray.kill(actor)

    def stop(self):
        """Stop every replica (each withdraws and drains first)."""
        self.scale(0)


#: Environment for a Ray kept on loopback: without the second variable Ray
#: turns "127.0.0.1" in a cluster address into the machine's own address
#: (``get_node_ip_address``) and connects there; the first keeps Ray from
#: sending usage statistics.  Ray reads them when it is imported.
LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def use_loopback(environ=None):
    """Keep Ray on 127.0.0.1 in this process and the ones it starts, though
    ray is imported already (as this module does): sets :data:`LOOPBACK_ENV`
    in ``environ`` (default ``os.environ``) and the value Ray derived from it.
    For tests and one machine, before ``ray.init`` or starting a cluster."""
    from ray._private import ray_constants

    (os.environ if environ is None else environ).update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False


def loopback_node_args(**resources_and_options):
    """``ray.init`` / ``Cluster.add_node`` keyword arguments that keep a
    node on 127.0.0.1 (its GCS, raylet, object manager, agents and workers
    listen and connect there) with no dashboard; for tests and a laptop.
    Needs :func:`use_loopback` first."""
    args = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    args.update(resources_and_options)
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m anyserve_tw.ray",
        description="Run N replicas of an AnyServe worker script as Ray actors until interrupted.")
    parser.add_argument("script", help="worker script (present on every node)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--ingress", default=defaults.DEFAULT_INGRESS,
                        help="management address(es) for ANYSERVE_INGRESS, comma-separated")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--resources", type=json.loads, default={},
                        help='custom resources as JSON, e.g. \'{"accelerator_x": 1}\'')
    parser.add_argument("--transport", choices=TRANSPORTS, default="unix")
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--loopback", action="store_true",
                        help="a Ray on 127.0.0.1 (one machine): don't turn it into this host's address")
    options = parser.parse_args(argv)
    if options.loopback:
        use_loopback()
    tls = None
    if options.tls_ca or options.tls_cert or options.tls_key:
        tls = (options.tls_ca, options.tls_cert, options.tls_key)
    ray.init(address=options.address)
    workers = RayWorkers(options.script, options.ingress, num_cpus=options.num_cpus,
                         num_gpus=options.num_gpus, resources=options.resources,
                         transport=options.transport, tls=tls)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        for info in workers.scale(options.replicas):
            print(json.dumps(info), flush=True)
        while not stopping:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        workers.stop()


if __name__ == "__main__":
    main()
