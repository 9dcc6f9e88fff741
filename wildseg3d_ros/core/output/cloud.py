"""ROS-free ``sensor_msgs/PointCloud2`` packing and unpacking with numpy structured arrays.

Nothing here loops over points in Python. The ROS layer copies the pieces returned here into a
``sensor_msgs/PointCloud2``::

    arr = pack_object_cloud(points, colors)              # structured (N,)
    lay = cloud_layout(arr)                              # fields, point_step, row_step, height, width
    msg.height, msg.width = lay.height, lay.width
    msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                  for f in lay.fields]
    msg.point_step, msg.row_step = lay.point_step, lay.row_step
    msg.is_bigendian = False
    msg.is_dense = lay.is_dense
    msg.data = cloud_to_bytes(arr)

and back (``fields`` may be the message's own ``PointField`` list, anything with
``name``/``offset``/``datatype``/``count`` attributes works)::

    arr = cloud_from_bytes(msg.data, msg.fields, msg.point_step, msg.height, msg.width,
                           msg.is_bigendian, row_step=msg.row_step)   # shape (height, width)

Layouts (all little-endian, offsets in bytes):

* object cloud (:func:`object_cloud_dtype`): ``x`` 0, ``y`` 4, ``z`` 8 (FLOAT32), ``rgb`` 12
  (FLOAT32 holding ``0x00RRGGBB``, the PCL / rviz2 / Foxglove convention); ``point_step`` 16.
* labelled cloud (:func:`labelled_cloud_dtype`): the object cloud + ``label`` 16 (UINT32);
  ``point_step`` 20.
* scene cloud (:func:`scene_cloud_dtype`): ``x`` 0, ``y`` 4, ``z`` 8, ``rgb`` 12,
  ``confidence`` 16 (FLOAT32), ``keyframe`` 20 (UINT32), ``label`` 24 (INT32, mask-cache object
  id, 0 = none); ``point_step`` 28. The scene cloud is *organised*: ``height = V*H`` rows
  (keyframe ``v`` occupies rows ``v*H .. v*H+H-1``), ``width = W``; invalid pixels have
  ``x = y = z = NaN`` (``is_dense = False``).

Big-endian clouds are byte-swapped to native little-endian on input; output is always little-endian.
Any inconsistency (unknown datatype, field outside ``point_step``, data size not
``row_step * height``...) raises :class:`CloudError` (a ``ValueError``) with a clear message.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
from ..geometry import finite_points

import numpy as np

# sensor_msgs/PointField datatypes
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = 1, 2, 3, 4, 5, 6, 7, 8

_DATATYPE_TO_CODE: Dict[int, str] = {
    INT8: "i1", UINT8: "u1", INT16: "i2", UINT16: "u2",
    INT32: "i4", UINT32: "u4", FLOAT32: "f4", FLOAT64: "f8",
}
_CODE_TO_DATATYPE: Dict[str, int] = {v: k for k, v in _DATATYPE_TO_CODE.items()}

#: largest accepted point_step (bytes); real clouds are far below this.
MAX_POINT_STEP = 1 << 16
#: largest accepted count of one field
MAX_FIELD_COUNT = 1 << 12
#: names treated as padding (PCL writes ``_`` padding fields); they are skipped on input.
PADDING_NAMES = ("", "_")


class CloudError(ValueError):
    """A point cloud whose fields, sizes or contents are inconsistent or unsupported."""


@dataclass
class FieldSpec:
    """One ``sensor_msgs/PointField``."""

    name: str
    offset: int
    datatype: int
    count: int = 1


@dataclass
class CloudLayout:
    """Everything the ROS layer needs besides ``data`` to fill a ``PointCloud2``."""

    fields: List[FieldSpec]
    point_step: int
    row_step: int
    height: int
    width: int
    is_dense: bool
    is_bigendian: bool = False


# --------------------------------------------------------------------------------------- rgb
def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...,) float32 whose bits are the uint32 ``r<<16 | g<<8 | b``.

    The top byte is 0, so the float is never NaN/inf (zero or denormal/normal positive).
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1:] != (3,):
        raise CloudError(f"pack_rgb expects (..., 3) colours, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:  # other types: values are taken as 0..255, clipped
        rgb = np.clip(np.nan_to_num(np.asarray(rgb, np.float64)).round(), 0, 255).astype(np.uint8)
    u = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) \
        | rgb[..., 2].astype(np.uint32)
    return np.ascontiguousarray(u, dtype="<u4").view("<f4")


def unpack_rgb(rgbf: np.ndarray) -> np.ndarray:
    """(...,) float32 packed colour -> (..., 3) uint8 RGB (inverse of :func:`pack_rgb`)."""
    a = np.asarray(rgbf)
    if a.dtype.itemsize != 4:
        raise CloudError(f"packed rgb must be a 4-byte type, got {a.dtype}")
    u = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")).view(np.uint32)
    out = np.empty(u.shape + (3,), np.uint8)
    out[..., 0] = (u >> 16) & 0xFF
    out[..., 1] = (u >> 8) & 0xFF
    out[..., 2] = u & 0xFF
    return out


# ------------------------------------------------------------------------------------ dtypes
def object_cloud_dtype() -> np.dtype:
    """x, y, z, rgb float32 at offsets 0, 4, 8, 12; itemsize (point_step) 16."""
    return np.dtype({"names": ["x", "y", "z", "rgb"], "formats": ["<f4"] * 4,
                     "offsets": [0, 4, 8, 12], "itemsize": 16})


def labelled_cloud_dtype() -> np.dtype:
    """x, y, z, rgb float32 + label uint32 at 16; itemsize (point_step) 20."""
    return np.dtype({"names": ["x", "y", "z", "rgb", "label"],
                     "formats": ["<f4"] * 4 + ["<u4"],
                     "offsets": [0, 4, 8, 12, 16], "itemsize": 20})


SCENE_POINT_STEP = 28


def scene_cloud_dtype() -> np.dtype:
    """Organised scene cloud: x,y,z,rgb,confidence float32, keyframe uint32, label int32.

    Offsets 0, 4, 8, 12, 16, 20, 24; itemsize (point_step) 28.
    """
    return np.dtype({"names": ["x", "y", "z", "rgb", "confidence", "keyframe", "label"],
                     "formats": ["<f4"] * 5 + ["<u4", "<i4"],
                     "offsets": [0, 4, 8, 12, 16, 20, 24], "itemsize": SCENE_POINT_STEP})


def _datatype_of(dt: np.dtype, name: str) -> int:
    code = f"{dt.kind}{dt.itemsize}"
    if code not in _CODE_TO_DATATYPE:
        raise CloudError(f"field {name!r}: numpy type {dt} has no PointField datatype")
    return _CODE_TO_DATATYPE[code]


def fields_from_dtype(dtype: np.dtype) -> List[FieldSpec]:
    """PointField specs (sorted by offset) of a structured dtype; sub-arrays give ``count``."""
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise CloudError(f"not a structured dtype: {dtype}")
    out = []
    for name in dtype.names:
        sub, offset = dtype.fields[name][:2]
        count = 1
        if sub.subdtype is not None:
            base, shape = sub.subdtype
            count = int(np.prod(shape))
            sub = base
        out.append(FieldSpec(name=name, offset=int(offset), datatype=_datatype_of(sub, name),
                             count=count))
    out.sort(key=lambda f: f.offset)
    return out


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise CloudError(f"{what} must be an integer, got {value!r}")
    try:
        iv = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CloudError(f"{what} must be an integer, got {value!r}") from None
    if iv != value:
        raise CloudError(f"{what} must be an integer, got {value!r}")
    return iv


def dtype_from_fields(fields: Sequence, point_step: int, is_bigendian: bool = False,
                      skip_unknown: bool = False) -> np.dtype:
    """Structured dtype honouring the fields' offsets and the padding up to ``point_step``.

    ``fields``: FieldSpec or sensor_msgs/PointField objects (``name``, ``offset``, ``datatype``,
    ``count``). Padding fields (named ``""`` or ``"_"``) are skipped. Unknown datatypes raise
    :class:`CloudError` unless ``skip_unknown`` (then the field is skipped like padding).
    The dtype's byte order is big-endian when ``is_bigendian``.
    """
    point_step = _as_int(point_step, "point_step")
    if not 0 < point_step <= MAX_POINT_STEP:
        raise CloudError(f"point_step {point_step} out of range (1..{MAX_POINT_STEP})")
    try:
        fields = list(fields)
    except TypeError:
        raise CloudError("fields must be a sequence of PointField-like objects") from None
    order = ">" if is_bigendian else "<"
    names, formats, offsets = [], [], []
    for i, f in enumerate(fields):
        try:
            name, offset, datatype, count = f.name, f.offset, f.datatype, f.count
        except AttributeError:
            raise CloudError(f"field #{i} has no name/offset/datatype/count: {f!r}") from None
        if not isinstance(name, str):
            raise CloudError(f"field #{i}: name must be a string, got {name!r}")
        offset = _as_int(offset, f"field {name!r} offset")
        datatype = _as_int(datatype, f"field {name!r} datatype")
        count = _as_int(count, f"field {name!r} count")
        if name in PADDING_NAMES:
            continue
        if datatype not in _DATATYPE_TO_CODE:
            if skip_unknown:
                continue
            raise CloudError(f"field {name!r}: unknown PointField datatype {datatype} "
                             f"(expected 1..8)")
        if not 1 <= count <= MAX_FIELD_COUNT:
            raise CloudError(f"field {name!r}: count {count} out of range (1..{MAX_FIELD_COUNT})")
        code = order + _DATATYPE_TO_CODE[datatype]
        size = np.dtype(code).itemsize * count
        if offset < 0 or offset + size > point_step:
            raise CloudError(f"field {name!r} (offset {offset}, {size} bytes) does not fit in "
                             f"point_step {point_step}")
        if name in names:
            raise CloudError(f"duplicate field name {name!r}")
        names.append(name)
        formats.append(code if count == 1 else (code, (count,)))
        offsets.append(offset)
    if not names:
        raise CloudError("the cloud has no usable fields")
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": point_step})
    except (ValueError, TypeError) as exc:  # pragma: no cover - guarded above
        raise CloudError(f"cannot build a dtype from the fields: {exc}") from None


# ------------------------------------------------------------------------------------ packing
def _column(a, n: int, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] != n:
        raise CloudError(f"column {name!r} has shape {a.shape}, expected first dim {n}")
    return a


def pack_points(_dtype: Optional[np.dtype] = None, **columns) -> np.ndarray:
    """Pack 1-D columns (N,) or (N, k) into a structured (N,) array.

    With ``_dtype`` the named fields are filled (missing fields stay zero, extra columns raise);
    otherwise the dtype is inferred from the columns, in keyword order, tightly packed,
    little-endian (columns of shape (N, k) become fields with ``count`` k).
    """
    if not columns:
        raise CloudError("pack_points needs at least one column")
    n = int(np.shape(next(iter(columns.values())))[0]) if np.ndim(
        next(iter(columns.values()))) else -1
    cols = {k: _column(v, n, k) for k, v in columns.items()}
    if _dtype is None:
        names, formats, offsets, off = [], [], [], 0
        for k, a in cols.items():
            base = a.dtype.newbyteorder("<")
            _datatype_of(base, k)
            shape = a.shape[1:]
            formats.append(base if not shape else (base, shape))
            names.append(k)
            offsets.append(off)
            off += base.itemsize * int(np.prod(shape) if shape else 1)
        dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                          "itemsize": off})
    else:
        dtype = np.dtype(_dtype)
        extra = set(cols) - set(dtype.names or ())
        if extra:
            raise CloudError(f"columns {sorted(extra)} are not fields of {dtype}")
    out = np.zeros(n, dtype)
    for k, a in cols.items():
        out[k] = a
    return out


def pack_object_cloud(points: np.ndarray, colors: Optional[np.ndarray] = None,
                      labels: Optional[np.ndarray] = None) -> np.ndarray:
    """(N,3) points + (N,3) uint8 colours (+ optional (N,) labels) -> structured (N,).

    Without labels the dtype is :func:`object_cloud_dtype` (point_step 16), with labels
    :func:`labelled_cloud_dtype` (point_step 20). Missing colours are white.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise CloudError(f"points must be (N, 3), got {points.shape}")
    n = points.shape[0]
    arr = np.empty(n, object_cloud_dtype() if labels is None else labelled_cloud_dtype())
    arr["x"] = points[:, 0]
    arr["y"] = points[:, 1]
    arr["z"] = points[:, 2]
    if colors is None:
        arr["rgb"] = pack_rgb(np.full((n, 3), 255, np.uint8))
    else:
        colors = np.asarray(colors)
        if colors.shape != (n, 3):
            raise CloudError(f"colors must be ({n}, 3), got {colors.shape}")
        arr["rgb"] = pack_rgb(colors)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (n,):
            raise CloudError(f"labels must be ({n},), got {labels.shape}")
        if labels.size and labels.min() < 0:
            raise CloudError("labels must be >= 0 (UINT32 field)")
        arr["label"] = labels
    return arr


