"""Scene graphs: which keyframe pairs a backend predicts (and the connectivity of a pair graph).

Pairs are ``(i, j)`` tuples of list positions; :func:`make_pairs` builds the
scene graphs that ``dust3r.image_pairs.make_pairs`` builds (same edge sets, same symmetrisation):

* ``complete``: every unordered pair, then every pair reversed;
* ``swin-k`` (cyclic; ``swin-k-noncyclic`` without wrap-around): each view with its k successors;
* ``logwin-k`` (cyclic / ``-noncyclic``): offsets 1, 2, 4, ..., 2^(k-1) both ways;
* ``oneref-r``: view ``r`` against all others.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Pair = Tuple[int, int]


def _window_size(scene_graph: str, default: int = 3) -> int:
    parts = scene_graph.split("-")
    if len(parts) < 2:
        return default
    try:
        return int(parts[1])
    except ValueError as exc:
        raise ValueError(f"bad scene graph {scene_graph!r}: expected e.g. 'swin-3'") from exc


def make_pairs(n: int, scene_graph: str = "complete", symmetrize: bool = True) -> List[Pair]:
    """Index pairs of the scene graph ``scene_graph`` over ``n`` views (see module docstring).

    The edge set (and, for ``complete`` and ``oneref``, the order) matches
    ``dust3r.image_pairs.make_pairs``; ``swin``/``logwin`` edges come sorted (DUSt3R iterates a
    set, i.e. in an unspecified order).  With ``symmetrize`` every edge is followed, after all
    forward edges, by its reverse.
    """
    n = int(n)
    if n < 2:
        return []
    sg = str(scene_graph)
    edges: List[Pair] = []
    if sg == "complete":
        edges = [(i, j) for i in range(n) for j in range(i)]
    elif sg.startswith("swin"):
        cyclic = not sg.endswith("noncyclic")
        k = _window_size(sg)
        s = set()
        for i in range(n):
            for d in range(1, k + 1):
                j = i + d
                if cyclic:
                    j %= n
                if j >= n or j == i:
                    continue
                s.add((min(i, j), max(i, j)))
        edges = sorted(s)
    elif sg.startswith("logwin"):
        cyclic = not sg.endswith("noncyclic")
        k = _window_size(sg)
        offsets = [2 ** e for e in range(k)]
        s = set()
        for i in range(n):
            for j in [i - o for o in offsets] + [i + o for o in offsets]:
                if cyclic:
                    j %= n
                if j < 0 or j >= n or j == i:
                    continue
                s.add((min(i, j), max(i, j)))
        edges = sorted(s)
    elif sg.startswith("oneref"):
        ref = _window_size(sg, default=0)
        if not 0 <= ref < n:
            raise ValueError(f"scene graph {sg!r}: reference view {ref} not in [0, {n})")
        edges = [(ref, j) for j in range(n) if j != ref]
    else:
        raise ValueError(f"unknown scene graph {sg!r} (complete | swin-k | logwin-k | oneref-r)")
    if symmetrize:
        edges = edges + [(j, i) for i, j in edges]
    return edges


def partners_of_next(n_prev: int, scene_graph: str = "complete") -> List[int]:
    """Positions (0 .. n_prev-1) of the earlier views that view ``n_prev`` -- the next one to
    arrive -- is paired with in ``scene_graph`` over ``n_prev + 1`` views: the pairs a backend
    can compute as soon as that view is accepted (a cyclic graph's wrap-around pairs change as
    views arrive; they are included for the current length)."""
    return sorted({i if j == n_prev else j for i, j in make_pairs(n_prev + 1, scene_graph, symmetrize=False)
                   if n_prev in (i, j)})


def graph_components(nodes: Sequence[int], edges: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Connected components (largest first) of the undirected graph (nodes, edges)."""
    nodes = list(nodes)
    if not nodes:
        return []
    idx = {v: k for k, v in enumerate(nodes)}
    r = np.array([idx[a] for a, _ in edges], np.int64)
    c = np.array([idx[b] for _, b in edges], np.int64)
    _, lab = connected_components(coo_matrix((np.ones(r.size), (r, c)), shape=(len(nodes),) * 2),
                                  directed=False)
    comp: Dict[int, List[int]] = {}
    for v, k in zip(nodes, lab.tolist()):
        comp.setdefault(k, []).append(v)
    return sorted(comp.values(), key=lambda c: (-len(c), c[0]))
