"""What travels between ``ultrasam serve`` and its clients: volumes, prompts and masks.

numpy and the standard library only, so the Slicer-side client imports it without torch. Nothing
is pickled: a volume is a small JSON header and its raw voxels, zlib-compressed; a mask result
lists the changed slices along the session's axis, bit-packed and zlib-compressed.

Volume body (POST /sessions)::

    b"USV1" | uint32 little-endian header length | header JSON (UTF-8) | zlib(voxels, C order)

Header: ``shape`` [K, J, I], ``dtype`` (one of :data:`VOXEL_DTYPES`), ``origin_lps``, ``spacing``
(i, j, k), ``direction_lps`` (3x3, columns i, j, k), ``name``.

A chunked upload (``POST /uploads`` with that header as JSON, then ``POST /uploads/{id}`` per chunk)
sends the voxels in C order as chunk bodies of the same layout, whose header is ``offset`` (the
first voxel's flat index), ``count`` (voxels) and ``dtype``.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Sequence

import numpy as np

PROTOCOL = 2  # bumped when a request or answer changes shape; client and server must agree
MAGIC = b"USV1"
VOXEL_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
_PROBE_BYTES = 1 << 20  # the first MiB decides whether the rest is worth compressing


class WireError(ValueError):
    """A body that cannot be decoded; the message says what was wrong."""


def volume_header(voxels: np.ndarray, origin_lps, spacing, direction_lps, name: str = "") -> dict:
    """The JSON header of (K, J, I) ``voxels`` and their geometry; WireError if they cannot travel."""
    if voxels.ndim != 3 or voxels.dtype.name not in VOXEL_DTYPES:
        raise WireError(f"a volume is (K, J, I) of {', '.join(VOXEL_DTYPES)}; got {voxels.shape} {voxels.dtype}")
    return {"shape": list(voxels.shape), "dtype": voxels.dtype.name, "name": name,
            "origin_lps": np.asarray(origin_lps, float).tolist(), "spacing": np.asarray(spacing, float).tolist(),
            "direction_lps": np.asarray(direction_lps, float).tolist()}


def encode_volume(voxels: np.ndarray, origin_lps, spacing, direction_lps, name: str = "", level: int = 1) -> bytes:
    """(K, J, I) voxels and their geometry -> a volume body (the whole volume in one request)."""
    voxels = np.ascontiguousarray(voxels)
    return _encode(volume_header(voxels, origin_lps, spacing, direction_lps, name), voxels.reshape(-1), level)


def encode_chunk(flat_voxels: np.ndarray, offset: int, count: int, level: int = 1) -> bytes:
    """Voxels ``offset`` to ``offset + count`` of a volume's C-order ``flat_voxels`` -> a chunk body."""
    part = flat_voxels[offset:offset + count]
    return _encode({"offset": int(offset), "count": int(part.size), "dtype": part.dtype.name}, part, level)


def _encode(header: dict, flat: np.ndarray, level: int) -> bytes:
    """``level`` 1: zlib's fastest; voxels whose first MiB does not compress (noise, most float
    data) are stored (level 0), 10x faster. That first MiB is compressed once: when it compresses,
    its output (flushed to a byte boundary) starts the stream that goes on with the rest."""
    raw = np.ascontiguousarray(flat).view(np.uint8)
    data = json.dumps(header).encode()
    start = MAGIC + struct.pack("<I", len(data)) + data
    stream = zlib.compressobj(level)
    head = stream.compress(raw[:_PROBE_BYTES].data) + stream.flush(zlib.Z_SYNC_FLUSH)
    if level and len(head) > 0.9 * min(raw.size, _PROBE_BYTES):
        return start + zlib.compress(raw.data, 0)
    return start + head + stream.compress(raw[_PROBE_BYTES:].data) + stream.flush()


def decode_volume(body: bytes, max_voxel_bytes: int) -> tuple[dict, np.ndarray]:
    """A volume body -> (header, (K, J, I) voxels); never inflates beyond ``max_voxel_bytes``."""
    header, data = _split(body)
    shape, dtype, size = check_volume_header(header, max_voxel_bytes)
    return header, _inflate(data, size, dtype).reshape(shape)


