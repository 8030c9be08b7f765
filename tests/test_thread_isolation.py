"""On the thread front, a slow model starves nothing (issue 8, point 3):
inference calls may not take the threads kept for the rest, nor one model
more than its share, so ServerLive and other models keep answering while a
client floods a slow model; the flood's excess is RESOURCE_EXHAUSTED at once."""
import grpc
import numpy as np

from anyserve_tw.ingress.threadfront import InferenceBudget
from tests.harness import KSERVE_SERVER, PROBE_SERVER, infer_inputs, wait_for
from tests.test_end_to_end import IngressTestCase
from tests.test_fronts import MODEL_INFER, nap_request

THREADS = 16
FLOOD = 100
NAP = 6.0  # seconds each flooding request waits on the worker


class ThreadFrontIsolationTests(IngressTestCase):
    workers = (KSERVE_SERVER, PROBE_SERVER)
    front = "threads"
    args = ("--threads", str(THREADS))
    ready = ("add", "nap")

    def test_slow_model_starves_nothing(self):
        budget = InferenceBudget(THREADS)
        with grpc.insecure_channel(self.ingress.address) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            flood = [infer.future(nap_request(NAP), timeout=30) for _ in range(FLOOD)]
            # Past its share, the slow model is refused at once, not queued.
            wait_for(lambda: sum(f.done() for f in flood) >= FLOOD - budget.per_model, NAP - 1,
                     what="the flood's excess refused")
            refused = [f for f in flood if f.done()]
            self.assertEqual(len(refused), FLOOD - budget.per_model)
            waiting = [f for f in flood if not f.done()]
            self.assertEqual({f.code() for f in refused}, {grpc.StatusCode.RESOURCE_EXHAUSTED})
            a = np.arange(4, dtype=np.int32)
            for _ in range(10):
                self.assertTrue(self.client.is_server_live(client_timeout=1))
                self.assertTrue(self.client.is_model_ready("add", client_timeout=1))
                np.testing.assert_array_equal(self.client.infer("add", infer_inputs(a=a, b=a),
                                                                client_timeout=1).as_numpy("sum"), 2 * a)
            for future in waiting:
                self.assertEqual(future.exception(timeout=30), None)
            # Its threads given back: the slow model is served again.
            result = self.client.infer("nap", infer_inputs(seconds=np.array([0.0])))
            self.assertEqual(result.as_numpy("seconds")[0], 0.0)
