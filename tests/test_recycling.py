"""Worker recycling with real processes (``--worker-max-requests``,
``--worker-max-rss``): under continuous load from real gRPC clients a
worker is replaced again and again without a single failed request, a
request in flight on the old worker is answered by it, and every recycle
is logged with its reason."""
import collections
import os
import re
import threading

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import ROOT, BackgroundInfer, Ingress, infer_inputs, pid_alive, wait_for

ENV_SERVER = os.path.join(ROOT, "tests", "workers", "env_server.py")


class Load:
    """``threads`` clients calling ``work`` back to back until stopped,
    each checking its answer, counting answers per worker pid."""

    def __init__(self, address, threads=4):
        self.pids = collections.Counter()
        self.errors = []
        self.ok = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address, n)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, address, n):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(address)
        i = 0
        try:
            while not self._stop.is_set():
                i += 1
                x = np.array([n * 1000000 + i], dtype=np.int32)
                try:
                    result = client.infer("work", infer_inputs(x=x), client_timeout=30)
                    if result.as_numpy("x").tolist() != x.tolist():
                        raise AssertionError("wrong answer %r for %r" % (result.as_numpy("x"), x))
                    pid = int(result.as_numpy("pid")[0])
                except Exception as e:
                    with self._lock:
                        self.errors.append(repr(e))
                else:
                    with self._lock:
                        self.ok += 1
                        self.pids[pid] += 1
        finally:
            client.close()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


class RecyclingTests(SynchronousTestCase):
    def ingress(self, *args):
        ingress = Ingress([ENV_SERVER], args=args, http=True)
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready("work", timeout=90)  # a loaded CI machine starts slowly
        return ingress

    def test_recycled_after_n_requests_under_load_losing_none(self):
        ingress = self.ingress("--worker-max-requests", "200")
        [first] = ingress.worker_pids()
        # In flight on the first worker across its recycle: it must answer.
        in_flight = BackgroundInfer(ingress.address, "slow", seconds=np.array([3.0]))
        wait_for(lambda: re.search(rb'anyserve_requests_in_flight\{model="slow"[^}]*\} 1\.0',
                                   ingress.http_get("/metrics")[2]), 20, what="the slow request in flight")
        load = Load(ingress.address)
        try:
            wait_for(lambda: len(load.pids) >= 3, 90, what="two recycles under load")
        finally:
            load.stop()
        self.assertEqual(load.errors, [])
        self.assertGreaterEqual(load.ok, 400)
        self.assertIn(first, load.pids)
        status, result, _ = in_flight.join(30)
        self.assertEqual(status, "ok")
        self.assertEqual(int(result.as_numpy("pid")[0]), first)

        log = ingress.log()
        reasons = re.findall(r"recycling worker env_server-0 \(pid \d+\): (.*); starting its replacement", log)
        self.assertGreaterEqual(len(reasons), 2, log)
        self.assertEqual(set(reasons), {"served 200 requests (--worker-max-requests 200)"})
        exited = "recycled worker env_server-0 (pid %d) exited with code 0" % first
        wait_for(lambda: exited in ingress.log(), 20, what="the first worker's exit logged")
        self.assertFalse(pid_alive(first))
        self.assertNotIn(first, ingress.worker_pids())
        self.assertNotIn("Traceback", ingress.log())

    def test_recycled_above_a_resident_memory_limit(self):
        """Every Python worker is above 1 MB: the first is recycled as soon
        as it has registered, and its replacement serves."""
        ingress = self.ingress("--worker-max-rss", "1")
        client = ingress.client()
        first = int(client.infer("work", infer_inputs(x=np.array([1], dtype=np.int32))).as_numpy("pid")[0])
        wait_for(lambda: "recycled worker env_server-0 (pid %d) exited with code 0" % first in ingress.log(),
                 60, what="the first worker recycled")
        self.assertRegex(ingress.log(), r"recycling worker env_server-0 \(pid %d\): resident memory \d+ MB "
                                        r"is above --worker-max-rss 1 MB" % first)

        def answered_by_another():
            result = client.infer("work", infer_inputs(x=np.array([2], dtype=np.int32)))
            return int(result.as_numpy("pid")[0]) != first
        wait_for(answered_by_another, 30, what="an answer from the replacement")
