"""Atomic, pickle-free persistence of completed scenes and of the segmentation session.

Layout of ``scene_dir`` (every name is made here, never taken from a message)::

    scene-20250101T120000123456Z-000007.npz   one completed scene per file (np.savez, no pickles)
    latest                                    JSON pointer {"magic", "version", "file"} to the newest
    session.json                              prompts / selections of the segmentation node
    .tmp-*                                    in-flight writes (removed on failure / next save)

Every write goes to a temporary file in ``scene_dir``, is flushed and ``fsync``-ed, then
``os.replace``-d onto its final name, and the directory is ``fsync``-ed: a crash at any point
leaves either the previous file or the new one, never a torn file. Scene files are numbered by a
monotonically increasing counter (the UTC timestamp is informative only), at most ``keep`` of them
are kept (oldest deleted first).

A scene file holds the arrays of the :class:`AlignedScene` (``scene__<field>``), of its
:class:`MaskCache` (``mask__labels``, ``mask__soft``), top-level numpy arrays of ``extra``
(``extra__<key>``), keyframe depth / pose priors (``kf__*``) and one ``__meta__`` uint8 array
holding UTF-8 JSON: ``magic`` (:data:`MAGIC`), ``version`` (:data:`FORMAT_VERSION`), the scalar
scene fields (loss, loss_history, frame_id, metric), the mask-cache object table, the JSON part of
``extra``, the keyframe metadata and, for verification, the dtype and shape of every array.
Loading uses ``allow_pickle=False``; a corrupt, truncated, foreign or wrong-version file raises
:class:`StoreError` with a message that says which file and what is wrong.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import re
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..types import AlignedScene, Keyframe, MaskCache

log = logging.getLogger(__name__)

MAGIC = "wildseg3d-scene"
SESSION_MAGIC = "wildseg3d-session"
FORMAT_VERSION = 1
LATEST_NAME = "latest"
SESSION_NAME = "session.json"
SCENE_RE = re.compile(r"^scene-(\d{8}T\d{12}Z)-(\d{6,})\.npz$")
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 600.0
#: refuse to parse ``__meta__`` above this size (bytes)
MAX_META_BYTES = 64 << 20
#: largest session file read back
MAX_SESSION_BYTES = 16 << 20

_SCENE_ARRAY_FIELDS = ("pts3d", "conf", "poses", "K", "rgb", "weights", "stamps")
_SCENE_JSON_FIELDS = ("loss", "loss_history", "frame_id", "metric")


class StoreError(RuntimeError):
    """A scene / session file that cannot be written or is refused on load."""


# --------------------------------------------------------------------------------- helpers
def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        if o.dtype.kind not in "biuf":
            raise TypeError(f"array of dtype {o.dtype} is not JSON-serialisable")
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON-serialisable")


def _dumps(obj) -> str:
    try:
        return json.dumps(obj, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"metadata is not JSON-serialisable: {exc}") from None


def _resolve_dir(scene_dir) -> Path:
    if scene_dir is None or str(scene_dir).strip() == "":
        raise StoreError("scene_dir is empty")
    d = Path(os.path.expanduser(str(scene_dir))).resolve()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create scene_dir {d}: {exc}") from None
    if not d.is_dir():
        raise StoreError(f"scene_dir {d} is not a directory")
    return d


def _inside(d: Path, name: str) -> Path:
    """``d / name`` for a store-made name, checked to stay directly inside ``d``."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise StoreError(f"refusing file name {name!r}")
    p = d / name
    if p.resolve().parent != d:
        raise StoreError(f"{p} resolves outside scene_dir {d}")
    return p


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(d: Path, name: str, write) -> Path:
    """Write via ``write(fileobj)`` to a temp file in ``d``, fsync, rename to ``name``, fsync ``d``."""
    final = _inside(d, name)
    tmp = _inside(d, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(str(tmp), str(final))
    except BaseException:
        try:
            os.unlink(str(tmp))
        except OSError:
            pass
        raise
    _fsync_dir(d)
    return final


def _scene_files(d: Path) -> List[Tuple[int, Path]]:
    """(counter, path) of the regular scene files in ``d``, oldest first."""
    out = []
    for p in d.iterdir():
        m = SCENE_RE.match(p.name)
        if m and not p.is_symlink() and p.is_file():
            out.append((int(m.group(2)), p))
    out.sort()
    return out


def _cleanup_tmp(d: Path) -> None:
    now = time.time()
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX):
            try:
                if now - p.lstat().st_mtime > STALE_TMP_S:
                    p.unlink()
            except OSError:
                pass


