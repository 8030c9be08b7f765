"""ModelInfer throughput benchmark for AnyServe, optionally against KServe.

Run ``python bench/bench.py`` from a checkout. It starts the ingress with one
worker as a single ``twistd -n anyserve`` command, once per gRPC front
(``--fronts``, default both ``aio`` and ``threads``), drives ``ModelInfer`` on
the ``add`` model with h2load (a separate native process, so the load
generator does not compete for the servers' Python interpreter), and prints a
table of request rate, mean latency and CPU time per request of the ingress
and the worker. With ``--peer kserve`` the same cases run against the KServe
Python ModelServer, with ``--floor`` against bench/floor.py, interleaved in the
same rounds; the ratios and the targets AnyServe is held to are printed.

This is a benchmark, not a test: it prints figures. It exits non-zero only when
a server failed to start, a correctness check failed or h2load saw failures.

Only stdlib, numpy and tritonclient are used; tritonclient (and numpy) are
imported lazily so ``--help`` works without them.
"""
import argparse
import functools
import os
import re
import shlex
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout

# ``--fronts`` names: the ingress's ``--front`` (and ``--loop``) for each; "default" passes none
# (the ingress's own default, and the only choice before ``--front`` existed).
FRONT_ARGS = {"aio": ["--front", "aio"], "threads": ["--front", "threads"], "default": [],
              "aio-asyncio": ["--front", "aio", "--loop", "asyncio"], "h2": ["--front", "h2"],
              "h2-asyncio": ["--front", "h2", "--loop", "asyncio"]}


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

    def __init__(self, label, argv, port, logdir, extra_env=None, ready_timeout=30.0):
        """Start ``argv`` in a scratch cwd of its own (for pidfiles), its output
        in ``<label>.log``, with ``extra_env`` added to our environment."""
        self.label = label
        self.argv = argv
        self.port = port
        self.ready_timeout = ready_timeout
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


def anyserve_label(front):
    """Server label for a ``--fronts`` name: anyserve-aio, anyserve-threads,
    or plain anyserve for the ingress's default."""
    return "anyserve" if front == "default" else "anyserve-" + front


def start_anyserve(front, args, logdir):
    """``twistd -n anyserve`` with one worker, the given front, then
    ``--ingress-args``, with ``--ingress-env`` added to its environment.
    Its HTTP port (REST and metrics, on as by default) is a free one of its
    own: several ingresses run side by side."""
    port, mgmt, http = free_port(), free_port(), free_port()
    argv = [args.twistd, "-n", "anyserve", "--port", str(port), "--mgmt", str(mgmt),
            "--http-port", str(http), "--worker", args.worker_script]
    argv += FRONT_ARGS[front] + args.ingress_argv
    return Server(anyserve_label(front), argv, port, logdir, env_items(args.ingress_env),
                  args.ready_timeout)


def start_baseline(args, logdir):
    """The ingress and worker of another checkout (``--baseline``), e.g. the
    last landed revision, with its own example worker and default front."""
    port, mgmt = free_port(), free_port()
    argv = [args.twistd, "-n", "anyserve", "--port", str(port), "--mgmt", str(mgmt),
            "--worker", os.path.join(args.baseline, "examples", "kserve_server.py")]
    env = {"PYTHONPATH": os.path.abspath(args.baseline)}
    return Server("baseline", argv, port, logdir, env, args.ready_timeout)


def start_floor(args, logdir):
    """The thread front with ``add`` inline (see bench/floor.py)."""
    port = free_port()
    argv = [sys.executable, os.path.join(REPO, "bench", "floor.py"), str(port)]
    return Server("floor", argv, port, logdir, ready_timeout=args.ready_timeout)


def start_kserve(args, logdir):
    """The KServe peer, usually from its own venv (kserve pins heavy deps)."""
    port, http = free_port(), free_port()
    argv = [args.peer_python, args.peer_script, str(port), str(http)]
    return Server("kserve", argv, port, logdir, env_items(args.peer_env),
                  args.peer_ready_timeout)


def env_items(items):
    """``NAME=VALUE`` strings (checked by parse_args) as a dict."""
    return dict(item.split("=", 1) for item in items)


