"""Name -> implementation registries for the pluggable stages (pointmap backends, segmenters).

An entry names the module and class (imported lazily, so heavy optional dependencies stay
optional), the flat configuration parameters it takes (``'dust3r.checkpoint' -> 'model'``: the
names of the ROS parameters / YAML keys / CLI flags, mapped to constructor keywords), whether it
takes the torch ``device``, and what to tell the user when its module cannot be imported.
Adding a backend is one module plus one entry; :mod:`wildseg3d_ros.core.config` builds the
constructor arguments from the flat parameters through :meth:`Registry.kwargs_from_flat`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Type


@dataclass(frozen=True)
class Entry:
    module: str
    cls: str
    params: Mapping[str, str] = field(default_factory=dict)  # flat name -> constructor keyword
    uses_device: bool = False
    metric: bool = False   # backends: pointmaps in metres (depth cameras)
    #: backends: per-view pointmaps dense and clean enough for geometric pre-segmentation (cuts
    #: at depth jumps and creases); False (two-view stereo: holes, noise) = segment by colour,
    #: associate the masks across views in 3D
    presegment_geometry: bool = True
    import_hint: str = ""  # appended to the error when the module cannot be imported


class Registry:
    def __init__(self, kind: str, error: Type[Exception], entries: Dict[str, Entry]):
        self.kind = kind
        self.error = error
        self.entries = dict(entries)

    def names(self) -> List[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> Entry:
        key = str(name).strip().lower()
        if key not in self.entries:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self.entries[key]

    def kwargs_from_flat(self, name: str, flat: Mapping[str, Any], device: str) -> Dict[str, Any]:
        """Constructor keywords of ``name`` from flat parameters (missing names keep the class
        defaults; empty strings mean 'not set')."""
        e = self.entry(name)
        kw = {k: flat[f] for f, k in e.params.items() if f in flat and flat[f] != ""}
        if e.uses_device:
            kw["device"] = device
        return kw

    def create(self, name: str, **kwargs):
        e = self.entry(name)
        try:
            mod = importlib.import_module(e.module)
        except ImportError as exc:
            raise self.error(f"the {self.kind} {name!r} is unavailable: could not import {e.module} ({exc})"
                             + (f". {e.import_hint}" if e.import_hint else "")) from exc
        cls = getattr(mod, e.cls, None)
        if cls is None:
            raise self.error(f"{e.module} defines no {e.cls}")
        return cls(**kwargs)
