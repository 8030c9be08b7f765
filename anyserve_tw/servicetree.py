"""Service-tree helpers shared by the ingress and the worker."""
from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger

log = Logger()


class SequentialMultiService(MultiService):
    """A MultiService whose children stop one at a time.

    ``MultiService.stopService`` stops every child at once; shutdown here has
    an order (drain gRPC, then stop workers, then close their connections), so
    each child's stop waits for the previous one's Deferred.  Children named in
    ``stop_order`` stop first, in that order; the rest last started, first
    stopped.
    """

    def __init__(self, stop_order=()):
        super().__init__()
        self.stop_order = list(stop_order)

    def stopping_order(self):
        first = [self.namedServices[n] for n in self.stop_order if n in self.namedServices]
        return first + [child for child in reversed(list(self)) if child not in first]

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for child in self.stopping_order():
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(lambda f, child=child: log.failure("stopping {child}", f, child=child))
        return d
