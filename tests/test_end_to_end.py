"""End to end: a real ingress (twistd), real worker processes, tritonclient.

Each test starts its own ingress on free ports, so a test that kills or stops
a worker cannot disturb another.
"""
import os
import signal
import time

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import (
    BackgroundInfer, CLASSIFIER_SERVER, KSERVE_SERVER, PROBE_MODELS, PROBE_SERVER, Ingress, Worker, infer_inputs, pid_alive,
    status_of, wait_for,
)




class IngressTestCase(SynchronousTestCase):
    workers = ()
    copies = 1
    args = ()
    ready = ()
    front = "aio"  # every class runs on the other fronts too (see the end)

    def setUp(self):
        self.ingress = Ingress(self.workers, self.copies, tuple(self.args) + ("--front", self.front))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready(*self.ready)
        self.client = self.ingress.client()

    def start_worker(self, script, socket_name):
        """A worker started on its own (not supervised) next to this ingress."""
        worker = Worker(script, self.ingress.mgmt_address, os.path.join(self.ingress.tmp, socket_name))
        self.addCleanup(worker.stop, signal.SIGKILL)
        return worker

    def add(self, a, b, **kwargs):
        result = self.client.infer("add", infer_inputs(a=a, b=b), **kwargs)
        return result.as_numpy("sum")

    def seen(self):
        return int(self.client.infer("seen", []).as_numpy("count")[0])


