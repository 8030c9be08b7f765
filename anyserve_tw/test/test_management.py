"""Tests for anyserve_tw.ingress.management: malformed registrations are refused with
INVALID_ARGUMENT before anything reaches the router."""
import grpc
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.ingress.management import ManagementAPI
from anyserve_tw.wire.errors import InferenceError

_m = protos.management


class Aborted(Exception):
    pass


class AbortingContext:
    """grpc's context.abort raises; so does this one."""

    def abort(self, code, message):
        raise Aborted(code, message)


class UnusedRouter:
    def __getattr__(self, name):
        raise AssertionError("a malformed registration reached the router (%s)" % name)


class RegisterModelValidationTests(SynchronousTestCase):
    def status(self, **fields):
        request = _m.RegisterModelRequest(**fields)
        api = ManagementAPI(UnusedRouter())
        with self.assertRaises(InferenceError) as caught:
            api.RegisterModel(request, 10.0)
        return caught.exception.code, caught.exception.message

    def test_malformed_registrations(self):
        good = dict(model_name="add", worker_id="w1", worker_address="unix:///tmp/w.sock")
        cases = [
            (dict(good, model_name=""), "model_name is required"),
            (dict(good, worker_id=""), "worker_id is required"),
            (dict(good, inputs=[_m.TensorSpec(name="", datatype="INT32")]), "input tensor without a name"),
            (dict(good, outputs=[_m.TensorSpec(name="y", datatype="INT33")]), "output 'y': unknown datatype 'INT33'"),
        ]
        for fields, message in cases:
            self.assertEqual(self.status(**fields), (grpc.StatusCode.INVALID_ARGUMENT, message))
