"""Message classes for the inference and management protocols.

The build compiles ``proto/`` into one FileDescriptorSet; here it is loaded into
a *private* descriptor pool.  tritonclient registers its own, different
``inference.*`` definitions in protobuf's default pool, and the default pool
refuses a second definition of the same symbol ("duplicate symbol").  A private
pool lets a worker import tritonclient (to call other models) next to us; only
serialized bytes ever cross between the two sets of classes.
"""
import os
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_DESCRIPTOR_SET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_generated", "anyserve.desc")


def _load_pool(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImportError(
            "%s is missing: it is built from proto/ by setup.py; "
            "install the package (pip install -e .)" % (path,)
        ) from None
    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    for file_proto in files.file:
        pool.Add(file_proto)
    return pool


POOL = _load_pool(_DESCRIPTOR_SET)


def _namespace(package, names):
    return SimpleNamespace(
        **{
            name: message_factory.GetMessageClass(
                POOL.FindMessageTypeByName(package + "." + name)
            )
            for name in names
        }
    )


def service_descriptor(full_name):
    """The ServiceDescriptor for ``full_name``, e.g. ``inference.GRPCInferenceService``."""
    return POOL.FindServiceByName(full_name)


def _message_names(file_name):
    return list(POOL.FindFileByName(file_name).message_types_by_name)


#: KServe v2 messages (package ``inference``).
inference = _namespace("inference", _message_names("anyserve/inference.proto"))
#: Worker management messages (package ``anyserve.management``).
management = _namespace(
    "anyserve.management", _message_names("anyserve/management.proto")
)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
MANAGEMENT_SERVICE = "anyserve.management.WorkerManagement"