# ------------------------------------------------------------------------------------ save
def _keyframes_to_meta(keyframes_meta, arrays: Dict[str, np.ndarray]) -> Optional[list]:
    if keyframes_meta is None:
        return None
    out = []
    for i, kf in enumerate(keyframes_meta):
        if isinstance(kf, Keyframe):
            d = {"index": int(kf.index), "stamp": float(kf.stamp), "frame_id": str(kf.frame_id),
                 "K": np.asarray(kf.K, np.float64).tolist()}
            if kf.pose_prior is not None:
                arrays[f"kf__pose_prior__{i}"] = np.asarray(kf.pose_prior)
            if kf.depth is not None:
                arrays[f"kf__depth__{i}"] = np.asarray(kf.depth)
            out.append(d)
        elif isinstance(kf, dict):
            d = {}
            for k, v in kf.items():
                if isinstance(v, np.ndarray) and k in ("depth", "pose_prior"):
                    arrays[f"kf__{k}__{i}"] = v
                else:
                    d[str(k)] = v
            out.append(d)
        else:
            raise StoreError(f"keyframes_meta[{i}] must be a Keyframe or a dict, got "
                             f"{type(kf).__name__}")
    return out


def _check_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.hasobject or a.dtype.kind not in "biufcSU" or a.dtype.names is not None:
        raise StoreError(f"array {name!r} has unsupported dtype {a.dtype} (no pickles)")
    return a


