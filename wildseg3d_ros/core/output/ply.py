"""Minimal vectorised PLY point-cloud writer/reader (vertex element only).

``write_ply`` writes ``x y z`` (float32), optional ``red green blue`` (uchar) and optional
``label`` (int32) per vertex, binary little-endian by default (one structured-array ``tobytes``),
or ASCII (``np.savetxt``; meant for small debug files). The file is written to a temporary name
and renamed, so readers never see a partial file. ``read_ply`` reads the vertex element of
``binary_little_endian``, ``binary_big_endian`` and ``ascii`` files (any scalar property types;
list properties and elements after ``vertex`` are ignored) and raises :class:`PlyError` on
malformed input.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
MAX_HEADER_BYTES = 1 << 16


class PlyError(ValueError):
    """A malformed or unsupported PLY file."""


def _vertex_array(points, colors=None, labels=None) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise PlyError(f"points must be (N, 3), got {points.shape}")
    n = points.shape[0]
    names, formats = ["x", "y", "z"], ["<f4"] * 3
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != (n, 3):
            raise PlyError(f"colors must be ({n}, 3), got {colors.shape}")
        if colors.dtype != np.uint8:
            colors = np.clip(np.nan_to_num(colors.astype(np.float64)).round(), 0, 255)
        names += ["red", "green", "blue"]
        formats += ["u1"] * 3
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (n,):
            raise PlyError(f"labels must be ({n},), got {labels.shape}")
        names.append("label")
        formats.append("<i4")
    arr = np.empty(n, np.dtype({"names": names, "formats": formats}))
    arr["x"], arr["y"], arr["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colors is not None:
        arr["red"], arr["green"], arr["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    if labels is not None:
        arr["label"] = labels
    return arr


def write_ply(path, points, colors=None, labels=None, binary: bool = True,
              comment: str = "wildseg3d_ros") -> Path:
    """Write an (N,3) point cloud with optional (N,3) uint8 colours and (N,) int labels."""
    arr = _vertex_array(points, colors, labels)
    inv = {"<f4": "float", "|u1": "uchar", "<i4": "int"}
    props = "".join(f"property {inv[arr.dtype[n].str]} {n}\n" for n in arr.dtype.names)
    comment = "".join(ch for ch in str(comment) if ch.isprintable())
    header = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\n"
              f"comment {comment}\nelement vertex {arr.shape[0]}\n{props}end_header\n")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            if binary:
                f.write(arr.tobytes())
            else:
                fmt = ["%.9g"] * 3 + ["%d"] * (len(arr.dtype.names) - 3)
                cols = np.empty((arr.shape[0], len(arr.dtype.names)), np.float64)
                for i, n in enumerate(arr.dtype.names):
                    cols[:, i] = arr[n]
                np.savetxt(f, cols, fmt=fmt, delimiter=" ")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_ply(path) -> Dict[str, Optional[np.ndarray]]:
    """Read the vertex element -> {"points" (N,3) f32, "colors" (N,3) u8|None, "labels" (N,)|None,
    "vertex": the structured array of every scalar vertex property, "format": str}."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0 or end > MAX_HEADER_BYTES:
        raise PlyError(f"{path}: not a PLY file (no 'ply' magic / end_header)")
    nl = data.find(b"\n", end)
    if nl < 0:
        raise PlyError(f"{path}: truncated header")
    try:
        lines = data[:end].decode("ascii").replace("\r", "").split("\n")
    except UnicodeDecodeError:
        raise PlyError(f"{path}: header is not ASCII") from None
    body = data[nl + 1:]
    fmt, elements, cur = None, [], None
    for ln in lines[1:]:
        tok = ln.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format" and len(tok) >= 2:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3:
            try:
                cur = [tok[1], int(tok[2]), []]
            except ValueError:
                raise PlyError(f"{path}: bad element line {ln!r}") from None
            if cur[1] < 0:
                raise PlyError(f"{path}: negative element count")
            elements.append(cur)
        elif tok[0] == "property" and cur is not None:
            if len(tok) == 3 and tok[1] in _PLY_TYPES:
                cur[2].append((tok[2], _PLY_TYPES[tok[1]]))
            elif tok[1] == "list":
                cur[2].append((tok[-1], None))
            else:
                raise PlyError(f"{path}: unsupported property line {ln!r}")
        else:
            raise PlyError(f"{path}: unexpected header line {ln!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise PlyError(f"{path}: unsupported format {fmt!r}")
    if not elements or elements[0][0] != "vertex":
        raise PlyError(f"{path}: the first element must be 'vertex'")
    _, n, props = elements[0]
    if any(t is None for _, t in props):
        raise PlyError(f"{path}: list properties in the vertex element are not supported")
    order = ">" if fmt == "binary_big_endian" else "<"
    try:
        dt = np.dtype([(name, order + t) for name, t in props])
    except (ValueError, TypeError) as exc:
        raise PlyError(f"{path}: bad vertex properties ({exc})") from None
    if fmt == "ascii":
        if n == 0:
            txt = np.zeros((0, len(props)))
        else:
            try:
                txt = np.loadtxt(io.BytesIO(body), dtype=np.float64, max_rows=n, ndmin=2)
            except ValueError as exc:
                raise PlyError(f"{path}: bad ASCII vertex data ({exc})") from None
        if txt.shape != (n, len(props)):
            raise PlyError(f"{path}: expected {n}x{len(props)} ASCII values, got {txt.shape}")
        vert = np.empty(n, dt.newbyteorder("<"))
        for i, (name, _) in enumerate(props):
            vert[name] = txt[:, i]
    else:
        need = n * dt.itemsize
        if len(body) < need:
            raise PlyError(f"{path}: truncated vertex data ({len(body)} < {need} bytes)")
        vert = np.frombuffer(body[:need], dt).astype(dt.newbyteorder("<"))
    names = vert.dtype.names
    if not all(c in names for c in "xyz"):
        raise PlyError(f"{path}: vertex element lacks x/y/z")
    pts = np.stack([vert[c].astype(np.float32) for c in "xyz"], 1)
    colors = None
    if all(c in names for c in ("red", "green", "blue")):
        colors = np.stack([vert[c] for c in ("red", "green", "blue")], 1).astype(np.uint8)
    labels = vert["label"].copy() if "label" in names else None
    return {"points": pts, "colors": colors, "labels": labels, "vertex": vert, "format": fmt}
