"""deploy/: the image definition, the Kubernetes manifests (checked offline:
no cluster runs here) and nginx's grpc_pass in front of two real ingresses."""
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile

import numpy as np
from twisted.trial import unittest

from tests import harness

DEPLOY = os.path.join(harness.ROOT, "deploy")
KUBERNETES = os.path.join(DEPLOY, "kubernetes")
#: Oldest Kubernetes the manifests are checked against (gRPC probes: 1.24+).
KUBERNETES_VERSION = "1.27.0"


def manifests():
    """(file name, document) of every YAML document under deploy/kubernetes."""
    import yaml

    found = []
    for name in sorted(os.listdir(KUBERNETES)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(KUBERNETES, name)) as f:
                found.extend((name, doc) for doc in yaml.safe_load_all(f) if doc)
    return found


def ingress_arguments(command, test, tmp):
    """Parse ``command`` (twistd ... anyserve OPTIONS) with the ingress's own
    option parser, as twistd would; returns the parsed Options."""
    from anyserve_tw.ingress.tap import Options

    test.assertIn("anyserve", command)
    test.assertEqual(os.path.basename(command[0]), "twistd")
    at = command.index("anyserve")
    test.assertIn("-n", command[:at], "twistd must stay in the foreground in a container")
    options = Options()
    # The token file goes to a temp dir instead of the runtime dir.
    options.parseOptions(command[at + 1:] + ["--mgmt-token-file", os.path.join(tmp, "token")])
    return options


