"""Service-tree helpers shared by the ingress and the worker."""
from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger

log = Logger()


class SequentialMultiService(MultiService):
    """A MultiService whose children stop one at a time, last started first.

    ``MultiService.stopService`` stops every child at once; shutdown here has
    an order (drain gRPC, then stop workers, then close their connections), so
    each child's stop waits for the previous one's Deferred.
    """

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(lambda f, child=child: log.failure("stopping {child}", f, child=child))
        return d