class ExampleModelsTests(IngressTestCase):
    """Every RPC of the protocol against the example workers."""

    workers = (KSERVE_SERVER, CLASSIFIER_SERVER)
    ready = ("add", "echo", ("cls", "v1"), ("cls", "v2"))

    def test_example_client(self):
        """README's ``python examples/client.py`` reaches every example model."""
        import subprocess
        import sys

        from tests.harness import EXAMPLES

        out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "client.py"), "--url", self.ingress.address],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        self.assertIn("server live: True ready: True", out)
        self.assertIn("add: [100 101 102", out)
        self.assertIn("echo: [b'hello' b'world']", out)
        for line in ("cls v1 -> version v1:", "cls v2 -> version v2:", "cls (default) -> version v2:",
                     "no-such-model: StatusCode.NOT_FOUND"):
            self.assertIn(line, out)
        # The two versions answer differently, as the seed's picture has it.
        labels = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in out.splitlines()}
        self.assertNotEqual(labels["cls v1 -> version v1"], labels["cls v2 -> version v2"])

    def test_ingress_and_workers_keep_freed_memory(self):
        """README "Memory": the ingress and each worker apply the malloc settings."""
        lines = [l for l in self.ingress.log().splitlines() if "malloc keeps freed buffers" in l]
        self.assertEqual(len(lines), 3, lines)  # the ingress and its two workers
        self.assertEqual(len([l for l in lines if "[kserve_server-0]" in l or "[classifier_server-0]" in l]), 2)

    def test_server_rpcs(self):
        self.assertTrue(self.client.is_server_live())
        self.assertTrue(self.client.is_server_ready())
        metadata = self.client.get_server_metadata()
        self.assertEqual(metadata.name, "anyserve")
        self.assertTrue(metadata.version)

    def test_model_ready(self):
        for name, version in [("add", ""), ("echo", ""), ("cls", "v1"), ("cls", "v2"), ("cls", "")]:
            self.assertTrue(self.client.is_model_ready(name, version), (name, version))
        self.assertFalse(self.client.is_model_ready("nope"))
        self.assertFalse(self.client.is_model_ready("cls", "v9"))

    def test_model_metadata(self):
        add = self.client.get_model_metadata("add")
        self.assertEqual(add.name, "add")
        self.assertEqual(add.platform, "python")
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in add.inputs],
                         [("a", "INT32", [-1]), ("b", "INT32", [-1])])
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in add.outputs],
                         [("sum", "INT32", [-1])])
        cls = self.client.get_model_metadata("cls", "v1")
        self.assertEqual(list(cls.versions), ["v1", "v2"])
        self.assertEqual([(t.name, t.datatype, list(t.shape)) for t in cls.inputs],
                         [("x", "FP32", [-1, 4])])
        echo = self.client.get_model_metadata("echo")
        self.assertEqual(list(echo.inputs), [])
        self.assertEqual(status_of(lambda: self.client.get_model_metadata("nope"))[0],
                         "StatusCode.NOT_FOUND")

    def test_infer_add(self):
        a = np.arange(16, dtype=np.int32)
        b = np.full(16, 7, dtype=np.int32)
        result = self.client.infer("add", infer_inputs(a=a, b=b), request_id="req-1")
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        self.assertEqual(result.get_response().id, "req-1")
        self.assertEqual(result.get_response().model_name, "add")

    def test_infer_echo_every_datatype(self):
        arrays = {
            "b": np.array([True, False]),
            "i8": np.array([-1, 2], dtype=np.int8),
            "i64": np.array([[1 << 40]], dtype=np.int64),
            "u16": np.array([65535], dtype=np.uint16),
            "f16": np.array([0.5, -2.0], dtype=np.float16),
            "f64": np.array([1e300], dtype=np.float64),
            "s": np.array([b"hello", b"", b"\x00\xff"], dtype=np.object_),
        }
        result = self.client.infer("echo", infer_inputs(**arrays))
        for name, array in arrays.items():
            got = result.as_numpy(name)
            self.assertEqual(got.dtype, array.dtype, name)
            np.testing.assert_array_equal(got, array)

    def test_infer_classifier_versions(self):
        x = np.array([[1, 5, 2, 0], [9, 1, 3, 4]], dtype=np.float32)
        v1 = self.client.infer("cls", infer_inputs(x=x), model_version="v1")
        v2 = self.client.infer("cls", infer_inputs(x=x), model_version="v2")
        default = self.client.infer("cls", infer_inputs(x=x))
        np.testing.assert_array_equal(v1.as_numpy("label"), [1, 0])
        np.testing.assert_array_equal(v2.as_numpy("label"), [3, 1])
        np.testing.assert_array_equal(default.as_numpy("label"), [3, 1])
        self.assertEqual(default.get_response().model_version, "v2")

    def test_requested_outputs(self):
        import tritonclient.grpc as grpcclient

        arrays = dict(p=np.array([1], dtype=np.int32), q=np.array([2], dtype=np.int32))
        result = self.client.infer("echo", infer_inputs(**arrays),
                                   outputs=[grpcclient.InferRequestedOutput("q")])
        self.assertEqual([o.name for o in result.get_response().outputs], ["q"])

    def test_bad_requests(self):
        """Wrong datatype, shape, a missing input: INVALID_ARGUMENT; unknown version: NOT_FOUND."""
        a = np.arange(4, dtype=np.int32)
        code, message = status_of(lambda: self.client.infer(
            "add", infer_inputs(a=a, b=a.astype(np.float32))))
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT")
        self.assertIn("datatype", message)
        code, message = status_of(lambda: self.client.infer("add", infer_inputs(a=a)))
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT")
        self.assertIn("missing", message)
        code, _ = status_of(lambda: self.client.infer(
            "cls", infer_inputs(x=np.zeros((2, 3), dtype=np.float32)), model_version="v1"))
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT")
        code, message = status_of(lambda: self.client.infer(
            "cls", infer_inputs(x=np.zeros((1, 4), dtype=np.float32)), model_version="v7"))
        self.assertEqual(code, "StatusCode.NOT_FOUND")
        self.assertIn("v7", message)
        # The workers are fine afterwards.
        np.testing.assert_array_equal(self.add(a, a), 2 * a)

    def test_malformed_bytes(self):
        """Bytes that are not a ModelInferRequest get INVALID_ARGUMENT, from the
        ingress (broken at the top level) or from the worker (broken inside)."""
        channel = grpc.insecure_channel(self.ingress.address)
        self.addCleanup(channel.close)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        broken_top = b"\x0a\xff\xff"  # field 1, length runs past the end
        # model_name="add", then field 5 (inputs) holding a truncated sub-message.
        broken_inside = b"\x0a\x03add" + b"\x2a\x04\x0a\x09ab"
        for payload in (broken_top, broken_inside):
            with self.assertRaises(grpc.RpcError) as caught:
                infer(payload, timeout=10)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, payload)
        a = np.arange(3, dtype=np.int32)
        np.testing.assert_array_equal(self.add(a, a), 2 * a)

    def test_large_tensors(self):
        """Two 4 MiB inputs (over gRPC's default 4 MiB cap) round-trip intact."""
        a = np.arange(1 << 20, dtype=np.int32)
        b = np.ones(1 << 20, dtype=np.int32)
        np.testing.assert_array_equal(self.add(a, b), a + b)