def pack_scene_cloud(scene) -> Tuple[np.ndarray, int, int]:
    """Organised scene cloud of an :class:`~wildseg3d_ros.core.types.AlignedScene`.

    Returns ``(arr, height, width)`` with ``arr`` of shape (V*H, W) and dtype
    :func:`scene_cloud_dtype`; keyframe ``v`` occupies rows ``v*H .. v*H+H-1``.
    Invalid points (non-finite or confidence <= 0) have x = y = z = NaN. ``label`` is the mask
    cache's object id (0: none); with the mask cache's ``kept`` pixels (Multi-view Group
    Mapping's precomputed filter), a pixel of object l that the filter removes carries -l.
    """
    pts = np.asarray(scene.pts3d)
    if pts.ndim != 4 or pts.shape[-1] != 3:
        raise CloudError(f"scene.pts3d must be (V, H, W, 3), got {pts.shape}")
    V, H, W = pts.shape[:3]
    conf = np.asarray(scene.conf, np.float32)
    rgb = np.asarray(scene.rgb)
    if conf.shape != (V, H, W) or rgb.shape != (V, H, W, 3):
        raise CloudError(f"scene.conf {conf.shape} / scene.rgb {rgb.shape} do not match "
                         f"pts3d {pts.shape}")
    valid = finite_points(pts) & (conf > 0)
    arr = np.empty((V * H, W), scene_cloud_dtype())
    nan = np.float32(np.nan)
    for i, c in enumerate("xyz"):
        arr[c] = np.where(valid, pts[..., i], nan).reshape(V * H, W)
    arr["rgb"] = pack_rgb(rgb).reshape(V * H, W)
    arr["confidence"] = conf.reshape(V * H, W)
    arr["keyframe"] = np.repeat(np.arange(V, dtype=np.uint32), H)[:, None]
    mc = getattr(scene, "mask_cache", None)
    if mc is not None:
        labels = np.asarray(mc.labels)
        if labels.shape != (V, H, W):
            raise CloudError(f"mask cache labels {labels.shape} do not match pts3d {pts.shape}")
        kept = getattr(mc, "kept", None)
        if kept is not None and np.shape(kept) == (V, H, W):
            # pixels of object l that Multi-view Group Mapping's filter removes are sent as -l
            labels = np.where(np.asarray(kept, bool) | (labels <= 0), labels, -labels)
        arr["label"] = labels.reshape(V * H, W)
    else:
        arr["label"] = 0
    return arr, V * H, W