# --------------------------------------------------------------------------
# h2load


def start_servers(started, starters, start_args, ready, stop, setup_errors, notes):
    """Start each of ``starters(*start_args)`` into the list ``started`` (at
    once, so that whoever cleans up after an interruption finds it) and wait
    until ``ready``; the ones that could not start or never got ready are
    stopped and left out, their reasons added to ``setup_errors`` and
    ``notes``."""
    for start in starters:
        try:
            started.append(start(*start_args))
        except OSError as e:
            setup_errors.append("could not start: %s" % e)
    for item in list(started):
        try:
            ready(item)
        except RuntimeError as e:
            setup_errors.append(str(e))
            notes.extend(stop(item))
            started.remove(item)


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
    server.wait_ready(server.ready_timeout)
    print("%s ready on port %d (pid %d, children %s)"
          % (server.label, server.port, server.pid, server.tree()), flush=True)


def run_rounds(args, servers, cases, bodies):
    """Every case against every server, interleaved, ``--rounds`` times.

    The machine's speed drifts (other tenants): running the servers back to
    back per case, round after round, keeps that drift out of the ratios.
    Each round starts one server further down the list, so no server always
    runs first (or right after the same other one).
    """
    results = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(servers) if servers else 0
        order = servers[shift:] + servers[:shift]
        for case in cases:
            for server in order:
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


def print_aligned(head, rows, left):
    """Plain aligned table; columns in ``left`` flush left, the rest right."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def print_table(results):
    """Every run, in the order run; the peer's CPU sits in ingress (main process)."""
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
    print_aligned(head, rows, left={1, 2})


def clean_runs(results):
    """{(server, case name): [Result]} of the runs whose figures hold."""
    by_key = {}
    for r in results:
        if r.succeeded and not r.problems:
            by_key.setdefault((r.server, r.case.name), []).append(r)
    return by_key


def median_of(runs, attr):
    """Median of one figure over runs, None when no run has it."""
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def print_medians(results, labels, case_names):
    """One row per server and case: each figure's median over the clean rounds."""
    by_key = clean_runs(results)
    attrs = [("req_per_s", ".1f"), ("mean_ms", ".3f"), ("ingress_us", ".1f"),
             ("worker_us", ".1f"), ("total_us", ".1f"), ("faults_per_req", ".1f")]
    rows = [[name, label, str(len(by_key[label, name]))]
            + [fmt(median_of(by_key[label, name], a), spec) for a, spec in attrs]
            for name in case_names for label in labels if (label, name) in by_key]
    if not rows:
        return
    head = ["case", "server", "rounds", "req/s", "mean ms", "ingress CPU us/req",
            "worker CPU us/req", "total CPU us/req", "page faults/req"]
    print("\nmedians over the rounds without problems:", end="")
    print_aligned(head, rows, left={0, 1})


def compare(by_key, mine, theirs, case_name, attr):
    """``mine``'s figure over ``theirs``' for one case: (ratio of the medians,
    my median, their median, each round's own ratio), or None without data."""
    a_runs, b_runs = by_key.get((mine, case_name)), by_key.get((theirs, case_name))
    if not a_runs or not b_runs:
        return None
    a, b = median_of(a_runs, attr), median_of(b_runs, attr)
    if a is None or not b:
        return None
    theirs_by_round = {r.round: getattr(r, attr) for r in b_runs}
    per_round = [getattr(r, attr) / theirs_by_round[r.round] for r in a_runs
                 if getattr(r, attr) is not None and theirs_by_round.get(r.round)]
    return a / b, a, b, per_round


def ratio_pairs(labels, peer):
    """(numerator, denominator) server pairs whose req/s ratio is printed:
    each AnyServe front and the floor over the peer, each front over the floor."""
    fronts = [label for label in labels if label.startswith("anyserve")]
    pairs = [(f, peer) for f in fronts] + [("floor", peer)] + [(f, "floor") for f in fronts]
    pairs += [(f, "baseline") for f in fronts]
    return [(a, b) for a, b in pairs if a in labels and b in labels]