class ProbeTests(IngressTestCase):
    """Failures and routing, checked from the workers' side too."""

    workers = (KSERVE_SERVER, PROBE_SERVER)
    ready = ("add",) + PROBE_MODELS

    def test_unknown_model_never_reaches_a_worker(self):
        before = self.seen()
        code, message = status_of(lambda: self.client.infer("no-such-model", infer_inputs(x=np.zeros(1))))
        self.assertEqual(code, "StatusCode.NOT_FOUND")
        self.assertEqual(message, "Request for unknown model: 'no-such-model' is not found")
        # The probe worker handled exactly one more request: the next 'seen'.
        self.assertEqual(self.seen(), before + 1)

    def test_handler_error_is_internal_with_its_message(self):
        x = np.array([b"kaput"], dtype=np.object_)
        code, message = status_of(lambda: self.client.infer("fail", infer_inputs(x=x)))
        self.assertEqual(code, "StatusCode.INTERNAL")
        self.assertIn("boom: kaput", message)
        self.assertIn("ValueError", message)
        self.assertTrue(self.client.is_model_ready("fail"))

    def test_handler_chosen_status(self):
        code, message = status_of(lambda: self.client.infer(
            "reject", infer_inputs(x=np.array([-1], dtype=np.int32)), client_timeout=10))
        self.assertEqual((code, message), ("StatusCode.INVALID_ARGUMENT", "x must be positive"))

    def test_deadline_exceeded(self):
        seconds = np.array([3.0])
        started = time.monotonic()
        code, _ = status_of(lambda: self.client.infer(
            "slow", infer_inputs(seconds=seconds), client_timeout=0.5))
        self.assertEqual(code, "StatusCode.DEADLINE_EXCEEDED")
        self.assertLess(time.monotonic() - started, 2.5)
        # Other requests, to the same worker too, carry on.
        self.assertTrue(self.client.infer("whoami", []).as_numpy("pid")[0] > 0)
        a = np.arange(3, dtype=np.int32)
        np.testing.assert_array_equal(self.add(a, a), 2 * a)

    def test_worker_importing_tritonclient_calls_another_model(self):
        """tritonclient's inference.* classes and ours coexist in one worker."""
        a = np.arange(6, dtype=np.int32)
        url = np.array([self.ingress.address.encode()], dtype=np.object_)
        result = self.client.infer("relay", infer_inputs(url=url, a=a))
        np.testing.assert_array_equal(result.as_numpy("sum"), 2 * a)

    def test_deferred_handler_runs_on_the_loop(self):
        x = np.arange(3, dtype=np.int32)
        result = self.client.infer("later", infer_inputs(x=x))
        np.testing.assert_array_equal(result.as_numpy("x"), x * 10)
        self.assertEqual(result.as_numpy("on_loop").tolist(), [True])

    def test_asynchronous_handler_returning_a_value(self):
        a = np.arange(4, dtype=np.int32)
        result = self.client.infer("inline_add", infer_inputs(a=a, b=a + 1))
        np.testing.assert_array_equal(result.as_numpy("sum"), 2 * a + 1)
        self.assertEqual(result.as_numpy("on_loop").tolist(), [True])

    def test_async_handler(self):
        a = np.arange(5, dtype=np.int32)
        result = self.client.infer("async_add", infer_inputs(a=a, b=a))
        np.testing.assert_array_equal(result.as_numpy("sum"), 2 * a)

    def test_sigkill_worker_under_load(self):
        """Requests in flight on a killed worker fail with UNAVAILABLE within a
        second; the other worker keeps answering; the killed one comes back."""
        probe_pid = int(self.client.infer("whoami", []).as_numpy("pid")[0])
        self.assertIn(probe_pid, self.ingress.worker_pids(PROBE_SERVER))
        calls = [BackgroundInfer(self.ingress.address, "slow", seconds=np.array([30.0]))
                 for _ in range(4)]
        time.sleep(0.5)  # let the four requests reach the worker
        killed_at = time.monotonic()
        os.kill(probe_pid, signal.SIGKILL)
        # Meanwhile the other worker serves.
        a = np.arange(8, dtype=np.int32)
        for _ in range(20):
            np.testing.assert_array_equal(self.add(a, a), 2 * a)
        for call in calls:
            code, message, at = call.join()
            self.assertEqual(code, "StatusCode.UNAVAILABLE", message)
            self.assertLess(at - killed_at, 1.0)
        # Supervised: a new probe process registers and serves again.
        new_pid = wait_for(
            lambda: int(self.client.infer("whoami", []).as_numpy("pid")[0]),
            timeout=20, what="probe worker restarted",
        )
        self.assertNotEqual(new_pid, probe_pid)
        self.assertFalse(pid_alive(probe_pid))
        np.testing.assert_array_equal(self.add(a, a), 2 * a)


