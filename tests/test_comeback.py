"""A standalone worker comes back quickly after its ingress restarts (issue 8,
point 7): its management channel reconnects on its own capped schedule, not
gRPC's default back-off (which grows to 120 s), and it retries often while
the ingress is away, so a new ingress on the same management port has it
registered within about a second."""
import os
import shutil
import signal
import tempfile
import time

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests import harness
from tests.harness import KSERVE_SERVER, Ingress, Worker, infer_inputs, wait_for

#: How long the ingress stays away: long enough for gRPC's default back-off
#: to have grown to several seconds.
AWAY = 6.0
#: How soon after the new ingress is live ``add`` must be ready again.
COMEBACK = 2.0


class ComebackTests(SynchronousTestCase):
    def start_ingress(self, ports=None):
        """An ingress with no workers of its own, on ``ports`` (inference,
        management) if given, else on free ones."""
        if ports is not None:
            chosen = iter(ports)
            self.patch(harness, "free_port", lambda: next(chosen))
        ingress = Ingress()
        self.addCleanup(ingress.cleanup)
        return ingress

    def add(self, ingress, a):
        return ingress.client().infer("add", infer_inputs(a=a, b=a), client_timeout=5).as_numpy("sum")

    def test_standalone_worker_is_back_within_seconds(self):
        first = self.start_ingress()
        sockets = tempfile.mkdtemp(prefix="as-comeback-", dir="/tmp")
        self.addCleanup(shutil.rmtree, sockets, True)
        worker = Worker(KSERVE_SERVER, first.mgmt_address, os.path.join(sockets, "w.sock"))
        self.addCleanup(worker.stop, signal.SIGKILL)
        first.wait_ready("add")
        a = np.arange(3, dtype=np.int32)
        np.testing.assert_array_equal(self.add(first, a), 2 * a)

        first.stop()
        time.sleep(AWAY)
        self.assertIsNone(worker.process.poll())  # the worker waited for an ingress

        second = self.start_ingress((first.port, first.mgmt))
        client = second.client()
        wait_for(client.is_server_live, 30, what="the new ingress live")
        wait_for(lambda: client.is_model_ready("add"), COMEBACK,
                 what="add registered again with the new ingress")
        np.testing.assert_array_equal(self.add(second, a), 2 * a)
