"""Profile files: one ``.safetensors`` with two integer tensors and a JSON header.

Layout (format version 1):

* tensor ``labels``  ``(blocks, dim)``      cluster of every hidden dimension, smallest
  unsigned/signed int dtype that holds it (uint8 for up to 256 clusters);
* tensor ``solvers`` ``(blocks, clusters)`` index of each cluster's solver in the pool
  listed in the header (uint8);
* safetensors metadata ``{"hyca": "<JSON>"}`` with the format and pool versions, the
  pool's solver names (ids are mapped by *name* on load, so a reordered or extended
  pool still reads old files), the model fingerprint, the schedule the profile was
  chosen for, the probe settings, creation time and the writing hyca version.

Reading parses the header itself (plain JSON, never pickle) before handing the file to
safetensors, so every failure is named: not a safetensors file, truncated, corrupt
header, not a HyCa profile, newer format, unknown solver, wrong shapes or dtypes,
labels out of range, and -- when the model is given -- a profile for another model.
Writing goes to a temporary file in the same folder and is renamed into place, so an
interrupted save never leaves half a file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..math.solvers import POOL_VERSION, get_solver, pool_names
from . import fingerprint as fpmod
from .profile import Profile

FORMAT_NAME = "hyca-profile"
FORMAT_VERSION = 1
#: safetensors metadata key holding the JSON header.
HEADER_KEY = "hyca"
#: Profile.metadata keys that the header stores as structured fields.
STRUCTURED = ("fingerprint", "interval", "warmup", "probe")
#: Profile.metadata keys the header rewrites on every save (a loaded profile gets them back).
DERIVED = ("created", "hyca_version", "pool_version", "format_version")
#: Refuse headers larger than this: a profile header is a few KiB.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Refuse files larger than this: FLUX.1's profile is about 180 KiB.
MAX_FILE_BYTES = 64 * 1024 * 1024
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ProfileError(ValueError):
    """A profile file cannot be used; the message says why and what to do."""


# --- writing ------------------------------------------------------------------------------

def _smallest_dtype(high: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if high <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def model_fingerprint(model: Any) -> dict[str, Any] | None:
    """A fingerprint dict from a fingerprint (a mapping) or None. Adapters make fingerprints
    from their model objects (``hyca.adapters.diffusers.fingerprint.fingerprint(transformer)``);
    this core module does not know them."""
    if model is None:
        return None
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(
        f"expected a model fingerprint (a dict), got {type(model).__name__}; for a diffusers transformer use "
        "hyca.adapters.diffusers.fingerprint.fingerprint(transformer)"
    )


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over ``labels`` then ``solvers`` as stored (dtype and bytes): catches flipped
    bits in the data, which safetensors itself does not check."""
    digest = hashlib.sha256()
    for name in ("labels", "solvers"):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _finite(value: Any) -> Any:
    """Non-finite floats become None: JSON has no NaN or infinity (a probe's error report may hold one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_header(profile: Profile, model: Any = None, *, interval: int | None = None,
                 warmup: int | None = None, probe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON header for ``profile``; arguments override what ``profile.metadata`` says."""
    meta = dict(profile.metadata)
    fp = model_fingerprint(model) or meta.get("fingerprint")
    if not fp:
        raise ProfileError(
            "a profile file must name its model: pass model=<the model fingerprint> "
            "(hyca.adapters.diffusers.fingerprint.fingerprint(transformer)) or put 'fingerprint' in profile.metadata"
        )
    _check_fingerprint(fp)
    _check_shapes(profile.labels.shape, profile.solvers.shape, fp, target=meta.get("target"))
    extra = {k: v for k, v in meta.items() if k not in STRUCTURED + DERIVED}
    chosen_for = extra.get("chosen_for")
    if interval is not None and isinstance(chosen_for, Mapping) and chosen_for.get("interval") not in (None, interval):
        extra["chosen_for"] = {**chosen_for, "interval": interval}  # the argument overrides it there too
    from .. import __version__

    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hyca_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "solver_pool": {"version": POOL_VERSION, "names": list(pool_names())},
        "fingerprint": dict(fp),
        "interval": interval if interval is not None else meta.get("interval"),
        "warmup": warmup if warmup is not None else meta.get("warmup"),
        "probe": dict(probe) if probe is not None else meta.get("probe", {}),
        "metadata": extra,
    }
    header = _finite(header)
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ProfileError(f"profile metadata must be plain JSON (str, int, float, bool, lists, dicts): {err}"
                           ) from None
    return header