def _xyz(flat: np.ndarray) -> np.ndarray:
    """(N,3) float32 from the x, y, z fields of a 1-D structured array: one strided copy when
    they are adjacent native float32 (the usual layout), else per field."""
    f = flat.dtype.fields
    f32 = np.dtype(np.float32)
    if all(f[c][0] == f32 for c in "xyz") and f["y"][1] == f["x"][1] + 4 and f["z"][1] == f["x"][1] + 8:
        # the 12 bytes of each point copied as one item (an inner loop over the points, not over
        # 3 floats per point: 1.6x faster)
        v = np.ndarray((flat.size,), np.dtype((np.void, 12)),
                       flat.data if flat.flags.c_contiguous else np.ascontiguousarray(flat).data,
                       offset=f["x"][1], strides=(flat.dtype.itemsize,))
        return np.ascontiguousarray(v).view(f32).reshape(flat.size, 3)
    return np.stack([flat[c].astype(np.float32) for c in "xyz"], -1)


def _rgb_bytes(flat: np.ndarray, name: str) -> Optional[np.ndarray]:
    """(N,3) uint8 of a packed little-endian 4-byte colour field read as bytes (B, G, R, -): one
    contiguous copy of the field and OpenCV's channel swap, ~3x faster than the integer shifts of
    :func:`unpack_rgb`; None when the field is not little-endian."""
    dt = flat.dtype.fields[name][0]
    if dt.byteorder == ">" or (dt.byteorder in "=|" and sys.byteorder != "little"):
        return None
    import cv2

    word = np.ascontiguousarray(flat[name]).view(np.uint8).reshape(-1, 1, 4)
    return cv2.cvtColor(word, cv2.COLOR_BGRA2RGB).reshape(-1, 3)