def check_volume_header(header: dict, max_voxel_bytes: int) -> tuple[tuple, np.dtype, int]:
    """A volume header -> (shape, dtype, bytes); WireError saying what is wrong or too large."""
    try:
        shape = tuple(int(n) for n in header["shape"])
        dtype = np.dtype(header["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"volume header is not valid JSON with 'shape' and 'dtype' ({error})") from None
    if dtype.name not in VOXEL_DTYPES or len(shape) != 3 or min(shape) < 1:
        raise WireError(f"volume must be (K, J, I) of {', '.join(VOXEL_DTYPES)}; got {list(shape)} {dtype.name}")
    size = int(np.prod(shape)) * dtype.itemsize
    if size > max_voxel_bytes:
        raise WireError(f"volume of {size / 2**20:.0f} MiB exceeds the server's limit of "
                        f"{max_voxel_bytes / 2**20:.0f} MiB: crop it, or start the server with a larger "
                        "--max-upload-mib")
    return shape, dtype, size


def decode_chunk(body: bytes, dtype: np.dtype, max_voxel_bytes: int) -> tuple[int, np.ndarray]:
    """A chunk body of a ``dtype`` volume -> (offset, flat voxels); never inflates beyond the limit."""
    header, data = _split(body)
    try:
        offset, count = int(header["offset"]), int(header["count"])
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"chunk header is not valid JSON with 'offset' and 'count' ({error})") from None
    if header.get("dtype") != dtype.name or offset < 0 or count < 1:
        raise WireError(f"a chunk holds 1 or more {dtype.name} voxels (the upload's type) from an offset >= 0; "
                        f"got {count} {header.get('dtype')} voxels from {offset}")
    if count * dtype.itemsize > max_voxel_bytes:
        raise WireError(f"chunk of {count * dtype.itemsize} bytes exceeds the server's limit of {max_voxel_bytes} "
                        "bytes per chunk: send smaller chunks")
    return offset, _inflate(data, count * dtype.itemsize, dtype)


def _split(body: bytes) -> tuple[dict, bytes]:
    """A body -> (its JSON header, its zlib data)."""
    if body[:4] != MAGIC or len(body) < 8:
        raise WireError("not a volume body: expected b'USV1', a header length, a JSON header and zlib voxels")
    (length,) = struct.unpack("<I", body[4:8])
    try:
        header = json.loads(body[8:8 + length])
    except ValueError as error:
        raise WireError(f"volume header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise WireError("volume header is not valid JSON: expected an object")
    return header, body[8 + length:]


def _inflate(data: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """zlib ``data`` -> exactly ``size`` bytes as flat ``dtype`` voxels; a zip bomb stops at size + 1."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, size + 1)
    except zlib.error as error:
        raise WireError(f"volume voxels are not zlib data ({error})") from None
    if len(raw) != size or not inflater.eof:
        raise WireError(f"volume voxels hold {len(raw)} bytes (or more); the header needs {size}")
    return np.frombuffer(raw, dtype)


def encode_slices(mask: np.ndarray, axis: int, indices: Sequence[int]) -> dict:
    """Slices ``indices`` of a (K, J, I) 0/1 mask along numpy ``axis``, for a JSON answer."""
    indices = [int(i) for i in indices]
    picked = np.take(mask, indices, axis=axis) != 0
    packed = zlib.compress(np.packbits(np.moveaxis(picked, axis, 0)).tobytes(), 6)
    return {"axis": axis, "shape": list(mask.shape), "indices": indices, "data": base64.b64encode(packed).decode()}


def apply_slices(mask: np.ndarray, payload: dict) -> np.ndarray:
    """Write an :func:`encode_slices` payload into ``mask`` (K, J, I) uint8, in place; returns it."""
    axis, indices = int(payload["axis"]), [int(i) for i in payload["indices"]]
    if list(mask.shape) != list(payload["shape"]):
        raise WireError(f"mask payload is for shape {payload['shape']}, not {list(mask.shape)}")
    moved = np.moveaxis(mask, axis, 0)
    count = len(indices) * int(np.prod(moved.shape[1:]))
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(payload["data"])), np.uint8), count=count)
    moved[indices] = bits.reshape((len(indices),) + moved.shape[1:])
    return mask


def prompts_to_json(points, labels, frame: str = "ras", boxes: Sequence = (), rois: Sequence = ()) -> dict:
    """Prompts as the server reads them (:class:`ultrasam.prompts3d.VolumePrompts` fields).

    Args:
        points: (N, 3) positions in ``frame``; labels: (N,) 1 positive, 0 negative.
        boxes: (corner_a, corner_b) pairs, two opposite corners of a box on one slice.
        rois: (center, axes, half_sizes): axes (3, 3) with one ROI axis per column.
    """
    return {"frame": frame, "points": np.asarray(points, float).reshape(-1, 3).tolist(),
            "labels": np.asarray(labels, int).reshape(-1).tolist(),
            "boxes": [[np.asarray(a, float).tolist(), np.asarray(b, float).tolist()] for a, b in boxes],
            "rois": [{"center": np.asarray(c, float).tolist(), "axes": np.asarray(x, float).tolist(),
                      "half_sizes": np.asarray(h, float).tolist()} for c, x, h in rois]}
