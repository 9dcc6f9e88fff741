"""The saved prompt session of the segmentation node (ROS-free): its JSON body and the scene
identity it is keyed by. The file itself is written atomically by core.store.save_session.

A prompt is ``(kind, data, positive, new_object)``: kind ``'point'`` with data = xyz (3 finite
floats, scene frame), or kind ``'pixel'`` with data = (keyframe, u, v)."""
from __future__ import annotations

import hashlib
from typing import List, Optional

import numpy as np

SESSION_FORMAT = "wildseg3d-prompts-1"


def scene_identity(height: int, width: int, point_step: int, frame_id: str, data, fields=()) -> str:
    """Identity of a published scene: SHA-1 hash of the cloud's data bytes, size, field layout
    ((name, offset, datatype, count) per field) and frame (the stamp is left out: a restored scene
    is republished with a new stamp but identical bytes). A content identity, not a security
    check: SHA-1 because it is the fastest hash hashlib has on current CPUs (their SHA
    instructions: 15 ms for a 27 MB scene on the development VM, BLAKE2b 41 ms), and the scene's
    preparation waits for it."""
    h = hashlib.sha1(usedforsecurity=False)
    layout = ";".join(f"{n},{o},{t},{c}" for n, o, t, c in fields)
    h.update(f"{height}x{width}:{point_step}:{frame_id}:{layout}:".encode())
    h.update(memoryview(data))
    return h.hexdigest()


def prompt_to_json(kind, data, positive, new_object) -> dict:
    d = {"kind": kind, "positive": bool(positive), "new_object": bool(new_object)}
    if kind == "point":
        d["xyz"] = [float(x) for x in data]
    else:
        d["keyframe"], d["u"], d["v"] = int(data[0]), float(data[1]), float(data[2])
    return d


def prompt_from_json(d) -> tuple:
    """Validated prompt tuple from a saved dict (ValueError / KeyError / TypeError if malformed)."""
    kind = d["kind"]
    if kind == "point":
        xyz = np.array(d["xyz"], dtype=np.float64).reshape(-1)
        if xyz.shape != (3,) or not np.isfinite(xyz).all():
            raise ValueError(f"bad 3D prompt {d['xyz']!r}")
        data = xyz
    elif kind == "pixel":
        data = (int(d["keyframe"]), float(d["u"]), float(d["v"]))
    else:
        raise ValueError(f"unknown prompt kind {kind!r}")
    return kind, data, bool(d["positive"]), bool(d["new_object"])


def session_body(scene_id: str, frame_id: str, prompts) -> dict:
    return {"format": SESSION_FORMAT, "scene_id": scene_id, "frame_id": frame_id,
            "prompts": [prompt_to_json(*p) for p in prompts]}


def session_prompts(body: Optional[dict], scene_id: str) -> Optional[List[tuple]]:
    """The saved prompts when ``body`` is a session of this scene, else None; raises ValueError /
    KeyError / TypeError when it is of this scene but malformed."""
    if not body or body.get("format") != SESSION_FORMAT or body.get("scene_id") != scene_id:
        return None
    return [prompt_from_json(x) for x in body.get("prompts") or []]
