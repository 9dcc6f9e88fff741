"""Structure from motion for a handful of keyframes with pycolmap (COLMAP's official bindings).

:func:`run_sfm` takes RGB views and their pinhole intrinsics (known, or an initial guess to be
refined) and returns camera-to-world poses, intrinsics, which views were registered (and why
the others were not), the sparse points and which views see them. CPU only:

1. SIFT features (COLMAP's CPU SIFT) and **exhaustive** matching with two-view geometric
   verification: with a few keyframes every pair is cheap, and exhaustive pairs find the loop
   closures a ring of views needs (a sequential matcher would miss them).
2. **Global mapping** (GLOMAP's rotation averaging + global positioning + bundle adjustment, in
   COLMAP since 3.12): all views are placed at once from the verified pair graph, so a view with
   few 3D-2D correspondences is not lost the way the incremental mapper drops it (on the
   Middlebury temple ring incremental mapping registers 13 of 16 views, global mapping 16).
3. When global mapping leaves views out (or fails, e.g. with 2 views, where no track spans 3
   views) **incremental mapping** with relaxed registration thresholds is run as well and the
   model with the most views (then the lowest reprojection error) is kept; the views still
   missing get one more PnP registration attempt against the kept model.
4. A final **robust bundle adjustment** (Cauchy loss) over all registered views with the
   intrinsics fixed when they are known (focal refined otherwise): GLOMAP's own bundle
   adjustment stops after a few iterations; on the temple this last step halves the pose error.

Poses are in COLMAP's arbitrary gauge and scale (the backend anchors and scales them).
Cancellation: ``cancel()`` is polled by a watcher thread that trips pycolmap's
``CancellationToken`` (extraction, matching, incremental mapping stop within a fraction of a
second); global mapping has no token and is checked before and after.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import BackendError, Cancelled


class SfmError(BackendError):
    """Structure from motion could not place at least two views (message says why)."""


@dataclass
class SfmOptions:
    max_num_features: int = 8192
    peak_threshold: float = 0.0066667   # SIFT peak threshold (COLMAP default 0.02 / octave_resolution)
    max_ratio: float = 0.8              # Lowe ratio test
    min_num_inliers: int = 15           # two-view verification: min inlier matches for a pair
    ransac_max_error: float = 4.0       # two-view verification RANSAC threshold (px)
    mapper: str = "auto"                # auto | global | incremental
    abs_pose_min_num_inliers: int = 15  # relaxed PnP registration (COLMAP default 30)
    final_ba: bool = True
    num_threads: int = -1               # -1: all cores
    seed: int = 0
    verbose: bool = False


@dataclass
class SfmResult:
    """poses (V,4,4) camera-to-world (NaN rows for unregistered views), K (V,3,3), registered
    (V,) bool, reasons {view: why it is not registered}, points (P,3) sparse points, visibility
    (P,V) bool (which views observe each point), inliers (V,V) verified matches per pair,
    features (V,) SIFT keypoints per view, mapper (which mapper produced the model),
    reprojection_error (px, mean), timings (s)."""

    poses: np.ndarray
    K: np.ndarray
    registered: np.ndarray
    reasons: Dict[int, str]
    points: np.ndarray
    visibility: np.ndarray
    inliers: np.ndarray
    features: np.ndarray
    mapper: str = ""
    reprojection_error: float = float("nan")
    intrinsics_refined: bool = False
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def num_registered(self) -> int:
        return int(self.registered.sum())

    def shared_points(self, i: int, j: int) -> np.ndarray:
        """Sparse points (world) seen by both views i and j."""
        return self.points[self.visibility[:, i] & self.visibility[:, j]]


# ----------------------------------------------------------------------------------------------
def _import_pycolmap():
    # OpenCV first: pycolmap's wheel bundles its own zlib/libpng, and when it is loaded before
    # OpenCV, cv2's PNG writer can end up mixing the two (heap corruption in deflateEnd)
    import cv2  # noqa: F401

    try:
        import pycolmap
    except ImportError as exc:  # pragma: no cover - pycolmap is in requirements.txt
        raise SfmError(f"pycolmap is not importable ({exc}): pip install pycolmap (COLMAP's bindings, "
                       "CPU wheels on PyPI)") from exc
    return pycolmap


@contextlib.contextmanager
def _quiet(pycolmap, verbose: bool):
    """COLMAP logs through glog to stderr; keep it to errors unless verbose."""
    lg = getattr(pycolmap, "logging", None)
    old = getattr(lg, "minloglevel", None) if lg is not None else None
    try:
        if lg is not None and old is not None and not verbose:
            lg.minloglevel = 2
        yield
    finally:
        if lg is not None and old is not None:
            lg.minloglevel = old


@contextlib.contextmanager
def _cancel_watch(pycolmap, cancel: Optional[Callable[[], bool]]):
    """A CancellationToken tripped by polling ``cancel`` every 50 ms (None: no token)."""
    if cancel is None:
        yield None
        return
    token = pycolmap.CancellationToken()
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            try:
                if cancel():
                    token.cancel()
                    return
            except Exception:  # noqa: BLE001 - a faulty cancel callable must not kill the run
                return

    th = threading.Thread(target=watch, name="sfm-cancel-watch", daemon=True)
    th.start()
    try:
        yield token
    except InterruptedError as exc:  # pycolmap's answer to a tripped token
        raise Cancelled(f"structure from motion cancelled ({exc})") from exc
    finally:
        stop.set()
        th.join(0.5)


def _check(cancel, where: str):
    if cancel is not None and cancel():
        raise Cancelled(f"structure from motion cancelled ({where})")


def _camera_params(K: np.ndarray, refine: bool) -> tuple:
    """COLMAP camera model + parameter string. COLMAP puts the centre of the top-left pixel at
    (0.5, 0.5), OpenCV / CameraInfo at (0, 0): the principal point moves by half a pixel."""
    cx, cy = K[0, 2] + 0.5, K[1, 2] + 0.5
    if refine:
        return "SIMPLE_PINHOLE", ",".join(repr(float(x)) for x in (0.5 * (K[0, 0] + K[1, 1]), cx, cy))
    return "PINHOLE", ",".join(repr(float(x)) for x in (K[0, 0], K[1, 1], cx, cy))


def _K_of(cam) -> np.ndarray:
    """OpenCV-convention K of a COLMAP camera (see _camera_params)."""
    K = np.asarray(cam.calibration_matrix(), np.float64).copy()
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    return K


def _epipolar_support(rec, view_of, kps, matches, thresh_px: float = 1.0) -> Tuple[int, float]:
    """How many verified feature matches the model's poses explain: matches whose Sampson
    distance under the model's relative pose of their two (registered) views is below
    ``thresh_px``; and the median distance. Independent of how points were triangulated, so
    models from different mappers compare fairly (a RANSAC-style hypothesis score)."""
    Ts, Kinv = {}, {}
    for iid, im in rec.images.items():
        if im.has_pose and iid in view_of:
            T = np.eye(4)
            T[:3, :4] = np.asarray(im.cam_from_world().matrix(), np.float64)
            Ts[iid] = T
            Kinv[iid] = np.linalg.inv(np.asarray(rec.cameras[im.camera_id].calibration_matrix(), np.float64))
    good, errs = 0, []
    for (a, b), m in matches.items():
        if a not in Ts or b not in Ts or len(m) == 0:
            continue
        T = Ts[b] @ np.linalg.inv(Ts[a])  # cam_b from cam_a
        t = T[:3, 3]
        tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
        F = Kinv[b].T @ (tx @ T[:3, :3]) @ Kinv[a]
        x1 = np.c_[kps[a][m[:, 0], :2], np.ones(len(m))]
        x2 = np.c_[kps[b][m[:, 1], :2], np.ones(len(m))]
        Fx1 = x1 @ F.T
        Ftx2 = x2 @ F
        num = np.einsum("ij,ij->i", x2, Fx1) ** 2
        den = Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2
        e = np.sqrt(num / np.maximum(den, 1e-18))
        good += int((e < thresh_px).sum())
        errs.append(e)
    med = float(np.median(np.concatenate(errs))) if errs else float("inf")
    return good, med


def _pose_c2w(image) -> np.ndarray:
    T = np.eye(4)
    T[:3, :4] = np.asarray(image.cam_from_world().matrix(), np.float64)
    R = T[:3, :3].T
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = -R @ T[:3, 3]
    return out


def _ba_options(pycolmap, refine_intrinsics: bool, robust: bool = True):
    bo = pycolmap.BundleAdjustmentOptions()
    bo.refine_focal_length = bool(refine_intrinsics)
    bo.refine_principal_point = False
    bo.refine_extra_params = False
    bo.print_summary = False
    if robust:
        bo.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    return bo


# ----------------------------------------------------------------------------------------------
def run_sfm(images: Sequence[np.ndarray], K: Sequence[np.ndarray], refine_intrinsics: bool = False,
            options: Optional[SfmOptions] = None, cancel: Optional[Callable[[], bool]] = None,
            progress: Optional[Callable[[float, str], None]] = None) -> SfmResult:
    """Register the views (see the module docstring). ``K``: one 3x3 per view (known, or the
    initial guess when ``refine_intrinsics``). Raises :class:`SfmError` when fewer than two views
    can be placed, :class:`~wildseg3d_ros.core.errors.Cancelled` when cancelled."""
    pycolmap = _import_pycolmap()
    o = options or SfmOptions()
    V = len(images)
    if V < 2:
        raise SfmError(f"structure from motion needs at least 2 views, got {V}")
    Ks = [np.asarray(k, np.float64) for k in K]
    if len(Ks) != V:
        raise SfmError(f"{len(Ks)} intrinsics for {V} views")
    say = progress or (lambda f, m: None)
    shared_K = all(np.allclose(k, Ks[0]) for k in Ks) and len({im.shape[:2] for im in images}) == 1
    tmp = tempfile.mkdtemp(prefix="wildseg3d_sfm_")
    t = {}
    try:
        with _quiet(pycolmap, o.verbose):
            return _run(pycolmap, images, Ks, refine_intrinsics, shared_K, o, tmp, cancel, say, t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(pycolmap, images, Ks, refine, shared_K, o, tmp, cancel, say, t) -> SfmResult:
    import cv2

    V = len(images)
    t0 = time.perf_counter()
    img_dir = os.path.join(tmp, "images")
    os.makedirs(img_dir)
    names = [f"{v:04d}.bmp" for v in range(V)]  # uncompressed: no zlib involved (see _import_pycolmap)
    for v, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] < 3 or im.dtype != np.uint8:
            raise SfmError(f"view {v}: expected an HxWx3 uint8 RGB image, got {im.shape} {im.dtype}")
        if not cv2.imwrite(os.path.join(img_dir, names[v]), np.ascontiguousarray(im[..., 2::-1])):
            raise SfmError(f"cannot write view {v} into the temporary folder {img_dir}")
    db_path = os.path.join(tmp, "database.db")
    pycolmap.set_random_seed(int(o.seed))
    model, params = _camera_params(Ks[0], refine)
    ro = pycolmap.ImageReaderOptions()
    ro.camera_model = model
    ro.camera_params = params
    eo = pycolmap.FeatureExtractionOptions()
    eo.num_threads = int(o.num_threads)
    eo.sift.max_num_features = int(o.max_num_features)
    eo.sift.peak_threshold = float(o.peak_threshold)
    _check(cancel, "before feature extraction")
    say(0.05, f"sfm: SIFT features of {V} views")
    with _cancel_watch(pycolmap, cancel) as tok:
        pycolmap.extract_features(db_path, img_dir, image_names=names,
                                  camera_mode=pycolmap.CameraMode.SINGLE if shared_K else pycolmap.CameraMode.PER_IMAGE,
                                  reader_options=ro, extraction_options=eo, device=pycolmap.Device.cpu,
                                  cancellation_token=tok)
    _check(cancel, "feature extraction")
    with pycolmap.Database.open(db_path) as db:
        id_of = {im.name: im.image_id for im in db.read_all_images()}
        if len(id_of) != V:
            raise SfmError(f"COLMAP read {len(id_of)} of {V} images")
        view_of = {iid: names.index(n) for n, iid in id_of.items()}
        features = np.array([db.num_keypoints_for_image(id_of[n]) for n in names], np.int64)
        if not shared_K:  # one camera per view: write each view's own intrinsics
            for n, v in zip(names, range(V)):
                img = db.read_image(id_of[n])
                cam = db.read_camera(img.camera_id)
                cam.set_params_from_string(_camera_params(Ks[v], refine)[1])
                db.update_camera(cam)
    t["features_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    say(0.25, "sfm: exhaustive matching + two-view geometry")
    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = int(o.num_threads)
    mo.sift.max_ratio = float(o.max_ratio)
    vo = pycolmap.TwoViewGeometryOptions()
    vo.min_num_inliers = int(o.min_num_inliers)
    vo.ransac.max_error = float(o.ransac_max_error)
    with _cancel_watch(pycolmap, cancel) as tok:
        pycolmap.match_exhaustive(db_path, matching_options=mo, verification_options=vo,
                                  device=pycolmap.Device.cpu, cancellation_token=tok)
    _check(cancel, "matching")
    inliers = np.zeros((V, V), np.int64)
    matches, kps = {}, {}
    with pycolmap.Database.open(db_path) as db:
        pids, geoms = db.read_two_view_geometries()
        for pid, g in zip(pids, geoms):
            a, b = pycolmap.pair_id_to_image_pair(pid)
            n = len(g.inlier_matches) if g.config not in (pycolmap.TwoViewGeometryConfiguration.UNDEFINED,
                                                           pycolmap.TwoViewGeometryConfiguration.DEGENERATE) else 0
            inliers[view_of[a], view_of[b]] = inliers[view_of[b], view_of[a]] = n
            if n:
                matches[(a, b)] = np.asarray(g.inlier_matches, np.int64).reshape(-1, 2)
        for iid in view_of:
            kps[iid] = np.asarray(db.read_keypoints(iid), np.float64)
    t["matching_s"] = time.perf_counter() - t1

    def unmatched_reason(v: int) -> str:
        others = [(inliers[v, u], u) for u in range(V) if u != v]
        best, u = max(others)
        if features[v] < 2 * o.min_num_inliers:
            return f"only {features[v]} SIFT features (textureless, blurred or dark image)"
        return (f"{features[v]} SIFT features but at most {best} geometrically verified matches with another "
                f"view (view {u}; need >= {o.min_num_inliers}): it does not overlap the others")

    connected = [v for v in range(V) if inliers[v].max() >= o.min_num_inliers]
    if len(connected) < 2:
        raise SfmError("no two views share enough verified feature matches: "
                       + "; ".join(f"view {v}: {unmatched_reason(v)}" for v in range(V)))

    # -- mapping --------------------------------------------------------------------------
    t2 = time.perf_counter()
    say(0.45, "sfm: mapping")
    recs = []
    tried = []
    if o.mapper in ("auto", "global"):
        _check(cancel, "before global mapping")
        go = pycolmap.GlobalPipelineOptions()
        go.num_threads = int(o.num_threads)
        go.random_seed = int(o.seed)
        go.min_num_matches = int(o.min_num_inliers)
        go.min_model_size = 2
        ba = go.mapper.bundle_adjustment
        ba.refine_focal_length = bool(refine)
        ba.refine_principal_point = False
        ba.refine_extra_params = False
        out = os.path.join(tmp, "global")
        os.makedirs(out)
        try:
            res = pycolmap.global_mapping(db_path, img_dir, out, go)
            recs += [("global", r) for r in res.values()]
        except Exception as e:  # noqa: BLE001 - a failed mapper is reported, the other one tried
            tried.append(f"global mapping failed: {e}")
        _check(cancel, "global mapping")
    if o.mapper in ("auto", "incremental"):
        io = pycolmap.IncrementalPipelineOptions()
        io.num_threads = int(o.num_threads)
        io.random_seed = int(o.seed)
        io.min_num_matches = int(o.min_num_inliers)
        io.min_model_size = 2
        io.extract_colors = False
        io.ba_refine_focal_length = bool(refine)
        io.ba_refine_principal_point = False
        io.ba_refine_extra_params = False
        io.mapper.abs_pose_min_num_inliers = int(o.abs_pose_min_num_inliers)
        io.mapper.abs_pose_min_inlier_ratio = 0.1
        io.mapper.init_min_num_inliers = max(int(o.min_num_inliers), 30)
        # with a few keyframes most points are seen twice: COLMAP's default drops two-view tracks
        # (with 2 views that discards every initial pair)
        io.triangulation.ignore_two_view_tracks = False
        out = os.path.join(tmp, "incremental")
        os.makedirs(out)
        try:
            with _cancel_watch(pycolmap, cancel) as tok:
                res = pycolmap.incremental_mapping(db_path, img_dir, out, io, cancellation_token=tok)
            recs += [("incremental", r) for r in res.values()]
        except Exception as e:  # noqa: BLE001
            tried.append(f"incremental mapping failed: {e}")
        _check(cancel, "incremental mapping")
    recs = [(k, r) for k, r in recs if r.num_reg_images() >= 2]
    if not recs:
        raise SfmError("structure from motion placed no two views together ("
                       + ("; ".join(tried) or "the mappers found no initial pair") + "); pairwise inlier matches: "
                       + ", ".join(f"{i}-{j}: {inliers[i, j]}" for i in range(V) for j in range(i + 1, V)
                                   if inliers[i, j]))
    t["mapping_s"] = time.perf_counter() - t2

    # -- register what is missing, triangulate, bundle-adjust; keep the best-supported model --
    # Every candidate (global / incremental, each of their models) is completed and refined the
    # same way, then judged like a RANSAC hypothesis: most views registered, then most verified
    # feature matches its poses explain (epipolar distance < 1 px). A model with a wrong pose
    # cannot explain as many (on 5 low-resolution views GLOMAP can be off by degrees where
    # incremental mapping is not; on the temple ring incremental mapping misses views).
    t3 = time.perf_counter()
    say(0.8, "sfm: bundle adjustment")
    recs.sort(key=lambda kr: -kr[1].num_reg_images())
    recs = [kr for kr in recs if kr[1].num_reg_images() >= recs[0][1].num_reg_images() - 2][:4]
    scored = []
    for name, r in recs:
        _check(cancel, "refinement")
        r = _complete_and_refine(pycolmap, db_path, r, refine, o, cancel, V, id_of)
        support, med = _epipolar_support(r, view_of, kps, matches)
        scored.append(((r.num_reg_images(), support, -med), name, r))
    (_, mapper_name, rec) = max(scored, key=lambda x: x[0])
    t["refine_s"] = time.perf_counter() - t3

    poses = np.full((V, 4, 4), np.nan)
    Kout = np.stack(Ks).copy()
    registered = np.zeros(V, bool)
    for iid, im in rec.images.items():
        if not im.has_pose or iid not in view_of:
            continue
        v = view_of[iid]
        registered[v] = True
        poses[v] = _pose_c2w(im)
        Kout[v] = _K_of(rec.cameras[im.camera_id])
    if refine and not registered.all():  # unregistered views share the refined camera when there is one
        ref = [Kout[v] for v in range(V) if registered[v]]
        if shared_K and ref:
            for v in range(V):
                if not registered[v]:
                    Kout[v] = ref[0]
    pts, vis = [], []
    for pid, p in rec.points3D.items():
        seen = np.zeros(V, bool)
        for el in p.track.elements:
            if el.image_id in view_of:
                seen[view_of[el.image_id]] = True
        pts.append(np.asarray(p.xyz, np.float64))
        vis.append(seen)
    points = np.stack(pts) if pts else np.zeros((0, 3))
    visibility = np.stack(vis) if vis else np.zeros((0, V), bool)
    other_models = []  # view sets of the models not kept (a split reconstruction)
    for _, r2 in recs:
        if r2 is rec:
            continue
        vs = {view_of[i] for i, im in r2.images.items() if im.has_pose and i in view_of}
        if vs and not vs & set(np.flatnonzero(registered).tolist()):
            other_models.append(vs)
    reasons = {}
    for v in range(V):
        if registered[v]:
            continue
        if v not in connected:
            reasons[v] = unmatched_reason(v)
        elif any(v in others for others in other_models):
            grp = next(sorted(others) for others in other_models if v in others)
            reasons[v] = (f"placed only in a separate model with views {grp}: too few feature matches link "
                          f"that group to the kept views {[u for u in range(V) if registered[u]]}")
        else:
            nb = [u for u in range(V) if registered[u] and inliers[v, u] >= o.min_num_inliers]
            reasons[v] = (f"{features[v]} SIFT features and verified matches with views "
                          f"{nb or [int(np.argmax(inliers[v]))]}, but the {mapper_name} mapper could not place it "
                          "(too few of its matches reach triangulated points, or they are inconsistent)")
    t["total_s"] = time.perf_counter() - t0
    return SfmResult(poses=poses, K=Kout, registered=registered, reasons=reasons, points=points,
                     visibility=visibility, inliers=inliers, features=features, mapper=mapper_name,
                     reprojection_error=float(rec.compute_mean_reprojection_error()),
                     intrinsics_refined=bool(refine), timings=t)


def _complete_and_refine(pycolmap, db_path, rec, refine, o, cancel, V, id_of):
    """One more PnP registration attempt for missing views (incremental mapper on the kept
    model: triangulation, relaxed absolute pose), then a robust global bundle adjustment."""
    missing = [iid for iid in id_of.values() if not (rec.exists_image(iid) and rec.images[iid].has_pose)]
    if missing or V <= 6:
        _check(cancel, "before registering the missing views")
        try:
            with pycolmap.Database.open(db_path) as db:
                dco = pycolmap.DatabaseCacheOptions()
                dco.min_num_matches = int(o.min_num_inliers)
                cache = pycolmap.DatabaseCache.create(db, dco)
            mapper = pycolmap.IncrementalMapper(cache)
            mapper.begin_reconstruction(rec)
            mo = pycolmap.IncrementalMapperOptions()
            mo.num_threads = int(o.num_threads)
            mo.abs_pose_min_num_inliers = int(o.abs_pose_min_num_inliers)
            mo.abs_pose_min_inlier_ratio = 0.1
            mo.abs_pose_refine_focal_length = bool(refine)
            mo.abs_pose_refine_extra_params = False
            tri = pycolmap.IncrementalTriangulatorOptions()
            tri.ignore_two_view_tracks = V > 6  # with a few views most points are seen twice only
            for iid in list(rec.reg_image_ids()):
                mapper.triangulate_image(tri, iid)
            for _ in range(2):
                for iid in missing:
                    if rec.exists_image(iid) and rec.images[iid].has_pose:
                        continue
                    try:
                        if mapper.register_next_image(mo, iid):
                            mapper.triangulate_image(tri, iid)
                    except Exception:  # noqa: BLE001 - registration of one view may fail: it stays out
                        pass
            mapper.complete_and_merge_tracks(tri)
            rec = mapper.reconstruction
            mapper.end_reconstruction(False)
        except Exception:  # noqa: BLE001 - keep the model as mapped
            pass
    if o.final_ba:
        _check(cancel, "before bundle adjustment")
        with _cancel_watch(pycolmap, cancel) as tok:
            pycolmap.bundle_adjustment(rec, _ba_options(pycolmap, refine), cancellation_token=tok)
        _check(cancel, "bundle adjustment")
    return rec