def scene_arrays_and_meta(scene: AlignedScene, extra: Optional[dict] = None,
                          keyframes_meta=None) -> Tuple[Dict[str, np.ndarray], dict]:
    """Split a scene (+ extra, keyframe metadata) into pickle-free arrays and JSON metadata."""
    arrays: Dict[str, np.ndarray] = {}
    meta: Dict[str, Any] = {"magic": MAGIC, "version": FORMAT_VERSION,
                            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    scalars = {}
    for f in dataclasses.fields(scene):
        v = getattr(scene, f.name)
        if f.name == "mask_cache":
            continue
        if isinstance(v, np.ndarray) or f.name in _SCENE_ARRAY_FIELDS:
            if v is not None:
                arrays[f"scene__{f.name}"] = _check_array(f.name, v)
        else:
            scalars[f.name] = list(v) if isinstance(v, (list, tuple)) else v
    meta["scene"] = scalars
    mc = scene.mask_cache
    if mc is not None:
        arrays["mask__labels"] = _check_array("mask.labels", mc.labels)
        arrays["mask__soft"] = _check_array("mask.soft", mc.soft)
        objs = mc.objects or {}
        meta["mask_objects"] = [[int(k), v] for k, v in objs.items()]
    extra_json = {}
    for k, v in (extra or {}).items():
        if not isinstance(k, str):
            raise StoreError(f"extra keys must be strings, got {k!r}")
        if isinstance(v, np.ndarray):
            arrays[f"extra__{k}"] = _check_array(f"extra.{k}", v)
        else:
            extra_json[k] = v
    meta["extra"] = extra_json
    kfm = _keyframes_to_meta(keyframes_meta, arrays)
    if kfm is not None:
        meta["keyframes_meta"] = kfm
    for k in arrays:
        if not re.fullmatch(r"[A-Za-z0-9_]+", k):
            raise StoreError(f"array key {k!r} must be alphanumeric/underscore")
    meta["arrays"] = {k: [a.dtype.str, list(a.shape)] for k, a in arrays.items()}
    return arrays, meta


def save_scene(scene_dir, scene: AlignedScene, extra: Optional[dict] = None,
               keyframes_meta=None, keep: int = 5, compress: bool = False) -> Path:
    """Atomically save ``scene`` into a new ``scene-<UTC>-<counter>.npz`` and point ``latest`` at it.

    ``extra``: JSON-serialisable dict (prompts, selections, stamps, frame ids...); its top-level
    numpy arrays are stored as arrays, bit-exact. ``keyframes_meta``: list of
    :class:`Keyframe` or dicts (depth / pose priors stored as arrays). ``keep``: number of scene
    files kept (>= 1), the oldest are deleted. Returns the path of the new file.
    """
    if int(keep) < 1:
        raise StoreError(f"keep must be >= 1, got {keep}")
    d = _resolve_dir(scene_dir)
    arrays, meta = scene_arrays_and_meta(scene, extra, keyframes_meta)
    meta_bytes = _dumps(meta).encode("utf-8")
    files = _scene_files(d)
    counter = files[-1][0] + 1 if files else 1
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"scene-{stamp}-{counter:06d}.npz"
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(meta_bytes, np.uint8)
    saver = np.savez_compressed if compress else np.savez

    path = _atomic_write(d, name, lambda f: saver(f, allow_pickle=False, **payload))
    _write_latest(d, name)
    # retention: oldest first, never the file just written
    files = _scene_files(d)
    for _, p in files[:max(0, len(files) - int(keep))]:
        if p != path:
            try:
                p.unlink()
            except OSError as exc:  # pragma: no cover
                log.warning("could not delete old scene %s: %s", p, exc)
    _cleanup_tmp(d)
    return path


def _write_latest(d: Path, name: str) -> None:
    body = _dumps({"magic": MAGIC, "version": FORMAT_VERSION, "file": name}).encode()
    _atomic_write(d, LATEST_NAME, lambda f: f.write(body))


# ------------------------------------------------------------------------------------ load
def _read_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise StoreError(f"cannot read scene file {path}: {exc}") from None
    if not data.startswith(b"PK"):
        raise StoreError(f"{path} is not a scene file (not an npz/zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError,
            zipfile.LargeZipFile, RuntimeError) as exc:
        raise StoreError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _parse_meta(path: Path, arrays: Dict[str, np.ndarray]) -> dict:
    raw = arrays.pop("__meta__", None)
    if raw is None:
        raise StoreError(f"{path} is a foreign npz file (no wildseg3d metadata)")
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_META_BYTES:
        raise StoreError(f"{path}: malformed metadata block")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{path}: metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("magic") != MAGIC:
        raise StoreError(f"{path} is a foreign file (magic {meta.get('magic') if isinstance(meta, dict) else None!r}, "
                         f"expected {MAGIC!r})")
    ver = meta.get("version")
    if ver != FORMAT_VERSION:
        raise StoreError(f"{path} has format version {ver!r}; this code reads version "
                         f"{FORMAT_VERSION} only")
    listed = meta.get("arrays")
    if not isinstance(listed, dict) or set(listed) != set(arrays):
        raise StoreError(f"{path}: arrays {sorted(arrays)} do not match the metadata")
    for k, a in arrays.items():
        spec = listed[k]
        if not (isinstance(spec, list) and len(spec) == 2
                and spec[0] == a.dtype.str and list(spec[1]) == list(a.shape)):
            raise StoreError(f"{path}: array {k!r} is {a.dtype.str}{list(a.shape)}, metadata "
                             f"says {spec!r}")
    return meta


def _validate_scene(path: Path, arrays: Dict[str, np.ndarray]) -> Tuple[int, int, int]:
    need = ["scene__pts3d", "scene__conf", "scene__poses", "scene__K", "scene__rgb"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise StoreError(f"{path}: missing arrays {missing}")
    pts = arrays["scene__pts3d"]
    if pts.ndim != 4 or pts.shape[-1] != 3:
        raise StoreError(f"{path}: pts3d has shape {pts.shape}, expected (V, H, W, 3)")
    V, H, W = pts.shape[:3]
    expect = {"scene__conf": (V, H, W), "scene__poses": (V, 4, 4), "scene__K": (V, 3, 3),
              "scene__rgb": (V, H, W, 3), "scene__weights": (V, H, W),
              "mask__labels": (V, H, W), "mask__soft": (V, H, W)}
    for k, shp in expect.items():
        if k in arrays and arrays[k].shape != shp:
            raise StoreError(f"{path}: {k[k.index('__') + 2:]} has shape {arrays[k].shape}, "
                             f"expected {shp}")
    if ("mask__labels" in arrays) != ("mask__soft" in arrays):
        raise StoreError(f"{path}: mask cache is incomplete")
    return V, H, W


def load_scene(path) -> Tuple[AlignedScene, dict]:
    """Load a scene file written by :func:`save_scene` -> ``(scene, extra)``.

    ``extra`` is the saved ``extra`` dict (arrays restored bit-exact) plus, when saved,
    ``extra["keyframes_meta"]`` (list of dicts, ``depth``/``pose_prior`` arrays restored) and
    always ``extra["_store"]`` = {"file", "created_utc", "version"}.
    """
    path = Path(path)
    arrays = _read_npz(path)
    meta = _parse_meta(path, arrays)
    _validate_scene(path, arrays)
    known = {f.name for f in dataclasses.fields(AlignedScene)}
    kwargs = {}
    for k, a in arrays.items():
        if k.startswith("scene__") and k[7:] in known:
            kwargs[k[7:]] = a
    scalars = meta.get("scene") or {}
    if not isinstance(scalars, dict):
        raise StoreError(f"{path}: malformed scene metadata")
    for k, v in scalars.items():
        if k in known and k not in kwargs and k != "mask_cache":
            kwargs[k] = v
    if "mask__labels" in arrays:
        objs = {}
        try:
            for k, v in meta.get("mask_objects") or []:
                objs[int(k)] = v
        except (TypeError, ValueError):
            raise StoreError(f"{path}: malformed mask-cache object table") from None
        kwargs["mask_cache"] = MaskCache(labels=arrays["mask__labels"],
                                         soft=arrays["mask__soft"], objects=objs)
    try:
        scene = AlignedScene(**kwargs)
    except TypeError as exc:
        raise StoreError(f"{path}: cannot rebuild the scene ({exc})") from None
    extra = dict(meta.get("extra") or {})
    for k, a in arrays.items():
        if k.startswith("extra__"):
            extra[k[7:]] = a
    if "keyframes_meta" in meta:
        kfm = [dict(x) for x in meta["keyframes_meta"]]
        for k, a in arrays.items():
            m = re.fullmatch(r"kf__(depth|pose_prior)__(\d+)", k)
            if m and int(m.group(2)) < len(kfm):
                kfm[int(m.group(2))][m.group(1)] = a
        extra["keyframes_meta"] = kfm
    extra["_store"] = {"file": path.name, "created_utc": meta.get("created_utc"),
                       "version": meta.get("version")}
    return scene, extra


def latest_path(scene_dir) -> Optional[Path]:
    """The file the ``latest`` pointer names (validated), else the newest scene file, else None."""
    d = _resolve_dir(scene_dir)
    ptr = d / LATEST_NAME
    if ptr.is_file() and not ptr.is_symlink():
        try:
            info = json.loads(ptr.read_text("utf-8"))
            name = info.get("file") if isinstance(info, dict) and info.get("magic") == MAGIC \
                else None
        except (OSError, ValueError, UnicodeDecodeError):
            name = None
        if isinstance(name, str) and SCENE_RE.match(name):
            p = _inside(d, name)
            if p.is_file() and not p.is_symlink():
                return p
        log.warning("scene pointer %s is invalid or dangling; using the newest scene file", ptr)
    files = _scene_files(d)
    return files[-1][1] if files else None


def load_latest(scene_dir) -> Optional[Tuple[AlignedScene, dict]]:
    """Load the newest good scene of ``scene_dir``; None when it holds no scene file.

    Follows the ``latest`` pointer; if that file is refused, falls back to the other scene
    files, newest first (with a warning). Raises :class:`StoreError` when scene files exist but
    none can be loaded.
    """
    d = _resolve_dir(scene_dir)
    first = latest_path(d)
    if first is None:
        return None
    candidates = [first] + [p for _, p in reversed(_scene_files(d)) if p != first]
    errors = []
    for p in candidates:
        try:
            return load_scene(p)
        except StoreError as exc:
            errors.append(str(exc))
            log.warning("refused scene file: %s", exc)
    raise StoreError(f"no loadable scene in {d}: " + "; ".join(errors))


# ------------------------------------------------------------------------------------ session
def save_session(scene_dir, prompts: dict) -> Path:
    """Atomically write the segmentation session (prompts, selections) as ``session.json``."""
    if not isinstance(prompts, dict):
        raise StoreError(f"session must be a dict, got {type(prompts).__name__}")
    d = _resolve_dir(scene_dir)
    body = _dumps({"magic": SESSION_MAGIC, "version": FORMAT_VERSION,
                   "saved_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "session": prompts}).encode("utf-8")
    return _atomic_write(d, SESSION_NAME, lambda f: f.write(body))


def load_session(scene_dir) -> Optional[dict]:
    """The dict given to :func:`save_session`, None when none was saved; StoreError if refused."""
    d = _resolve_dir(scene_dir)
    p = _inside(d, SESSION_NAME)
    if not p.exists():
        return None
    if p.is_symlink() or not p.is_file():
        raise StoreError(f"{p} is not a regular file")
    try:
        if p.stat().st_size > MAX_SESSION_BYTES:
            raise StoreError(f"{p} is larger than {MAX_SESSION_BYTES} bytes")
        info = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{p} is corrupt ({exc})") from None
    if not isinstance(info, dict) or info.get("magic") != SESSION_MAGIC:
        raise StoreError(f"{p} is not a wildseg3d session file")
    if info.get("version") != FORMAT_VERSION:
        raise StoreError(f"{p} has format version {info.get('version')!r}; expected "
                         f"{FORMAT_VERSION}")
    sess = info.get("session")
    if not isinstance(sess, dict):
        raise StoreError(f"{p}: malformed session")
    return sess