class HeartbeatTests(IngressTestCase):
    workers = (KSERVE_SERVER, PROBE_SERVER)
    args = ("--heartbeat-timeout", "2")
    ready = ("add", "whoami")

    def test_sigstop_worker_is_evicted(self):
        """A hung worker (SIGSTOP) keeps its sockets open; missed heartbeats evict
        it, its model stops being ready, and requests get UNAVAILABLE fast.
        Being supervised, it is replaced: a new process serves the model."""
        pid = int(self.client.infer("whoami", []).as_numpy("pid")[0])
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            wait_for(lambda: not self.client.is_model_ready("whoami"), timeout=10,
                     what="whoami evicted")
            self.assertLess(time.monotonic() - stopped_at, 2 + 1.5)
            code, _ = status_of(lambda: self.client.infer("whoami", [], client_timeout=5))
            self.assertEqual(code, "StatusCode.UNAVAILABLE")
            self.assertFalse(self.client.is_server_ready())
            a = np.arange(4, dtype=np.int32)
            np.testing.assert_array_equal(self.add(a, a), 2 * a)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: self.client.is_model_ready("whoami"), timeout=20,
                 what="whoami served again")
        self.assertNotEqual(int(self.client.infer("whoami", []).as_numpy("pid")[0]), pid)
        self.assertIn("replacing worker", self.ingress.log())


class MessageSizeTests(IngressTestCase):
    """A supervised worker gets the ingress's --max-message-size and refuses
    to send a larger response itself; the next request is unaffected."""

    workers = (PROBE_SERVER,)
    args = ("--max-message-size", "1000000")
    ready = ("big",)

    def big(self, n):
        return self.client.infer("big", infer_inputs(n=np.array([n], dtype=np.int64)))

    def test_oversize_response(self):
        code, message = status_of(lambda: self.big(2000000))
        self.assertEqual(code, "StatusCode.RESOURCE_EXHAUSTED")
        # The worker's own refusal ("worker response of ..." would be the ingress's).
        self.assertRegex(message, r"^response of \d+ bytes exceeds the 1000000-byte limit$")
        self.assertEqual(self.big(1000).as_numpy("data").shape, (1000,))


class SharedModelTests(IngressTestCase):
    workers = (PROBE_SERVER,)
    copies = 2
    ready = ("whoami",)

    def test_two_workers_share_one_model(self):
        wait_for(lambda: len(self.ingress.worker_pids(PROBE_SERVER)) == 2, what="two workers")
        pids = set(self.ingress.worker_pids(PROBE_SERVER))
        # Within 20 requests in a row, each worker answers at least once.
        wait_for(
            lambda: {int(self.client.infer("whoami", []).as_numpy("pid")[0]) for _ in range(20)} == pids,
            timeout=10, what="both workers answering",
        )


class StandaloneWorkerTests(IngressTestCase):
    def test_standalone_worker_registers_and_unregisters(self):
        """``python examples/kserve_server.py`` next to a running ingress."""
        ingress, client = self.ingress, self.client
        worker = self.start_worker(KSERVE_SERVER, "w.sock")
        socket_path = worker.socket_path
        ingress.wait_ready("add", "echo")
        a = np.arange(4, dtype=np.int32)
        np.testing.assert_array_equal(
            client.infer("add", infer_inputs(a=a, b=a)).as_numpy("sum"), 2 * a)
        self.assertTrue(os.path.exists(socket_path))
        self.assertEqual(worker.stop(), 0)
        self.assertFalse(os.path.exists(socket_path))
        # It said so itself (a dropped connection alone would not log this).
        wait_for(lambda: "model echo:- withdrawn by worker" in ingress.log(), timeout=5,
                 what="UnregisterModel logged")
        # Known, but with no live worker: not ready, UNAVAILABLE.
        self.assertFalse(client.is_model_ready("add"))
        code, _ = status_of(lambda: client.infer("add", infer_inputs(a=a, b=a)))
        self.assertEqual(code, "StatusCode.UNAVAILABLE")


