"""Bounded memory for responses a client does not read.

gRPC keeps a response it was handed until HTTP/2 flow control lets it out:
measured with grpcio 1.85 on both fronts, against a client that never reads,
a unary call's response stays in the server (its done callback does not fire)
and a stream's write does not complete, for as long as the connection stays
open; each unread 1 MiB response costs the ingress about 2 MB.  Nothing
frees it but the end of the call.  The thread front can end one call
(``context.cancel()``, which frees the bytes at once); grpc.aio has no
server-side cancel: cancelling the RPC's task runs its done callbacks but
leaves the bytes in gRPC until the connection closes.

So the bound is kept in three parts:

* :class:`UnreadBytes` counts the bytes of responses handed to gRPC (or
  queued for it) and not yet delivered, per client connection (keyed by
  ``context.peer()``) and in all.  Past :data:`MAX_UNREAD_PER_CLIENT` or
  :data:`MAX_UNREAD_TOTAL`, new inference calls get RESOURCE_EXHAUSTED at
  once, a response that would go past is dropped for RESOURCE_EXHAUSTED, and
  a stream is closed with it: the ingress holds at most the cap plus one
  response per connection.
* Past the total cap only the connections holding a large share (at least
  1/:data:`FAIR_SHARE` of the per-client cap) are refused, so that a few
  connections that answer pings but read nothing (which grpc.aio can't end
  one call at a time) don't lock everyone else out; past
  :data:`HARD_CEILING` times the cap, everyone is.
* A call whose responses have made no progress for :data:`UNREAD_TIMEOUT`
  seconds is cancelled by a sweep once a second (one LoopingCall, started
  by the first inference call; no timer per request).  On the thread front
  that frees its bytes and its thread; on grpc.aio it ends a stream (and
  frees what waits in its queue) but cannot end a unary call: keepalive
  does, for a client that reads nothing.
* HTTP/2 keepalive (:func:`keepalive_options`): a client that reads
  nothing at all cannot answer the server's pings either, and gRPC closes
  its connection within :data:`UNREAD_TIMEOUT`, ending every call on it and
  freeing their bytes, on both fronts, whatever the traffic.

A client that reads but keeps more than the cap in flight on one connection
meets the cap too: responses handed to gRPC together are all undelivered
until HTTP/2 has sent them (measured: 50 concurrent 8 MiB answers on one
connection, 2 to 16 of them refused).  It is the memory that client costs;
it can open more connections, or the cap can be raised.  Behind a proxy
that multiplexes many users on one connection, they share its cap.
"""
import threading

import grpc
from twisted.internet.task import LoopingCall

from anyserve_tw.wire.errors import InferenceError

MiB = 1024 * 1024

#: Unread response bytes one client connection may have in the ingress
#: before its new calls are refused.
MAX_UNREAD_PER_CLIENT = 64 * MiB

#: Unread response bytes of all clients together.
MAX_UNREAD_TOTAL = 256 * MiB

#: Past the total cap, only connections holding at least this fraction
#: (1/FAIR_SHARE) of the per-client cap are refused: a few clients that
#: never read (on grpc.aio their unary calls can't be ended one by one)
#: must not lock out everyone else ...
FAIR_SHARE = 8
#: ... up to this many times the total cap, where every client is refused.
HARD_CEILING = 2

#: Seconds a call's responses may go unread before it is cancelled.
UNREAD_TIMEOUT = 30.0

#: Seconds between sweeps for calls past :data:`UNREAD_TIMEOUT`.
SWEEP_INTERVAL = 1.0

#: The RPCs whose responses are counted: the only ones that carry tensors.
COUNTED_METHODS = ("ModelInfer", "ModelStreamInfer")


def keepalive_options(timeout=UNREAD_TIMEOUT):
    """gRPC server options pinging each connection with calls in flight
    every third of ``timeout`` and closing it when a ping goes unanswered
    for the remaining two thirds (gRPC's own default, 20 s, for 30 s: it
    applies to gRPC's flow-control pings too, which already end a client
    that stalls right after sending; the keepalive pings catch one that
    stalls later)."""
    ping_every = int(timeout * 1000 / 3)
    return [
        ("grpc.keepalive_time_ms", ping_every),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000) - ping_every),
    ]


def exhausted(message):
    return InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def counted(unread, hold, put):
    """``put`` for a stream's responses, each counted against ``hold``; past
    the cap the stream gets the RESOURCE_EXHAUSTED error in its place (and
    is closed with it).  Both fronts' streams send through this."""
    def send(response):
        if response is not None:
            try:
                unread.take(hold, len(response))
            except InferenceError as e:
                response = e
        put(response)
    return send


