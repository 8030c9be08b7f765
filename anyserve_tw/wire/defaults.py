"""One home for what the ingress and its workers must agree on.

Message caps, environment variable names (how a supervising ingress tells a
worker where to register), the v2 datatype names a registration may use, and
the default-version rule: a request that names no version goes to the version
registered without one (``""``) if there is one, otherwise to the highest
version in natural order, where digit runs compare as numbers (``v2 < v10``).
Both processes route with :func:`default_version`, so they always agree.
"""
import re

from anyserve_tw.wire.errors import not_found

#: Largest request or response, bytes, in both gRPC and frames: 64 MiB.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

#: Cap on management messages (registrations, heartbeats).
MAX_MANAGEMENT_MESSAGE_SIZE = 4 * 1024 * 1024

#: Threads of the ingress's thread front: one per RPC in flight.
DEFAULT_FRONT_THREADS = 64

#: RPCs the ingress takes in before answering RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT_RPCS = 1024

#: How a worker's address starts: ``unix:///path/to/its.sock``.
UNIX_PREFIX = "unix://"

#: Where a worker registers when nothing says otherwise.
DEFAULT_INGRESS = "127.0.0.1:9000"

#: Seconds between a worker's heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 2.0

#: Threads a worker runs plain handlers in.
DEFAULT_WORKER_THREADS = 4

# Environment variables a worker reads (and a supervising ingress sets).
ENV_INGRESS = "ANYSERVE_INGRESS"
ENV_SOCKET = "ANYSERVE_SOCKET"
ENV_WORKER_ID = "ANYSERVE_WORKER_ID"
ENV_HEARTBEAT_INTERVAL = "ANYSERVE_HEARTBEAT_INTERVAL"
ENV_THREADS = "ANYSERVE_THREADS"
ENV_MAX_MESSAGE_SIZE = "ANYSERVE_MAX_MESSAGE_SIZE"
ENV_SUPERVISED = "ANYSERVE_SUPERVISED"
#: The management token itself (how a supervising ingress hands it over) ...
ENV_TOKEN = "ANYSERVE_TOKEN"
#: ... or the file a standalone worker reads it from (default: see
#: :func:`anyserve_tw.wire.credentials.default_token_path`).
ENV_TOKEN_FILE = "ANYSERVE_TOKEN_FILE"

#: The KServe v2 datatype names (the worker maps each to a numpy dtype).
DATATYPE_NAMES = frozenset([
    "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
    "FP16", "FP32", "FP64", "BYTES",
])

_DIGITS = re.compile(r"(\d+)")


def natural_key(version):
    """Sort key comparing digit runs as numbers: ``v2`` < ``v10``."""
    return [(1, int(part), "") if part.isdigit() else (0, 0, part) for part in _DIGITS.split(version)]


def default_version(name, versions):
    """The version a request naming none goes to (the rule above); NOT_FOUND if none."""
    if not versions:
        raise not_found(name)
    if "" in versions:
        return ""
    return max(versions, key=natural_key)
