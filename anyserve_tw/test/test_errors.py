"""InferenceError accepts what handler authors naturally write."""
import grpc
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire.errors import BRIEF_LIMIT, InferenceError, brief, not_found, status_from_number


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


class BriefTests(SynchronousTestCase):
    """Status messages quote a client's strings shortened: a 4 MB model name
    must not make the status itself too large to send."""

    def test_short_strings_unchanged(self):
        self.assertEqual(brief("add"), "add")
        self.assertEqual(brief("x" * BRIEF_LIMIT), "x" * BRIEF_LIMIT)

    def test_long_strings_shortened_with_their_size(self):
        self.assertEqual(brief("x" * (4 * 1024 * 1024)), "x" * BRIEF_LIMIT + "... (4194304 bytes)")
        self.assertEqual(brief("\u00e9" * 101), "\u00e9" * 100 + "... (202 bytes)")

    def test_not_found(self):
        name = "m" * (4 * 1024 * 1024)
        for error in (not_found(name), not_found(name, name)):
            self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
            self.assertLess(len(error.message), 300)
            self.assertIn("'%s... (4194304 bytes)'" % ("m" * BRIEF_LIMIT), error.message)
        self.assertEqual(not_found("add", "2").message,
                         "Request for unknown model: 'add' version '2' is not found")