class WorkerDrainTests(IngressTestCase):
    args = ("--heartbeat-timeout", "1")

    def test_worker_drains_on_sigterm_while_heartbeating(self):
        """A worker told to stop withdraws its models at once but finishes the
        request in flight, heartbeating meanwhile, so the ingress (heartbeat
        timeout 1 s) does not evict it half way."""
        ingress = self.ingress
        worker = self.start_worker(PROBE_SERVER, "p.sock")
        ingress.wait_ready("slow")
        call = BackgroundInfer(ingress.address, "slow", seconds=np.array([3.0]))
        time.sleep(0.5)
        worker.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not ingress.client().is_model_ready("slow"), timeout=5,
                 what="slow withdrawn")
        status, result = call.join()[:2]
        self.assertEqual(status, "ok", result)
        self.assertEqual(float(result.as_numpy("seconds")[0]), 3.0)
        self.assertEqual(worker.process.wait(20), 0)  # the one SIGTERM was enough


class StartupFailureTests(SynchronousTestCase):
    front = "aio"

    def test_port_in_use_leaves_no_worker_behind(self):
        """If the inference port can't be bound, twistd exits and no worker
        process or socket is left (workers start only after every port is bound)."""
        import shutil
        import socket
        import tempfile

        from tests.harness import cmdline

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        marker_dir = tempfile.mkdtemp(prefix="as-port-", dir="/tmp")
        self.addCleanup(shutil.rmtree, marker_dir, True)
        script = os.path.join(marker_dir, "marked_worker.py")
        shutil.copy(KSERVE_SERVER, script)
        ingress = Ingress((script,), args=("--port", str(holder.getsockname()[1]), "--front", self.front))
        self.addCleanup(ingress.cleanup)
        self.assertNotEqual(ingress.process.wait(30), 0)

        def marked():
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if script in cmdline(int(pid)):
                        found.append(int(pid))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            return found

        time.sleep(0.5)
        self.assertEqual(marked(), [])
        self.assertEqual(os.listdir(ingress.socket_dir), [])


class ShutdownTests(IngressTestCase):
    workers = (KSERVE_SERVER, PROBE_SERVER)
    args = ("--grace", "10")
    ready = ("add", "slow")

    def test_sigterm_drains_and_cleans_up(self):
        """SIGTERM: the request in flight finishes, new ones are refused, every
        worker process exits, no socket file is left."""
        ingress = self.ingress
        workers = ingress.worker_pids()
        self.assertEqual(len(workers), 2)
        self.assertEqual(len(os.listdir(ingress.socket_dir)), 2)
        call = BackgroundInfer(ingress.address, "slow", client_timeout=20, seconds=np.array([1.5]))
        time.sleep(0.4)
        stopping = time.monotonic()
        ingress.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        a = np.arange(3, dtype=np.int32)
        code, _ = status_of(lambda: ingress.client().infer("add", infer_inputs(a=a, b=a), client_timeout=5))
        self.assertEqual(code, "StatusCode.UNAVAILABLE")
        # twistd re-raises the signal it stopped on once shutdown is complete,
        # so an orderly stop on SIGTERM exits with -SIGTERM.
        self.assertEqual(ingress.process.wait(30), -signal.SIGTERM)
        status, result = call.join()[:2]
        self.assertEqual(status, "ok", result)
        self.assertEqual(float(result.as_numpy("seconds")[0]), 1.5)
        self.assertLess(time.monotonic() - stopping, 15)
        for pid in workers:
            self.assertFalse(pid_alive(pid), pid)
        self.assertEqual(os.listdir(ingress.socket_dir), [])
        self.assertIn("Server Shut Down", ingress.log())


#: The other fronts every end-to-end class runs on: (class-name suffix, ``--front``).
OTHER_FRONTS = (("OnThreads", "threads"), ("OnH2", "h2"))


def on_the_other_fronts(namespace, fronts=OTHER_FRONTS):
    """Add copies of every test class here whose ``front`` is "aio", one per
    other front: ``...OnThreads`` (``--front threads``), ``...OnH2``
    (``--front h2``)."""
    for name, case in list(namespace.items()):
        if (isinstance(case, type) and issubclass(case, SynchronousTestCase)
                and getattr(case, "front", None) == "aio" and case.__module__ == namespace["__name__"]
                and name != "IngressTestCase"):
            for suffix, front in fronts:
                namespace[name + suffix] = type(
                    name + suffix, (case,), {"front": front, "__module__": namespace["__name__"]})


on_the_other_fronts(globals())
