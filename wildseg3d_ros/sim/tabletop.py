"""Embedded default scene: a procedural, seeded tabletop scene rendered by vectorised ray casting.

A closed room (floor, four walls, ceiling; about 5 m x 5 m x 3 m) holds a table (top 1.2 x 0.8 m,
top surface at z = 0.75 m, four legs) with ``num_objects`` boxes / spheres / upright cylinders
(6-20 cm) resting on it without overlapping.  :func:`render_view` casts one ray per pixel through
every primitive at once with numpy (a Python loop runs over the ~16 primitives only) and returns

* ``rgb``      H x W x 3 uint8 (Lambertian shading, one directional light + ambient, multiplicative
  world-position textures so feature matchers find corners and colour segmentation still works),
* ``depth``    H x W float32 metres, **z-depth** along the optical axis (every pixel hits: closed room),
* ``instance`` H x W int32 instance id of the primitive hit.

Conventions (see :mod:`wildseg3d_ros.core.types`): world frame z up, metres; poses are
camera-to-world 4x4 float64 with OpenCV camera axes (x right, y down, z forward).  Pixel (col j,
row i) is the ray through ``K^-1 [j, i, 1]`` (integer pixel centres), so
``X_cam = depth[i, j] * K^-1 [j, i, 1]`` back-projects exactly onto the hit surface.

Instance ids: 1 floor, 2 walls (and ceiling), 3 table (top and legs), 4.. objects
(``SceneDef.object_ids``).  Everything is deterministic for a fixed seed.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ..core.geometry import look_at, rotation_from_rotvec

FLOOR_ID = 1
WALL_ID = 2
TABLE_ID = 3
FIRST_OBJECT_ID = 4

TABLE_HEIGHT = 0.75
TABLE_SIZE = (1.2, 0.8)
TABLE_THICKNESS = 0.04
ROOM_HALF = (2.5, 2.5)
ROOM_HEIGHT = 3.0

_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------------------------
@dataclass
class Primitive:
    """One world-frame primitive.

    kind: 'box' | 'sphere' | 'cylinder' | 'cup' | 'plane'.
    box:      ``center`` (3,), ``half_extents`` (3,), ``yaw`` (rad, about world z).
    sphere:   ``center``, ``radius``.
    cylinder: upright (axis = world z); ``center`` is the middle of the axis, ``radius``, ``height``.
    cup:      an upright cylinder open at the top, hollow: walls and bottom ``wall`` thick
              (a mug or a can seen through its opening).
    plane:    ``center`` is a point on the plane, ``normal`` the unit normal (infinite plane; the
              room is the inside of six planes).
    color: base RGB in [0, 1]; texture: 'checker' | 'stripes' | 'noise' | 'wood' | 'wall' | 'fine';
    texture_scale: pattern period in metres; tex_seed: seeds the texture hash.
    """

    kind: str
    instance_id: int
    name: str
    color: np.ndarray
    texture: str = "noise"
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    half_extents: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    radius: float = 0.0
    height: float = 0.0
    normal: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    wall: float = 0.004
    texture_scale: float = 0.02
    tex_seed: int = 0

    def rotation(self) -> np.ndarray:
        """World-from-local rotation (yaw about z; identity for non-boxes)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def bounding_radius(self) -> float:
        if self.kind == "box":
            return float(np.linalg.norm(self.half_extents))
        if self.kind == "sphere":
            return float(self.radius)
        if self.kind in ("cylinder", "cup"):
            return float(np.hypot(self.radius, self.height / 2))
        return float("inf")

    def footprint_radius(self) -> float:
        """Radius of the xy footprint (for non-overlapping placement)."""
        if self.kind == "box":
            return float(np.hypot(self.half_extents[0], self.half_extents[1]))
        return float(self.radius)

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (metres, negative inside) of world points (..., 3) to this surface."""
        p = np.asarray(points, dtype=np.float64) - self.center
        if self.kind == "plane":
            return p @ self.normal
        if self.kind == "sphere":
            return np.linalg.norm(p, axis=-1) - self.radius
        if self.kind == "box":
            q = np.abs(p @ self.rotation()) - self.half_extents
            out = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
            return out + np.minimum(q.max(-1), 0.0)
        if self.kind == "cylinder":
            q = np.stack([np.linalg.norm(p[..., :2], axis=-1) - self.radius,
                          np.abs(p[..., 2]) - self.height / 2], -1)
            return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)
        if self.kind == "cup":
            rad = np.linalg.norm(p[..., :2], axis=-1)
            q = np.stack([rad - self.radius, np.abs(p[..., 2]) - self.height / 2], -1)
            outer = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)
            # the cavity: radius - wall, from the bottom's top face up through the opening
            lo = -self.height / 2 + self.wall
            qc = np.stack([rad - (self.radius - self.wall), lo - p[..., 2]], -1)
            cavity = np.linalg.norm(np.maximum(qc, 0.0), axis=-1) + np.minimum(qc.max(-1), 0.0)
            return np.maximum(outer, -cavity)
        raise ValueError(self.kind)

    def top_z(self) -> float:
        if self.kind == "box":
            return float(self.center[2] + self.half_extents[2])
        if self.kind == "sphere":
            return float(self.center[2] + self.radius)
        if self.kind in ("cylinder", "cup"):
            return float(self.center[2] + self.height / 2)
        return float("inf")


@dataclass
class SceneDef:
    primitives: list  # list[Primitive]
    object_ids: List[int]
    names: Dict[int, str]
    table_center: np.ndarray
    seed: int = 0
    light_dir: np.ndarray = field(default_factory=lambda: _normalize(np.array([0.35, -0.45, 1.0])))
    ambient: float = 0.38

    def primitives_of(self, instance_id: int) -> List[Primitive]:
        return [p for p in self.primitives if p.instance_id == instance_id]

    def sdf(self, instance_id: int, points: np.ndarray) -> np.ndarray:
        """Distance of world points to the union of the primitives with this instance id."""
        prims = self.primitives_of(instance_id)
        if not prims:
            raise KeyError(instance_id)
        return np.min(np.stack([p.sdf(points) for p in prims]), axis=0)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


_HUE_NAMES = [(15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
              (255, "blue"), (290, "purple"), (335, "magenta"), (360, "red")]


def _hue_name(h_deg: float) -> str:
    for lim, name in _HUE_NAMES:
        if h_deg < lim:
            return name
    return "red"


def make_tabletop_scene(seed: int = 0, num_objects: int = 5) -> SceneDef:
    """Room + table + ``num_objects`` non-overlapping objects on the table top (ids 4, 5, ...)."""
    rng = np.random.default_rng(seed)
    prims: List[Primitive] = []
    names: Dict[int, str] = {FLOOR_ID: "floor", WALL_ID: "wall", TABLE_ID: "table"}

    # --- room: inside of a box made of 6 planes (normals point inwards) ---------------------
    hx, hy = ROOM_HALF
    prims.append(Primitive("plane", FLOOR_ID, "floor", np.array([0.55, 0.38, 0.24]), "wood",
                           center=np.zeros(3), normal=np.array([0.0, 0.0, 1.0]),
                           texture_scale=0.14, tex_seed=int(rng.integers(1 << 30))))
    wall_col = np.array([0.80, 0.78, 0.70])
    for c, n in [((hx, 0, 0), (-1, 0, 0)), ((-hx, 0, 0), (1, 0, 0)),
                 ((0, hy, 0), (0, -1, 0)), ((0, -hy, 0), (0, 1, 0)),
                 ((0, 0, ROOM_HEIGHT), (0, 0, -1))]:
        prims.append(Primitive("plane", WALL_ID, "wall", wall_col.copy(), "wall",
                               center=np.array(c, float), normal=np.array(n, float),
                               texture_scale=0.5, tex_seed=int(rng.integers(1 << 30))))

    # --- table: top + 4 legs ------------------------------------------------------------------
    tx, ty = TABLE_SIZE
    table_col = np.array([0.74, 0.72, 0.68])
    tseed = int(rng.integers(1 << 30))
    prims.append(Primitive("box", TABLE_ID, "table", table_col, "fine",
                           center=np.array([0.0, 0.0, TABLE_HEIGHT - TABLE_THICKNESS / 2]),
                           half_extents=np.array([tx / 2, ty / 2, TABLE_THICKNESS / 2]),
                           texture_scale=0.012, tex_seed=tseed))
    leg_h = TABLE_HEIGHT - TABLE_THICKNESS
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append(Primitive("box", TABLE_ID, "table", table_col * 0.8, "fine",
                                   center=np.array([sx * (tx / 2 - 0.06), sy * (ty / 2 - 0.06), leg_h / 2]),
                                   half_extents=np.array([0.025, 0.025, leg_h / 2]),
                                   texture_scale=0.012, tex_seed=tseed))

    # --- objects ------------------------------------------------------------------------------
    kinds = ["box", "sphere", "cylinder"]
    kind_list = (kinds * ((num_objects + 2) // 3))[:num_objects]
    if num_objects > 3:
        kind_list = kinds + list(rng.choice(kinds, num_objects - 3))
    kind_list = [kind_list[i] for i in rng.permutation(num_objects)] if num_objects else []
    hue0 = rng.uniform(0, 360)
    hues = (hue0 + 360.0 * np.arange(num_objects) / max(num_objects, 1)) % 360
    hues = hues[rng.permutation(num_objects)] if num_objects else hues
    textures = ["checker", "stripes", "noise"]

    def _layout():
        objs: List[Primitive] = []
        obj_names: Dict[int, str] = {}
        placed: List[Tuple[np.ndarray, float]] = []
        margin = 0.06
        for k, kind in enumerate(kind_list):
            oid = FIRST_OBJECT_ID + k
            sat = rng.uniform(0.75, 0.95)
            val = rng.uniform(0.75, 0.95)
            col = np.array(colorsys.hsv_to_rgb(hues[k] / 360.0, sat, val))
            tex = textures[int(rng.integers(3))]
            tscale = float(rng.uniform(0.018, 0.03))
            tsd = int(rng.integers(1 << 30))
            for attempt in range(2000):
                shrink = 1.0 if attempt < 1000 else 0.6  # fall back to smaller objects if crowded
                if kind == "box":
                    dims = rng.uniform(0.06, 0.20, 3) * shrink
                    dims = np.maximum(dims, 0.06)
                    prim = Primitive("box", oid, "", col, tex, half_extents=dims / 2,
                                     yaw=float(rng.uniform(0, np.pi)), texture_scale=tscale, tex_seed=tsd)
                    zc = TABLE_HEIGHT + dims[2] / 2
                elif kind == "sphere":
                    r = max(rng.uniform(0.03, 0.10) * shrink, 0.03)
                    prim = Primitive("sphere", oid, "", col, tex, radius=r, texture_scale=tscale, tex_seed=tsd)
                    zc = TABLE_HEIGHT + r
                else:
                    r = max(rng.uniform(0.03, 0.08) * shrink, 0.03)
                    h = max(rng.uniform(0.08, 0.20) * shrink, 0.06)
                    prim = Primitive("cylinder", oid, "", col, tex, radius=r, height=h,
                                     texture_scale=tscale, tex_seed=tsd)
                    zc = TABLE_HEIGHT + h / 2
                fr = prim.footprint_radius()
                lim = np.array([tx / 2 - margin - fr, ty / 2 - margin - fr])
                if np.any(lim <= 0):
                    continue
                xy = rng.uniform(-lim, lim)
                if all(np.hypot(*(xy - q)) > fr + qr + 0.025 for q, qr in placed):
                    break
            else:
                raise RuntimeError(f"could not place {num_objects} objects on the table")
            prim.center = np.array([xy[0], xy[1], zc])
            placed.append((xy, fr))
            name = f"{_hue_name(hues[k])} {kind}"
            if name in obj_names.values():
                name = f"{name} {oid}"
            prim.name = name
            obj_names[oid] = name
            objs.append(prim)
        return objs, obj_names

    # Rejection-sample whole layouts until every object is visible (>= ~300 px at 640x480) in at
    # least 4 of the 5 views of the default trajectory (camera_trajectory(5, scene, seed=seed));
    # keep the best layout if none qualifies within _LAYOUT_ATTEMPTS.
    table_center = np.array([0.0, 0.0, TABLE_HEIGHT])
    best = None
    for _ in range(_LAYOUT_ATTEMPTS if num_objects else 1):
        objs, obj_names = _layout()
        scene = SceneDef(primitives=prims + objs, object_ids=[p.instance_id for p in objs],
                         names={**names, **obj_names}, table_center=table_center.copy(), seed=seed)
        score = _visibility_score(scene, seed) if num_objects else 5
        if best is None or score > best[0]:
            best = (score, scene)
        if score >= _VIS_TARGET:
            break
    return best[1]


_LAYOUT_ATTEMPTS = 40
_VIS_TARGET = 4  # views (of 5) in which every object must be visible


def _visibility_score(scene: SceneDef, seed: int, n_views: int = 5, min_px: int = 20) -> int:
    """Min over objects of the number of default-trajectory views (rendered at 160x120) that show
    the object with at least ``min_px`` pixels."""
    w, h = 160, 120
    K = intrinsics(w, h)
    poses = camera_trajectory(n_views, scene, seed=seed)
    counts = np.zeros((n_views, len(scene.object_ids)), np.int64)
    for v, T in enumerate(poses):
        inst = _cast(scene, K, T, w, h)[1]
        ids = np.array([p.instance_id for p in scene.primitives], np.int32)
        lab = np.where(inst >= 0, ids[np.maximum(inst, 0)], 0)
        counts[v] = [(lab == o).sum() for o in scene.object_ids]
    return int((counts >= min_px).sum(0).min())


# ----------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------
def intrinsics(width: int, height: int, fov_deg: float = 60.0) -> np.ndarray:
    """Pinhole K with horizontal field of view ``fov_deg``, square pixels, centred principal point
    (``((W-1)/2, (H-1)/2)``: pixel centres at integer coordinates)."""
    f = (width / 2.0) / np.tan(np.deg2rad(fov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def camera_trajectory(n_views: int, scene: SceneDef, radius: float = 1.6, height: float = 1.1,
                      arc_deg: float = 100.0, seed: int = 0) -> np.ndarray:
    """(n, 4, 4) camera-to-world poses on a horizontal arc (centred on the -y side of the table)
    at ``height`` metres, each looking at the table centre plus a small seeded jitter (~2 cm)."""
    rng = np.random.default_rng(seed + 7919)
    c = np.asarray(scene.table_center, float)
    if n_views == 1:
        az = np.array([-90.0])
    else:
        az = -90.0 + np.linspace(-arc_deg / 2, arc_deg / 2, n_views)
    poses = np.empty((n_views, 4, 4))
    for i, a in enumerate(np.deg2rad(az)):
        eye = np.array([c[0] + radius * np.cos(a), c[1] + radius * np.sin(a), height])
        target = c + rng.normal(0.0, 0.02, 3)
        poses[i] = look_at(eye, target)
    return poses


def add_odometry_drift(poses: np.ndarray, seed: int = 0, trans_sigma: float = 0.01,
                       rot_sigma_deg: float = 0.5) -> np.ndarray:
    """Odometry-like poses: each relative motion ``inv(T_{k-1}) T_k`` is perturbed by a random
    rigid transform (translation sigma ``trans_sigma`` m per axis, rotation sigma ``rot_sigma_deg``
    per axis) and re-chained from the exact first pose, so the error is a random walk that grows
    along the trajectory."""
    poses = np.asarray(poses, dtype=np.float64)
    rng = np.random.default_rng(seed + 104729)
    out = np.empty_like(poses)
    out[0] = poses[0]
    for k in range(1, len(poses)):
        rel = np.linalg.inv(poses[k - 1]) @ poses[k]
        E = np.eye(4)
        E[:3, :3] = rotation_from_rotvec(np.deg2rad(rng.normal(0.0, rot_sigma_deg, 3)))
        E[:3, 3] = rng.normal(0.0, trans_sigma, 3)
        out[k] = out[k - 1] @ rel @ E
        # re-orthonormalise against round-off
        u, _, vt = np.linalg.svd(out[k][:3, :3])
        out[k][:3, :3] = u @ vt
    return out


# ----------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------
def _intersect(prim: Primitive, o: np.ndarray, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray
               ) -> np.ndarray:
    """Ray parameter t of the first hit (inf = miss) for rays o + t (dx, dy, dz) (not unit).

    Ray directions are passed as three same-shape component arrays (contiguous arithmetic is
    much faster than reductions over a trailing axis of length 3)."""
    inf = np.inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if prim.kind == "plane":
            n = prim.normal
            num = float((prim.center - o) @ n)
            ax = int(np.argmax(np.abs(n)))
            if abs(n[ax]) > 1 - 1e-12:  # axis aligned: one component only
                dn = (dx, dy, dz)[ax] * n[ax]
            else:
                dn = dx * n[0] + dy * n[1] + dz * n[2]
            t = num / dn
            return np.where(t > _EPS, t, inf)
        if prim.kind == "sphere":
            oc = o - prim.center
            a = dx * dx + dy * dy + dz * dz
            b = dx * oc[0] + dy * oc[1] + dz * oc[2]
            disc = b * b - a * float(oc @ oc - prim.radius ** 2)
            t = (-b - np.sqrt(disc)) / a
            return np.where((disc >= 0) & (t > _EPS), t, inf)
        if prim.kind == "box":
            R = prim.rotation()
            ol = R.T @ (o - prim.center)
            h = prim.half_extents
            dls = (dx * R[0, 0] + dy * R[1, 0], dx * R[0, 1] + dy * R[1, 1], dz)
            tmin = tmax = None
            for i in range(3):
                inv = 1.0 / dls[i]
                t1 = (-h[i] - ol[i]) * inv
                t2 = (h[i] - ol[i]) * inv
                lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
                tmin = lo if tmin is None else np.maximum(tmin, lo)
                tmax = hi if tmax is None else np.minimum(tmax, hi)
            return np.where((tmax >= tmin) & (tmin > _EPS), tmin, inf)
        if prim.kind == "cylinder":
            oc = o - prim.center
            hh = prim.height / 2
            r2 = prim.radius ** 2
            a = dx * dx + dy * dy
            b = dx * oc[0] + dy * oc[1]
            disc = b * b - a * float(oc[0] ** 2 + oc[1] ** 2 - r2)
            ts = (-b - np.sqrt(disc)) / a
            zs = oc[2] + ts * dz
            best = np.where((disc >= 0) & (ts > _EPS) & (np.abs(zs) <= hh), ts, inf)
            for zc in (hh, -hh):
                tc = (zc - oc[2]) / dz
                xc = oc[0] + tc * dx
                yc = oc[1] + tc * dy
                ok = (tc > _EPS) & (xc * xc + yc * yc <= r2)
                best = np.minimum(best, np.where(ok, tc, inf))
            return best
        if prim.kind == "cup":
            # every boundary point of the solid along the ray; the nearest one is the hit
            oc = o - prim.center
            hh = prim.height / 2
            R, Ri = prim.radius, prim.radius - prim.wall
            lo = -hh + prim.wall
            a = dx * dx + dy * dy
            b = dx * oc[0] + dy * oc[1]
            best = np.full(np.shape(dx), inf)
            for r_, z0 in ((R, -hh), (Ri, lo)):  # outer side, inner side (both roots)
                disc = b * b - a * float(oc[0] ** 2 + oc[1] ** 2 - r_ * r_)
                sq = np.sqrt(disc)
                for ts in ((-b - sq) / a, (-b + sq) / a):
                    zs = oc[2] + ts * dz
                    best = np.minimum(best, np.where((disc >= 0) & (ts > _EPS) & (zs >= z0)
                                                     & (zs <= hh), ts, inf))
            for zc, r_lo, r_hi in ((hh, Ri, R), (lo, 0.0, Ri), (-hh, 0.0, R)):  # rim, bottoms
                tc = (zc - oc[2]) / dz
                xc = oc[0] + tc * dx
                yc = oc[1] + tc * dy
                rr = xc * xc + yc * yc
                ok = (tc > _EPS) & (rr <= r_hi * r_hi) & (rr >= r_lo * r_lo)
                best = np.minimum(best, np.where(ok, tc, inf))
            return best
    raise ValueError(prim.kind)


def _pixel_rect(prim: Primitive, K, R, o, width, height):
    """Conservative pixel rectangle (r0, r1, c0, c1) covering the primitive, or None if unseen."""
    rb = prim.bounding_radius()
    if not np.isfinite(rb):
        return 0, height, 0, width
    pc = R.T @ (prim.center - o)
    if pc[2] + rb <= 0:
        return None
    if pc[2] - rb <= 1e-3:
        return 0, height, 0, width
    zs = np.array([pc[2] - rb, pc[2] + rb])
    xs = np.array([pc[0] - rb, pc[0] + rb])
    ys = np.array([pc[1] - rb, pc[1] + rb])
    rx = (xs[:, None] / zs[None]).ravel()
    ry = (ys[:, None] / zs[None]).ravel()
    c0 = int(np.floor(K[0, 2] + K[0, 0] * rx.min())) - 1
    c1 = int(np.ceil(K[0, 2] + K[0, 0] * rx.max())) + 2
    r0 = int(np.floor(K[1, 2] + K[1, 1] * ry.min())) - 1
    r1 = int(np.ceil(K[1, 2] + K[1, 1] * ry.max())) + 2
    c0, c1 = max(c0, 0), min(c1, width)
    r0, r1 = max(r0, 0), min(r1, height)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def _normals(prim: Primitive, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) at surface points p (N, 3)."""
    if prim.kind == "plane":
        return np.broadcast_to(prim.normal, p.shape).copy()
    q = p - prim.center
    if prim.kind == "sphere":
        return q / prim.radius
    if prim.kind == "box":
        R = prim.rotation()
        ql = (q @ R) / prim.half_extents
        ax = np.abs(ql).argmax(-1)
        nl = np.zeros_like(ql)
        nl[np.arange(len(ql)), ax] = np.sign(ql[np.arange(len(ql)), ax])
        return nl @ R.T
    if prim.kind == "cylinder":
        hh = prim.height / 2
        rad = np.hypot(q[:, 0], q[:, 1])
        cap = (np.abs(q[:, 2]) - hh) > (rad - prim.radius) - 1e-9
        n = np.zeros_like(q)
        n[:, :2] = q[:, :2] / np.maximum(rad, 1e-12)[:, None]
        n[cap] = 0.0
        n[cap, 2] = np.sign(q[cap, 2])
        return n
    if prim.kind == "cup":
        hh = prim.height / 2
        R, Ri = prim.radius, prim.radius - prim.wall
        lo = -hh + prim.wall
        rad = np.hypot(q[:, 0], q[:, 1])
        radial = q[:, :2] / np.maximum(rad, 1e-12)[:, None]
        # distance to each face: outer side, inner side, rim / inner bottom (up), outer bottom
        d = np.stack([np.abs(rad - R), np.abs(rad - Ri),
                      np.where(rad >= Ri - 1e-9, np.abs(q[:, 2] - hh), np.abs(q[:, 2] - lo)),
                      np.abs(q[:, 2] + hh)], 1)
        face = d.argmin(1)
        n = np.zeros_like(q)
        n[face == 0, :2] = radial[face == 0]
        n[face == 1, :2] = -radial[face == 1]
        n[face == 2, 2] = 1.0
        n[face == 3, 2] = -1.0
        return n
    raise ValueError(prim.kind)


