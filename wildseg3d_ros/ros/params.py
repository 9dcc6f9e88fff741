"""Declarative ROS 2 parameters: one spec table per node gives name, default, description and
range; declared with ParameterDescriptor (so `ros2 param describe` shows them) and validated in
an on-set callback that rejects bad values with the reason."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[Sequence[str]] = None
    read_only: bool = False
    # Optional extra validation: returns an error string or None.
    check: Optional[Callable[[Any], Optional[str]]] = None

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if self.choices:
            d.additional_constraints = "one of: " + ", ".join(self.choices)
        if isinstance(self.default, bool):
            return d
        if isinstance(self.default, int) and (self.min is not None or self.max is not None):
            d.integer_range = [IntegerRange(from_value=int(self.min if self.min is not None else -2**62),
                                            to_value=int(self.max if self.max is not None else 2**62),
                                            step=0)]
        elif isinstance(self.default, float) and (self.min is not None or self.max is not None):
            d.floating_point_range = [FloatingPointRange(
                from_value=float(self.min if self.min is not None else -1e300),
                to_value=float(self.max if self.max is not None else 1e300), step=0.0)]
        return d

    def validate(self, value: Any) -> Optional[str]:
        """Return a human-readable reason when ``value`` is not acceptable, else None."""
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                return f"{self.name} must be a bool, got {value!r}"
        elif isinstance(self.default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{self.name} must be an integer, got {value!r}"
        elif isinstance(self.default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{self.name} must be a number, got {value!r}"
            if value != value:  # NaN
                return f"{self.name} must not be NaN"
        elif isinstance(self.default, str) and not isinstance(value, str):
            return f"{self.name} must be a string, got {value!r}"
        if self.min is not None and isinstance(value, (int, float)) and value < self.min:
            return f"{self.name}={value} is below its minimum {self.min}"
        if self.max is not None and isinstance(value, (int, float)) and value > self.max:
            return f"{self.name}={value} is above its maximum {self.max}"
        if self.choices and value not in self.choices:
            return f"{self.name}={value!r} is not one of {list(self.choices)}"
        if self.check is not None:
            return self.check(value)
        return None


_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
_GRAPH_RE = re.compile(r"^(complete|(swin|logwin)-\d+(-noncyclic)?|oneref-\d+)$")


def check_device(v: str) -> Optional[str]:
    """torch device string: cpu, cuda, cuda:N or mps."""
    return None if _DEVICE_RE.match(v) else f"device {v!r} is not one of cpu, cuda, cuda:<N>, mps"


def check_scene_graph(v: str) -> Optional[str]:
    return None if _GRAPH_RE.match(v) else (f"scene_graph {v!r} is not complete, swin-<k>[-noncyclic], "
                                                "logwin-<k>[-noncyclic] or oneref-<k>")


def check_dir_param(v: str) -> Optional[str]:
    """A directory parameter (may be empty = disabled): no NUL, not absurdly long."""
    if "\0" in v or len(v) > 4096:
        return "directory parameter contains a NUL byte or is longer than 4096 characters"
    return None


def check_file_param(v: str) -> Optional[str]:
    """A file path parameter (may be empty): no NUL, not absurdly long. Existence is checked
    when the model is loaded, so that the node can report it in diagnostics."""
    return check_dir_param(v)


class ParameterTable:
    """Declares a node's parameters from specs and keeps a validated snapshot dict."""

    def __init__(self, node, specs: Iterable[ParamSpec], on_change: Optional[Callable[[Dict[str, Any]], None]] = None,
                 validator: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None):
        """``validator(values)``: cross-parameter check of a complete proposed value dict (after
        every single value passed its own spec); returns the reason it is refused, or None.
        At start-up a refused combination is logged and listed in ``startup_errors`` (the node
        decides what to do with it); at run time the whole update is rejected with the reason."""
        self._node = node
        self.specs: Dict[str, ParamSpec] = {s.name: s for s in specs}
        self._on_change = on_change
        self._validator = validator
        self.startup_errors: List[str] = []
        for s in self.specs.values():
            node.declare_parameter(s.name, s.default, s.descriptor())
        self.values: Dict[str, Any] = {}
        bad: List[str] = []
        for name, s in self.specs.items():
            v = node.get_parameter(name).value
            if isinstance(s.default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            err = s.validate(v)
            if err:
                bad.append(err)
                v = s.default
            self.values[name] = v
        for err in bad:
            node.get_logger().error(f"invalid start-up parameter, default used instead: {err}")
        self.startup_errors = list(bad)
        if validator is not None:
            err = validator(dict(self.values))
            if err:
                node.get_logger().error(f"invalid start-up parameter combination: {err}")
                self.startup_errors.append(err)
        node.add_on_set_parameters_callback(self._on_set)

    def __getitem__(self, name: str):
        return self.values[name]

    def _on_set(self, params) -> SetParametersResult:
        changed = {}
        for p in params:
            s = self.specs.get(p.name)
            if s is None:
                continue
            v = p.value
            if isinstance(s.default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            err = s.validate(v)
            if err:
                self._node.get_logger().warning(f"rejected parameter update: {err}")
                return SetParametersResult(successful=False, reason=err)
            if s.read_only:
                return SetParametersResult(successful=False, reason=f"{p.name} is read-only")
            changed[p.name] = v
        if changed and self._validator is not None:
            proposed = dict(self.values)
            proposed.update(changed)
            try:
                err = self._validator(proposed)
            except Exception as e:  # a validator bug must not take the node down
                err = f"parameter validation failed: {e}"
            if err:
                self._node.get_logger().warning(f"rejected parameter update {sorted(changed)}: {err}")
                return SetParametersResult(successful=False, reason=err)
        self.values.update(changed)
        if changed and self._on_change is not None:
            self._on_change(changed)
        return SetParametersResult(successful=True)

    def grouped(self, prefix: str) -> Dict[str, Any]:
        """Values under ``prefix.`` with the prefix stripped (e.g. 'dga' -> {'alpha_p': 0.5, ...})."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.values.items() if k.startswith(p)}
