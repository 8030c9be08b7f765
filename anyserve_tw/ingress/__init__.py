"""The ingress process: ``twistd anyserve`` serves the gRPC APIs, keeps the
model registry and forwards ModelInfer to workers without decoding tensors.
Nothing here imports the worker SDK or numpy."""