def unpack_scene_cloud(arr: np.ndarray, height: int, width: int, num_views: int,
                       keyframe: bool = True) -> dict:
    """Inverse of :func:`pack_scene_cloud` for any field layout holding at least x, y, z.

    Returns ``pts3d`` (V,H,W,3) float32 (NaN where invalid), ``rgb`` (V,H,W,3) uint8 (0 when
    absent), ``conf`` (V,H,W) float32 (absent: 1 where finite, else 0), ``label`` (V,H,W) int32
    (0 when absent) and, with ``keyframe``, ``keyframe`` (V,H,W) int64 (absent: the row block
    index).
    """
    height = _as_int(height, "height")
    width = _as_int(width, "width")
    num_views = _as_int(num_views, "num_views")
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        raise CloudError("scene cloud must be a structured array")
    if num_views <= 0 or height <= 0 or width <= 0 or height % num_views:
        raise CloudError(f"scene cloud height {height} is not a positive multiple of "
                         f"num_views {num_views} (width {width})")
    if arr.size != height * width:
        raise CloudError(f"scene cloud has {arr.size} points, expected {height}x{width}")
    missing = [c for c in "xyz" if c not in arr.dtype.names]
    if missing:
        raise CloudError(f"scene cloud lacks fields {missing}")
    for name in arr.dtype.names:
        if arr.dtype.fields[name][0].subdtype is not None and name in (
                "x", "y", "z", "rgb", "confidence", "label", "keyframe"):
            raise CloudError(f"field {name!r} must have count 1")
    H = height // num_views
    shp = (num_views, H, width)
    flat = arr.reshape(-1)
    pts = _xyz(flat).reshape(shp + (3,))
    names = arr.dtype.names
    if "rgb" in names or "rgba" in names:
        col = flat["rgb" if "rgb" in names else "rgba"]
        if col.dtype.itemsize != 4:
            raise CloudError(f"rgb field must be 4 bytes, got {col.dtype}")
        rgb = _rgb_bytes(flat, "rgb" if "rgb" in names else "rgba")
        rgb = (unpack_rgb(col) if rgb is None else rgb).reshape(shp + (3,))
    else:
        rgb = np.zeros(shp + (3,), np.uint8)
    if "confidence" in names:
        conf = flat["confidence"].astype(np.float32).reshape(shp)
    else:
        conf = finite_points(pts).astype(np.float32)
    label = flat["label"].astype(np.int32).reshape(shp) if "label" in names \
        else np.zeros(shp, np.int32)
    out = {"pts3d": pts, "rgb": rgb, "conf": conf, "label": label}
    if keyframe:
        out["keyframe"] = (flat["keyframe"].astype(np.int64).reshape(shp) if "keyframe" in names else
                           np.broadcast_to(np.arange(num_views, dtype=np.int64)[:, None, None], shp).copy())
    return out


