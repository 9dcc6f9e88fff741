"""The segmentation node's scene input: a wildseg3d/scene PointCloud2 checked field by field
before it replaces the current scene, then decoded (core.scene_codec).

The scene layout is fixed (core.cloud.scene_cloud_dtype): x y z rgb confidence FLOAT32,
keyframe UINT32, label INT32, one value each. A cloud that lacks one of them, declares another
type (e.g. a float32 ``label``: its bytes would be read as other labels), repeats a name, or
whose data is shorter / longer than its header says is refused with the reason; the current
scene is kept."""
from __future__ import annotations

from sensor_msgs.msg import PointCloud2, PointField

from ..core.output import cloud as corecloud
from ..core.prompts.session_file import scene_identity as _identity
from ..core.output.scene_codec import SceneDecodeError, scene_from_cloud_array
from . import convert

_NAMES = {PointField.INT8: "INT8", PointField.UINT8: "UINT8", PointField.INT16: "INT16",
          PointField.UINT16: "UINT16", PointField.INT32: "INT32", PointField.UINT32: "UINT32",
          PointField.FLOAT32: "FLOAT32", PointField.FLOAT64: "FLOAT64"}
SCENE_FIELDS = {"x": PointField.FLOAT32, "y": PointField.FLOAT32, "z": PointField.FLOAT32,
                "rgb": PointField.FLOAT32, "confidence": PointField.FLOAT32,
                "keyframe": PointField.UINT32, "label": PointField.INT32}


class SceneMessageError(ValueError):
    """A scene message that cannot replace the current scene (the reason is the message)."""


def scene_identity(msg: PointCloud2) -> str:
    return _identity(msg.height, msg.width, f"{msg.point_step}/{msg.row_step}", msg.header.frame_id, msg.data,
                     [(f.name, int(f.offset), int(f.datatype), int(f.count)) for f in msg.fields])


def check_scene_fields(msg: PointCloud2) -> None:
    names = [f.name for f in msg.fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SceneMessageError(f"fields {dup} appear more than once")
    missing = [n for n in SCENE_FIELDS if n not in names]
    if missing:
        raise SceneMessageError(f"scene cloud lacks the field(s) {missing} (needs {list(SCENE_FIELDS)}; "
                                f"has {names})")
    for f in msg.fields:
        want = SCENE_FIELDS.get(f.name)
        if want is None:
            continue
        if int(f.datatype) != want:
            raise SceneMessageError(f"field '{f.name}' is {_NAMES.get(int(f.datatype), f'datatype {f.datatype}')}, "
                                    f"expected {_NAMES[want]}")
        if int(f.count) != 1:
            raise SceneMessageError(f"field '{f.name}' has count {f.count}, expected 1")
        size = {PointField.INT8: 1, PointField.UINT8: 1, PointField.INT16: 2, PointField.UINT16: 2}.get(int(f.datatype), 4)
        if int(f.offset) < 0 or int(f.offset) + size > int(msg.point_step):
            raise SceneMessageError(f"field '{f.name}' (offset {f.offset}, {size} bytes) does not fit in point_step "
                                    f"{msg.point_step}")
    if int(msg.row_step) != int(msg.width) * int(msg.point_step):
        raise SceneMessageError(f"row_step {msg.row_step} is not width x point_step = {msg.width} x {msg.point_step}")
    expect = int(msg.row_step) * int(msg.height)
    if len(msg.data) != expect:
        raise SceneMessageError(f"data is {'truncated' if len(msg.data) < expect else 'padded'}: {len(msg.data)} bytes, "
                                f"the header says {msg.height} rows x {msg.row_step} bytes = {expect}")


def decode_scene(msg: PointCloud2):
    """The AlignedScene of a non-empty scene message; raises SceneMessageError with the reason."""
    check_scene_fields(msg)
    try:
        arr = convert.cloud_to_struct(msg)
        return scene_from_cloud_array(arr, msg.header.frame_id)
    except (corecloud.CloudError, SceneDecodeError, ValueError) as e:
        raise SceneMessageError(str(e)) from None
