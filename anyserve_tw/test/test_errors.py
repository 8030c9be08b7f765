"""InferenceError accepts what handler authors naturally write."""
import grpc
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire.errors import InferenceError, status_from_number


class InferenceErrorTests(SynchronousTestCase):
    def test_numeric_code_and_exception_message(self):
        e = InferenceError(3, ValueError("bad value"))
        self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(e.message, "bad value")

    def test_unknown_code(self):
        self.assertEqual(InferenceError("nonsense", "m").code, grpc.StatusCode.UNKNOWN)
        self.assertEqual(status_from_number(999), grpc.StatusCode.UNKNOWN)

    def test_status_code_kept(self):
        e = InferenceError(grpc.StatusCode.NOT_FOUND, "gone")
        self.assertEqual((e.code, e.message, str(e)), (grpc.StatusCode.NOT_FOUND, "gone", "gone"))
