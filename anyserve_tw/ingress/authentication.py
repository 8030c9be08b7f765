"""Who may call the management API: the holder of the ingress's token.

Checked by a server interceptor, before a request is even parsed, so an
unauthenticated caller costs the ingress one metadata comparison and
nothing of the registry.  grpc.aio and grpcio's thread pool each take their
own kind of interceptor; both ask one :class:`TokenCheck`.  Refusals are
UNAUTHENTICATED, and logged at most once per :data:`LOG_EVERY` seconds with
how many there were, since a misconfigured worker retries every tick.

Scoping (a worker may only withdraw or heartbeat what it registered) is the
management API's, by the worker key each call carries
(:mod:`anyserve_tw.ingress.management`).
"""
import hmac

import grpc
from twisted.logger import Logger

from anyserve_tw.wire import credentials

#: Seconds between two log lines about refused calls.
LOG_EVERY = 60.0


class TokenCheck:
    """Compares a call's ``authorization`` metadata with ``token`` in
    constant time; ``clock`` (an IReactorTime) paces the log."""

    log = Logger()

    def __init__(self, token, clock):
        self.expected = (credentials.SCHEME + token).encode("utf-8")
        self.clock = clock
        self.refused = 0
        self._unlogged = 0
        self._logged_at = None

    def allows(self, invocation_metadata):
        """True if the metadata carries the token; else counts and maybe
        logs a refusal."""
        for key, value in invocation_metadata or ():
            if key == credentials.METADATA_KEY:
                given = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self.expected):
                    return True
                return self._refuse("a wrong token")
        return self._refuse("no token")

    def _refuse(self, what):
        self.refused += 1
        self._unlogged += 1
        now = self.clock.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self.log.warn("management call refused: {what} ({count} refused since the last such line); "
                          "workers need the ingress's token (ANYSERVE_TOKEN or ANYSERVE_TOKEN_FILE)",
                          what=what, count=self._unlogged)
            self._logged_at = now
            self._unlogged = 0
        return False

    #: What a refused caller is told.
    MESSAGE = ("management calls need the ingress's token in the 'authorization' metadata "
               "(workers read it from ANYSERVE_TOKEN or the file ANYSERVE_TOKEN_FILE names)")


def _deny_sync(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, TokenCheck.MESSAGE)


async def _deny_aio(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, TokenCheck.MESSAGE)


class ThreadTokenInterceptor(grpc.ServerInterceptor):
    """The check for the thread front (grpcio's synchronous server)."""

    def __init__(self, check):
        self.check = check
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_sync)

    def intercept_service(self, continuation, handler_call_details):
        if self.check.allows(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        return self._deny


class AioTokenInterceptor(grpc.aio.ServerInterceptor):
    """The check for the default front (grpc.aio on the reactor's loop)."""

    def __init__(self, check):
        self.check = check
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_aio)

    async def intercept_service(self, continuation, handler_call_details):
        if self.check.allows(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return self._deny


#: The interceptor class for each front.
INTERCEPTORS = {"aio": AioTokenInterceptor, "threads": ThreadTokenInterceptor}
