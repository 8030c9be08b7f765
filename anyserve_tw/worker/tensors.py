"""KServe v2 datatypes and their numpy forms.

Only workers decode tensors; the ingress uses :data:`DATATYPES` to check the
specs workers register.  Raw contents are little-endian, row-major; BYTES
elements are each prefixed by their length as a 4-byte little-endian integer,
as Triton and tritonclient do.
"""
import struct

import numpy as np

from anyserve_tw.wire.errors import brief, invalid_argument

#: v2 datatype -> numpy dtype (little-endian).
DATATYPES = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

#: v2 datatype -> the InferTensorContents field holding it when sent typed.
#: FP16 has no field of its own in the protocol; it is accepted in fp32_contents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


_BY_KIND = {
    (dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items() if name != "BYTES"
}


def datatype_of(array):
    """The v2 datatype of a numpy array (object/str/bytes arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_KIND[array.dtype.kind, array.dtype.itemsize]
    except KeyError:
        raise invalid_argument("no KServe v2 datatype for numpy dtype %s" % array.dtype) from None


#: Most dimensions a tensor may have: numpy 1.x's limit (2.x allows 64).
MAX_DIMS = 32

#: Most elements the non-zero dimensions of a shape may multiply to.  An
#: empty tensor's shape can name any sizes beside its zero, and numpy refuses
#: (ValueError) shapes whose extent times the element size passes 2**63
#: bytes, even empty ones; 2**56 elements of at most 8 bytes stay well clear.
MAX_EXTENT = 2 ** 56


def shape_text(shape, limit=8):
    """``[1, 2, 3]``, or its first ``limit`` dimensions and how many there
    are: a shape comes from the client, and status messages quote it."""
    if len(shape) <= limit:
        return str([int(d) for d in shape])
    return "[%s, ... (%d dimensions)]" % (", ".join(str(int(d)) for d in shape[:limit]), len(shape))


def element_count(shape):
    """How many elements ``shape`` holds, computed with Python ints;
    INVALID_ARGUMENT for a shape numpy could not make (negative or too many
    dimensions, or an extent past :data:`MAX_EXTENT`)."""
    if len(shape) > MAX_DIMS:
        raise invalid_argument("shape %s has %d dimensions, more than %d"
                               % (shape_text(shape), len(shape), MAX_DIMS))
    count = 1
    for dim in shape:
        if dim < 0:
            raise invalid_argument("negative dimension in shape %s" % (shape_text(shape),))
        count *= dim
    if count > MAX_EXTENT or (not count and _extent(shape) > MAX_EXTENT):
        raise invalid_argument("shape %s is too large: its non-zero dimensions multiply to "
                               "more than 2**56 elements" % (shape_text(shape),))
    return count


def _extent(shape):
    extent = 1
    for dim in shape:
        if dim:
            extent *= dim
    return extent


def decode_bytes(buffer, count=None):
    """Split length-prefixed BYTES elements into a list of bytes objects."""
    view = memoryview(buffer)
    items = []
    pos = 0
    size = len(view)
    while pos < size:
        if pos + 4 > size:
            raise invalid_argument("BYTES tensor: truncated length prefix")
        (length,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + length > size:
            raise invalid_argument("BYTES tensor: element runs past the end")
        items.append(bytes(view[pos:pos + length]))
        pos += length
    if count is not None and len(items) != count:
        raise invalid_argument(
            "BYTES tensor holds %d elements, its shape needs %d" % (len(items), count)
        )
    return items


def encode_bytes(items):
    """Length-prefix each element (bytes, or str encoded as UTF-8)."""
    parts = []
    for item in items:
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def from_raw(datatype, shape, raw):
    """A numpy array viewing raw little-endian contents (no copy for numbers)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _object_array(decode_bytes(raw, count), shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise invalid_argument(
            "raw content is %d bytes, expected %d for %s %s"
            % (len(raw), count * dtype.itemsize, datatype, shape_text(shape))
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(datatype, shape, contents):
    """A numpy array built from typed InferTensorContents."""
    values = getattr(contents, CONTENTS_FIELD[datatype])
    count = element_count(shape)
    if len(values) != count:
        raise invalid_argument(
            "%s holds %d elements, expected %d for shape %s"
            % (CONTENTS_FIELD[datatype], len(values), count, shape_text(shape))
        )
    if datatype == "BYTES":
        return _object_array(list(values), shape)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values:
        # int_contents / uint_contents are 32-bit: narrower types must fit.
        limits = np.iinfo(dtype)
        if min(values) < limits.min or max(values) > limits.max:
            raise invalid_argument("%s value out of range for %s" % (CONTENTS_FIELD[datatype], datatype))
    return np.array(values, dtype=dtype).reshape(shape)


def _object_array(items, shape):
    """An object array of ``items`` (already checked against ``shape``)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


class LossyCast(ValueError):
    """A handler's output that its declared datatype cannot hold as it is."""


def as_datatype(value, datatype):
    """``value`` (an array, a number, nested lists) as an array of the v2
    ``datatype``, refusing casts that would change a value.

    Integer and BOOL outputs take only values they hold exactly: no
    overflow, no fractional part, no NaN or infinity, only 0 and 1 for BOOL.
    Float outputs take any real number, rounded to their precision as
    floats are (a float64 result for an FP32 output is the common case),
    but not one past their range (it would become infinity).  BYTES outputs
    take anything (elements not str or bytes are sent as their ``str``).
    Strings, objects and complex numbers are not numbers to cast.
    Raises :class:`LossyCast` saying what the values were and why
    ("float64 values it can't hold: 200.0 is out of range").
    """
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        return np.asarray(value, dtype=object)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise LossyCast("a value numpy cannot make an array of (%s)" % (brief(e),)) from None
    source = array.dtype
    if source == dtype:
        return array
    if source.kind not in "biuf":
        raise LossyCast(_NOT_NUMBERS.get(source.kind)
                        or "%s values, which have no v2 datatype" % (source.name,))
    if array.size == 0 or np.can_cast(source, dtype, "safe"):
        # Exact (bool into anything, integers into wider ones), or int64 into
        # FP64, which numpy counts as safe and rounds past 2**53 as floats do.
        return array.astype(dtype)
    problem = _cast_problem(array, dtype)
    if problem is not None:
        raise LossyCast("%s values it can't hold: %s" % (source.name, problem))
    with np.errstate(all="ignore"):
        return array.astype(dtype)


_NOT_NUMBERS = {
    "U": "str values, which are not numbers",
    "S": "bytes values, which are not numbers",
    "O": "object values (None, mixed types or ints past 64 bits?), which are not numbers",
}


def _cast_problem(array, dtype):
    """Why ``array`` can't become ``dtype`` exactly ("200.0 is out of
    range"...), or None if it can (by the rules of :func:`as_datatype`)."""
    kind = array.dtype.kind
    if dtype.kind == "f":
        with np.errstate(all="ignore"):
            overflow = np.isinf(array.astype(dtype))
        if kind == "f":
            overflow &= np.isfinite(array)
        if overflow.any():
            return "%s is out of range" % (array[overflow][0],)
        return None
    if kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            return "%s" % (array[~finite][0],)
        fractional = np.trunc(array) != array
        if fractional.any():
            return "%s has a fractional part" % (array[fractional][0],)
    if dtype.kind == "b":
        other = (array != 0) & (array != 1)
        if other.any():
            return "%s is neither 0 nor 1" % (array[other][0],)
        return None
    limits = np.iinfo(dtype)
    # Python's comparisons of int and float are exact, numpy's are not.
    low, high = array.min().item(), array.max().item()
    if low < limits.min:
        return "%s is out of range" % (low,)
    if high > limits.max:
        return "%s is out of range" % (high,)
    return None


def to_buffer(datatype, array):
    """Raw little-endian contents of ``array`` as ``datatype``: a bytes-like
    view of the array's memory where possible (no copy), else bytes."""
    if datatype == "BYTES":
        return encode_bytes(array.reshape(-1).tolist())
    array = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
    return memoryview(array.reshape(-1)).cast("B")
