"""Real processes for end-to-end tests: an ingress under twistd, its workers,
and tritonclient as the client."""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
KSERVE_SERVER = os.path.join(EXAMPLES, "kserve_server.py")
CLASSIFIER_SERVER = os.path.join(EXAMPLES, "classifier_server.py")
PROBE_SERVER = os.path.join(ROOT, "tests", "workers", "probe_server.py")
#: Every model of PROBE_SERVER: it registers them concurrently, in no order.
PROBE_MODELS = ("whoami", "seen", "slow", "fail", "reject", "big", "relay", "later",
                "inline_add", "async_add", "nap", "cancelled")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD_MAIN = "from twisted.scripts.twistd import run; run()"


def free_port():
    """A port free now, below Linux's ephemeral range (32768 and up), so
    that no client connection of this or another test takes it between now
    and the moment the process under test binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port found in 20000-32767")


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid):
    """Pids of the direct children of ``pid``."""
    found = []
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return found


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def rss_bytes(pid):
    """Resident memory of process ``pid``, bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def status_of(call):
    """Run ``call``; return (grpc status name, message) of the error it raised."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as e:
        return e.status(), e.message()
    raise AssertionError("expected an error, the call succeeded")


class Ingress:
    """``twistd -n anyserve`` with its supervised workers, on free ports."""

    def __init__(self, workers=(), copies=1, args=(), python=None, env=None, http=False):
        """``python``: run twistd with this interpreter instead of ours;
        ``env``: its environment instead of ours; ``http``: serve REST and
        ``/metrics`` on a free port (``http_port``), else no HTTP server
        (``--http-port 0``, so no test binds the default 8080)."""
        self.http = http
        self.tmp = tempfile.mkdtemp(prefix="as-e2e-", dir="/tmp")
        self.socket_dir = os.path.join(self.tmp, "s")
        os.mkdir(self.socket_dir)
        self.log_path = os.path.join(self.tmp, "ingress.log")
        self.stderr_path = os.path.join(self.tmp, "ingress.stderr")
        self._twistd = [TWISTD] if python is None else [python, "-c", TWISTD_MAIN]
        self._options = ["--socket-dir", self.socket_dir, "--workers", str(copies)]
        for script in workers:
            self._options += ["--worker", script]
        self._options += list(args)
        self._env = env
        self._client = None
        self._start()

    def _start(self):
        """Start twistd on ports free a moment ago."""
        self.port = free_port()
        self.mgmt = free_port()
        self.http_port = free_port() if self.http else None
        command = self._twistd + [
            "-n", "--pidfile=", "--logfile=" + self.log_path, "anyserve",
            "--port", str(self.port), "--mgmt", str(self.mgmt), "--host", "127.0.0.1",
            "--http-port", str(self.http_port or 0),
        ] + self._options
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(command, cwd=self.tmp, env=self._env, stdin=subprocess.DEVNULL,
                                            stderr=stderr)

    def _lost_a_port(self):
        """Whether the ingress exited because one of its ports was taken
        between free_port() and its bind (another process's random port)."""
        if self.process.poll() is None:
            return False
        with open(self.stderr_path, errors="replace") as f:
            said = f.read() + self.log()
        return "cannot listen on" in said or "Address already in use" in said

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    @property
    def mgmt_address(self):
        return "127.0.0.1:%d" % self.mgmt

    @property
    def token_path(self):
        """Where the ingress keeps its management token (the default file
        for its port, which standalone workers find by themselves)."""
        from anyserve_tw.wire import credentials

        return credentials.default_token_path(self.mgmt)

    def mgmt_metadata(self):
        """Call metadata carrying the ingress's token, as a worker's calls do."""
        from anyserve_tw.wire import credentials

        wait_for(lambda: os.path.exists(self.token_path), what="the management token file")
        return credentials.metadata(credentials.read_token(self.token_path))

    @property
    def http_address(self):
        """``127.0.0.1:PORT`` of the HTTP server (None without ``http=True``)."""
        return None if self.http_port is None else "127.0.0.1:%d" % self.http_port

    def http_get(self, path, timeout=10.0):
        """GET ``path`` from the HTTP server: (status, headers, body bytes)."""
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def client(self):
        import tritonclient.grpc as grpcclient

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.address)
        return self._client

    def wait_ready(self, *models, timeout=30.0):
        """Wait until the server is live and every ``(name, version)`` or name is ready.
        An ingress that lost one of its ports to another process before it
        could bind it is started again on others (twice at most)."""
        for attempt in range(3):
            client = self.client()
            wait_for(lambda: self.process.poll() is not None or client.is_server_live(), timeout,
                     what="ingress live")
            if not self._lost_a_port() or attempt == 2:
                break
            self.close_client()
            try:
                os.unlink(self.token_path)
            except FileNotFoundError:
                pass
            self._start()
        if self.process.poll() is not None:
            raise AssertionError("the ingress exited with code %s before it was live"
                                 % self.process.returncode)
        for model in models:
            name, version = model if isinstance(model, tuple) else (model, "")
            wait_for(lambda: client.is_model_ready(name, version), timeout,
                     what="model %s:%s ready" % (name, version))

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def worker_pids(self, script=None):
        pids = children(self.process.pid)
        if script is not None:
            pids = [p for p in pids if os.path.basename(script) in cmdline(p)]
        return pids

    def close_client(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self, timeout=30.0):
        """SIGTERM the ingress; return its exit code (SIGKILL after ``timeout``)."""
        self.close_client()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("ingress did not exit within %.0fs of SIGTERM" % timeout)
        return self.process.returncode

    def cleanup(self):
        """Best-effort teardown: no process or temp file outlives a test."""
        pids = []
        try:
            pids = self.worker_pids()
        except (FileNotFoundError, ProcessLookupError):
            pass
        try:
            self.stop()
        finally:
            for pid in pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.tmp, ignore_errors=True)
            try:
                os.unlink(self.token_path)
            except FileNotFoundError:
                pass


class Worker:
    """A worker script started on its own, as ``python examples/kserve_server.py``."""

    def __init__(self, script, ingress_address, socket_path):
        env = dict(os.environ, ANYSERVE_INGRESS=ingress_address, ANYSERVE_SOCKET=socket_path,
                   ANYSERVE_HEARTBEAT_INTERVAL="0.5")
        self.socket_path = socket_path
        self.process = subprocess.Popen([sys.executable, script], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def infer_inputs(**arrays):
    """tritonclient InferInputs from numpy arrays (datatype inferred)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        array = np.asarray(array)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class BackgroundInfer:
    """One ModelInfer on its own client and thread, for requests that must be
    in flight while the test does something else (kill, stop, signal)."""

    def __init__(self, address, model, client_timeout=60, **arrays):
        import threading

        self.outcome = None  # ("ok", InferResult, when) or (status, message, when)
        self._thread = threading.Thread(
            target=self._run, args=(address, model, client_timeout, arrays)
        )
        self._thread.start()

    def _run(self, address, model, client_timeout, arrays):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(address)
        try:
            result = client.infer(model, infer_inputs(**arrays), client_timeout=client_timeout)
            self.outcome = ("ok", result, time.monotonic())
        except InferenceServerException as e:
            self.outcome = (e.status(), e.message(), time.monotonic())
        finally:
            client.close()

    def join(self, timeout=30):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("request still running after %ss" % timeout)
        return self.outcome