class KubernetesManifestTests(unittest.TestCase):

    def setUp(self):
        if importlib.util.find_spec("yaml") is None:
            raise unittest.SkipTest("PyYAML is not installed (pip install kubernetes-validate brings it)")
        self.tmp = tempfile.mkdtemp(prefix="as-deploy-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.docs = manifests()
        self.kinds = sorted(doc["kind"] for _, doc in self.docs)

    def test_what_is_shipped(self):
        """A ServingRuntime and an InferenceService on it; a plain Deployment
        and its Service."""
        self.assertEqual(self.kinds, ["Deployment", "InferenceService", "Service", "ServingRuntime"])

    def test_core_objects_match_the_kubernetes_schema(self):
        """The Deployment and Service, and the ServingRuntime's containers as
        a Pod's, pass Kubernetes's own OpenAPI schema, strictly (no unknown
        field), with kubernetes-validate (its schemas ship in the package)."""
        try:
            import kubernetes_validate
        except ImportError:
            raise unittest.SkipTest("kubernetes-validate is not installed (pip install kubernetes-validate)")
        checked = 0
        for name, doc in self.docs:
            if doc["kind"] == "ServingRuntime":
                doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
                       "spec": {"containers": doc["spec"]["containers"]}}
            elif doc["apiVersion"].startswith("serving.kserve.io/"):
                continue  # below: no schema of KServe's ships offline
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
        self.assertEqual(checked, 3)
        # And the check does reject: a wrong type, an unknown field.
        deployment = [d for _, d in self.docs if d["kind"] == "Deployment"][0]
        for broken in ({"replicas": "two"}, {"replica": 2}):
            bad = dict(deployment, spec=dict(deployment["spec"], **broken))
            with self.assertRaises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)

    def test_kserve_objects(self):
        """What KServe requires of a ServingRuntime and an InferenceService,
        and that the InferenceService selects this runtime."""
        [runtime] = [d for _, d in self.docs if d["kind"] == "ServingRuntime"]
        [service] = [d for _, d in self.docs if d["kind"] == "InferenceService"]
        self.assertEqual(runtime["apiVersion"], "serving.kserve.io/v1alpha1")
        self.assertEqual(service["apiVersion"], "serving.kserve.io/v1beta1")
        spec = runtime["spec"]
        formats = {f["name"] for f in spec["supportedModelFormats"]}
        self.assertTrue(formats)
        self.assertLessEqual(set(spec["protocolVersions"]), {"v1", "v2", "grpc-v1", "grpc-v2"})
        self.assertIn("grpc-v2", spec["protocolVersions"])
        [container] = spec["containers"]
        self.assertEqual(container["name"], "kserve-container")  # the name KServe looks for
        self.assertEqual([p["name"] for p in container["ports"]], ["h2c"])  # one port, gRPC
        model = service["spec"]["predictor"]["model"]
        self.assertEqual(model["runtime"], runtime["metadata"]["name"])
        self.assertIn(model["modelFormat"]["name"], formats)
        self.assertIn(model["protocolVersion"], spec["protocolVersions"])
        self.assertTrue(model["storageUri"])
        # The runtime runs the script KServe's storage initializer puts there.
        options = ingress_arguments(container["command"] + container["args"], self, self.tmp)
        self.assertEqual(options["worker"], ["/mnt/models/server.py"])

    def containers(self):
        found = []
        for _, doc in self.docs:
            if doc["kind"] == "Deployment":
                found.extend(doc["spec"]["template"]["spec"]["containers"])
            elif doc["kind"] == "ServingRuntime":
                found.extend(doc["spec"]["containers"])
        return found

    def test_containers_run_the_ingress_with_grpc_health_probes(self):
        """Each container's command is an ingress command line its own
        parser accepts; liveness is gRPC health's "" service and readiness
        inference.GRPCInferenceService (ServerReady), both on its --port,
        which the container declares."""
        containers = self.containers()
        self.assertEqual(len(containers), 2)
        for container in containers:
            options = ingress_arguments(container["command"] + container["args"], self, self.tmp)
            self.assertEqual(options["host"], "0.0.0.0")
            self.assertEqual(options["mgmt-host"], "127.0.0.1")  # workers share the pod
            port = options["port"]
            self.assertIn(port, [p["containerPort"] for p in container["ports"]])
            live, ready = container["livenessProbe"]["grpc"], container["readinessProbe"]["grpc"]
            self.assertEqual(live, {"port": port})
            self.assertEqual(ready, {"port": port, "service": "inference.GRPCInferenceService"})

    def test_deployment_service_selects_its_pods(self):
        [deployment] = [d for _, d in self.docs if d["kind"] == "Deployment"]
        [service] = [d for _, d in self.docs if d["kind"] == "Service"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        self.assertEqual(deployment["spec"]["selector"]["matchLabels"], labels)
        self.assertLessEqual(service["spec"]["selector"].items(), labels.items())
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        named = {p["name"] for p in container["ports"]}
        self.assertLessEqual({p["targetPort"] for p in service["spec"]["ports"]}, named)

    def test_kubectl_reads_every_object(self):
        """kubectl (where installed) reads each file and names every object.
        ``kubectl apply --dry-run=client`` needs an API server to map kinds,
        so this uses its local mode, with a kubeconfig that points nowhere
        (no traffic leaves the test)."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise unittest.SkipTest("kubectl is not installed")
        kubeconfig = os.path.join(self.tmp, "kubeconfig")
        with open(kubeconfig, "w") as f:
            f.write("apiVersion: v1\nkind: Config\n"
                    "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                    "contexts: [{name: none, context: {cluster: none}}]\ncurrent-context: none\n")
        names = []
        for name in sorted(os.listdir(KUBERNETES)):
            result = subprocess.run(
                [kubectl, "label", "--local", "--dry-run=client", "-o", "name",
                 "-f", os.path.join(KUBERNETES, name), "anyserve.checked=yes"],
                env=dict(os.environ, KUBECONFIG=kubeconfig), capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            names.extend(result.stdout.split())
        self.assertEqual(sorted(names), sorted([
            "deployment.apps/anyserve", "service/anyserve",
            "servingruntime.serving.kserve.io/anyserve",
            "inferenceservice.serving.kserve.io/anyserve-add"]))


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return found


class DockerfileTests(unittest.TestCase):

    def setUp(self):
        self.steps = dockerfile_instructions(os.path.join(DEPLOY, "Dockerfile"))

    def test_base_and_install(self):
        self.assertEqual(self.steps[0], ("FROM", "python:3.11-slim"))
        runs = [args for kind, args in self.steps if kind == "RUN"]
        self.assertTrue(any(re.search(r"\bpip install \.(\s|$)", r) for r in runs), runs)
        self.assertIn("USER", [kind for kind, _ in self.steps])

    def test_copies_what_exists_and_what_the_build_needs(self):
        """Every COPY source exists in the repository (the build context);
        together they hold what ``pip install .`` reads: setup.py's files and
        MANIFEST.in's."""
        copied = []
        for kind, args in self.steps:
            if kind == "COPY":
                parts = shlex.split(args)
                self.assertFalse(parts[0].startswith("--from"), "no multi-stage copy expected")
                for source in parts[:-1]:
                    self.assertTrue(os.path.exists(os.path.join(harness.ROOT, source)),
                                    "COPY %s: no such file in the repository" % source)
                    copied.append(source.rstrip("/"))
        for needed in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.rst", "proto",
                       "anyserve_tw", "twisted"):
            self.assertIn(needed, copied)
        with open(os.path.join(harness.ROOT, "MANIFEST.in")) as f:
            for line in f:
                words = line.split()
                if len(words) == 2 and words[0] in ("include", "graft"):
                    self.assertIn(words[1], copied, "MANIFEST.in names %s" % words[1])

    def test_command_is_an_ingress_serving_a_copied_worker(self):
        import json

        [command] = [json.loads(args) for kind, args in self.steps if kind == "CMD"]
        tmp = tempfile.mkdtemp(prefix="as-deploy-", dir="/tmp")
        self.addCleanup(shutil.rmtree, tmp, True)
        options = ingress_arguments(command, self, tmp)
        exposed = {int(p) for kind, args in self.steps if kind == "EXPOSE" for p in args.split()}
        self.assertLessEqual({options["port"], options["http-port"], options["mgmt"]}, exposed)
        # The worker it runs is put there by a RUN step, from a copied file.
        [worker] = options["worker"]
        runs = " ".join(args for kind, args in self.steps if kind == "RUN")
        source = re.search(r"cp (\S+) %s" % re.escape(worker), runs)
        self.assertIsNotNone(source, "no RUN step puts %s in place" % worker)
        self.assertTrue(os.path.exists(os.path.join(harness.ROOT, source.group(1))))


