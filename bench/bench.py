"""ModelInfer throughput benchmark for AnyServe, optionally against KServe.

Run ``python bench/bench.py`` from a checkout. It starts the
ingress with one worker as a single ``twistd -n anyserve`` command, drives
``ModelInfer`` on the ``add`` model with h2load (a separate native process, so
the load generator does not compete for the servers' Python interpreter), and
prints a table of request rate, mean latency and CPU time per request of the
ingress and the worker. With ``--peer kserve`` the same cases run against the
KServe Python ModelServer and the ratios are printed.

This is a benchmark, not a test: it prints figures. It exits non-zero only when
a server failed to start, a correctness check failed or h2load saw failures.

Only stdlib, numpy and tritonclient are used; tritonclient (and numpy) are
imported lazily so ``--help`` works without them.
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

MODEL = "add"
RPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
LARGE_ELEMENTS = 262144  # 1 MiB of INT32 per input
SMALL_ELEMENTS = 16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Cases and results


@dataclass
class Case:
    """One load shape: elements per input, requests kept in flight, count."""

    name: str
    elements: int
    inflight: int
    requests: int


@dataclass
class Result:
    """Figures of one h2load run against one server."""

    server: str
    case: Case
    req_per_s: float = 0.0
    mean_ms: float = 0.0
    succeeded: int = 0
    failed: int = 0
    ingress_us: float = None
    worker_us: float = None
    faults_per_req: float = None
    round: int = 1
    problems: list = field(default_factory=list)

    @property
    def total_us(self):
        """Whole server CPU per request; the peer has no ingress/worker split."""
        parts = [v for v in (self.ingress_us, self.worker_us) if v is not None]
        return sum(parts) if parts else None


def build_cases(args):
    """The three cases from the brief, filtered by ``--cases``."""
    cases = [
        Case("small-1", SMALL_ELEMENTS, 1, args.requests_small),
        Case("small-16", SMALL_ELEMENTS, 16, args.requests_small),
        Case("large-8", LARGE_ELEMENTS, 8, args.requests_large),
    ]
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(wanted) - {c.name for c in cases}
    if unknown:
        raise SystemExit("unknown case(s): " + ", ".join(sorted(unknown)))
    return [c for c in cases if c.name in wanted]


def case_inputs(elements):
    """Deterministic a and b whose sum is known, distinct per element."""
    import numpy as np

    a = np.arange(elements, dtype=np.int32)
    b = (np.arange(elements, dtype=np.int32) * 3 + 7).astype(np.int32)
    return a, b


# --------------------------------------------------------------------------
# Request encoding and checks (tritonclient only, never runtime internals)


def encode_grpc_body(elements):
    """One length-prefixed gRPC message, as h2load will send it verbatim.

    Built with tritonclient's own protobuf classes so the bench stays
    independent of the runtime's generated code.
    """
    from tritonclient.grpc import service_pb2

    a, b = case_inputs(elements)
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    for name in ("a", "b"):
        tensor = req.inputs.add()
        tensor.name = name
        tensor.datatype = "INT32"
        tensor.shape.append(elements)
    req.raw_input_contents.append(a.tobytes())
    req.raw_input_contents.append(b.tobytes())
    payload = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def check_inference(port, elements):
    """One real ModelInfer with tritonclient; returns an error string or None.

    h2load counts HTTP 200 as success even when grpc-status in the trailers is
    an error, so each run is bracketed by a call whose values are compared.
    """
    import numpy as np
    import tritonclient.grpc as grpcclient

    a, b = case_inputs(elements)
    client = grpcclient.InferenceServerClient(url="127.0.0.1:%d" % port)
    try:
        inputs = []
        for name, arr in (("a", a), ("b", b)):
            inp = grpcclient.InferInput(name, [elements], "INT32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        result = client.infer(MODEL, inputs, client_timeout=30)
        got = result.as_numpy("sum")
    except Exception as e:  # any client or server error is a failed check
        return "infer failed: %s" % (str(e).splitlines() or [repr(e)])[0]
    finally:
        client.close()
    if got is None:
        return "response has no output 'sum'"
    if got.dtype != np.int32 or not np.array_equal(got.reshape(-1), a + b):
        return "wrong sum (dtype %s, first %r)" % (got.dtype, got.reshape(-1)[:4])
    return None


def model_ready(port):
    """True when the server at port says the model is ready."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url="127.0.0.1:%d" % port)
    try:
        return client.is_model_ready(MODEL, client_timeout=2)
    except Exception:
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------
# /proc accounting


