"""Calls every example model through the ingress with tritonclient.

    python examples/client.py [--url 127.0.0.1:8000]
"""
import argparse

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name, array):
    array = np.asarray(array)
    from tritonclient.utils import np_to_triton_dtype

    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000")
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    print("server live:", client.is_server_live(), "ready:", client.is_server_ready())

    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 100, dtype=np.int32)
    if client.is_model_ready("add"):
        result = client.infer("add", [tensor("a", a), tensor("b", b)])
        print("add:", result.as_numpy("sum"))
    if client.is_model_ready("echo"):
        result = client.infer("echo", [tensor("text", np.array([b"hello", b"world"], dtype=object))])
        print("echo:", result.as_numpy("text"))
    x = np.array([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.3, 0.9]], dtype=np.float32)
    for version in ("v1", "v2", ""):
        if client.is_model_ready("cls", version):
            result = client.infer("cls", [tensor("x", x)], model_version=version)
            print("cls %s -> version %s:" % (version or "(default)", result.get_response().model_version),
                  result.as_numpy("label"))
    try:
        client.infer("no-such-model", [tensor("a", a)])
    except grpcclient.InferenceServerException as e:
        print("no-such-model:", e.status(), e.message())


if __name__ == "__main__":
    main()
