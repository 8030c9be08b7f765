"""ModelStreamInfer end to end: tritonclient's streams against a real ingress
and the example workers, decoupled (``countdown``) and not (``add``)."""
import os
import queue
import time

import numpy as np

from tests.harness import KSERVE_SERVER, ROOT, infer_inputs
from tests.test_end_to_end import IngressTestCase, on_the_other_fronts, status_of

STREAM_SERVER = os.path.join(ROOT, "examples", "stream_server.py")


class StreamTests(IngressTestCase):
    workers = (STREAM_SERVER, KSERVE_SERVER)
    ready = ("countdown", "add")

    def setUp(self):
        super().setUp()
        self.results = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))
        self.addCleanup(self.client.stop_stream)

    def countdown(self, n, request_id="", **kwargs):
        self.client.async_stream_infer(
            "countdown", infer_inputs(n=np.array([n], dtype=np.int32)), request_id=request_id, **kwargs)

    def take(self, count, timeout=20):
        """The next ``count`` (result, error) pairs the stream delivers."""
        return [self.results.get(timeout=timeout) for _ in range(count)]

    def assertQuiet(self, seconds=0.3):
        time.sleep(seconds)
        self.assertTrue(self.results.empty(), "unexpected extra response")

    def test_countdown_streams_each_value(self):
        self.countdown(5, "c1")
        got = self.take(5)
        self.assertEqual([e for _, e in got], [None] * 5)
        self.assertEqual([int(r.as_numpy("value")[0]) for r, _ in got], [4, 3, 2, 1, 0])
        self.assertEqual({r.get_response().id for r, _ in got}, {"c1"})
        worker = got[0][0].get_response().parameters["anyserve_worker"].string_param
        self.assertTrue(worker)
        self.assertQuiet()

    def test_empty_final_response_when_the_client_asks(self):
        self.countdown(2, enable_empty_final_response=True)
        got = self.take(3)
        flags = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
        self.assertEqual(flags, [False, False, True])
        self.assertEqual(len(got[2][0].get_response().outputs), 0)
        self.assertQuiet()

    def test_zero_responses(self):
        self.countdown(0, enable_empty_final_response=True)
        (final, error), = self.take(1)
        self.assertIsNone(error)
        self.assertTrue(final.get_response().parameters["triton_final_response"].bool_param)

    def test_requests_interleave_on_one_stream(self):
        for i in range(4):
            self.countdown(3, "s%d" % i)
        got = self.take(12)
        by_id = {}
        for result, error in got:
            self.assertIsNone(error)
            by_id.setdefault(result.get_response().id, []).append(int(result.as_numpy("value")[0]))
        self.assertEqual(by_id, {"s%d" % i: [2, 1, 0] for i in range(4)})

    def test_errors_travel_on_the_stream_which_goes_on(self):
        self.client.async_stream_infer("nope", infer_inputs(n=np.array([1], dtype=np.int32)))
        self.countdown(-1)
        self.countdown(1)
        got = self.take(3)
        errors = sorted(str(e) for _, e in got if e is not None)
        self.assertEqual(len(errors), 2, got)
        self.assertIn("n must be in 0..", errors[0] + errors[1])
        self.assertIn("unknown model", errors[0] + errors[1])
        (ok,) = [r for r, e in got if e is None]
        self.assertEqual(int(ok.as_numpy("value")[0]), 0)

    def test_plain_model_answers_once_on_a_stream(self):
        a = np.arange(4, dtype=np.int32)
        self.client.async_stream_infer("add", infer_inputs(a=a, b=a))
        (result, error), = self.take(1)
        self.assertIsNone(error)
        self.assertEqual(result.as_numpy("sum").tolist(), [0, 2, 4, 6])
        self.assertQuiet()

    def test_unary_call_of_a_decoupled_model_is_refused(self):
        code, message = status_of(lambda: self.client.infer(
            "countdown", infer_inputs(n=np.array([2], dtype=np.int32))))
        self.assertEqual(code, "StatusCode.UNIMPLEMENTED")
        self.assertIn("ModelStreamInfer", message)

    def test_client_leaving_mid_stream_leaves_the_server_serving(self):
        self.countdown(10000)
        self.take(1)
        self.client.stop_stream(cancel_requests=True)
        a = np.arange(3, dtype=np.int32)
        self.assertEqual(self.add(a, a).tolist(), [0, 2, 4])
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))
        while not self.results.empty():
            self.results.get()
        self.countdown(2)
        self.assertEqual([int(r.as_numpy("value")[0]) for r, _ in self.take(2)], [1, 0])


on_the_other_fronts(globals())