class Hold:
    """The unread bytes of one call.  ``cancel``: how the sweep ends the
    call (None: it can't, and keepalive is what ends it)."""

    __slots__ = ("peer", "size", "since", "cancel", "closed")

    def __init__(self, peer, cancel):
        self.peer = peer
        self.size = 0
        self.since = None
        self.cancel = cancel
        self.closed = False


class UnreadBytes:
    """The count of unread response bytes, per client connection and in all
    (see the module's docstring).  Safe to use from any thread: the thread
    front counts from its gRPC threads and the reactor's."""

    def __init__(self, clock, per_client=MAX_UNREAD_PER_CLIENT, total=MAX_UNREAD_TOTAL,
                 timeout=UNREAD_TIMEOUT, interval=SWEEP_INTERVAL):
        self.clock = clock
        self.per_client = per_client
        self.total_cap = total
        self.timeout = timeout
        self.interval = interval
        self.total = 0
        self.by_peer = {}
        self._holds = set()  # holds with bytes unread
        self._sweeper = None
        self._starting = False
        self._lock = threading.Lock()

    def unread(self, peer):
        return self.by_peer.get(peer, 0)

    def _refusal(self, peer):
        held = self.by_peer.get(peer, 0)
        if held >= self.per_client:
            return exhausted("this connection has %d MiB of responses it has not read (cap %d MiB): "
                             "read them before sending more" % (held // MiB, self.per_client // MiB))
        if self.total >= self.total_cap and (held >= self.per_client // FAIR_SHARE
                                             or self.total >= HARD_CEILING * self.total_cap):
            return exhausted("the ingress holds %d MiB of responses its clients have not read "
                             "(cap %d MiB): retry later" % (self.total // MiB, self.total_cap // MiB))
        return None

    def admit(self, peer):
        """Raise RESOURCE_EXHAUSTED if ``peer`` (or everyone) is over the cap.
        The first call starts the sweep (from any thread)."""
        if not self._starting:
            self._starting = True
            # On the reactor thread, whichever thread we are on (a fake clock has no threads).
            getattr(self.clock, "callFromThread", lambda f: f())(self.start)
        error = self._refusal(peer)
        if error is not None:
            raise error

    def start(self):
        """Sweep every ``interval`` seconds (on the reactor thread)."""
        self._starting = True
        if self._sweeper is None:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(self.interval, now=False)

    def stop(self):
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()

    def open(self, peer, cancel=None):
        """A :class:`Hold` for one call of ``peer``."""
        return Hold(peer, cancel)

    def take(self, hold, size):
        """Count ``size`` more bytes for ``hold``'s call, or raise
        RESOURCE_EXHAUSTED (counting nothing) if its client or the ingress
        is already at the cap."""
        with self._lock:
            error = self._refusal(hold.peer)
            if error is not None:
                raise error
            if hold.closed:
                return
            if not hold.size and hold.cancel is not None:  # only those the sweep can end
                hold.since = self.clock.seconds()
                self._holds.add(hold)
            hold.size += size
            self.total += size
            self.by_peer[hold.peer] = self.by_peer.get(hold.peer, 0) + size

    def give(self, hold, size):
        """``size`` of ``hold``'s bytes were delivered (or dropped): progress."""
        with self._lock:
            self._give(hold, min(size, hold.size))
            if hold.size and hold.cancel is not None:
                hold.since = self.clock.seconds()

    def close(self, hold):
        """The call ended: whatever it held is released."""
        with self._lock:
            hold.closed = True
            self._give(hold, hold.size)

    def _give(self, hold, size):
        if not size:
            return
        hold.size -= size
        self.total -= size
        left = self.by_peer[hold.peer] - size
        if left:
            self.by_peer[hold.peer] = left
        else:
            del self.by_peer[hold.peer]
        if not hold.size and hold.cancel is not None:
            self._holds.discard(hold)

    def sweep(self, now=None):
        """Cancel every call whose bytes have gone unread for ``timeout``."""
        now = self.clock.seconds() if now is None else now
        with self._lock:
            stuck = [h for h in self._holds if now - h.since >= self.timeout]
            cancels = []
            for hold in stuck:  # cancelled once: the sweep forgets them
                self._holds.discard(hold)
                cancels.append(hold.cancel)
                hold.cancel = None
        for cancel in cancels:
            cancel()
        return len(stuck)
