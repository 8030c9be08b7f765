"""Issue 8, point 5: a client that asks for large responses and never reads
them cannot pin the ingress's memory.

The attacker is :class:`tests.rawh2.UnreadingClient`: one HTTP/2 connection
that sends ModelInfer calls (or opens ModelStreamInfer streams) for 1 MiB
responses of the probe worker's ``big`` model and never reads a byte.
Before the unread-bytes cap, 300 of them pinned about 630 MB of the
ingress for as long as the connection stayed open.
"""
import time

import numpy as np
from tritonclient.utils import InferenceServerException

from tests.harness import PROBE_SERVER, infer_inputs, rss_bytes, wait_for
from tests.rawh2 import UnreadingClient
from tests.test_end_to_end import IngressTestCase, on_the_other_fronts
from anyserve_tw.ingress.backpressure import MAX_UNREAD_PER_CLIENT, UNREAD_TIMEOUT
from anyserve_tw.wire import protos

MiB = 1024 * 1024

#: Calls (or streams) the attacker opens, each for a 1 MiB response.
CALLS = 300

#: Calls sent at once.
BURST = 20

#: How much the ingress may grow under the attack: the per-connection cap,
#: twice over (gRPC keeps a copy of each response besides ours), plus room
#: for the allocator; far below the ~2 MB per call it cost unbounded.
ALLOWED_GROWTH = 2 * MAX_UNREAD_PER_CLIENT + 80 * MiB


def big_request(size=MiB):
    request = protos.inference.ModelInferRequest(model_name="big")
    tensor = request.inputs.add(name="n", datatype="INT64", shape=[1])
    tensor.contents.int64_contents.append(size)
    return request.SerializeToString()


def server_side_state(server_port, client_port):
    """The kernel's TCP state (a hex string, "01": established) of the
    ingress's end of the connection from ``client_port``, None if gone.
    (Closed by the ingress, that end waits in FIN_WAIT1 behind the data
    the client never read; the client's end still looks established.)"""
    wanted = ":%04X" % server_port, ":%04X" % client_port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC's sockets are IPv6 ones, v4-mapped
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                    return fields[3]
    return None


TCP_ESTABLISHED = "01"


class UnreadResponsesTests(IngressTestCase):
    workers = (PROBE_SERVER,)
    ready = ("big",)

    def big(self, size=MiB, **kwargs):
        result = self.client.infer("big", infer_inputs(n=np.array([size], dtype=np.int64)), **kwargs)
        return result.as_numpy("data")

    def attack(self, open_call):
        """Warm the ingress up, attack it with ``open_call(client)`` CALLS
        times, and return (growth of its RSS, the attacker)."""
        for _ in range(8):  # the allocator's steady state for 1 MiB answers
            self.assertEqual(len(self.big()), MiB)
        pid = self.ingress.process.pid
        before = rss_bytes(pid)
        attacker = UnreadingClient("127.0.0.1", self.ingress.port, answer_pings=True)
        self.addCleanup(attacker.close)
        # In bursts, as calls come over time: what a burst's answers cost
        # while they pass through the ingress is the same for a client that
        # reads; what stays is what the client does not read.
        for burst in range(0, CALLS, BURST):
            for _ in range(BURST):
                open_call(attacker)
            time.sleep(0.2)
        # The worker answers all of them within a few seconds; then the
        # ingress holds what it holds.
        peak = before
        settled_since = time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and time.monotonic() - settled_since < 2.0:
            time.sleep(0.25)
            now = rss_bytes(pid)
            if now > peak + MiB:
                settled_since = time.monotonic()
            peak = max(peak, now)
        return peak - before, attacker

    def assertOthersServed(self):
        """Another client is answered: health at once, and ModelInfer too,
        except that on the thread front the attacker's streams may hold
        every inference thread until they are swept, and then the answer
        is the thread budget's RESOURCE_EXHAUSTED, at once."""
        self.assertTrue(self.client.is_server_live())
        if self.front == "threads":
            try:
                self.big(timeout=20)
            except InferenceServerException as e:
                self.assertEqual(e.status(), "StatusCode.RESOURCE_EXHAUSTED")
                self.assertIn("threads", e.message())
                return
        self.assertEqual(len(self.big(timeout=20)), MiB)

    def assertMostEnded(self, attacker):
        """The calls past the cap were answered with a status at once (a
        trailers-only response needs no flow-control window) instead of
        waiting in the ingress: all but about the cap's worth of 1 MiB."""
        held = MAX_UNREAD_PER_CLIENT // MiB
        wait_for(lambda: len(attacker.ended) >= CALLS - held - 8, timeout=10,
                 what="the calls past the cap to end (%d ended)" % len(attacker.ended))

    def test_unread_unary_calls_are_bounded(self):
        growth, attacker = self.attack(lambda c: c.unary("ModelInfer", big_request()))
        self.assertLess(growth, ALLOWED_GROWTH, "ingress grew %d MiB" % (growth // MiB))
        self.assertMostEnded(attacker)
        self.assertOthersServed()

    def test_unread_streams_are_bounded(self):
        growth, attacker = self.attack(lambda c: c.open("ModelStreamInfer", [big_request()]))
        self.assertLess(growth, ALLOWED_GROWTH, "ingress grew %d MiB" % (growth // MiB))
        self.assertMostEnded(attacker)
        self.assertOthersServed()

    def test_a_client_that_reads_nothing_is_let_go(self):
        """Within UNREAD_TIMEOUT the ingress closes the connection of a
        client that reads nothing, which ends its calls and frees their
        bytes; meanwhile and after, others are served."""
        attacker = UnreadingClient("127.0.0.1", self.ingress.port)
        self.addCleanup(attacker.close)
        for _ in range(20):
            attacker.unary("ModelInfer", big_request())
        self.assertOthersServed()
        state = lambda: server_side_state(self.ingress.port, attacker.local_port)
        self.assertEqual(state(), TCP_ESTABLISHED)
        wait_for(lambda: state() != TCP_ESTABLISHED, timeout=UNREAD_TIMEOUT + 10,
                 interval=0.5, what="the ingress to close the unreading client's connection")
        self.assertOthersServed()


on_the_other_fronts(globals())


class StalledStreamsTests(IngressTestCase):
    """A client that answers pings (so keepalive keeps it) but reads none
    of its streams' responses: on the thread front each such stream holds
    an inference thread, and enough of them refuse everyone else's
    ModelInfer; the sweep cancels them after UNREAD_TIMEOUT, which frees
    their threads and bytes."""

    workers = (PROBE_SERVER,)
    ready = ("big",)
    front = "threads"

    def test_stalled_streams_are_cancelled(self):
        attacker = UnreadingClient("127.0.0.1", self.ingress.port, answer_pings=True)
        self.addCleanup(attacker.close)
        streams = [attacker.open("ModelStreamInfer", [big_request()]) for _ in range(64)]

        def refused():
            try:
                self.client.infer("big", infer_inputs(n=np.array([16], dtype=np.int64)), timeout=20)
            except InferenceServerException as e:
                return e.status() == "StatusCode.RESOURCE_EXHAUSTED" and "threads" in e.message()
            return False
        wait_for(refused, timeout=20, what="the stalled streams to hold every inference thread")
        wait_for(lambda: not refused(), timeout=UNREAD_TIMEOUT + 15, interval=0.5,
                 what="the sweep to cancel the stalled streams")
        self.assertTrue(attacker.reset & set(streams), "no stream was reset")
        self.assertTrue(self.client.is_server_live())