def save_profile(profile: Profile, path: str | os.PathLike, model: Any = None, *, interval: int | None = None,
                 warmup: int | None = None, probe: Mapping[str, Any] | None = None) -> Path:
    """Write ``profile`` to ``path`` atomically; returns the path.

    ``model``: the model fingerprint (else ``profile.metadata["fingerprint"]``).
    ``interval`` / ``warmup`` / ``probe``: the schedule and probe settings it was chosen for
    (else the same keys of ``profile.metadata``).
    """
    from safetensors.torch import save_file

    header = build_header(profile, model, interval=interval, warmup=warmup, probe=probe)
    tensors = {
        "labels": profile.labels.to(_smallest_dtype(max(profile.num_clusters - 1, 0))).contiguous(),
        "solvers": profile.solvers.to(_smallest_dtype(len(pool_names()) - 1)).contiguous(),
    }
    header["tensors_sha256"] = tensor_digest(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so os.replace is an atomic rename on one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header)})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a profile is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# --- reading: the container ------------------------------------------------------------------

def _describe_foreign(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (torch.save / pickle checkpoint), not safetensors; HyCa never loads pickles"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle, not safetensors; HyCa never loads pickles"
    return "it does not start with a safetensors header"


def read_raw_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, checked against the file's real size."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ProfileError(f"{path}: not a profile file: {size / 2**20:.0f} MiB is far larger than any profile")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ProfileError(f"{path}: not a profile file ({size} bytes, too short for a safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length < 2:
                raise ProfileError(f"{path}: not a profile file: {_describe_foreign(head)}")
            if 8 + length > size:
                raise ProfileError(
                    f"{path}: truncated file: the header alone needs {8 + length} bytes but the file has {size}; "
                    "download or copy it again"
                )
            raw = f.read(length)
    except OSError as err:
        raise ProfileError(f"{path}: cannot read the profile file: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProfileError(f"{path}: corrupt file: its safetensors header is not valid JSON; "
                           "download or copy it again") from None
    if not isinstance(header, dict):
        raise ProfileError(f"{path}: corrupt file: its safetensors header is not a JSON object")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ProfileError(f"{path}: corrupt file: tensor entry {name!r} has no valid data_offsets") from None
    if 8 + length + data_end > size:
        raise ProfileError(
            f"{path}: truncated file: its tensors need {8 + length + data_end} bytes but the file has {size}; "
            "download or copy it again"
        )
    return header


def _hyca_header(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    meta = raw.get("__metadata__")
    text = meta.get(HEADER_KEY) if isinstance(meta, dict) else None
    if not isinstance(text, str):
        names = sorted(k for k in raw if k != "__metadata__")
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
        raise ProfileError(f"{path}: not a HyCa profile: a safetensors file without HyCa metadata (tensors: "
                           f"{shown or 'none'}); make a profile with: python -m hyca probe")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProfileError(f"{path}: corrupt profile: the HyCa metadata is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ProfileError(f"{path}: not a HyCa profile: its metadata does not declare format {FORMAT_NAME!r}")
    return header


def fingerprint_of(path: Path) -> Mapping[str, Any] | None:
    """The model fingerprint a profile file was made for, from its header alone; None when
    the file is no readable profile or names no model."""
    try:
        fingerprint = _hyca_header(path, read_raw_header(path)).get("fingerprint")
    except ProfileError:
        return None
    return fingerprint if isinstance(fingerprint, Mapping) else None


def model_class_of(path: Path) -> str | None:
    """The model class a profile file was made for (its fingerprint's ``class``), from its
    header alone; None when the file is no readable profile."""
    found = (fingerprint_of(path) or {}).get("class")
    return found if isinstance(found, str) else None


def settings_header(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata keys that say what a profile was chosen for, from a raw safetensors
    header (:func:`read_raw_header`), without loading the tensors: ``chosen_for``,
    ``interval``, ``warmup``, ``compute_last``, ``positions``, ``probe``."""
    header = _hyca_header(path, raw)
    extra = header.get("metadata") if isinstance(header.get("metadata"), Mapping) else {}
    return {**{k: extra.get(k) for k in ("chosen_for", "compute_last", "positions")},
            "interval": header.get("interval"), "warmup": header.get("warmup"),
            "probe": header.get("probe") if isinstance(header.get("probe"), Mapping) else {}}


# --- reading: the contents ----------------------------------------------------------------

def _field(path: Path, header: Mapping[str, Any], key: str, kind: type, optional: bool = False) -> Any:
    value = header.get(key)
    if value is None and optional:
        return None
    # bool is an int subclass; a JSON true is never a valid count.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProfileError(f"{path}: corrupt profile: metadata field {key!r} is {value!r:.80}, "
                           f"expected {kind.__name__}")
    return value


def _check_fingerprint(fp: Any, where: str = "the fingerprint") -> None:
    if not isinstance(fp, Mapping):
        raise ProfileError(f"{where} must be a JSON object, got {type(fp).__name__}")
    for key, kind in fpmod.FIELDS.items():
        if not isinstance(fp.get(key), kind) or isinstance(fp.get(key), bool):
            raise ProfileError(f"{where} field {key!r} is {fp.get(key)!r:.80}, expected {kind.__name__}")
    blocks = fp["blocks"]
    if not blocks or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                             for k, v in blocks.items()):
        raise ProfileError(f"{where} field 'blocks' must map block lists to positive counts, got {blocks!r:.80}")
    if fp["hidden_size"] <= 0:
        raise ProfileError(f"{where} field 'hidden_size' must be positive, got {fp['hidden_size']}")


def _check_run_keys(path: Path, metadata: Mapping[str, Any], interval: Any) -> None:
    """The metadata keys the engine runs by (:mod:`hyca.engine.targets`, :class:`~hyca.engine.schedule.Schedule`):
    a value the engine could not apply is a :class:`ProfileError` now, not a run that ignores it."""
    from ..engine.cache import POSITION_AXES
    from ..engine.targets import TARGETS

    target = metadata.get("target")
    if target is not None and target not in TARGETS:
        raise ProfileError(f"{path}: corrupt profile: target {target!r} in its metadata; HyCa forecasts one of "
                           f"{', '.join(TARGETS)}")
    first = metadata.get("first_interval")
    if first is not None:
        whole = isinstance(first, int) and not isinstance(first, bool)
        if not whole or first < 1 or (isinstance(interval, int) and first > interval):
            raise ProfileError(f"{path}: corrupt profile: first_interval {first!r} in its metadata (the first "
                               f"computed step after warm-up: a whole number from 1 to the interval N={interval})")
    for key in ("skip_last", "guard", "compute_last"):
        if key in metadata and not isinstance(metadata[key], bool):
            raise ProfileError(f"{path}: corrupt profile: {key} {metadata[key]!r} in its metadata (true or false)")
    positions = metadata.get("positions")
    if positions is not None and positions not in POSITION_AXES:
        raise ProfileError(f"{path}: corrupt profile: positions {positions!r} in its metadata (one of "
                           f"{', '.join(POSITION_AXES)})")
    chosen_for = metadata.get("chosen_for")
    if chosen_for is not None and not isinstance(chosen_for, Mapping):
        raise ProfileError(f"{path}: corrupt profile: chosen_for {chosen_for!r} in its metadata (the settings it was "
                           "chosen for, a mapping)")
    told = chosen_for.get("interval") if isinstance(chosen_for, Mapping) else None
    if told is not None and isinstance(interval, int) and told != interval:
        raise ProfileError(f"{path}: corrupt profile: chosen for interval N={told} in its settings but N={interval} "
                           "in its header; the file contradicts itself")


def _check_shapes(labels_shape: Any, solvers_shape: Any, fp: Mapping[str, Any], where: str = "profile",
                  target: Any = None) -> None:
    """A profile covers every block x hidden dim; one that forecasts the output head
    (``target="output"``) covers that head's input, one "block" x hidden dim; one that
    forecasts the model output (``"model_output"``), one "block" x output channels (the
    fingerprint does not hold them: the host checks them at the first step)."""
    if target == "model_output" and len(labels_shape) == 2 and labels_shape[1] >= 1:
        want = (1, int(labels_shape[1]))
    else:
        want = (1 if target == "output" else fpmod.total_blocks(fp), int(fp["hidden_size"]))
    if len(labels_shape) != 2 or tuple(labels_shape) != want:
        raise ProfileError(
            f"{where}: labels have shape {tuple(labels_shape)}, but the model it names "
            f"({fpmod.describe(fp)}) needs {want}; the file is damaged or was edited -- probe again"
        )
    if len(solvers_shape) != 2 or solvers_shape[0] != want[0] or solvers_shape[1] < 1:
        raise ProfileError(
            f"{where}: solvers have shape {tuple(solvers_shape)}, expected ({want[0]}, clusters >= 1)"
        )


def _map_solver_ids(path: Path, solvers: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """File pool ids -> this hyca's pool ids, by name; unknown names are an error."""
    current = pool_names()
    table = torch.full((len(names),), -1, dtype=torch.int64)
    for fid in torch.unique(solvers).tolist():
        if not 0 <= fid < len(names):
            raise ProfileError(f"{path}: corrupt profile: solver id {fid} is outside the file's pool of {len(names)}")
        name = names[fid]
        try:
            table[fid] = current.index(get_solver(str(name)).name)
        except ValueError:
            raise ProfileError(
                f"{path}: the profile uses solver {name!r}, which this hyca does not know "
                f"(its pool: {', '.join(current)}); upgrade hyca or make a new profile with: python -m hyca probe"
            ) from None
    return table[solvers], sorted({names[i] for i in torch.unique(solvers).tolist()})


def read_profile(path: str | os.PathLike, expected: Any = None, *,
                 interval: int | None = None) -> tuple[Profile, list[str]]:
    """Load and validate ``path``; returns the profile and warnings (nothing is warned here).

    ``expected``: the fingerprint of the model the profile must belong to.
    ``interval``: the interval it is about to be used at (a different one is a warning).
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"{path} is a folder; give one of its .safetensors profile files")
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    raw = read_raw_header(path)
    header = _hyca_header(path, raw)
    version = _field(path, header, "format_version", int)
    if version > FORMAT_VERSION:
        raise ProfileError(
            f"{path}: profile format version {version} is newer than this hyca understands "
            f"(up to {FORMAT_VERSION}); upgrade hyca (pip install -U hyca)"
        )
    if version < 1:
        raise ProfileError(f"{path}: corrupt profile: format version {version}")
    pool_info = _field(path, header, "solver_pool", dict)
    names = pool_info.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise ProfileError(f"{path}: corrupt profile: 'solver_pool.names' must be a list of solver names")
    fp = _field(path, header, "fingerprint", dict)
    try:
        _check_fingerprint(fp, "the profile's fingerprint")
    except ProfileError as err:
        raise ProfileError(f"{path}: corrupt profile: {err}") from None
    tensors = {k: v for k, v in raw.items() if k != "__metadata__"}
    if set(tensors) != {"labels", "solvers"}:
        raise ProfileError(f"{path}: corrupt profile: expected tensors labels and solvers, found {sorted(tensors)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            labels, solvers = f.get_tensor("labels"), f.get_tensor("solvers")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ProfileError(f"{path}: corrupt file: safetensors could not read it ({err})") from None
    if _field(path, header, "tensors_sha256", str) != tensor_digest({"labels": labels, "solvers": solvers}):
        raise ProfileError(f"{path}: corrupt file: the tensor data does not match its checksum; "
                           "download or copy it again")
    for name, t in (("labels", labels), ("solvers", solvers)):
        if t.dtype not in _INT_DTYPES:
            raise ProfileError(f"{path}: corrupt profile: {name} has dtype {t.dtype}, expected an integer dtype")
    extra_meta = header.get("metadata") if isinstance(header.get("metadata"), dict) else {}
    _check_run_keys(path, extra_meta, header.get("interval"))
    _check_shapes(labels.shape, solvers.shape, fp, where=str(path), target=extra_meta.get("target"))
    labels, solvers = labels.to(torch.int64), solvers.to(torch.int64)
    if labels.min() < 0 or labels.max() >= solvers.shape[1]:
        raise ProfileError(
            f"{path}: corrupt profile: cluster labels span [{int(labels.min())}, {int(labels.max())}] "
            f"but there are {solvers.shape[1]} clusters"
        )
    solvers, used = _map_solver_ids(path, solvers, names)

    warns: list[str] = []
    if _field(path, pool_info, "version", int) != POOL_VERSION:
        warns.append(
            f"{path}: made with solver pool version {pool_info['version']}, this hyca has {POOL_VERSION}; "
            f"solvers were matched by name ({', '.join(used)}), but their weights may have changed -- "
            "consider probing again"
        )
    if expected is not None:
        want = model_fingerprint(expected)
        why = fpmod.mismatch(fp, want)
        if why is not None:
            raise ProfileError(f"{path}: this profile does not fit the model: {why}; make one for this model "
                               "(the \"automatic\" profile in the WebUI and ComfyUI, python -m hyca probe for a "
                               "diffusers model)")
    chosen = _field(path, header, "interval", int, optional=True)
    warmup = _field(path, header, "warmup", int, optional=True)
    from .settings import RunSettings  # the one rule for what a count may be

    try:
        RunSettings.from_json({"interval": chosen, "warmup": warmup})
    except ValueError:
        raise ProfileError(f"{path}: corrupt profile: interval {chosen!r} / warm-up {warmup!r} in its metadata "
                           "(an interval is at least 1 and a warm-up at least 1); make the profile again") from None
    if interval is not None and chosen is not None and chosen != interval and interval > 1:  # (N=1 forecasts nothing)
        warns.append(
            f"{path}: this profile was chosen for interval N={chosen}, it is used at N={interval}; it works, "
            f"but forecasts may be less accurate -- set N={chosen} (interval={chosen}) to use it as chosen, or "
            f"probe at N={interval} for the best choice"
        )
    extra = _field(path, header, "metadata", dict, optional=True) or {}
    if isinstance(extra.get("chosen_for"), Mapping):  # what lookups rank it by: checked now, not at a run
        try:
            RunSettings.from_json(extra["chosen_for"])
        except ValueError as error:
            raise ProfileError(f"{path}: corrupt profile: the settings it was chosen for: {error}") from None
    metadata = {
        **extra,
        "fingerprint": fp,
        "interval": chosen,
        "warmup": warmup,
        "probe": _field(path, header, "probe", dict, optional=True) or {},
        "created": header.get("created"),
        "hyca_version": header.get("hyca_version"),
        "format_version": version,
        "pool_version": pool_info["version"],
    }
    return Profile(labels=labels, solvers=solvers, metadata=metadata, source=str(path)), warns


def load_profile(path: str | os.PathLike, model: Any = None, *, interval: int | None = None) -> Profile:
    """Load and validate a profile file (see :func:`read_profile`); problems that still
    allow use, like another interval, become :class:`UserWarning`\\ s."""
    profile, warns = read_profile(path, model, interval=interval)
    for message in warns:
        warnings.warn(message, UserWarning, stacklevel=2)
    return profile
