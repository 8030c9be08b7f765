"""One error type that carries a gRPC status from wherever it is raised.

Raised by the ingress's registry (NOT_FOUND, UNAVAILABLE), its links to
workers (UNAVAILABLE when a worker dies), the worker SDK (INVALID_ARGUMENT,
INTERNAL) and the fronts (DEADLINE_EXCEEDED); the fronts turn it into the
RPC's status.
"""
import grpc
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.logger import Logger

log = Logger()

_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


class InferenceError(Exception):
    """A failure the client should see as ``code`` with ``message``."""

    def __init__(self, code, message):
        # Accept what handler authors naturally write: a numeric code, or an
        # exception as the message.  Both are sent over the wire as is.
        if not isinstance(code, grpc.StatusCode):
            code = status_from_number(code) if isinstance(code, int) else grpc.StatusCode.UNKNOWN
        message = str(message)
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self):
        return "InferenceError(%s, %r)" % (self.code.name, self.message)


def status_from_number(number):
    """The ``grpc.StatusCode`` for its numeric value (UNKNOWN if unheard of)."""
    return _BY_CODE.get(number, grpc.StatusCode.UNKNOWN)


#: Most characters of a client's string a status message quotes.
BRIEF_LIMIT = 100


def brief(text, limit=BRIEF_LIMIT):
    """``text`` (a name, version, ... from the client) as a status message
    quotes it: its first ``limit`` characters and its size when longer, so
    a 4 MB name cannot make the status itself too large to send."""
    text = str(text)
    if len(text) <= limit:
        return text
    return "%s... (%d bytes)" % (text[:limit], len(text.encode("utf-8", "surrogatepass")))


def not_found(name, version=""):
    if version:
        return InferenceError(
            grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: '%s' version '%s' is not found" % (brief(name), brief(version)),
        )
    return InferenceError(
        grpc.StatusCode.NOT_FOUND, "Request for unknown model: '%s' is not found" % (brief(name),)
    )


def unavailable(message):
    return InferenceError(grpc.StatusCode.UNAVAILABLE, message)


def invalid_argument(message):
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def as_inference_error(failure):
    """The InferenceError a failed call should reach the client as."""
    if failure.check(InferenceError):
        return failure.value
    if failure.check(TimeoutError):
        return InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    if failure.check(CancelledError):
        return InferenceError(grpc.StatusCode.CANCELLED, "request cancelled")
    log.failure("unexpected error", failure)
    return InferenceError(grpc.StatusCode.INTERNAL, "unexpected error: %s" % failure.getErrorMessage())
