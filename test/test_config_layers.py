"""Layered parameter files (config/base.yaml + one profile) and the launch files that load them.

Every key of every file must be a declared parameter of its node (the PARAMS tables of the node
modules), with a value of the right type inside its range (ParamSpec.validate); the merged
base + profile set must pass the reconstruction node's cross-parameter check. The launch files
cannot run here (no `launch` package on PyPI): they are compiled, their parameter layering is
exercised through their pure helper functions, and every config file / executable they name must
exist.
"""
from __future__ import annotations

import ast
import importlib.util
import py_compile
import re
from pathlib import Path

import pytest
import yaml

from wildseg3d_ros.ros import reconstruction_node as rn
from wildseg3d_ros.ros import segmentation_node as sn

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
SPECS = {"reconstruction_node": {s.name: s for s in rn.PARAMS},
         "segmentation_node": {s.name: s for s in sn.PARAMS}}
PROFILES = ("rgbd_cpu", "rgb_cpu", "dust3r_sam2_gpu", "jetson")
LAYERED = ("base.yaml",) + tuple(f"{p}.yaml" for p in PROFILES)


def _load(name):
    data = yaml.safe_load((CONFIG / name).read_text())
    assert set(data) <= set(SPECS), f"{name}: unknown node sections {set(data) - set(SPECS)}"
    return {node: body["ros__parameters"] for node, body in data.items()}


@pytest.mark.parametrize("name", LAYERED + ("wildseg3d.yaml",))
def test_every_key_declared_typed_and_in_range(name):
    for node, params in _load(name).items():
        for key, value in params.items():
            assert key in SPECS[node], f"{name}: {node} declares no parameter {key!r}"
            err = SPECS[node][key].validate(value)
            assert err is None, f"{name}: {node}.{key}: {err}"


def test_base_covers_every_parameter_with_defaults():
    base = _load("base.yaml")
    for node, specs in SPECS.items():
        missing = set(specs) - set(base[node])
        assert not missing, (f"config/base.yaml lacks {node} parameters {sorted(missing)}: a parameter was "
                             "added to the node; add it to base.yaml (and the docs) with its default")
        for key, spec in specs.items():  # base = the nodes' defaults (profiles change things)
            assert base[node][key] == spec.default, (node, key, base[node][key], spec.default)


def _merged(profile):
    base, prof = _load("base.yaml"), _load(f"{profile}.yaml")
    return {node: {**base[node], **prof.get(node, {})} for node in base}


@pytest.mark.parametrize("profile", PROFILES)
def test_merged_profile_is_consistent(profile):
    m = _merged(profile)
    rec, seg = m["reconstruction_node"], m["segmentation_node"]
    assert rn._validate_combination(rec) is None
    # both nodes agree on the segmenter / its model / device
    for key in ("segmenter", "sam2.config", "sam2.checkpoint", "device"):
        assert rec[key] == seg[key], (profile, key)
    if rec["backend"] == "dust3r":
        assert rec["dust3r.checkpoint"]
        size = rec["dust3r.image_size"]
        assert f"_{size}_" in Path(rec["dust3r.checkpoint"]).name  # checkpoint trained at that size
    if rec["segmenter"] == "sam2":
        from wildseg3d_ros.apps.gpu_check import KNOWN_CHECKPOINTS
        ck = Path(rec["sam2.checkpoint"]).name
        assert KNOWN_CHECKPOINTS[ck]["config"] == rec["sam2.config"]
    if profile == "rgbd_cpu":
        assert rec["backend"] == "rgbd" and rec["segmenter"] == "geometric" and rec["device"] == "cpu"
    if profile == "rgb_cpu":  # RGB camera, no weights
        assert rec["backend"] == "sfm" and rec["segmenter"] == "classical" and rec["device"] == "cpu"
    if profile == "jetson":
        gpu = _merged("dust3r_sam2_gpu")["reconstruction_node"]
        assert rec["keyframes.max_keyframes"] < gpu["keyframes.max_keyframes"]
        assert rec["dust3r.image_size"] == 224 and "hiera_t" in rec["sam2.config"]


def _import_launch(name):
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), ROOT / "launch" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # launch imports are inside functions: importable without them
    return mod


@pytest.mark.parametrize("name", ["wildseg3d_layered.launch.py", "bag_replay.launch.py", "wildseg3d.launch.py"])
def test_launch_files_compile_and_reference_existing_things(name, tmp_path):
    path = ROOT / "launch" / name
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    src = path.read_text()
    tree = ast.parse(src)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    scripts = set(re.findall(r'"(\w+) = wildseg3d_ros', (ROOT / "setup.py").read_text()))
    for exe in re.findall(r'executable="(\w+)"', src):
        assert exe in scripts | {"rviz2"}, f"{name}: executable {exe!r} is not a console script"
    for cfg in re.findall(r'"(\w+\.yaml)"', src):
        assert (CONFIG / cfg).is_file(), f"{name}: config/{cfg} missing"


