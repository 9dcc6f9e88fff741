"""ROS-free numpy equivalents of ``cv_bridge`` for ``sensor_msgs/Image``, ``CompressedImage``
and ``CameraInfo`` (the ROS layer passes the message fields in; this module never imports rclpy).

Outputs follow the package conventions (see :mod:`wildseg3d_ros.core.types`):

* colour encodings (``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8``; aliases ``8UC1`` = mono8,
  ``8UC3`` = bgr8, ``8UC4`` = bgra8 as cv_bridge assumes) decode to ``H x W x 3`` uint8 **RGB**;
  alpha is dropped, mono is replicated to three channels;
* depth encodings decode to ``H x W`` float32 **metres**: ``16UC1`` is millimetres (0 = invalid);
  ``mono16`` is accepted as an alias of ``16UC1`` because several RGB-D drivers publish depth in
  millimetres under that name (a genuine 16-bit grey *colour* image is therefore not supported);
  ``32FC1`` is metres as is (NaN/inf/negative kept by :func:`decode_image`, zeroed by
  :func:`decode_depth`).

Decoding builds a zero-copy strided view onto the message buffer (``np.ndarray(buffer=...,
strides=(step, ...))``, so row padding ``step > width * bpp`` costs nothing) and then makes a
single contiguous copy that also performs the channel swap / byte swap / unit conversion.

Every problem with the input raises :class:`ImageDecodeError` (a ``ValueError``) with a message
that says what was wrong; no other exception type escapes the public decoders, whatever bytes
or header values they are given (property-tested in ``test/test_image_codec.py``).
"""
from __future__ import annotations

import operator
import struct
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "ImageDecodeError",
    "COLOR_ENCODINGS",
    "DEPTH_ENCODINGS",
    "decode_image",
    "decode_depth",
    "decode_compressed",
    "encode_image",
    "encode_compressed",
    "encode_compressed_depth",
    "validate_camera_info",
    "bytes_per_pixel",
]


class ImageDecodeError(ValueError):
    """The image / camera-info message cannot be decoded; the message says why."""