def read_stat(pid):
    """Fields of /proc/pid/stat after the command name, or None if gone.

    The name may contain spaces and parentheses, so split after the last ')'.
    Index 0 is field 3 (state); so ppid is [1], utime [11], stime [12],
    starttime [19].
    """
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2:].split()


def children(pid):
    """Direct children, from /proc/pid/task/*/children or a ppid scan."""
    found = set()
    task_dir = "/proc/%d/task" % pid
    try:
        for tid in os.listdir(task_dir):
            with open(os.path.join(task_dir, tid, "children")) as f:
                found.update(int(x) for x in f.read().split())
        return found
    except OSError:
        pass  # kernel without CONFIG_PROC_CHILDREN, or pid gone: scan
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st and int(st[1]) == pid:
                found.add(int(entry))
    return found


def descendants(pid):
    """Every process below pid, breadth first."""
    out, todo = [], [pid]
    while todo:
        kids = sorted(children(todo.pop(0)))
        out.extend(kids)
        todo.extend(kids)
    return out


def stat_sum(pids, *indexes):
    """Sum of the given read_stat() fields over pids that still exist."""
    total = 0
    for pid in pids:
        st = read_stat(pid)
        if st:
            total += sum(int(st[i]) for i in indexes)
    return total


def cpu_ticks(pids):
    """utime+stime, in clock ticks."""
    return stat_sum(pids, 11, 12)


def minor_faults(pids):
    """Page faults served without I/O: a server that keeps mapping fresh
    memory for every request shows hundreds per request here."""
    return stat_sum(pids, 7)


def identity(pid):
    """(pid, starttime): survives pid reuse, unlike the pid alone."""
    st = read_stat(pid)
    return (pid, st[19]) if st else None


# --------------------------------------------------------------------------
# Process lifecycle