def print_ratios(results, pairs, case_names):
    """Per case, req/s of each pair: the ratio of the medians over the rounds,
    then each round's own ratio."""
    by_key = clean_runs(results)
    width = max([len(a) for a, _ in pairs] + [0])
    first = True
    for name in case_names:
        for mine, theirs in pairs:
            found = compare(by_key, mine, theirs, name, "req_per_s")
            if found is None:
                continue
            if first:
                print("\nreq/s ratios (of the medians%s):" % brackets_note(results))
                first = False
            ratio, a, b, per_round = found
            print("  %-9s %-*s / %-6s %9.1f / %9.1f = %5.2fx%s"
                  % (name, width, mine, theirs, a, b, ratio, rounds_note(per_round)))


def brackets_note(results):
    return "; each round's in brackets" if len({r.round for r in results}) > 1 else ""


def rounds_note(per_round):
    """Each round's own ratio, when there is more than one round."""
    if len(per_round) < 2:
        return ""
    return "  [%s]" % ", ".join("%.2f" % x for x in per_round)


@dataclass(frozen=True)
class Target:
    """AnyServe's figure for ``case`` against ``factor`` times the baseline's
    (``peer`` or ``floor``): at least that when ``at_least``, else at most."""

    case: str
    attr: str
    baseline: str
    factor: float
    at_least: bool

    def describe(self, peer):
        what = {"req_per_s": "req/s", "mean_ms": "mean latency",
                "total_us": "CPU us/req"}[self.attr]
        return "%-8s %-12s %s %.2fx %-6s" % (
            self.case, what, ">=" if self.at_least else "<=", self.factor,
            peer if self.baseline == "peer" else self.baseline)


# What the issue asks of the default front; CPU is the whole server's
# (ingress + worker, against the peer's processes together).
TARGETS = [
    Target("small-16", "req_per_s", "peer", 1.3, True),
    Target("small-16", "req_per_s", "floor", 0.75, True),
    Target("small-1", "mean_ms", "peer", 0.9, False),
    Target("large-8", "req_per_s", "peer", 1.1, True),
] + [Target(name, "total_us", "peer", 1.0, False) for name in ("small-1", "small-16", "large-8")]


def print_targets(results, labels, peer):
    """PASS/MISS of every target for every AnyServe front that ran, judged
    on the ratio of the medians over the rounds."""
    fronts = [label for label in labels if label.startswith("anyserve")]
    if not fronts or not peer:
        return
    by_key = clean_runs(results)
    for front in fronts:
        print("\ntargets for %s (ratio of the medians%s):" % (front, brackets_note(results)))
        counts = {}
        for target in TARGETS:
            verdict, detail = judge(by_key, labels, peer, front, target)
            counts[verdict] = counts.get(verdict, 0) + 1
            print("  %-4s  %s  %s" % (verdict, target.describe(peer), detail))
        print("  %s: %s" % (front, ", ".join("%d %s" % (counts[v], v)
                                              for v in ("PASS", "MISS", "n/a") if v in counts)))


def judge(by_key, labels, peer, front, target):
    """("PASS", "MISS" or "n/a", the figures or why there are none)."""
    baseline = peer if target.baseline == "peer" else target.baseline
    found = compare(by_key, front, baseline, target.case, target.attr)
    if found is None:
        if baseline not in labels:
            return "n/a", " no %s (run with --%s)" % (baseline, target.baseline)
        return "n/a", " %s not measured cleanly on both" % target.case
    ratio, _, _, per_round = found
    ok = ratio >= target.factor if target.at_least else ratio <= target.factor
    return ("PASS" if ok else "MISS"), "%5.2fx  (%s / %s)%s" % (
        ratio, figure(by_key, front, target), figure(by_key, baseline, target),
        rounds_note(per_round))


