"""Handlers stuck past their requests' deadlines, in a real worker (issue 8,
point 4): they keep their threads (Python cannot stop a thread), but no
longer count against their model nor the worker's thread budget, so other
models keep answering; a worker whose threads are all stuck says it is
unhealthy and refuses what needs a thread at once; SIGTERM never waits for
abandoned handlers, nor past its grace for the others.  A handler's
exception leaves its traceback in the worker's log."""
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import ROOT, Ingress, infer_inputs, status_of, wait_for

STUCK_SERVER = os.path.join(ROOT, "tests", "workers", "stuck_server.py")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: How long the ``slow`` handlers sleep: longer than any test here.
SLEEP = 30.0
#: The clients' deadline for them.
DEADLINE = 0.5
#: The worker's shutdown grace (ModelServer's default).
GRACE = 10.0


def slow_request(seconds):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="seconds", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.array([seconds], dtype="<f8").tobytes())
    return request.SerializeToString()


class StuckThreadTestCase(SynchronousTestCase):
    """An ingress of its own and one stuck_server worker, started on its own
    with ``threads`` handler threads, its log in ``worker_log``."""

    threads = 4

    def setUp(self):
        self.ingress = Ingress()
        self.addCleanup(self.ingress.cleanup)
        self.worker_log = os.path.join(self.ingress.tmp, "worker.log")
        env = dict(os.environ, ANYSERVE_INGRESS=self.ingress.mgmt_address,
                   ANYSERVE_SOCKET=os.path.join(self.ingress.tmp, "stuck.sock"),
                   ANYSERVE_THREADS=str(self.threads), ANYSERVE_HEARTBEAT_INTERVAL="0.5")
        with open(self.worker_log, "wb") as log:
            self.worker = subprocess.Popen([sys.executable, STUCK_SERVER], env=env, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(self.kill_worker)
        self.ingress.wait_ready("slow", "add", "health")
        self.client = self.ingress.client()
        self.channel = grpc.insecure_channel(self.ingress.address)
        self.addCleanup(self.channel.close)

    def kill_worker(self):
        if self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()

    def log(self):
        with open(self.worker_log) as f:
            return f.read()

    def health(self):
        """(healthy, reason, stuck threads, threads holding a handler)."""
        result = self.client.infer("health", [], client_timeout=5)
        return (bool(result.as_numpy("healthy")[0]), result.as_numpy("reason")[0].decode(),
                int(result.as_numpy("stuck")[0]), int(result.as_numpy("occupied")[0]))

    def add(self, timeout):
        a = np.arange(4, dtype=np.int32)
        result = self.client.infer("add", infer_inputs(a=a, b=a), client_timeout=timeout)
        np.testing.assert_array_equal(result.as_numpy("sum"), 2 * a)

    def slow_past_deadline(self, count):
        """``count`` slow requests at once, each given up after DEADLINE."""
        infer = self.channel.unary_unary(MODEL_INFER)
        futures = [infer.future(slow_request(SLEEP), timeout=DEADLINE) for _ in range(count)]
        self.assertEqual({f.exception(timeout=10).code() for f in futures},
                         {grpc.StatusCode.DEADLINE_EXCEEDED})

    def terminate(self):
        """SIGTERM the worker: seconds until it exited, and its exit code."""
        started = time.monotonic()
        self.worker.send_signal(signal.SIGTERM)
        try:
            code = self.worker.wait(GRACE + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker still running %.0fs after SIGTERM" % (GRACE + 10))
        return time.monotonic() - started, code


class StuckThreadTests(StuckThreadTestCase):
    threads = 4

    def test_stuck_handlers_leave_threads_for_the_others(self):
        """8 requests to a model whose handler sleeps 30 s, each given up
        after 0.5 s: ``add`` (which needs a thread) still answers, and so
        does ``slow`` itself, while the stuck handlers sleep on; SIGTERM
        then does not wait for them.  (And a handler's exception is logged
        with its traceback.)"""
        self.slow_past_deadline(8)
        for _ in range(3):
            self.add(timeout=2)
        healthy, reason, stuck, occupied = self.health()
        # At most threads - 1 run at once; as each is given up, a waiting
        # one whose deadline has not passed yet may start in its place.
        self.assertTrue(3 <= stuck <= 8, stuck)
        self.assertEqual((healthy, reason, occupied), (True, "", stuck))
        result = self.client.infer("slow", infer_inputs(seconds=np.array([0.0])), client_timeout=2)
        self.assertEqual(result.as_numpy("seconds")[0], 0.0)
        self.assertIn("its thread is stuck", self.log())
        self.check_traceback_logged()  # here rather than in a worker of its own
        elapsed, code = self.terminate()
        self.assertLess(elapsed, 3.0)  # nothing owed an answer: no drain
        self.assertEqual(code, 0)

    def check_traceback_logged(self):
        """A handler's exception: INTERNAL naming it, and its traceback,
        with the model's name, in the worker's log."""
        code, message = status_of(lambda: self.client.infer(
            "fail", infer_inputs(x=np.array([7], dtype=np.int32)), client_timeout=5))
        self.assertEqual(code, "StatusCode.INTERNAL")
        self.assertIn("ValueError: stuck_server fail 7", message)
        wait_for(lambda: "ValueError: stuck_server fail 7" in self.log(), 5, what="the traceback logged")
        log = self.log()
        self.assertIn("model fail failed", log)
        self.assertIn("Traceback (most recent call last)", log)
        self.assertIn('stuck_server.py", line', log)

    def test_sigterm_waits_for_a_running_request_at_most_its_grace(self):
        """A handler still within its deadline is waited for up to the grace
        (10 s), not for its whole 30 s run."""
        infer = self.channel.unary_unary(MODEL_INFER)
        running = infer.future(slow_request(SLEEP), timeout=60)
        wait_for(lambda: self.health()[3] == 1, 10, what="the slow handler running")
        elapsed, code = self.terminate()
        self.assertGreater(elapsed, GRACE - 1)  # it waited for the request...
        self.assertLess(elapsed, GRACE + 1.5)  # ...but not past its grace
        self.assertIn("still running after", self.log())
        self.assertIsNotNone(running.exception(timeout=10))



class EveryThreadStuckTests(StuckThreadTestCase):
    """One thread, so at most two stuck threads replaced: the third stuck
    handler leaves none."""

    threads = 1

    def test_unhealthy_and_evicted(self):
        """The third stuck handler leaves no thread: the worker says so in
        its next heartbeat, the ingress evicts it (its models UNAVAILABLE at
        once), and it does not register again while unhealthy."""
        for _ in range(2):
            self.slow_past_deadline(1)
            self.add(timeout=2)
        self.assertEqual(self.health()[:3], (True, "", 2))
        self.slow_past_deadline(1)
        wait_for(lambda: "reports itself unhealthy" in self.ingress.log(), 5, what="the worker evicted")
        self.assertIn("all 3 handler threads are stuck", self.ingress.log())
        self.assertIn("'slow': 3", self.ingress.log())
        started = time.monotonic()
        code, _ = status_of(lambda: self.add(timeout=5))
        self.assertLess(time.monotonic() - started, 2.0)  # refused, not queued
        self.assertEqual(code, "StatusCode.UNAVAILABLE")
        self.assertIn("worker unhealthy", self.log())
        time.sleep(2.0)  # four heartbeats
        self.assertFalse(self.client.is_model_ready("add"))
        elapsed, code = self.terminate()
        self.assertLess(elapsed, 3.0)
        self.assertEqual(code, 0)


class UnhealthySupervisedWorkerTests(SynchronousTestCase):
    def test_replaced(self):
        """A supervised worker whose every thread is stuck is evicted and
        replaced: a new process serves ``add``."""
        ingress = Ingress([STUCK_SERVER], env=dict(os.environ, ANYSERVE_THREADS="1"))
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready("slow", "add")
        [pid] = ingress.worker_pids(STUCK_SERVER)
        with grpc.insecure_channel(ingress.address) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            for _ in range(3):
                with self.assertRaises(grpc.RpcError):
                    infer(slow_request(SLEEP), timeout=DEADLINE)
        wait_for(lambda: "reports itself unhealthy" in ingress.log(), 10, what="the worker evicted")
        wait_for(lambda: ingress.worker_pids(STUCK_SERVER) and ingress.worker_pids(STUCK_SERVER) != [pid],
                 20, what="a new worker process")
        ingress.wait_ready("add")
        a = np.arange(4, dtype=np.int32)
        result = ingress.client().infer("add", infer_inputs(a=a, b=a), client_timeout=5)
        np.testing.assert_array_equal(result.as_numpy("sum"), 2 * a)
