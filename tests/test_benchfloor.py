"""Tests for bench/floor.py's inline add: the floor must answer like
the real model does, or its figures would compare nothing."""
import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from bench import floor as benchfloor
from anyserve_tw.test.test_management import Aborted, AbortingContext

_v2 = protos.inference


class ModelInferTests(SynchronousTestCase):
    def request(self, *arrays):
        request = _v2.ModelInferRequest(model_name="add", id="r1")
        for name, array in zip("ab", arrays):
            request.inputs.add(name=name, datatype="INT32", shape=[array.size])
            request.raw_input_contents.append(array.astype("<i4").tobytes())
        return request.SerializeToString()

    def test_sum(self):
        a = np.arange(16, dtype=np.int32)
        b = np.arange(16, dtype=np.int32) * 7 - 3
        response = _v2.ModelInferResponse.FromString(
            benchfloor.model_infer(self.request(a, b), AbortingContext()))
        self.assertEqual((response.model_name, response.id), ("add", "r1"))
        self.assertEqual([(o.name, o.datatype, list(o.shape)) for o in response.outputs],
                         [("sum", "INT32", [16])])
        got = np.frombuffer(response.raw_output_contents[0], dtype="<i4")
        self.assertEqual(got.tolist(), (a + b).tolist())

    def test_one_input_is_invalid(self):
        with self.assertRaises(Aborted) as caught:
            benchfloor.model_infer(self.request(np.zeros(4, np.int32)), AbortingContext())
        self.assertEqual(caught.exception.args[0], grpc.StatusCode.INVALID_ARGUMENT)

    def test_ready_only_for_add(self):
        ready = benchfloor.model_ready
        self.assertTrue(ready(_v2.ModelReadyRequest(name="add"), None).ready)
        self.assertFalse(ready(_v2.ModelReadyRequest(name="other"), None).ready)