# ------------------------------------------------------------------------------------- bytes
def cloud_layout(arr: np.ndarray, height: Optional[int] = None,
                 width: Optional[int] = None) -> CloudLayout:
    """Message metadata of a structured array (2-D arrays are organised clouds)."""
    arr = np.asarray(arr)
    if height is None or width is None:
        if arr.ndim == 2:
            height, width = arr.shape
        else:
            height, width = 1, arr.size
    if height * width != arr.size:
        raise CloudError(f"{height}x{width} does not match {arr.size} points")
    fields = fields_from_dtype(arr.dtype)
    step = arr.dtype.itemsize
    dense = True
    if arr.size and all(c in arr.dtype.names for c in "xyz"):
        flat = arr.reshape(-1)
        dense = bool(np.isfinite(flat["x"]).all() and np.isfinite(flat["y"]).all()
                     and np.isfinite(flat["z"]).all())
    return CloudLayout(fields=fields, point_step=step, row_step=step * int(width),
                       height=int(height), width=int(width), is_dense=dense)


def cloud_to_bytes(arr: np.ndarray) -> bytes:
    """Little-endian bytes of a structured array, rows contiguous (``row_step = W*point_step``)."""
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        raise CloudError("cloud_to_bytes expects a structured array")
    dt = arr.dtype
    le = dt.newbyteorder("<")
    if le != dt:
        arr = arr.astype(le)
    return np.ascontiguousarray(arr).tobytes()


