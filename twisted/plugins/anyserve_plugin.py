"""twistd plugin: ``twistd -n anyserve --port 8000 --mgmt 9000``.

Deliberately tiny: ``twistd --help`` imports this module, and nothing heavy
(grpc, numpy) is imported until the anyserve subcommand is actually used.
"""
from twisted.application.service import ServiceMaker

anyserve = ServiceMaker(
    "AnyServe ingress",
    "anyserve_tw.ingress.tap",
    "KServe v2 gRPC ingress routing to Python model workers.",
    "anyserve",
)