def test_layered_parameters_helper():
    mod = _import_launch("wildseg3d_layered.launch.py")
    assert set(mod.PROFILES) == set(PROFILES)
    for p in PROFILES:
        assert (CONFIG / f"{p}.yaml").is_file()
    ov = {a: "" for a in mod.OVERRIDES}
    files = mod.layered_parameters(str(CONFIG), "jetson", ov, "reconstruction_node")
    assert files == [str(CONFIG / "base.yaml"), str(CONFIG / "jetson.yaml")]
    ov.update(device="cuda:1", sam2_checkpoint="/ckpt/sam2.1_hiera_tiny.pt", backend="rgbd",
              reconstruct_at="3", use_compressed="true")
    rec = mod.layered_parameters(str(CONFIG), "dust3r_sam2_gpu", ov, "reconstruction_node", use_sim_time=True)[-1]
    seg = mod.layered_parameters(str(CONFIG), "dust3r_sam2_gpu", ov, "segmentation_node")[-1]
    assert rec == {"device": "cuda:1", "sam2.checkpoint": "/ckpt/sam2.1_hiera_tiny.pt", "backend": "rgbd",
                   "keyframes.reconstruct_at": 3, "input.use_compressed": True, "use_sim_time": True}
    assert seg == {"device": "cuda:1", "sam2.checkpoint": "/ckpt/sam2.1_hiera_tiny.pt"}
    # every override maps to a declared parameter of the nodes it names, with a valid value type
    for arg, (pname, nodes, _t) in mod.OVERRIDES.items():
        for node in nodes:
            assert pname in SPECS[node], (arg, node, pname)
    for node, d in (("reconstruction_node", rec), ("segmentation_node", seg)):
        for k, v in d.items():
            if k != "use_sim_time":
                assert SPECS[node][k].validate(v) is None
    with pytest.raises(ValueError, match="unknown profile"):
        mod.layered_parameters(str(CONFIG), "gpu", ov, "reconstruction_node")
    with pytest.raises(ValueError):
        mod.layered_parameters(str(CONFIG), "rgbd_cpu", {"use_compressed": "yes"}, "reconstruction_node")
    names = [n for n, _, _ in mod.launch_arguments()]
    for a in ("profile", "image", "depth", "camera_info", "backend", "segmenter", "dust3r_checkpoint",
              "sam2_checkpoint", "device", "world_frame", "use_sim_time"):
        assert a in names


def test_bag_replay_command():
    mod = _import_launch("bag_replay.launch.py")
    assert mod.bag_play_command("/b", "0.5", True, "1.5", "/a /b") == [
        "ros2", "bag", "play", "/b", "--clock", "--rate", "0.5", "--start-offset", "1.5", "--loop",
        "--topics", "/a", "/b"]
    assert mod.bag_play_command("/b") == ["ros2", "bag", "play", "/b", "--clock", "--rate", "1.0"]
    with pytest.raises(ValueError, match="bag:="):
        mod.bag_play_command("")
    lay = mod._layered()
    assert callable(lay._launch_setup) and "use_sim_time" in [n for n, _, _ in lay.launch_arguments()]


def test_default_launch_config_covers_every_parameter():
    """config/wildseg3d.yaml (used by launch/wildseg3d.launch.py) sets every declared parameter."""
    import yaml

    from wildseg3d_ros.ros import reconstruction_node, segmentation_node
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "wildseg3d.yaml").read_text())
    for node, mod in (("reconstruction_node", reconstruction_node), ("segmentation_node", segmentation_node)):
        keys = set(data[node]["ros__parameters"])
        missing = {s.name for s in mod.PARAMS} - keys
        assert not missing, f"config/wildseg3d.yaml lacks {node} parameters {sorted(missing)}"


def test_fastdds_profile_is_shipped_and_used_by_every_launch_file():
    """config/fastdds_large_data.xml: a Fast DDS default participant profile with a shared-memory
    segment >= 8 MiB (the 512 KiB default loses large frames) plus UDPv4, installed by setup.py,
    and every launch file starts its processes with it (FASTDDS_DEFAULT_PROFILES_FILE)."""
    import xml.etree.ElementTree as ET

    path = CONFIG / "fastdds_large_data.xml"
    root = ET.parse(path).getroot()
    ns = {"d": "http://www.eprosima.com"}
    assert root.tag == "{http://www.eprosima.com}dds"
    descs = {d.find("d:transport_id", ns).text: d for d in root.iterfind(".//d:transport_descriptor", ns)}
    kinds = {d.find("d:type", ns).text for d in descs.values()}
    assert kinds == {"SHM", "UDPv4"}
    shm = next(d for d in descs.values() if d.find("d:type", ns).text == "SHM")
    assert int(shm.find("d:segment_size", ns).text) >= 8 * 1024 * 1024
    part = root.find(".//d:participant", ns)
    assert part.get("is_default_profile") == "true"
    used = [t.text for t in part.iterfind(".//d:userTransports/d:transport_id", ns)]
    assert set(used) == set(descs)
    assert part.find(".//d:useBuiltinTransports", ns).text == "false"
    assert 'glob("config/*.xml")' in (ROOT / "setup.py").read_text()
    for name in ("wildseg3d.launch.py", "wildseg3d_layered.launch.py", "bag_replay.launch.py"):
        src = (ROOT / "launch" / name).read_text()
        assert "fastdds_profile" in src and ("FASTDDS_DEFAULT_PROFILES_FILE" in src or "transport_env" in src), name
    lay = _import_launch("wildseg3d_layered.launch.py")
    assert lay.transport_env(str(path)) == {"FASTDDS_DEFAULT_PROFILES_FILE": str(path)}
    assert lay.transport_env("") == {}
    with pytest.raises(FileNotFoundError):
        lay.transport_env(str(CONFIG / "no_such_profile.xml"))
    default = dict((n, d) for n, d, _ in lay.launch_arguments())["fastdds_profile"]
    assert Path(default).resolve() == path.resolve()  # source tree fallback without ament