def find_nginx():
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def local_nginx_conf(ingresses, grpc_port, http_port, prefix):
    """deploy/nginx.conf as shipped, with only its addresses and nginx's own
    files changed for a test: the ingresses' ports, loopback listeners, and
    a pid file, logs and temp files under ``prefix``."""
    with open(os.path.join(DEPLOY, "nginx.conf")) as f:
        text = f.read()
    a, b = ingresses
    replacements = [
        ("server ingress-a:8000 ", "server %s " % a.address),
        ("server ingress-b:8000 ", "server %s " % b.address),
        # The ingresses run without REST (--http-port 0): closed ports.
        ("server ingress-a:8080 ", "server 127.0.0.1:%d " % harness.free_port()),
        ("server ingress-b:8080 ", "server 127.0.0.1:%d " % harness.free_port()),
        ("listen 8000 http2;", "listen 127.0.0.1:%d http2;" % grpc_port),
        ("listen 8080;", "listen 127.0.0.1:%d;" % http_port),
        ("\nhttp {", "\npid %(p)s/nginx.pid;\nerror_log %(p)s/error.log info;\nhttp {\n"
                   "    client_body_temp_path %(p)s/body; proxy_temp_path %(p)s/proxy;\n"
                   "    fastcgi_temp_path %(p)s/fastcgi; uwsgi_temp_path %(p)s/uwsgi;\n"
                   "    scgi_temp_path %(p)s/scgi;" % {"p": prefix}),
    ]
    for old, new in replacements:
        if text.count(old) != 1:
            raise AssertionError("deploy/nginx.conf changed shape: %r found %d times" % (old, text.count(old)))
        text = text.replace(old, new)
    return "daemon off;\n" + text


class NginxTests(unittest.TestCase):
    """deploy/nginx.conf in front of two real ingresses sharing one worker."""

    timeout = 120

    def test_calls_through_nginx_reach_both_ingresses_and_survive_one(self):
        """Calls through nginx reach the worker via both ingresses (each one's
        statistics count some); after one ingress is killed, every call
        through nginx still succeeds."""
        nginx = find_nginx()
        if nginx is None:
            raise unittest.SkipTest("nginx is not installed (Debian: apt-get install nginx)")
        import tritonclient.grpc as grpcclient

        ingresses = [harness.Ingress(args=("--startup-window", "0")) for _ in range(2)]
        for ingress in ingresses:
            self.addCleanup(ingress.cleanup)
        prefix = tempfile.mkdtemp(prefix="as-nginx-", dir="/tmp")
        self.addCleanup(shutil.rmtree, prefix, True)
        worker = harness.Worker(harness.KSERVE_SERVER, ",".join(i.mgmt_address for i in ingresses),
                                os.path.join(prefix, "worker.sock"))
        self.addCleanup(worker.stop, signal.SIGKILL)
        for ingress in ingresses:
            ingress.wait_ready("add")

        port, http_port = harness.free_port(), harness.free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(local_nginx_conf(ingresses, port, http_port, prefix))
        check = subprocess.run([nginx, "-t", "-p", prefix, "-c", conf], capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)
        process = subprocess.Popen([nginx, "-p", prefix, "-c", conf], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop_nginx():
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT)  # graceful; its workers follow
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.addCleanup(stop_nginx)
        harness.wait_for(lambda: port_open(port), 10, what="nginx listening")
        client = grpcclient.InferenceServerClient("127.0.0.1:%d" % port)
        self.addCleanup(client.close)

        a = np.arange(4, dtype=np.int32)

        def call():
            result = client.infer("add", harness.infer_inputs(a=a, b=a * 10), client_timeout=10)
            self.assertEqual(result.as_numpy("sum").tolist(), (a * 11).tolist())
            return result.get_response().parameters["anyserve_worker"].string_param

        served_by = {call() for _ in range(10)}
        self.assertEqual(len(served_by), 1)  # the one worker
        counts = [int(i.client().get_inference_statistics("add").model_stats[0].inference_stats.success.count)
                  for i in ingresses]
        self.assertEqual(sum(counts), 10)
        self.assertTrue(all(counts), "nginx used one ingress only: %s" % counts)

        ingresses[0].process.send_signal(signal.SIGKILL)
        ingresses[0].process.wait(10)
        self.assertEqual({call() for _ in range(10)}, served_by)
        self.assertEqual(
            int(ingresses[1].client().get_inference_statistics("add").model_stats[0]
                .inference_stats.success.count), counts[1] + 10)