# ----------------------------------------------------------------------------------------------
# Textures (multiplicative, world-position based, deterministic)
# ----------------------------------------------------------------------------------------------
_M1, _M2, _M3, _M4 = (np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F),
                      np.uint32(0x5BD1E995))


def _hash(ix, iy, iz, seed: int) -> np.ndarray:
    """Integer lattice hash -> float in [0, 1)."""
    h = (ix.astype(np.uint32) * _M1) ^ (iy.astype(np.uint32) * _M2) ^ (iz.astype(np.uint32) * _M3)
    h ^= np.uint32(seed & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h *= _M4
    h ^= h >> np.uint32(15)
    h *= _M1
    h ^= h >> np.uint32(16)
    return h.astype(np.float32) * np.float32(1.0 / 4294967296.0)


def _value_noise(p: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth 3D value noise in [0, 1) with lattice spacing ``scale`` metres; p (N, 3)."""
    q = (p / scale).astype(np.float32)
    f = np.floor(q)
    w = q - f
    w = w * w * (3.0 - 2.0 * w)
    i = f.astype(np.int64)
    ix, iy, iz = i[:, 0], i[:, 1], i[:, 2]
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    out = np.zeros(len(p), np.float32)
    for dx in (0, 1):
        ax = wx if dx else 1 - wx
        for dy in (0, 1):
            ay = wy if dy else 1 - wy
            axy = ax * ay
            for dz in (0, 1):
                az = wz if dz else 1 - wz
                out += axy * az * _hash(ix + dx, iy + dy, iz + dz, seed)
    return out


def _texture(prim: Primitive, p: np.ndarray) -> np.ndarray:
    """Multiplicative texture factor (N, 3) at world points p (N, 3)."""
    s, sd, kind = prim.texture_scale, prim.tex_seed, prim.texture
    n = len(p)
    if kind == "checker":
        c = np.floor(p / s).astype(np.int64).sum(-1) & 1
        m = 1.0 + 0.18 * (2.0 * c - 1.0) + 0.16 * (_value_noise(p, s * 0.45, sd) - 0.5)
    elif kind == "stripes":
        rs = np.random.default_rng(sd)
        a = _normalize(rs.normal(size=3))
        ph = np.sin(2 * np.pi * (p @ a) / s + 3.0 * _value_noise(p, s * 2.0, sd + 1))
        m = 1.0 + 0.2 * np.tanh(3.0 * ph) + 0.14 * (_value_noise(p, s * 0.4, sd) - 0.5)
    elif kind == "noise":
        m = (1.0 + 0.45 * (_value_noise(p, s * 0.7, sd) - 0.5)
             + 0.3 * (_value_noise(p, s * 0.3, sd + 1) - 0.5))
    elif kind == "fine":
        m = (1.0 + 0.3 * (_value_noise(p, s, sd) - 0.5)
             + 0.2 * (_value_noise(p, s * 6.0, sd + 1) - 0.5))
    elif kind == "wood":
        # planks along x, width s; per-plank tone, dark seams, grain stripes along the plank
        plank = np.floor(p[:, 1] / s)
        pi = plank.astype(np.int64)
        zero = np.zeros(n, np.int64)
        tone = _hash(pi, zero, zero, sd)
        off = _hash(pi, zero + 1, zero, sd) * 10.0
        frac = p[:, 1] / s - plank
        seam = np.minimum(frac, 1 - frac) < 0.04
        seg = np.floor((p[:, 0] + off) / 0.9).astype(np.int64)  # plank ends
        endseam = np.abs((p[:, 0] + off) / 0.9 - seg - 0.5) > 0.49
        grain = np.sin(2 * np.pi * (p[:, 1] * 38.0 + 4.0 * _value_noise(p * [0.08, 1, 1], 0.05, sd + 2)))
        m = (0.8 + 0.35 * tone + 0.1 * grain + 0.15 * (_value_noise(p, 0.03, sd + 3) - 0.5))
        m = np.where(seam | endseam, 0.45, m)
    elif kind == "wall":
        # blotchy plaster + fine grain + muted rectangular "posters" on a coarse lattice
        u = p[:, 0] + p[:, 1]  # in-plane horizontal coordinate for axis-aligned walls / ceiling
        v = p[:, 2] + np.where(np.abs(p[:, 2] - ROOM_HEIGHT) < 1e-3, p[:, 1], 0.0)
        m = (1.0 + 0.3 * (_value_noise(p, s, sd) - 0.5)
             + 0.15 * (_value_noise(p, 0.02, sd + 1) - 0.5))
        cu, cv = np.floor(u / 1.1).astype(np.int64), np.floor(v / 0.9).astype(np.int64)
        fu, fv = u / 1.1 - cu, v / 0.9 - cv
        zero = np.zeros(n, np.int64)
        has = _hash(cu, cv, zero, sd + 5) > 0.45
        inside = has & (fu > 0.15) & (fu < 0.85) & (fv > 0.15) & (fv < 0.85)
        tone = 0.55 + 0.35 * _hash(cu, cv, zero + 5, sd + 6)
        tint = tone[:, None] * (0.85 + 0.15 * np.stack([_hash(cu, cv, zero + k, sd + 6) for k in range(3)], -1))
        # random (non-repeating) block pattern inside each poster: distinctive for matchers
        bu = np.floor(u / 0.045).astype(np.int64)
        bv = np.floor(v / 0.045).astype(np.int64)
        motif = _hash(bu, bv, zero + 7, sd + 8) - 0.5
        post = tint * (0.85 + 0.6 * motif)[:, None]
        m3 = np.where(inside[:, None], post, m[:, None])
        return m3.astype(np.float32)
    else:
        m = np.ones(n)
    return np.repeat(np.asarray(m, np.float32)[:, None], 3, axis=1)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
_RAY_CACHE: Dict[tuple, np.ndarray] = {}


def _camera_rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """3 x H x W camera-frame directions K^-1 [j, i, 1] (z component 1), cached."""
    key = (width, height) + tuple(np.round(np.asarray(K, float).ravel(), 9))
    r = _RAY_CACHE.get(key)
    if r is None:
        Kinv = np.linalg.inv(K)
        jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        pix = np.stack([jj, ii, np.ones_like(jj)], 0)
        r = np.einsum("ij,jhw->ihw", Kinv, pix)
        r[2] = 1.0
        if len(_RAY_CACHE) > 8:
            _RAY_CACHE.clear()
        _RAY_CACHE[key] = r
    return r


def _cast(scene: SceneDef, K: np.ndarray, T_c2w: np.ndarray, width: int, height: int):
    """Geometry pass: (t = z-depth (H,W) float64, primitive index (H,W) int16 (-1 miss),
    world ray directions (3,H,W), camera centre (3,))."""
    K = np.asarray(K, np.float64)
    T = np.asarray(T_c2w, np.float64)
    R, o = T[:3, :3], T[:3, 3].copy()
    dcam = _camera_rays(K, width, height)
    # world ray directions; the ray parameter t equals z-depth because dcam's z component is 1
    d = np.einsum("ij,jhw->ihw", R, dcam)
    dx, dy, dz = d[0], d[1], d[2]
    tbest = np.full((height, width), np.inf)
    pidx = np.full((height, width), -1, np.int16)
    for k, prim in enumerate(scene.primitives):
        rect = _pixel_rect(prim, K, R, o, width, height)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        sl = (slice(r0, r1), slice(c0, c1))
        t = _intersect(prim, o, dx[sl], dy[sl], dz[sl])
        sub = tbest[sl]
        closer = t < sub
        np.minimum(sub, t, out=sub)
        np.copyto(pidx[sl], k, where=closer)

    return tbest, pidx, d, o


def render_view(scene: SceneDef, K: np.ndarray, T_c2w: np.ndarray, width: int, height: int
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast one view. Returns rgb (H,W,3) uint8, z-depth (H,W) float32 m, instance (H,W) int32.

    Pixel (row i, col j) is the ray through ``K^-1 [j, i, 1]`` from the camera centre, so
    ``depth[i, j] * K^-1 [j, i, 1]`` is the hit point in the camera frame."""
    tbest, pidx, d, o = _cast(scene, K, T_c2w, width, height)
    ids = np.array([p.instance_id for p in scene.primitives], np.int32)
    instance = np.where(pidx >= 0, ids[np.maximum(pidx, 0)], 0).astype(np.int32)
    depth = np.where(np.isfinite(tbest), tbest, 0.0).astype(np.float32)

    rgb = np.zeros((height * width, 3), np.float32)
    flat_idx = pidx.ravel()
    order = np.argsort(flat_idx, kind="stable")
    counts = np.bincount(flat_idx.astype(np.int64) + 1, minlength=len(scene.primitives) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    tflat = tbest.ravel()
    dflat = d.reshape(3, -1)
    light = _normalize(np.asarray(scene.light_dir, float))
    for k, prim in enumerate(scene.primitives):
        sel = order[starts[k + 1]:starts[k + 2]]
        if len(sel) == 0:
            continue
        dk = dflat[:, sel].T  # (N, 3)
        tk = tflat[sel]
        p = o + tk[:, None] * dk
        nrm = _normals(prim, p)
        dn = (nrm * dk).sum(1)
        inv_len = 1.0 / np.sqrt((dk * dk).sum(1))
        facing = -dn * inv_len  # cos between normal and direction towards the camera
        nrm = np.where((facing < 0)[:, None], -nrm, nrm)
        diffuse = np.maximum(nrm @ light, 0.0)
        shade = (scene.ambient + 0.5 * diffuse + 0.17 * np.abs(facing)).astype(np.float32)
        col = np.asarray(prim.color, np.float32)[None] * _texture(prim, p)
        col *= shade[:, None]
        rgb[sel] = col
    rgb8 = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(height, width, 3)
    return rgb8, depth, instance


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------
@dataclass
class SyntheticSequence:
    scene: SceneDef
    rgb: np.ndarray          # (V, H, W, 3) uint8
    depth: np.ndarray        # (V, H, W) float32 z-depth metres
    instance: np.ndarray     # (V, H, W) int32
    K: np.ndarray            # (3, 3) float64
    poses: np.ndarray        # (V, 4, 4) float64 ground-truth camera-to-world
    odom_poses: np.ndarray   # (V, 4, 4) float64 drifted odometry camera-to-world
    stamps: np.ndarray       # (V,) float64 seconds

    @property
    def num_views(self) -> int:
        return int(self.rgb.shape[0])


def render_sequence(n_views: int = 5, width: int = 640, height: int = 480, seed: int = 0,
                    num_objects: int = 5, **traj_kwargs) -> SyntheticSequence:
    """Scene + trajectory + renders + drifted odometry, stamps 0.5 s apart.

    ``traj_kwargs`` go to :func:`camera_trajectory` (radius, height, arc_deg); ``seed`` seeds the
    scene, the look-at jitter and the odometry drift."""
    scene = make_tabletop_scene(seed=seed, num_objects=num_objects)
    K = intrinsics(width, height)
    traj_kwargs.setdefault("seed", seed)
    poses = camera_trajectory(n_views, scene, **traj_kwargs)
    rgb = np.empty((n_views, height, width, 3), np.uint8)
    depth = np.empty((n_views, height, width), np.float32)
    inst = np.empty((n_views, height, width), np.int32)
    for v in range(n_views):
        rgb[v], depth[v], inst[v] = render_view(scene, K, poses[v], width, height)
    odom = add_odometry_drift(poses, seed=seed)
    stamps = np.arange(n_views, dtype=np.float64) * 0.5
    return SyntheticSequence(scene, rgb, depth, inst, K, poses, odom, stamps)


__all__ = ["Primitive", "SceneDef", "SyntheticSequence", "make_tabletop_scene", "camera_trajectory",
           "intrinsics", "render_view", "add_odometry_drift", "render_sequence", "look_at",
           "FLOOR_ID", "WALL_ID", "TABLE_ID", "FIRST_OBJECT_ID", "TABLE_HEIGHT"]
