"""End to end with KServe's own Python clients (``kserve.InferenceGRPCClient``,
``kserve.InferenceRESTClient``) against a real ingress, over gRPC and REST.

kserve pins an older protobuf and grpcio-tools than this project, so it
lives in an interpreter of its own: ``ANYSERVE_KSERVE_PYTHON``, else
``/work/kserve-venv/bin/python`` if it exists (``.ci/run`` makes one).
That interpreter runs ``tests/workers/kserve_client_calls.py``, which prints
what every client call returned or raised; these tests assert on it.  The
calls run once per test process, against one ingress, and every test reads
that one outcome.
"""
import json
import os
import subprocess
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, ROOT, Ingress

CALLS = os.path.join(ROOT, "tests", "workers", "kserve_client_calls.py")
#: Where this project's development machine keeps a venv with kserve.
DEFAULT_PYTHON = "/work/kserve-venv/bin/python"
HOW_TO_ENABLE = ("set ANYSERVE_KSERVE_PYTHON to a python that has kserve 0.21, e.g. "
                 "python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install 'kserve==0.21.0' "
                 "&& export ANYSERVE_KSERVE_PYTHON=/tmp/kserve-venv/bin/python")

#: add's answer to a = [1, 2, 3, 4], b = [10, 20, 30, 40] (see CALLS).
SUM = {"name": "sum", "datatype": "INT32", "shape": [4], "data": [11, 22, 33, 44]}

_outcome = []  # [results dict] or [exception to raise again], once computed


def kserve_python():
    """The interpreter to run CALLS with; SkipTest when there is none with kserve."""
    python = os.environ.get("ANYSERVE_KSERVE_PYTHON")
    if not python:
        if not os.path.exists(DEFAULT_PYTHON):
            raise SkipTest("no interpreter with kserve: " + HOW_TO_ENABLE)
        python = DEFAULT_PYTHON
    try:
        check = subprocess.run([python, "-c", "import kserve"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise SkipTest("cannot run %s (%s): %s" % (python, e, HOW_TO_ENABLE))
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["exit status %d" % check.returncode])[-1]
        raise SkipTest("%s cannot import kserve (%s): %s" % (python, last, HOW_TO_ENABLE))
    return python


def _run_calls():
    python = kserve_python()
    ingress = Ingress([KSERVE_SERVER], http=True)
    try:
        ingress.wait_ready("add", "echo")
        run = subprocess.run([python, CALLS, ingress.address, ingress.http_address],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    finally:
        log = ingress.log()
        ingress.cleanup()
    if run.returncode != 0:
        raise AssertionError("%s exited with %d\nstdout:\n%s\nstderr:\n%s\ningress log:\n%s"
                             % (CALLS, run.returncode, run.stdout, run.stderr[-4000:], log[-4000:]))
    try:
        return json.loads(run.stdout)
    except ValueError:
        raise AssertionError("%s printed no JSON:\n%s\nstderr:\n%s" % (CALLS, run.stdout, run.stderr[-4000:]))


def kserve_results():
    """What every KServe client call gave, from one run of CALLS."""
    if not _outcome:
        try:
            _outcome.append(_run_calls())
        except (SkipTest, AssertionError, subprocess.TimeoutExpired) as e:
            _outcome.append(e)
    if isinstance(_outcome[0], Exception):
        raise _outcome[0]
    return _outcome[0]


class KServeClientTests(SynchronousTestCase):
    def setUp(self):
        self.results = kserve_results()

    def returned(self, protocol, call):
        """What ``call`` returned; fails with what it raised instead."""
        entry = self.results[protocol][call]
        if "error" in entry:
            self.fail("kserve %s %s: %r raised %s" % (self.results["kserve"], protocol, call,
                                                      json.dumps(entry["error"], indent=1)))
        return entry["value"]

    def raised(self, protocol, call):
        """What ``call`` raised; fails if it returned."""
        entry = self.results[protocol][call]
        if "error" not in entry:
            self.fail("%s %r returned %r, expected an error" % (protocol, call, entry["value"]))
        return entry["error"]

    def assertSum(self, response, request_id=None):
        self.assertEqual((response["model_name"], response["outputs"]), ("add", [SUM]))
        if request_id is not None:
            self.assertEqual(response["id"], request_id)

    def test_grpc_client(self):
        """InferenceGRPCClient: health, model readiness, infer with raw and
        typed INT32 contents, KServe's stub for the metadata the client
        lacks, and the gRPC codes of a bad request with the server answering
        after them."""
        self.assertIs(self.returned("grpc", "is_server_live"), True)
        self.assertIs(self.returned("grpc", "is_server_ready"), True)
        self.assertIs(self.returned("grpc", "is_model_ready add"), True)
        self.assertIs(self.returned("grpc", "is_model_ready nope"), False)
        self.assertSum(self.returned("grpc", "infer add raw"), "g1")
        self.assertSum(self.returned("grpc", "infer add typed"), "g2")

        unknown = self.raised("grpc", "infer unknown model")
        self.assertEqual((unknown["raised"], unknown["code"]), ("grpc.aio._call.AioRpcError", "NOT_FOUND"))
        self.assertIn("'nope'", unknown["details"])
        wrong = self.raised("grpc", "infer wrong input name")
        self.assertEqual(wrong["code"], "INVALID_ARGUMENT")
        self.assertIn("'c'", wrong["details"])
        self.assertSum(self.returned("grpc", "infer add after errors"))

        self.assertEqual(self.returned("grpc", "stub ServerMetadata")["name"], "anyserve")
        metadata = self.returned("grpc", "stub ModelMetadata add")
        self.assertEqual((metadata["name"], metadata["inputs"], metadata["outputs"]), (
            "add",
            [{"name": "a", "datatype": "INT32", "shape": [-1]}, {"name": "b", "datatype": "INT32", "shape": [-1]}],
            [{"name": "sum", "datatype": "INT32", "shape": [-1]}],
        ))

    def test_rest_client(self):
        """InferenceRESTClient (v2): model readiness, infer with JSON and with
        binary tensors (and binary outputs when asked), and the HTTP statuses
        of a bad request, whose JSON error the client puts in its message."""
        self.assertIs(self.returned("rest", "is_model_ready add"), True)
        self.assertIs(self.returned("rest", "is_model_ready nope"), False)
        json_body = {"content-type": "application/json", "inference-header-content-length": None}
        for call, request_id in (("infer add json", "r1"), ("infer add binary", "r2")):
            response = self.returned("rest", call)
            self.assertSum(response, request_id)
            self.assertEqual(response["headers"], json_body, call)
        response = self.returned("rest", "infer add binary output")
        self.assertSum(response, "r3")  # decoded by the client from the tensor after the JSON
        self.assertEqual(response["headers"]["content-type"], "application/octet-stream")
        self.assertIsNotNone(response["headers"]["inference-header-content-length"])

        unknown = self.raised("rest", "infer unknown model")
        self.assertEqual((unknown["raised"], unknown["status"]), ("httpx.HTTPStatusError", 404))
        self.assertIn("'nope'", unknown["message"])  # read from the JSON body: content type as expected
        wrong = self.raised("rest", "infer wrong input name")
        self.assertEqual(wrong["status"], 400)
        self.assertIn("'c'", wrong["message"])
        self.assertSum(self.returned("rest", "infer add after errors"))

    def test_rest_server_health(self):
        """InferenceRESTClient's is_server_live / is_server_ready read
        ``{"live": true}`` / ``{"ready": true}`` from the body."""
        self.assertIs(self.returned("rest", "is_server_live"), True)
        self.assertIs(self.returned("rest", "is_server_ready"), True)