def free_port():
    """An unused loopback TCP port (briefly bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server started in its own session so the whole tree can be stopped."""

    def __init__(self, label, argv, port, logdir, extra_env=None):
        """Start ``argv`` in a scratch cwd of its own (for pidfiles), its output
        in ``<label>.log``, with ``extra_env`` added to our environment."""
        self.label = label
        self.argv = argv
        self.port = port
        print("starting:", " ".join(["%s=%s" % kv for kv in (extra_env or {}).items()] + argv),
              flush=True)
        cwd = os.path.join(logdir, label + "-cwd")
        os.makedirs(cwd, exist_ok=True)
        env = dict(os.environ, **extra_env) if extra_env else None
        self.log_path = os.path.join(logdir, label + ".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.seen = set()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def tree(self):
        """Current descendants; remembered so stop() can reach escapees."""
        pids = descendants(self.pid)
        self.seen.update(i for i in map(identity, pids) if i)
        return pids

    def wait_ready(self, timeout):
        """Poll is_model_ready until true; fail fast if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError("%s exited with code %s before ready; log: %s"
                                   % (self.label, self.proc.returncode, self.log_tail()))
            if model_ready(self.port):
                self.tree()
                return
            time.sleep(0.25)
        raise RuntimeError("%s: model %r not ready after %.0f s; log: %s"
                           % (self.label, MODEL, timeout, self.log_tail()))

    def log_tail(self, lines=15):
        """Last lines of the server's output, for error messages."""
        self._log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace").splitlines()
        return "\n    " + "\n    ".join(text[-lines:]) if text else "(empty)"

    def stop(self, timeout=10.0):
        """Stop the server as a user would, then make sure nothing is left.

        SIGTERM goes to the leader alone so the server's own shutdown (which
        should stop its children) is exercised; whatever outlives it gets
        SIGTERM, then SIGKILL. Returns notes on anything that needed force.
        A second Ctrl-C must not cut this short and leave servers behind.
        """
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return self._stop(timeout)
        finally:
            signal.signal(signal.SIGINT, previous)
            self._log.close()

    def _stop(self, timeout):
        notes = []
        if self.alive():
            self.tree()
            self._send([self.pid], signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            notes.append("%s pid %d ignored SIGTERM for %.0f s" % (self.label, self.pid, timeout))
        left = self._remaining()
        if left:
            notes.append("%s left pids %s running after it stopped" % (self.label, left))
        self._send_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (self.alive() or self._remaining()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive() or self._remaining():
            notes.append("%s needed SIGKILL" % self.label)
            self._send_group(signal.SIGKILL)
            self.proc.wait()
        return notes

    def _remaining(self):
        """Remembered descendants that are still the same, unreaped process."""
        left = []
        for pid, start in self.seen:
            st = read_stat(pid)
            if st and st[19] == start and st[0] != "Z":
                left.append(pid)
        return sorted(left)

    def _send_group(self, sig):
        """Signal our own session's group, by its id, and remembered escapees."""
        self._send([-self.pid] + self._remaining(), sig)

    @staticmethod
    def _send(pids, sig):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def start_anyserve(args, logdir):
    """``twistd -n anyserve`` with one worker."""
    port, mgmt = free_port(), free_port()
    argv = [args.twistd, "-n", "anyserve", "--port", str(port),
            "--mgmt", str(mgmt), "--worker", args.worker_script]
    return Server("anyserve", argv, port, logdir)


def start_floor(args, logdir):
    """The ingress's gRPC front with ``add`` inline (see bench/floor.py)."""
    port = free_port()
    argv = [sys.executable, os.path.join(REPO, "bench", "floor.py"), str(port)]
    return Server("floor", argv, port, logdir)


def start_kserve(args, logdir):
    """The KServe peer, usually from its own venv (kserve pins heavy deps)."""
    port, http = free_port(), free_port()
    argv = [args.peer_python, args.peer_script, str(port), str(http)]
    extra = dict(item.split("=", 1) for item in args.peer_env)
    return Server("kserve", argv, port, logdir, extra)


# --------------------------------------------------------------------------
# h2load


def h2load_argv(h2load, port, body_path, requests, inflight):
    """HTTP/2 cleartext, one connection, ``inflight`` concurrent streams."""
    return [h2load, "-n", str(requests), "-c", "1", "-m", str(inflight),
            "-d", body_path,
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "http://127.0.0.1:%d%s" % (port, RPC_PATH)]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_h2load(text):
    """req/s, mean ms, succeeded, failed and DATA bytes from h2load output."""
    out = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    out["req_per_s"] = float(m.group(1)) if m else 0.0
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, "
                  r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        total, _, ok = int(m.group(1)), int(m.group(2)), int(m.group(3))
        out["succeeded"], out["failed"] = ok, total - ok
    else:
        out["succeeded"], out["failed"] = 0, -1
    m = re.search(r"traffic: .*?\((\d+)\) data", text)
    out["data_bytes"] = int(m.group(1)) if m else 0
    m = re.search(r"time for request:\s+\S+?(us|ms|s)\s+\S+?(?:us|ms|s)\s+"
                  r"([\d.]+)(us|ms|s)", text)
    out["mean_ms"] = float(m.group(2)) * _UNITS[m.group(3)] if m else 0.0
    return out


def run_h2load(args, port, body_path, requests, inflight):
    """Run h2load to completion (bounded by --h2load-timeout); parse output.

    A stuck server must not hang the bench: on timeout h2load is killed and
    the run counts as failed.
    """
    argv = h2load_argv(args.h2load, port, body_path, requests, inflight)
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=args.h2load_timeout)
        text, rc = proc.stdout.decode("utf-8", "replace"), proc.returncode
    except subprocess.TimeoutExpired:
        text, rc = "h2load killed after %.0f s" % args.h2load_timeout, -1
    parsed = parse_h2load(text)
    parsed["text"] = text
    parsed["rc"] = rc
    return parsed


# --------------------------------------------------------------------------
# Measuring one case


def warmup_count(case):
    """Enough requests to open connections, fill pools and caches; brief."""
    return max(case.inflight * 20, case.requests // 20)


def min_response_bytes(case):
    """Smallest plausible gRPC response: prefix plus the raw INT32 sum.

    A gRPC error is a trailers-only response with no DATA, so h2load's data
    byte count below this bound means some 200s were not real answers.
    """
    return 5 + 4 * case.elements


def measure(args, server, case, body_path):
    """Check, warm up, run h2load with CPU sampled around it, check again."""
    res = Result(server.label, case)
    err = check_inference(server.port, case.elements)
    if err:
        res.problems.append("pre-run check: " + err)
        return res
    warm = run_h2load(args, server.port, body_path, warmup_count(case), case.inflight)
    if warm["failed"]:
        res.problems.append("warm-up: %d failed" % warm["failed"])

    ingress_pids = [server.pid]
    workers_before = server.tree()
    t_ing, t_work = cpu_ticks(ingress_pids), cpu_ticks(workers_before)
    faults = minor_faults(ingress_pids + workers_before)
    run = run_h2load(args, server.port, body_path, case.requests, case.inflight)
    d_ing = cpu_ticks(ingress_pids) - t_ing
    faults = minor_faults(ingress_pids + workers_before) - faults
    workers_after = server.tree()
    d_work = cpu_ticks(workers_before) - t_work

    res.req_per_s, res.mean_ms = run["req_per_s"], run["mean_ms"]
    res.succeeded, res.failed = run["succeeded"], run["failed"]
    if res.succeeded:
        per_req = 1e6 / os.sysconf("SC_CLK_TCK") / res.succeeded
        res.ingress_us = d_ing * per_req
        res.worker_us = d_work * per_req if workers_before else None
        res.faults_per_req = faults / res.succeeded
    record_run_problems(res, run, case, server, workers_before, workers_after)
    return res


def record_run_problems(res, run, case, server, before, after):
    """Everything that makes the figures of a run untrustworthy."""
    if run["rc"] != 0 or res.failed:
        res.problems.append("h2load rc=%d, %d failed:\n%s"
                            % (run["rc"], res.failed, indent(run["text"])))
    if run["data_bytes"] < res.succeeded * min_response_bytes(case):
        res.problems.append("only %d response DATA bytes for %d requests: some "
                            "HTTP 200s carried gRPC errors"
                            % (run["data_bytes"], res.succeeded))
    if set(before) != set(after):
        res.problems.append("process tree changed during the run: %s -> %s "
                            "(crash or restart?)" % (before, after))
    if not server.alive():
        res.problems.append("server exited with code %s" % server.proc.returncode)
        return
    err = check_inference(server.port, case.elements)
    if err:
        res.problems.append("post-run check: " + err)


def indent(text):
    return "    " + "\n    ".join(text.strip().splitlines())


def wait_until_ready(args, server):
    """Block until the server's model answers; RuntimeError if it never does."""
    server.wait_ready(args.ready_timeout if server.label == "anyserve"
                      else args.peer_ready_timeout)
    print("%s ready on port %d (pid %d, children %s)"
          % (server.label, server.port, server.pid, server.tree()), flush=True)


def run_rounds(args, servers, cases, bodies):
    """Every case against every server, interleaved, ``--rounds`` times.

    The machine's speed drifts (other tenants): running the servers back to
    back per case, round after round, keeps that drift out of the ratios.
    """
    results = []
    for round_no in range(1, args.rounds + 1):
        for case in cases:
            for server in servers:
                if not server.alive():
                    continue
                print("  round %d %s: %s ..." % (round_no, server.label, case.name),
                      end="", flush=True)
                res = measure(args, server, case, bodies[case.name])
                res.round = round_no
                print(" %.0f req/s%s" % (res.req_per_s, "  PROBLEMS" if res.problems else ""),
                      flush=True)
                results.append(res)
    return results


# --------------------------------------------------------------------------
# Output


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(results):
    """Plain aligned table; the peer's CPU sits in ingress (main process)."""
    if not results:
        return
    head = ["round", "server", "case", "in-flight", "requests", "req/s", "mean ms",
            "ingress CPU us/req", "worker CPU us/req", "total CPU us/req", "page faults/req",
            "failed"]
    rows = [[str(r.round), r.server, r.case.name, str(r.case.inflight), str(r.succeeded + max(r.failed, 0)),
             fmt(r.req_per_s, ".1f"), fmt(r.mean_ms, ".3f"), fmt(r.ingress_us, ".1f"),
             fmt(r.worker_us, ".1f"), fmt(r.total_us, ".1f"), fmt(r.faults_per_req, ".1f"),
             str(r.failed)]
            for r in results]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 3 or i == 0 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def print_ratios(results, peer, ours=("anyserve", "floor")):
    """Our servers' req/s over the peer's per case: each round's, and the
    ratio of the medians over all rounds."""
    by_key = {}
    for r in results:
        if r.succeeded and not r.problems:
            by_key.setdefault((r.server, r.case.name), []).append(r)
    rows = [(server, name) for server, name in dict.fromkeys((r.server, r.case.name) for r in results)
            if server in ours and (server, name) in by_key and (peer, name) in by_key]
    if rows:
        print()
    case_order = list(dict.fromkeys(r.case.name for r in results))
    for server, name in sorted(rows, key=lambda row: (ours.index(row[0]), case_order.index(row[1]))):
        mine = {r.round: r.req_per_s for r in by_key[server, name]}
        theirs = {r.round: r.req_per_s for r in by_key[peer, name]}
        per_round = ["%.2fx" % (mine[k] / theirs[k]) for k in sorted(mine) if k in theirs]
        a = statistics.median(mine.values())
        p = statistics.median(theirs.values())
        print("ratio %-9s %-8s %9.1f req/s / %s %9.1f req/s = %.2fx (medians; per round %s)"
              % (name, server, a, peer, p, a / p, ", ".join(per_round)))


def print_problems(results, setup_errors):
    """Everything that went wrong, after the figures."""
    lines = list(setup_errors)
    for r in results:
        lines.extend("%s %s: %s" % (r.server, r.case.name, p) for p in r.problems)
    if lines:
        print()
        print("PROBLEMS:")
        for p in lines:
            print("  " + p)
    return bool(lines)


def print_notes(notes):
    """Shutdown trouble: worth knowing, but it does not spoil the figures."""
    if notes:
        print()
        print("NOTES:")
        for n in notes:
            print("  " + n)


# --------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="anyserve-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--worker-script",
                   default=os.path.join(REPO, "examples", "kserve_server.py"),
                   help="worker script given to the ingress")
    p.add_argument("--twistd",
                   default=os.path.join(os.path.dirname(sys.executable), "twistd"),
                   help="twistd executable to start the ingress with")
    p.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load")
    p.add_argument("--requests-small", type=int, default=20000,
                   help="measured requests for the 16-element cases")
    p.add_argument("--requests-large", type=int, default=1500,
                   help="measured requests for the 1 MiB case")
    p.add_argument("--rounds", type=int, default=3,
                   help="times every case runs against every server, interleaved")
    p.add_argument("--cases", default="small-1,small-16,large-8",
                   help="comma-separated subset of small-1, small-16, large-8")
    p.add_argument("--peer", choices=["kserve"], help="also benchmark this peer")
    p.add_argument("--floor", action="store_true",
                   help="also run the ingress's gRPC front alone with the model inline "
                        "(bench/floor.py): the most any design behind it can reach")
    p.add_argument("--only-peer", action="store_true",
                   help="skip AnyServe, benchmark the peer alone (implies --peer kserve)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="interpreter with kserve installed, e.g. a venv's python")
    p.add_argument("--peer-script",
                   default=os.path.normpath(os.path.join(
                       REPO, "..", "shared", "peers", "kserve_add.py")))
    p.add_argument("--peer-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the peer (repeatable), e.g. glibc "
                        "malloc settings like those AnyServe applies to itself: "
                        "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait for AnyServe's model to be ready")
    p.add_argument("--peer-ready-timeout", type=float, default=90.0,
                   help="seconds to wait for the peer (kserve imports slowly)")
    p.add_argument("--h2load-timeout", type=float, default=600.0,
                   help="seconds after which one h2load run is abandoned")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the scratch directory with the servers' logs")
    args = p.parse_args(argv)
    if args.only_peer and not args.peer:
        args.peer = "kserve"
    for item in args.peer_env:
        if not item.partition("=")[0] or "=" not in item:
            p.error("--peer-env wants NAME=VALUE, got %r" % item)
    if args.peer_env and not args.peer:
        p.error("--peer-env needs --peer")
    return args


def preflight(args):
    """Fail with a clear message before starting anything that would."""
    need = [("h2load", args.h2load), ("--peer-script", args.peer_script if args.peer else None),
            ("--worker-script", None if args.only_peer else args.worker_script),
            ("--twistd", None if args.only_peer else args.twistd),
            ("--peer-python", args.peer_python if args.peer else None)]
    for what, path in need:
        if path and not os.path.exists(path):
            raise SystemExit("%s not found: %s" % (what, path))


def write_bodies(cases, logdir):
    """Pre-encode one request body file per case, for h2load -d."""
    bodies = {}
    for case in cases:
        path = os.path.join(logdir, "body-%s.bin" % case.name)
        with open(path, "wb") as f:
            f.write(encode_grpc_body(case.elements))
        bodies[case.name] = path
    return bodies


def on_sigterm(signum, frame):
    """Turn SIGTERM into an exception so the finally blocks stop servers."""
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    preflight(args)
    cases = build_cases(args)
    signal.signal(signal.SIGTERM, on_sigterm)
    logdir = tempfile.mkdtemp(prefix="anyserve-bench-")
    starters = ([] if args.only_peer else [start_anyserve])
    starters += [start_floor] if args.floor else []
    starters += [start_kserve] if args.peer == "kserve" else []
    results, setup_errors, notes = [], [], []
    bodies = write_bodies(cases, logdir)
    print("%d CPUs, load average %.2f (other load skews the figures)"
          % (os.cpu_count(), os.getloadavg()[0]), flush=True)
    servers = []
    try:
        for start in starters:
            try:
                servers.append(start(args, logdir))
            except OSError as e:
                setup_errors.append("could not start: %s" % e)
        for server in list(servers):
            try:
                wait_until_ready(args, server)
            except RuntimeError as e:
                setup_errors.append(str(e))
                notes.extend(server.stop())
                servers.remove(server)
        results.extend(run_rounds(args, servers, cases, bodies))
    except KeyboardInterrupt:
        setup_errors.append("interrupted")
    finally:
        for server in servers:
            notes.extend(server.stop())
        print_table(results)
        if args.peer:
            print_ratios(results, args.peer)
        bad = print_problems(results, setup_errors)
        print_notes(notes)
        if args.keep_logs or bad:
            print("\nlogs kept in", logdir)
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