# encoding -> (channels, numpy base dtype char, channel order to produce RGB or None)
_COLOR = {
    "rgb8": (3, "u1", None),
    "bgr8": (3, "u1", (2, 1, 0)),
    "rgba8": (4, "u1", (0, 1, 2)),
    "bgra8": (4, "u1", (2, 1, 0)),
    "mono8": (1, "u1", (0, 0, 0)),
}
_CV_CODE = {
    "rgb8": None,
    "bgr8": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
}
_COLOR_ALIASES = {"8uc1": "mono8", "8uc3": "bgr8", "8uc4": "bgra8"}
# depth encoding -> (numpy base dtype char, scale to metres)
_DEPTH = {
    "16uc1": ("u2", 1e-3),
    "mono16": ("u2", 1e-3),
    "32fc1": ("f4", 1.0),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")

# ROS compressed_depth_image_transport ConfigHeader: int32 format + float32 depthParam[2]
_CDEPTH_HEADER = struct.Struct("<iff")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG = b"\xff\xd8"


def _norm_encoding(encoding) -> str:
    if not isinstance(encoding, str):
        raise ImageDecodeError(f"encoding must be a string, got {type(encoding).__name__}")
    enc = encoding.strip().lower()
    return _COLOR_ALIASES.get(enc, enc)


def _layout(enc: str) -> Tuple[int, int]:
    """(channels, bytes per channel) of a normalised encoding."""
    if enc in _COLOR:
        return _COLOR[enc][0], 1
    if enc in _DEPTH:
        return 1, int(_DEPTH[enc][0][1])
    raise ImageDecodeError(
        f"unsupported image encoding {enc!r} (supported: {', '.join(COLOR_ENCODINGS)}, "
        f"8UC1/8UC3/8UC4, {', '.join(DEPTH_ENCODINGS)})")


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of a supported encoding (raises ImageDecodeError otherwise)."""
    c, b = _layout(_norm_encoding(encoding))
    return c * b


def _as_int(name: str, v) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise ImageDecodeError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(v)
    except TypeError:
        raise ImageDecodeError(f"{name} must be an integer, got {type(v).__name__}") from None


def _as_u8_buffer(data) -> np.ndarray:
    """1-D uint8 view on the message data without copying when it supports the buffer protocol."""
    if data is None:
        raise ImageDecodeError("image data is missing (None)")
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 or data.dtype == np.int8:
            a = data.reshape(-1)  # view when contiguous
            return a.view(np.uint8)
        if data.flags.c_contiguous:
            return data.reshape(-1).view(np.uint8)
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        mv = memoryview(data)
    except TypeError:
        # e.g. a list of ints (rclpy can give sequences): one conversion
        try:
            arr = np.asarray(data)
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(f"image data is not a byte buffer: {e}") from None
        if arr.dtype.kind not in "iub" or arr.ndim != 1:
            raise ImageDecodeError(f"image data must be a byte sequence, got {arr.dtype} ndim {arr.ndim}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ImageDecodeError("image data values must be bytes in 0..255")
        return arr.astype(np.uint8)
    if mv.nbytes == 0:
        return np.zeros(0, np.uint8)
    try:
        return np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)
    except (TypeError, ValueError):
        return np.frombuffer(mv.tobytes(), dtype=np.uint8)


def _check_header(encoding, height, width, step, data, max_pixels):
    enc = _norm_encoding(encoding)
    channels, bpc = _layout(enc)
    h = _as_int("height", height)
    w = _as_int("width", width)
    s = _as_int("step", step)
    if h <= 0 or w <= 0:
        raise ImageDecodeError(f"zero-size or negative image: {w}x{h}")
    if max_pixels is not None and h * w > int(max_pixels):
        raise ImageDecodeError(f"image {w}x{h} = {h * w} pixels exceeds the cap of {int(max_pixels)} pixels")
    row = w * channels * bpc
    if s < row:
        raise ImageDecodeError(f"step {s} is smaller than width*bytes_per_pixel = {w}*{channels * bpc} = {row}")
    buf = _as_u8_buffer(data)
    # ROS requires len(data) == step*height; longer data is tolerated (extra bytes ignored)
    need = s * h
    if buf.size < need:
        raise ImageDecodeError(
            f"data has {buf.size} bytes, expected step*height = {s}*{h} = {s * h} for a {w}x{h} {enc} image")
    return enc, channels, bpc, h, w, s, buf


def _strided_view(buf: np.ndarray, dtype: np.dtype, h: int, w: int, channels: int, s: int) -> np.ndarray:
    """Zero-copy H x W x C view honouring the row step (unaligned access is fine for numpy)."""
    item = dtype.itemsize
    return np.ndarray(shape=(h, w, channels), dtype=dtype, buffer=buf, offset=0,
                      strides=(s, channels * item, item))


def decode_image(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0,
                 max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode the fields of a ``sensor_msgs/Image``.

    Returns ``H x W x 3`` uint8 RGB for colour encodings, ``H x W`` float32 metres for depth
    encodings (``16UC1``/``mono16`` millimetres -> metres, ``32FC1`` as is; non-finite values are
    *not* cleaned here, use :func:`decode_depth`). The result is always a new C-contiguous,
    writable array (one copy, which also does the channel/byte swap and unit conversion).
    ``is_bigendian`` only matters for 16/32-bit encodings. ``max_pixels`` caps ``height*width``.

    Raises :class:`ImageDecodeError` for an unsupported encoding, ``step < width*bpp``,
    ``len(data) < step*height``, zero size, or more than ``max_pixels`` pixels.
    """
    enc, channels, bpc, h, w, s, buf = _check_header(encoding, height, width, step, data, max_pixels)
    if enc in _COLOR:
        view = _strided_view(buf, np.dtype(np.uint8), h, w, channels, s)
        code = _CV_CODE[enc]
        if code is None:  # rgb8: one copy (the view may alias a read-only message buffer)
            return np.array(view, order="C", copy=True)
        # OpenCV accepts the strided (padded-row) view directly and writes a new array in one pass
        try:
            return cv2.cvtColor(view[..., 0] if channels == 1 else view, code)
        except cv2.error as e:  # e.g. dimensions beyond OpenCV's int limits
            raise ImageDecodeError(f"cannot convert {enc} image {w}x{h}: {str(e).strip().splitlines()[-1]}") from None
    base, scale = _DEPTH[enc]
    dt = np.dtype((">" if is_bigendian else "<") + base)
    view = _strided_view(buf, dt, h, w, 1, s)[..., 0]
    if scale == 1.0:
        return view.astype(np.float32, order="C", copy=True)
    out = view.astype(np.float32, order="C", copy=True)
    out *= np.float32(scale)
    return out


def _depth_stats(depth: np.ndarray, may_be_bad: bool = True) -> Tuple[np.ndarray, Dict[str, int]]:
    """Zero NaN/inf/negative in place; count each kind (detailed counts only when some exist)."""
    n_nan = n_inf = n_neg = 0
    if may_be_bad:
        with np.errstate(invalid="ignore"):
            good = (depth >= 0) & (depth < np.inf)  # False for NaN, -inf, +inf, negatives
        n_bad = depth.size - int(np.count_nonzero(good))
        if n_bad:
            bad_vals = depth[~good]
            n_nan = int(np.count_nonzero(np.isnan(bad_vals)))
            n_inf = int(np.count_nonzero(np.isinf(bad_vals)))
            n_neg = int(np.count_nonzero(bad_vals < 0)) - int(np.count_nonzero(bad_vals == -np.inf))
            depth[~good] = 0.0
    n_valid = int(np.count_nonzero(depth))
    stats = {
        "total": int(depth.size),
        "nan": n_nan,
        "inf": n_inf,          # +inf and -inf
        "negative": n_neg,     # finite negative values
        "invalid": int(depth.size) - n_valid,  # all zeros after cleaning (incl. original zeros)
        "valid": n_valid,
    }
    return depth, stats


def decode_depth(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0,
                 max_pixels: Optional[int] = None) -> Tuple[np.ndarray, Dict[str, int]]:
    """Decode a depth ``sensor_msgs/Image`` to ``H x W`` float32 metres with invalid values = 0.

    NaN, +/-inf and negative values become 0. Returns ``(depth, stats)`` where ``stats`` counts
    ``total``, ``nan``, ``inf`` (either sign), ``negative`` (finite negatives), ``invalid`` (all
    zeros after cleaning, including original zeros) and ``valid`` pixels, so the caller can log e.g. "depth all invalid". A colour encoding raises
    :class:`ImageDecodeError`.
    """
    enc = _norm_encoding(encoding)
    if enc not in _DEPTH:
        if enc in _COLOR:
            raise ImageDecodeError(f"encoding {encoding!r} is a colour encoding, expected a depth encoding "
                                   f"({', '.join(DEPTH_ENCODINGS)})")
        _layout(enc)  # raises the unsupported-encoding error
    depth = decode_image(enc, height, width, step, data, is_bigendian, max_pixels)
    return _depth_stats(depth, may_be_bad=_DEPTH[enc][0] == "f4")


# ---------------------------------------------------------------------------------------------
# CompressedImage
# ---------------------------------------------------------------------------------------------

def _to_bytes(data) -> bytes:
    if data is None:
        raise ImageDecodeError("compressed data is missing (None)")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return _as_u8_buffer(data).tobytes()


def _peek_size(b: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG IHDR or a JPEG SOF marker without decoding; None if unknown."""
    if b.startswith(_PNG_SIG) and len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return w, h
    if b.startswith(_JPEG_SIG):
        i, n = 2, len(b)
        for _ in range(512):  # bounded marker walk (a few markers precede SOF in practice)
            while i < n and b[i] != 0xFF:
                i += 1
            while i < n and b[i] == 0xFF:
                i += 1
            if i >= n:
                return None
            m = b[i]
            i += 1
            if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
                continue
            if i + 2 > n:
                return None
            seg = (b[i] << 8) | b[i + 1]
            if m in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                if i + 7 > n:
                    return None
                h = (b[i + 3] << 8) | b[i + 4]
                w = (b[i + 5] << 8) | b[i + 6]
                return w, h
            if m == 0xD9 or seg < 2:
                return None
            i += seg
    return None


def _imdecode(b: bytes, flags: int, what: str) -> np.ndarray:
    if len(b) == 0:
        raise ImageDecodeError(f"{what}: empty data")
    try:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), flags)
    except cv2.error as e:
        raise ImageDecodeError(f"{what}: corrupt data ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ImageDecodeError(f"{what}: corrupt or unrecognised data ({len(b)} bytes, "
                               f"starts with {b[:8].hex()})")
    return img


def decode_compressed(format: str, data, max_pixels: Optional[int] = None) -> np.ndarray:  # noqa: A002
    """Decode a ``sensor_msgs/CompressedImage`` (``format`` and ``data`` fields).

    * Colour (``'jpeg'``, ``'png'``, ``'bgr8; jpeg compressed bgr8'``, ``'rgb8; png compressed
      bgr8'``, ...): ``H x W x 3`` uint8 RGB (image_transport always compresses BGR order, and
      grey images are replicated to three channels).
    * Depth: when the encoding before ``';'`` is ``16UC1``/``mono16``/``32FC1`` (e.g.
      ``'16UC1; png compressed'`` or the ``compressed_depth_image_transport`` format
      ``'16UC1; compressedDepth png'``): ``H x W`` float32 metres, 0 = invalid. The 12-byte
      compressedDepth ``ConfigHeader`` (int32 format, float32 depthQuantA, depthQuantB) is
      detected and skipped when present; ``32FC1`` compressedDepth is inverse-depth quantised and
      decoded as ``depthQuantA / (v - depthQuantB)`` for ``v != 0``. The ``rvl`` codec is not
      supported.

    Only PNG and JPEG data are decoded (checked by signature; other formats OpenCV knows are
    refused). ``max_pixels`` is checked on the PNG/JPEG header *before* decompression
    (decompression bombs).
    Corrupt or truncated-beyond-repair data raises :class:`ImageDecodeError`. (libjpeg silently
    grey-fills a JPEG truncated after its header; such an image is returned.)
    """
    if not isinstance(format, str):
        raise ImageDecodeError(f"format must be a string, got {type(format).__name__}")
    b = _to_bytes(data)
    fmt = format.strip().lower()
    head = fmt.split(";", 1)[0].strip()
    head = _COLOR_ALIASES.get(head, head)
    is_cdepth = "compresseddepth" in fmt
    depth_enc = head if head in _DEPTH else None
    if is_cdepth and depth_enc is None:
        depth_enc = "16uc1"  # compressedDepth without a recognisable encoding prefix
    if "rvl" in fmt:
        raise ImageDecodeError(f"compressed format {format!r}: the RVL codec is not supported (use png)")

    quant = None
    payload = b
    if depth_enc is not None and not b.startswith(_PNG_SIG):
        if len(b) > _CDEPTH_HEADER.size and b[_CDEPTH_HEADER.size:].startswith(_PNG_SIG):
            _fmt_id, qa, qb = _CDEPTH_HEADER.unpack_from(b, 0)
            quant = (qa, qb)
            payload = b[_CDEPTH_HEADER.size:]
        else:
            raise ImageDecodeError(f"depth CompressedImage {format!r}: data is not a PNG "
                                   f"(with or without a compressedDepth header)")
    if not (payload.startswith(_PNG_SIG) or payload.startswith(_JPEG_SIG)):
        # only PNG/JPEG are decoded: OpenCV would also parse BMP/PNM/TIFF/... headers, whose
        # declared sizes are allocated before the data is read (decompression bombs)
        raise ImageDecodeError(f"CompressedImage {format!r}: data is neither PNG nor JPEG "
                               f"({len(payload)} bytes, starts with {payload[:8].hex()})")
    size = _peek_size(payload)
    if size is None:
        raise ImageDecodeError(f"CompressedImage {format!r}: corrupt data (no PNG IHDR / JPEG frame header)")
    else:
        w, h = size
        if w == 0 or h == 0:
            raise ImageDecodeError(f"compressed image header says zero size ({w}x{h})")
        if max_pixels is not None and w * h > int(max_pixels):
            raise ImageDecodeError(f"compressed image {w}x{h} = {w * h} pixels exceeds the cap of "
                                   f"{int(max_pixels)} pixels")

    if depth_enc is None:
        img = _imdecode(payload, cv2.IMREAD_COLOR, f"CompressedImage {format!r}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ImageDecodeError(f"CompressedImage {format!r}: unexpected decoded shape {img.shape}")
        if img.dtype != np.uint8:
            img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    img = _imdecode(payload, cv2.IMREAD_UNCHANGED, f"depth CompressedImage {format!r}")
    if img.ndim != 2:
        raise ImageDecodeError(f"depth CompressedImage {format!r}: expected a single-channel PNG, "
                               f"got shape {img.shape}")
    if img.dtype != np.uint16:
        raise ImageDecodeError(f"depth CompressedImage {format!r}: expected a 16-bit PNG, got {img.dtype}")
    if depth_enc == "32fc1":
        if quant is None:
            raise ImageDecodeError(f"depth CompressedImage {format!r}: 32FC1 needs the compressedDepth "
                                   f"header with the quantisation parameters")
        qa, qb = quant
        if not (np.isfinite(qa) and np.isfinite(qb)):
            raise ImageDecodeError(f"depth CompressedImage {format!r}: non-finite quantisation parameters")
        v = img.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = np.float32(qa) / (v - np.float32(qb))
        out[(img == 0) | ~np.isfinite(out) | (out < 0)] = 0.0
        return out.astype(np.float32, copy=False)
    out = img.astype(np.float32)
    out *= np.float32(1e-3)
    return out


# ---------------------------------------------------------------------------------------------
# Encoding (camera publisher, tests)
# ---------------------------------------------------------------------------------------------

def encode_image(arr: np.ndarray, encoding: str, step: Optional[int] = None, is_bigendian: bool = False
                 ) -> Tuple[str, int, int, int, bytes]:
    """Encode an array into ``sensor_msgs/Image`` fields ``(encoding, height, width, step, data)``.

    * ``rgb8``/``bgr8``/``rgba8``/``bgra8``: ``arr`` is ``H x W x 3`` uint8 **RGB** (package
      convention); the bytes are written in the requested channel order (alpha = 255).
    * ``mono8``: ``arr`` is ``H x W`` (or ``H x W x 1``) uint8.
    * ``16UC1``: ``arr`` is float metres (-> rounded millimetres; NaN/inf/negative/over 65.535 m
      -> 0) or integer millimetres (written as is, must fit uint16).
    * ``32FC1``: ``arr`` is float metres.

    ``step`` (default ``width * bpp``) may be larger: each row is zero-padded. ``is_bigendian``
    selects the byte order of 16/32-bit encodings (publish it in the message's ``is_bigendian``).
    """
    enc = _norm_encoding(encoding)
    channels, bpc = _layout(enc)
    arr = np.asarray(arr)
    if enc in _COLOR:
        if arr.dtype != np.uint8:
            raise ValueError(f"{encoding} expects uint8 data, got {arr.dtype}")
        if enc == "mono8":
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[..., 0]
            if arr.ndim != 2:
                raise ValueError(f"mono8 expects an H x W array, got shape {arr.shape}")
            px = arr[..., None]
        else:
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"{encoding} expects an H x W x 3 RGB array, got shape {arr.shape}")
            if enc == "rgb8":
                px = arr
            elif enc == "bgr8":
                px = arr[..., ::-1]
            else:
                alpha = np.full(arr.shape[:2] + (1,), 255, np.uint8)
                rgb = arr if enc == "rgba8" else arr[..., ::-1]
                px = np.concatenate([rgb, alpha], axis=2)
    else:
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"{encoding} expects an H x W array, got shape {arr.shape}")
        base = _DEPTH[enc][0]
        dt = np.dtype((">" if is_bigendian else "<") + base)
        if base == "u2":
            if arr.dtype.kind in "ui":
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise ValueError(f"{encoding} integer millimetres must be in 0..65535")
                mm = arr
            else:
                m = arr.astype(np.float64)
                with np.errstate(invalid="ignore"):
                    mm = np.rint(m * 1000.0)
                    mm[~np.isfinite(mm) | (mm < 0) | (mm > 65535)] = 0
            px = mm.astype(dt)[..., None]
        else:
            px = arr.astype(dt)[..., None]
    h, w = px.shape[:2]
    row = w * channels * bpc
    s = row if step is None else int(step)
    if s < row:
        raise ValueError(f"step {s} < width*bpp {row}")
    raw = np.ascontiguousarray(px).view(np.uint8).reshape(h, row)
    if s != row:
        padded = np.zeros((h, s), np.uint8)
        padded[:, :row] = raw
        raw = padded
    out_enc = {"16uc1": "16UC1", "32fc1": "32FC1"}.get(enc, enc)
    return out_enc, int(h), int(w), int(s), raw.tobytes()


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """Compress an ``H x W x 3`` uint8 RGB (or ``H x W`` grey) image to JPEG or PNG bytes
    (BGR order inside, as image_transport does). Use format string ``'rgb8; jpeg compressed bgr8'``
    (or ``png``) in the message."""
    f = fmt.strip().lower()
    if f in ("jpg", "jpeg"):
        ext, params = ".jpg", [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    elif f == "png":
        ext, params = ".png", [int(cv2.IMWRITE_PNG_COMPRESSION), 1]
    else:
        raise ValueError(f"unsupported compression format {fmt!r} (jpeg or png)")
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"encode_compressed expects uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2BGR)
    elif a.ndim != 2:
        raise ValueError(f"encode_compressed expects H x W x 3 or H x W, got {a.shape}")
    ok, buf = cv2.imencode(ext, a, params)
    if not ok:
        raise ValueError("cv2.imencode failed")
    return buf.tobytes()


def encode_compressed_depth(depth_m: np.ndarray, header: bool = True) -> Tuple[str, bytes]:
    """Compress float metres (0/NaN = invalid) as a 16-bit millimetre PNG, the way
    ``compressed_depth_image_transport`` does for 16UC1. Returns ``(format, data)``;
    ``header=True`` prepends the 12-byte ConfigHeader (format 0 = PNG, params 0, 0)."""
    _, h, w, _, raw = encode_image(depth_m, "16UC1")
    mm = np.frombuffer(raw, "<u2").reshape(h, w)
    ok, buf = cv2.imencode(".png", mm, [int(cv2.IMWRITE_PNG_COMPRESSION), 1])
    if not ok:
        raise ValueError("cv2.imencode failed")
    data = buf.tobytes()
    if header:
        return "16UC1; compressedDepth png", _CDEPTH_HEADER.pack(0, 0.0, 0.0) + data
    return "16UC1; png compressed", data


# ---------------------------------------------------------------------------------------------
# CameraInfo
# ---------------------------------------------------------------------------------------------

def validate_camera_info(K, width: int, height: int) -> np.ndarray:
    """Check a ``CameraInfo.k`` (9 values row-major, or 3x3) against the image size.

    Returns ``K`` as 3x3 float64. Raises :class:`ImageDecodeError` when: the shape is wrong; any
    value is non-finite; ``K`` is all zeros (uncalibrated camera, the CameraInfo default); a focal
    length is zero or negative; the last row is not ``[0, 0, 1]`` or ``K[1, 0] != 0``; the
    principal point lies outside the image (``0 <= cx <= width``, ``0 <= cy <= height``); the
    image size is not positive.
    """
    w = _as_int("width", width)
    h = _as_int("height", height)
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"camera info has a zero or negative image size {w}x{h}")
    try:
        k = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ImageDecodeError(f"camera matrix K is not numeric: {e}") from None
    if k.shape == (9,):
        k = k.reshape(3, 3)
    if k.shape != (3, 3):
        raise ImageDecodeError(f"camera matrix K must have 9 values or be 3x3, got shape {k.shape}")
    if not np.isfinite(k).all():
        raise ImageDecodeError("camera matrix K has non-finite values")
    if not k.any():
        raise ImageDecodeError("camera matrix K is all zeros (camera not calibrated)")
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if fx <= 0 or fy <= 0:
        raise ImageDecodeError(f"camera matrix K has a zero or negative focal length (fx={fx}, fy={fy})")
    if k[1, 0] != 0 or not np.allclose(k[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise ImageDecodeError(f"camera matrix K is not an upper-triangular pinhole matrix: {k.tolist()}")
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise ImageDecodeError(f"principal point ({cx}, {cy}) lies outside the {w}x{h} image")
    return k.copy()
