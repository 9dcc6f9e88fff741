"""The package's errors and its one cancellation scheme (ROS-free).

Every long step takes an optional ``cancel`` callable (returns True when the caller wants the
work aborted) and calls :func:`check_cancel` between units of work (a pair, a view, an
iteration); that raises :class:`Cancelled`, the single cancellation exception of the package.

Errors a user can act on derive from :class:`WildsegError` and carry a message that says what
was wrong and what to do: :class:`BackendError` (pointmap backends), :class:`SegmenterError`
(pre-segmentation / refinement models), :class:`AlignmentError` (degenerate alignment input,
also a ``ValueError``), :class:`PipelineError` (a reconstruction that cannot run),
:class:`InputError` (unusable offline input or options).
"""
from __future__ import annotations

from typing import Callable, Optional

CancelFn = Callable[[], bool]
ProgressFn = Callable[[float, str], None]


class WildsegError(RuntimeError):
    """Base of the package's user-facing errors."""


class Cancelled(RuntimeError):
    """``cancel()`` asked a long operation to stop (reset, shutdown, a newer request)."""


class BackendError(WildsegError):
    """A pointmap backend cannot be created or cannot run."""


class SegmenterError(WildsegError):
    """A segmentation backend cannot be created or cannot run."""


class AlignmentError(WildsegError, ValueError):
    """The pairwise predictions cannot be aligned (degenerate input)."""


class PipelineError(WildsegError):
    """A reconstruction that cannot run (too few keyframes, inconsistent inputs, a stage failed)."""


class InputError(WildsegError):
    """Offline input or options that cannot be used as asked (exit code 2 of the CLI)."""


def check_cancel(cancel: Optional[CancelFn], what: str = "operation") -> None:
    """Raise :class:`Cancelled` when ``cancel`` is given and returns True."""
    if cancel is not None and cancel():
        raise Cancelled(f"{what} cancelled")


def report(progress: Optional[ProgressFn], fraction: float, message: str = "") -> None:
    """Call ``progress(fraction clipped to [0, 1], message)`` when a callback is given."""
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)
