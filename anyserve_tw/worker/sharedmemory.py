"""The system shared-memory regions clients registered, as this worker sees them.

Clients register POSIX shared-memory objects with the ingress (Triton's
system shared-memory extension), which sends every worker connection the
whole table (SHM_TABLE frames, :func:`anyserve_tw.wire.payloads.decode_shm_table`).
A request then names a region instead of carrying a tensor's bytes: the
worker reads inputs from, and writes outputs into, its own mapping of the
object.

Each object is mapped once, whole, by key (``mmap`` offsets must be page
aligned; regions' offsets need not be), and the mapping is shared by every
region that names it.  A mapping is never closed under a live view: arrays a
handler holds view the client's memory directly, so when a region is
unregistered, or its key is replaced by a new object of the same name, the
table only drops its reference; Python unmaps the old object once the last
view of it is released (``mmap.close()`` would refuse while views exist, and
a handler thread may be resolving a window of it at that very moment).  A
request that resolved its regions keeps them valid until it is done, as
Triton keeps a region unregistered mid-request mapped.

What stays the client's business, as with Triton: shrinking an object that
is mapped (reading past its new end kills the process with SIGBUS), and
changing an input's bytes while the request runs.

SHM_TABLE frames come on each of the ingress's connections to this worker,
and frames on different connections are not ordered with respect to each
other.  ``update(payload, source=connection)`` keeps one table per
connection, and :meth:`SharedMemoryTable.view` reads through the table of
the connection a request came on, which always saw the regions its request
names first.  Without ``source`` the last table received wins.
"""
import mmap
import os
import stat
import threading

import grpc

from anyserve_tw.wire import payloads
from anyserve_tw.wire.errors import InferenceError, brief, invalid_argument

#: Where Linux keeps POSIX shared-memory objects (``shm_open`` names).
SHM_DIRECTORY = "/dev/shm"


def shm_path(key):
    """The file behind a POSIX shared-memory name: ``shm_open`` ignores
    leading slashes; any other slash, or ``..``, would leave the directory."""
    name = key.lstrip("/")
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise invalid_argument("invalid shared memory key '%s'" % key)
    return os.path.join(SHM_DIRECTORY, name)


def not_found(name):
    """Triton's error for a request naming a region no one registered."""
    return InferenceError(grpc.StatusCode.NOT_FOUND,
                          "Unable to find shared memory region: '%s'" % brief(name))


class _Mapping:
    """One object mapped whole, and which object it was (device, inode)."""

    __slots__ = ("key", "map", "size", "identity", "writable")

    def __init__(self, key):
        self.key = key
        path = shm_path(key)
        # As shm_open: no symlink out of /dev/shm; O_NONBLOCK so a FIFO put
        # under the key cannot block the worker in open() (it is refused below).
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        self.writable = True
        try:
            try:
                fd = os.open(path, os.O_RDWR | flags)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | flags)
                self.writable = False
        except OSError as e:
            raise InferenceError(
                grpc.StatusCode.INTERNAL,
                "Unable to open shared memory region: '%s': %s" % (key, e.strerror)) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise invalid_argument("shared memory key '%s' is not a shared memory object" % key)
            self.size = info.st_size
            self.identity = (info.st_dev, info.st_ino)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, prot) if self.size else None
        finally:
            os.close(fd)



def _identity(key):
    try:
        info = os.stat(shm_path(key), follow_symlinks=False)
    except (OSError, InferenceError):
        return None
    return info.st_dev, info.st_ino


