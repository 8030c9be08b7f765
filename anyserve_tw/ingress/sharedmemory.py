"""The system shared-memory regions clients registered (Triton's extension).

A client creates a POSIX shared-memory object, registers a window of it
under a name, and then names that region in a request instead of sending a
tensor's bytes.  The ingress only keeps the list: it checks that the object
exists and is large enough, and hands the table to its workers (SHM_TABLE
frames, through ``on_change``), which map the objects and read and write the
tensors.  It opens an object only to ``fstat`` it, and maps nothing.

Behaviour follows Triton's server: registering a name twice is
ALREADY_EXISTS, unregistering an unknown name succeeds, an unknown name's
status is NOT_FOUND, and registering an object that cannot be opened is
INTERNAL "Unable to open shared memory region".
"""
import os
import stat

import grpc

from anyserve_tw.wire.errors import InferenceError, brief, invalid_argument
from anyserve_tw.wire.payloads import Region

#: Where Linux keeps POSIX shared-memory objects.
SHM_DIRECTORY = "/dev/shm"

#: Most regions registered at once: each is a line in every SHM_TABLE frame
#: and a mapping in every worker.
MAX_REGIONS = 1024

#: Longest region name and key: a POSIX shm name is a file name (255 bytes).
MAX_NAME_LENGTH = 256


def _check_text(what, value):
    if not value:
        raise invalid_argument("shared memory region %s must not be empty" % what)
    if len(value) > MAX_NAME_LENGTH:
        raise invalid_argument("shared memory region %s of %d characters is longer than %d"
                               % (what, len(value), MAX_NAME_LENGTH))


def object_size(name, key, directory=SHM_DIRECTORY):
    """The size of the shared-memory object ``key`` (``shm_open``'s name:
    leading slashes ignored, no other slash); INVALID_ARGUMENT for a key
    that names no object of its own, INTERNAL as Triton if it can't be opened."""
    base = key.lstrip("/")
    if not base or "/" in base or "\0" in base or base in (".", ".."):
        raise invalid_argument("cannot register shared memory region '%s' - invalid shm key '%s'"
                               % (name, key))
    try:
        # As shm_open: a symlink in /dev/shm must not lead a worker elsewhere.
        # O_NONBLOCK: a FIFO planted under the key must not block the reactor
        # in open(); anything but a regular file is refused below.
        fd = os.open(os.path.join(directory, base),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise InferenceError(grpc.StatusCode.INTERNAL,
                             "Unable to open shared memory region: '%s': %s" % (key, e.strerror)) from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise invalid_argument("cannot register shared memory region '%s' - '%s' is not a shared "
                               "memory object" % (name, key))
    return info.st_size


class SharedMemoryRegistry:
    """Region name -> :class:`~anyserve_tw.wire.payloads.Region`.

    ``on_change(table)`` is called with :meth:`table` after every change, so
    workers learn of a region before any request can name it.
    """

    def __init__(self, on_change=None, directory=SHM_DIRECTORY, max_regions=MAX_REGIONS):
        self.on_change = on_change
        self.directory = directory
        self.max_regions = max_regions
        self._regions = {}

    def register(self, name, key, offset, byte_size):
        """Register ``byte_size`` bytes at ``offset`` of the object ``key`` as ``name``."""
        _check_text("name", name)
        _check_text("key", key)
        if name in self._regions:
            raise InferenceError(grpc.StatusCode.ALREADY_EXISTS,
                                 "shared memory region '%s' already in manager" % name)
        if len(self._regions) >= self.max_regions:
            raise InferenceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 "cannot register shared memory region '%s': %d regions are "
                                 "registered already, the most this server keeps"
                                 % (name, len(self._regions)))
        offset, byte_size = int(offset), int(byte_size)
        if offset < 0 or byte_size < 0:
            raise invalid_argument("failed to register shared memory region '%s': negative offset "
                                   "or byte size" % name)
        size = object_size(name, key, self.directory)
        if offset + byte_size > size:
            raise invalid_argument(
                "failed to register shared memory region '%s': invalid args: offset %d + byte "
                "size %d is past the end of '%s' (%d bytes)" % (name, offset, byte_size, key, size))
        self._regions[name] = Region(key, offset, byte_size)
        self._changed()

    def unregister(self, name=""):
        """Forget region ``name``, or every region for ``""``; an unknown
        name is no error (Triton's answer too)."""
        if not name:
            if not self._regions:
                return
            self._regions.clear()
        elif self._regions.pop(name, None) is None:
            return
        self._changed()

    def status(self, name=""):
        """``{name: Region}`` of one region, or of all for ``""``."""
        if not name:
            return dict(self._regions)
        try:
            return {name: self._regions[name]}
        except KeyError:
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 "Unable to find system shared memory region: '%s'" % brief(name)) from None

    def table(self):
        """``{name: Region}`` of every region: what workers are told."""
        return dict(self._regions)

    def _changed(self):
        if self.on_change is not None:
            self.on_change(self.table())