def _byte_view(data) -> memoryview:
    """A flat byte view of bytes / bytearray / array.array / numpy / list of ints."""
    if isinstance(data, (list, tuple)):
        try:
            a = np.asarray(data)
        except (ValueError, TypeError):
            a = None
        if a is None or (a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255)):
            raise CloudError("data list must hold integers 0..255")
        return memoryview(a.astype(np.uint8).reshape(-1))
    if isinstance(data, str):
        raise CloudError("data must be bytes, not str")
    try:
        mv = memoryview(data)
    except TypeError:
        raise CloudError(f"data of type {type(data).__name__} is not a byte buffer") from None
    try:
        return mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    except TypeError:
        return memoryview(mv.tobytes())


def cloud_from_bytes(data, fields: Sequence, point_step: int, height: int, width: int,
                     is_bigendian: bool = False, row_step: Optional[int] = None,
                     skip_unknown: bool = False) -> np.ndarray:
    """Decode ``PointCloud2.data`` into a writable native-endian structured array (height, width).

    Validates ``row_step >= width * point_step`` and ``len(data) == row_step * height``;
    bytes between the end of a row's points and ``row_step`` are skipped. Big-endian data is
    byte-swapped. Raises :class:`CloudError` on any inconsistency.
    """
    height = _as_int(height, "height")
    width = _as_int(width, "width")
    if height < 0 or width < 0:
        raise CloudError(f"negative size {height}x{width}")
    dtype = dtype_from_fields(fields, point_step, bool(is_bigendian), skip_unknown)
    point_step = dtype.itemsize
    row_step = point_step * width if row_step is None else _as_int(row_step, "row_step")
    if row_step < point_step * width:
        raise CloudError(f"row_step {row_step} < width {width} * point_step {point_step}")
    buf = _byte_view(data)
    if len(buf) != row_step * height:
        raise CloudError(f"data has {len(buf)} bytes, expected row_step {row_step} * height "
                         f"{height} = {row_step * height}")
    native = dtype.newbyteorder("<") if is_bigendian else dtype
    if height == 0 or width == 0:
        return np.zeros((height, width), native)
    raw = np.frombuffer(buf, np.uint8).reshape(height, row_step)[:, :point_step * width]
    arr = np.ascontiguousarray(raw).view(dtype).reshape(height, width)
    if is_bigendian:
        return arr.astype(native)
    return arr.copy() if not arr.flags.writeable else arr