class SharedMemoryTable:
    """Registered regions by name, and this worker's mappings of them.

    ``update`` runs on the reactor thread; ``read``/``window``/``write`` may
    run in handler threads at the same time.
    """

    def __init__(self):
        self._tables = {}  # source -> {name: Region}, each replaced whole
        self._last = {}  # the last table updated, for reads without a source
        self._maps = {}  # key -> _Mapping
        self._lock = threading.Lock()

    # -- the table -------------------------------------------------------------

    def update(self, payload, source=None):
        """Replace ``source``'s table with an SHM_TABLE payload (``b""``:
        empty), dropping the mappings no table names any more, or whose key
        now names another object."""
        regions = payloads.decode_shm_table(payload) if len(payload) else {}
        self._tables[source] = regions
        self._last = regions
        self._prune(recheck={region.key for region in regions.values()})

    def forget(self, source):
        """Drop a source's table (its connection closed)."""
        if self._tables.pop(source, None) is not None:
            self._prune()

    def regions(self, source=None):
        """``{name: Region}`` as ``source`` last told it."""
        return dict(self._table(source))

    def view(self, source):
        """The regions as one connection knows them, with the same
        ``read``/``window``/``write`` as the table."""
        return _View(self, source)

    def _table(self, source):
        return self._last if source is None else self._tables.get(source, {})

    def _prune(self, recheck=()):
        with self._lock:
            in_use = {r.key for table in self._tables.values() for r in table.values()}
            stale = [m for key, m in self._maps.items() if key not in in_use]
            for key in recheck:
                mapping = self._maps.get(key)
                if mapping is not None:
                    now = _identity(key)
                    # Unlinked but still registered: the old object is still
                    # the client's region.  Replaced: map the new one next time.
                    if now is not None and now != mapping.identity:
                        stale.append(mapping)
            for mapping in stale:
                # Not closed: a request in a thread may be using it.  The
                # object is unmapped when the last reference to it goes.
                self._maps.pop(mapping.key, None)

    # -- tensors ---------------------------------------------------------------

    def _resolve(self, region, offset, byte_size, source):
        """(mapping, start) of a window of a region, validated as Triton does."""
        found = self._table(source).get(region)
        if found is None:
            raise not_found(region)
        if offset < 0 or byte_size < 0:
            raise invalid_argument(
                "Invalid offset or byte size for shared memory region: '%s' (offset %d, byte size %d)"
                % (region, offset, byte_size))
        if offset >= found.byte_size:
            raise invalid_argument(
                "Invalid offset for shared memory region: '%s' (offset %d, region of %d bytes)"
                % (region, offset, found.byte_size))
        if offset + byte_size > found.byte_size:
            raise invalid_argument(
                "Invalid offset + byte size for shared memory region: '%s' "
                "(offset %d + byte size %d > region of %d bytes)"
                % (region, offset, byte_size, found.byte_size))
        mapping = self._mapping(found.key)
        start = found.offset + offset
        if start + byte_size > mapping.size:
            raise invalid_argument(
                "shared memory region '%s' needs bytes %d-%d of '%s', which is now %d bytes"
                % (region, start, start + byte_size, found.key, mapping.size))
        return mapping, start

    def _mapping(self, key):
        mapping = self._maps.get(key)
        if mapping is None:
            with self._lock:
                mapping = self._maps.get(key)
                if mapping is None:
                    mapping = _Mapping(key)
                    if any(r.key == key for table in self._tables.values() for r in table.values()):
                        self._maps[key] = mapping
                    # else: the table moved on meanwhile; this one request's
                    # views keep the mapping until they are released.
        return mapping

    def read(self, region, offset, byte_size, source=None):
        """A read-only memoryview of ``byte_size`` bytes at ``offset`` in
        ``region``; INVALID_ARGUMENT / NOT_FOUND as Triton answers."""
        mapping, start = self._resolve(region, offset, byte_size, source)
        if not byte_size:
            return memoryview(b"")
        return memoryview(mapping.map)[start:start + byte_size].toreadonly()

    def window(self, region, offset, byte_size, source=None):
        """A writable memoryview of a window of ``region``, for an output."""
        mapping, start = self._resolve(region, offset, byte_size, source)
        if not mapping.writable:
            raise invalid_argument(
                "shared memory region '%s' ('%s') is read-only to the worker" % (region, mapping.key))
        if not byte_size:
            return memoryview(bytearray())
        return memoryview(mapping.map)[start:start + byte_size]

    def write(self, region, offset, byte_size, parts, source=None):
        """Copy bytes-like ``parts`` one after another into a window of
        ``region``; INVALID_ARGUMENT if they exceed ``byte_size``.  Returns
        how many bytes were written."""
        return write_parts(self.window(region, offset, byte_size, source), parts)


class _View:
    """A SharedMemoryTable seen through one source's table."""

    __slots__ = ("table", "source")

    def __init__(self, table, source):
        self.table = table
        self.source = source

    def read(self, region, offset, byte_size):
        return self.table.read(region, offset, byte_size, self.source)

    def window(self, region, offset, byte_size):
        return self.table.window(region, offset, byte_size, self.source)

    def write(self, region, offset, byte_size, parts):
        return self.table.write(region, offset, byte_size, parts, self.source)


def write_parts(window, parts):
    """Copy ``parts`` into the writable memoryview ``window``, in order."""
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(len(v) for v in views)
    if total > len(window):
        raise invalid_argument(
            "%d bytes do not fit the %d-byte shared memory window" % (total, len(window)))
    position = 0
    for v in views:
        window[position:position + len(v)] = v
        position += len(v)
    return total