def figure(by_key, label, target):
    """The median a target judges; CPU with the medians of its two parts."""
    runs = by_key[label, target.case]
    if target.attr == "mean_ms":
        return "%.3f ms" % median_of(runs, "mean_ms")
    if target.attr == "total_us":
        return "%.1f us: ingress %s, worker %s" % (
            median_of(runs, "total_us"), fmt(median_of(runs, "ingress_us"), ".1f"),
            fmt(median_of(runs, "worker_us"), ".1f"))
    return "%.1f" % median_of(runs, target.attr)


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
        prog="python bench/bench.py", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--baseline", metavar="CHECKOUT",
                   help="also run the ingress of another checkout of this project (built: "
                        "pip install -e, or its anyserve_tw/_generated copied in), e.g. a "
                        "`git worktree add` of the last landed revision, as server 'baseline'")
    p.add_argument("--fronts", default="aio,threads",
                   help="comma-separated ingress fronts to benchmark, each as its own "
                        "server in the same rounds: aio (anyserve-aio), aio-asyncio "
                        "(anyserve-aio-asyncio: --loop asyncio), h2 (anyserve-h2: our "
                        "HTTP/2 front), h2-asyncio, threads "
                        "(anyserve-threads), default (anyserve, no --front: for an "
                        "ingress without that option)")
    p.add_argument("--ingress-args", action="append", default=[], metavar="ARGS",
                   help="extra arguments for every ingress, split like a shell "
                        "would (repeatable), e.g. --ingress-args='--threads 8'")
    p.add_argument("--ingress-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for every ingress (repeatable)")
    p.add_argument("--peer", choices=["kserve"], help="also benchmark this peer")
    p.add_argument("--floor", action="store_true",
                   help="also run the ingress's gRPC front alone with the model inline "
                        "(bench/floor.py): the most the thread front can reach")
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
    for option, items in (("--peer-env", args.peer_env), ("--ingress-env", args.ingress_env)):
        for item in items:
            if not item.partition("=")[0] or "=" not in item:
                p.error("%s wants NAME=VALUE, got %r" % (option, item))
    if args.peer_env and not args.peer:
        p.error("--peer-env needs --peer")
    args.fronts = list(dict.fromkeys(f.strip() for f in args.fronts.split(",") if f.strip()))
    unknown = [f for f in args.fronts if f not in FRONT_ARGS]
    if unknown:
        p.error("unknown front(s) %s; known: %s" % (", ".join(unknown), ", ".join(FRONT_ARGS)))
    if args.only_peer:
        args.fronts = []
    elif not args.fronts:
        p.error("--fronts names no front (use --only-peer to skip AnyServe)")
    try:
        args.ingress_argv = [a for chunk in args.ingress_args for a in shlex.split(chunk)]
    except ValueError as e:
        p.error("--ingress-args: %s" % e)
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
    if any(FRONT_ARGS[f] for f in args.fronts) and not ingress_has_front_option(args.twistd):
        raise SystemExit("this ingress (%s anyserve) has no --front option: "
                         "use --fronts default" % args.twistd)


def ingress_has_front_option(twistd):
    """Whether ``twistd anyserve --help`` lists ``--front``."""
    try:
        out = subprocess.run([twistd, "anyserve", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit("%s anyserve --help failed: %s" % (twistd, e))
    return b"--front=" in out.stdout


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
    starters = [functools.partial(start_anyserve, front) for front in args.fronts]
    starters += [start_baseline] if args.baseline else []
    starters += [start_floor] if args.floor else []
    starters += [start_kserve] if args.peer == "kserve" else []
    results, setup_errors, notes = [], [], []
    bodies = write_bodies(cases, logdir)
    print("%d CPUs, load average %.2f (other load skews the figures)"
          % (os.cpu_count(), os.getloadavg()[0]), flush=True)
    servers = []
    try:
        start_servers(servers, starters, (args, logdir), lambda server: wait_until_ready(args, server),
                      lambda server: server.stop(), setup_errors, notes)
        results.extend(run_rounds(args, servers, cases, bodies))
    except KeyboardInterrupt:
        setup_errors.append("interrupted")
    finally:
        for server in servers:
            notes.extend(server.stop())
        labels = ([anyserve_label(f) for f in args.fronts] + ["baseline"] * bool(args.baseline)
                  + ["floor"] * args.floor
                  + [args.peer] * bool(args.peer))
        case_names = [case.name for case in cases]
        print_table(results)
        print_medians(results, labels, case_names)
        print_ratios(results, ratio_pairs(labels, args.peer), case_names)
        print_targets(results, labels, args.peer)
        bad = print_problems(results, setup_errors)
        print_notes(notes)
        if args.keep_logs or bad:
            print("\nlogs kept in", logdir)
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
