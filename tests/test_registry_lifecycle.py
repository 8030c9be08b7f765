"""The registry forgets, with real processes (hardening issue, point 6).

- a standalone worker stopped with SIGTERM withdraws its models: they are
  NOT_FOUND at once and ServerReady is true again;
- one killed with SIGKILL leaves its models known but UNAVAILABLE (not
  ready, ServerReady false) for ``--forget-after`` seconds, then NOT_FOUND;
- for ``--startup-window`` seconds an unknown model is UNAVAILABLE
  ("workers are registering"), not NOT_FOUND;
- ``--max-inflight-per-model``: past it, RESOURCE_EXHAUSTED at once for
  that model, while the others answer.
"""
import os
import signal
import time

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import (
    KSERVE_SERVER, PROBE_SERVER, BackgroundInfer, Ingress, Worker, infer_inputs, status_of, wait_for,
)


def add_inputs():
    return infer_inputs(a=np.array([1, 2], dtype=np.int32), b=np.array([3, 4], dtype=np.int32))


class ForgettingTests(SynchronousTestCase):
    forget_after = 3.0

    def setUp(self):
        self.ingress = Ingress(args=("--forget-after", str(self.forget_after), "--startup-window", "0"))
        self.addCleanup(self.ingress.cleanup)
        self.client = self.ingress.client()

    def start_worker(self):
        worker = Worker(KSERVE_SERVER, self.ingress.mgmt_address,
                        os.path.join(self.ingress.tmp, "w%d.sock" % time.monotonic_ns()))
        self.addCleanup(worker.stop, signal.SIGKILL)
        self.ingress.wait_ready("add", "echo")
        self.assertEqual(list(self.client.infer("add", add_inputs()).as_numpy("sum")), [4, 6])
        self.assertTrue(self.client.is_server_ready())
        return worker

    def add_status(self):
        return status_of(lambda: self.client.infer("add", add_inputs()))

    def test_sigterm_withdraws_sigkill_is_forgotten_later(self):
        # A clean exit: the worker withdraws its models, which leave at once.
        worker = self.start_worker()
        self.assertEqual(worker.stop(signal.SIGTERM), 0)
        self.assertEqual(self.add_status(), ("StatusCode.NOT_FOUND",
                                             "Request for unknown model: 'add' is not found"))
        self.assertFalse(self.client.is_model_ready("add"))
        self.assertTrue(self.client.is_server_ready())
        self.assertEqual(self.client.get_model_repository_index().models, [])

        # A crash: known but unavailable, then forgotten.
        worker = self.start_worker()
        worker.stop(signal.SIGKILL)
        lost = time.monotonic()
        status, message = wait_for(lambda: (lambda s: s if s[0] != "StatusCode.OK" else None)(
            self.add_status()), what="add failing after SIGKILL")
        self.assertEqual(status, "StatusCode.UNAVAILABLE")
        self.assertIn("'add'", message)
        self.assertFalse(self.client.is_model_ready("add"))
        self.assertFalse(self.client.is_server_ready())
        self.assertEqual(sorted(m.name for m in self.client.get_model_repository_index().models),
                         ["add", "echo"])
        wait_for(lambda: self.add_status()[0] == "StatusCode.NOT_FOUND", timeout=self.forget_after + 15,
                 what="add forgotten")
        self.assertGreaterEqual(time.monotonic() - lost, self.forget_after - 0.5)
        self.assertTrue(self.client.is_server_ready())
        self.assertEqual(self.client.get_model_repository_index().models, [])

        # And a worker registering it again serves it as before.
        self.start_worker()


class StartupWindowTests(SynchronousTestCase):
    def test_unknown_model_is_unavailable_while_workers_register(self):
        ingress = Ingress(args=("--startup-window", "60"))
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready()
        status, message = status_of(lambda: ingress.client().infer("add", add_inputs()))
        self.assertEqual((status, message), ("StatusCode.UNAVAILABLE",
                                             "model 'add' is not registered yet: workers are registering"))


class InflightCapTests(SynchronousTestCase):
    def test_past_the_cap_is_resource_exhausted_at_once(self):
        ingress = Ingress([PROBE_SERVER], args=("--max-inflight-per-model", "2"))
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready("slow", "inline_add")
        client = ingress.client()
        calls = []

        def seen():
            """Requests that reached the worker, less the seen calls made."""
            calls.append(1)
            return int(client.infer("seen", []).as_numpy("count")[0]) - len(calls)

        before = seen()
        # Two slow requests fill "slow"'s slots ...
        background = [BackgroundInfer(ingress.address, "slow", seconds=np.array([3.0])) for _ in range(2)]
        wait_for(lambda: seen() == before + 2, what="both slow requests at the worker")
        status, message = status_of(lambda: client.infer("slow", infer_inputs(seconds=np.array([0.0]))))
        # ... the next one is refused at once, and other models answer.
        self.assertEqual((status, message), ("StatusCode.RESOURCE_EXHAUSTED",
                                             "model 'slow' has 2 requests in flight"))
        self.assertTrue(all(b.outcome is None for b in background))
        result = client.infer("inline_add", infer_inputs(a=np.array([1], dtype=np.int32),
                                                         b=np.array([2], dtype=np.int32)))
        self.assertEqual(list(result.as_numpy("sum")), [3])
        for b in background:
            self.assertEqual(b.join(30)[0], "ok")
        # The slots are free again.
        self.assertEqual(list(client.infer("slow", infer_inputs(seconds=np.array([0.0]))).as_numpy("seconds")),
                         [0.0])
