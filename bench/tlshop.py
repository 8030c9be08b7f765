"""The price of the network hop: ``add`` and two 1 MiB inputs (``echo``)
served by a worker on the ingress's host (Unix socket) and by one on
another host (mutual TLS over a veth pair between network namespaces).

A benchmark, not a test: it prints figures.  Needs root (namespaces, from
``tests/netns.py``) and the ``test`` extra (tritonclient, trustme)::

    sudo .venv/bin/python bench/tlshop.py [--calls 1000] [--rounds 2]

The client sits in the test's own namespace and reaches the ingress (in
the hub namespace) over TLS in both cases, so the only difference is the
ingress-to-worker hop.  Calls are sequential (one in flight): the figures
are latencies, median and 99th percentile, after 50 warm-up calls.
"""
import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

INGRESS_PORT, MGMT_PORT, WORKER_PORT = 8001, 9001, 7001


def port_open(host, port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def measure(hop, calls):
    """{case: (p50 us, p99 us)} with the worker behind ``hop`` (unix or tls)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from tests.harness import KSERVE_SERVER, TWISTD, infer_inputs, wait_for
    from tests.netns import Hosts
    from tests.tlscerts import Pki

    directory = tempfile.mkdtemp(prefix="as-tlshop-", dir="/tmp")
    hosts = Hosts(["w1"])
    processes = []
    try:
        pki = Pki(directory)
        cert, key = pki.issue("ingress", hosts.client_address, hosts.hub_address("w1"), "127.0.0.1")
        token = "b" * 40
        token_file = os.path.join(directory, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        command = [TWISTD, "-n", "--pidfile=", "--logfile=" + os.path.join(directory, "ingress.log"),
                   "anyserve", "--port", str(INGRESS_PORT), "--mgmt", str(MGMT_PORT), "--host", "0.0.0.0",
                   "--mgmt-host", "0.0.0.0", "--http-port", "0", "--mgmt-token-file", token_file,
                   "--tls-ca", pki.ca_path, "--tls-cert", cert, "--tls-key", key]
        if hop == "unix":
            command += ["--worker", KSERVE_SERVER]
        processes.append(subprocess.Popen(hosts.command("hub", command), cwd=directory))
        wait_for(lambda: port_open(hosts.client_address, INGRESS_PORT), 20, what="the ingress")
        if hop == "tls":
            address = hosts.address("w1")
            env = dict(os.environ, ANYSERVE_LISTEN="tls://%s:%d" % (address, WORKER_PORT),
                       ANYSERVE_INGRESS="%s:%d" % (hosts.hub_address("w1"), MGMT_PORT), ANYSERVE_TOKEN=token,
                       **pki.worker_env(*pki.issue("w1", address)))
            with open(os.path.join(directory, "worker.log"), "wb") as log:
                processes.append(subprocess.Popen(hosts.command("w1", [sys.executable, KSERVE_SERVER]), env=env,
                                                  stdout=log, stderr=log))
        client = grpcclient.InferenceServerClient("%s:%d" % (hosts.client_address, INGRESS_PORT), ssl=True,
                                                  root_certificates=pki.ca_path)
        wait_for(lambda: client.is_model_ready("add") and client.is_model_ready("echo"), 30, what="models")
        cases = (
            ("add", "add", infer_inputs(a=np.arange(16, dtype=np.int32), b=np.arange(16, dtype=np.int32)), calls),
            ("2 x 1 MiB", "echo", infer_inputs(x=np.zeros(1 << 20, np.uint8), y=np.ones(1 << 20, np.uint8)),
             max(20, calls // 5)),
        )
        figures = {}
        for label, model, inputs, n in cases:
            for _ in range(50):
                client.infer(model, inputs)
            times = []
            for _ in range(n):
                started = time.perf_counter()
                client.infer(model, inputs)
                times.append(time.perf_counter() - started)
            times.sort()
            figures[label] = (statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6)
        client.close()
        return figures
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        hosts.destroy()
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="add calls per round (2 x 1 MiB: a fifth)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (unix, tls), interleaved")
    options = parser.parse_args()
    from tests.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        sys.exit("cannot run: %s" % reason)
    print("%-6s %-10s %10s %10s" % ("hop", "case", "p50 us", "p99 us"))
    for _ in range(options.rounds):
        for hop in ("unix", "tls"):
            for label, (p50, p99) in measure(hop, options.calls).items():
                print("%-6s %-10s %10.0f %10.0f" % (hop, label, p50, p99), flush=True)


if __name__ == "__main__":
    main()
