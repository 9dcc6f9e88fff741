"""Model checkpoints by path or by Hugging Face hub id (one resolver for DUSt3R/MASt3R and SAM2).

:func:`resolve_checkpoint` turns what a user wrote (``dust3r.checkpoint`` / ``sam2.checkpoint``
parameters, ``--checkpoint`` / ``--sam2-checkpoint`` options) into a local path:

* an existing file or folder (``~`` expanded) is returned as it is;
* a hub id ``owner/name`` (optionally ``owner/name/file.pt`` or ``owner/name@revision``) is
  resolved with ``huggingface_hub`` **through its cache** (``HF_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): a cached copy is used without any
  network access; otherwise it is downloaded into that cache, unless ``HF_HUB_OFFLINE=1`` (then,
  and when the download fails, one :class:`CheckpointError` says what to download and where).

What is fetched per kind: ``dust3r`` repositories are ``save_pretrained`` folders (config.json +
weights; NAVER's ``naver/DUSt3R_*`` / ``naver/MASt3R_*`` ids), the whole snapshot is resolved
and its folder returned; ``sam2`` repositories hold one ``.pt`` per model (``facebook/sam2.1-hiera-*``,
the file names of ``sam2.build_sam.HF_MODEL_ID_TO_FILENAMES``), that file is returned.
Licences stay the models': DUSt3R/MASt3R weights CC BY-NC-SA 4.0, SAM2 Apache-2.0.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple, Type

from .errors import WildsegError


class CheckpointError(WildsegError):
    """A checkpoint cannot be found locally and cannot (or may not) be downloaded."""


_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
                     r"(?P<file>/[^@]+)?(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")

#: file inside each known SAM2 repository (as sam2.build_sam names them)
SAM2_HUB_FILES = {
    "facebook/sam2-hiera-tiny": "sam2_hiera_tiny.pt",
    "facebook/sam2-hiera-small": "sam2_hiera_small.pt",
    "facebook/sam2-hiera-base-plus": "sam2_hiera_base_plus.pt",
    "facebook/sam2-hiera-large": "sam2_hiera_large.pt",
    "facebook/sam2.1-hiera-tiny": "sam2.1_hiera_tiny.pt",
    "facebook/sam2.1-hiera-small": "sam2.1_hiera_small.pt",
    "facebook/sam2.1-hiera-base-plus": "sam2.1_hiera_base_plus.pt",
    "facebook/sam2.1-hiera-large": "sam2.1_hiera_large.pt",
}
#: matching SAM2 config of each known repository (inside the sam2 package)
SAM2_HUB_CONFIGS = {
    "facebook/sam2-hiera-tiny": "configs/sam2/sam2_hiera_t.yaml",
    "facebook/sam2-hiera-small": "configs/sam2/sam2_hiera_s.yaml",
    "facebook/sam2-hiera-base-plus": "configs/sam2/sam2_hiera_b+.yaml",
    "facebook/sam2-hiera-large": "configs/sam2/sam2_hiera_l.yaml",
    "facebook/sam2.1-hiera-tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "facebook/sam2.1-hiera-small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "facebook/sam2.1-hiera-base-plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "facebook/sam2.1-hiera-large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def parse_hub_id(spec: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """(repo_id, file inside the repo or None, revision or None) when ``spec`` reads as a hub id
    (``owner/name[/file][@rev]``, not an absolute / relative / home path), else None."""
    s = str(spec).strip()
    if not s or s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") < 1:
        return None
    m = _HUB_ID.match(s)
    if not m:
        return None
    f = m.group("file")
    return m.group("repo"), (f[1:] if f else None), m.group("rev")


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub uses, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    return str(os.environ.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "true", "yes", "on")


def _how_to_get(repo: str, filename: Optional[str], cache: str) -> str:
    what = f"{repo} {filename}" if filename else repo
    return (f"on a machine with internet access run `hf download {what}` (huggingface_hub's CLI; older "
            f"releases: huggingface-cli download) or in Python "
            f"huggingface_hub.{'hf_hub_download' if filename else 'snapshot_download'}({repo!r}"
            f"{', ' + repr(filename) if filename else ''}), and copy its cache folder "
            f"models--{repo.replace('/', '--')} into {cache} (set HF_HUB_CACHE to use another cache), or "
            "download the checkpoint file and give its local path instead")


def cached_checkpoint(spec, kind: str = "dust3r") -> Optional[str]:
    """The local path of hub id ``spec`` when it is already in the hub cache, else None (never
    touches the network; for checks such as ``wildseg3d check-gpu``)."""
    hub = parse_hub_id(spec) if spec else None
    if hub is None:
        return None
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return resolve_checkpoint(spec, kind)
    except CheckpointError:
        return None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def how_to_download(spec, kind: str = "dust3r") -> str:
    """What to run to put hub id ``spec`` into the local cache."""
    hub = parse_hub_id(spec)
    if hub is None:
        return ""
    fname = hub[1] or (SAM2_HUB_FILES.get(hub[0]) if kind == "sam2" else None)
    return _how_to_get(hub[0], fname, hub_cache_dir())


def resolve_checkpoint(spec, kind: str = "dust3r", error: Type[Exception] = CheckpointError) -> str:
    """Local path of the checkpoint ``spec`` (see the module docstring); ``kind`` 'dust3r' |
    'sam2'; ``error``: exception class raised (the caller's, e.g. BackendError)."""
    if spec is None or not str(spec).strip():
        raise error(f"no {kind} checkpoint given (a local path or a Hugging Face hub id)")
    raw = str(spec).strip()
    path = os.path.expanduser(raw)
    if os.path.exists(path):
        return path
    hub = parse_hub_id(raw)
    if hub is None:
        raise error(f"{kind} checkpoint {raw!r} is not an existing file or folder (nor a Hugging Face hub id "
                    "like owner/name)")
    repo, filename, rev = hub
    if kind == "sam2" and filename is None:
        filename = SAM2_HUB_FILES.get(repo)
        if filename is None:
            raise error(f"SAM2 hub id {repo!r}: unknown repository; name the file too (owner/name/file.pt) or use "
                        f"one of {sorted(SAM2_HUB_FILES)}")
    try:
        import huggingface_hub as hf
    except ImportError as exc:
        raise error(f"{kind} checkpoint {raw!r} looks like a Hugging Face hub id but huggingface_hub is not "
                    f"installed ({exc}): pip install huggingface_hub, or give a local path") from exc
    cache = hub_cache_dir()
    offline = hub_offline()
    kw = dict(repo_id=repo, revision=rev, cache_dir=cache)
    try:
        if filename:
            return str(hf.hf_hub_download(filename=filename, local_files_only=True, **kw))
        return str(hf.snapshot_download(local_files_only=True, **kw))
    except Exception as exc:  # noqa: BLE001 - not cached (the hub's exception types vary by version)
        cached_err = exc
    if offline:
        raise error(f"{kind} checkpoint {raw!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 "
                    f"forbids downloading it ({type(cached_err).__name__}): " + _how_to_get(repo, filename, cache))
    try:
        if filename:
            return str(hf.hf_hub_download(filename=filename, **kw))
        return str(hf.snapshot_download(**kw))
    except Exception as exc:  # noqa: BLE001 - network / auth / missing repo: one readable message
        raise error(f"{kind} checkpoint {raw!r}: not cached in {cache} and the download failed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}): "
                    + _how_to_get(repo, filename, cache)) from exc
