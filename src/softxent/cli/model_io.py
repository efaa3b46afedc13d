"""The model folder: ``model.safetensors`` (the numbers) + ``model.json`` (everything else).  No pickle.

``model.safetensors`` holds float64 tensors::

    coef            (K, D)   Θ, row k = class k           intercept   (K,)   b
    feature_mean    (D,)     standardisation centre       feature_scale (D,)  standardisation scale
    impute_values   (D,)     only with --impute mean      loss_curve  (T,)    objective per iteration

``model.json`` holds the format name and version, the softxent version, the classes (with their type, so
that ints stay ints and strings stay strings), the feature names and preprocessing, the estimator's
parameters, the solver, the objective, the metrics, the training data's description and the run's status
(``complete``, ``interrupted`` or ``checkpoint``), the SHA-256, size and shapes of the tensors, and (format
version 2) a checksum of all of that (:mod:`.model_schema`).

Loading never executes code and reads nothing unbounded: only regular files inside the folder; model.json
no larger than the tensor file beside it allows (:func:`metadata_limits`), parsed strictly, its checksum verified and its schema validated; the tensor file's size, 8-byte header
length and JSON header checked against model.json before its body is read once, then its SHA-256.  Every
problem raises :class:`~softxent.cli.errors.ModelFileError` with a one-line reason that never quotes the
file's bytes.

Saving is one step (:func:`save_model`): the tensors are staged under their SHA-256, ``model.json`` is the
commit point, and the loader finds the tensors under either name, so the folder holds the old model or the
new one at every instant.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Preprocessing
from .errors import ModelFileError
from .model_schema import MAX_VALUES, canonical_sha256, count_values, parse_strict, validate, verify_checksum

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_JSON",
    "MODEL_TENSORS",
    "SavedModel",
    "save_model",
    "load_model",
    "metadata_limits",
    "check_metadata_fits",
    "resolve_model_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "classes_to_json",
    "classes_from_json",
]

FORMAT_NAME = "softxent-model"
FORMAT_VERSION = 2  # 2: model.json carries a checksum of its own content; the folder is saved as one step
MODEL_JSON = "model.json"
MODEL_TENSORS = "model.safetensors"
MAX_JSON_BYTES = 16 * 2**20  # model.json's allowance whatever the tensors (with MAX_VALUES; parses in ~1 s)
#: beyond MAX_JSON_BYTES, a model.json may hold this many bytes per byte of the tensor file beside it
JSON_BYTES_PER_TENSOR_BYTE = 16
_MAX_HEADER = 2**20  # the safetensors JSON header; softxent's own is under 1 KiB


def metadata_limits(tensor_bytes: int) -> tuple[int, int]:
    """The most bytes and JSON values a model.json may have beside a tensor file of ``tensor_bytes`` bytes.

    model.json lists a few names per feature (its input column, its name, a category), the tensor file holds
    K + 2 >= 4 float64 per feature: both grow with the features, so the limits do too -- above a fixed
    allowance, :data:`JSON_BYTES_PER_TENSOR_BYTE` bytes per tensor byte (512 bytes per feature at K = 2) and
    one value per float64 (4 per feature).  A fixed 16 MiB made models of ~500 000 features fail when saved,
    and 2**20 values svmlight's widest data; a small folder still cannot make the loader parse a large
    model.json.  ``train`` checks before fitting that its names fit (:func:`check_metadata_fits`).
    """
    return MAX_JSON_BYTES + JSON_BYTES_PER_TENSOR_BYTE * tensor_bytes, MAX_VALUES + tensor_bytes // 8


def check_metadata_fits(preprocessing: Preprocessing, classes, meta: dict | None = None) -> None:
    """Before fitting: a DataError when the feature names, categories and class labels (and ``meta``, e.g. the
    training files) would make a model.json over :func:`metadata_limits` for a model of these features and
    classes, so that a model that trains is a model that saves (and loads); only absurdly long names fail."""
    from .errors import DataError

    k, d = len(classes), preprocessing.n_features
    tensor_bytes = 8 * (k * d + k + d * len(preprocessing.tensors()))  # a lower bound: no loss curve, no header
    text = _dumps(_jsonable({"classes": classes_to_json(classes), "features": preprocessing.to_json(),
                             **(meta or {})})).encode("utf-8")
    reserve = 64 << 10  # the rest: format, parameters, metrics
    max_bytes, max_values = metadata_limits(tensor_bytes)
    if len(text) + reserve > max_bytes or count_values(text) + 4096 > max_values:
        names = list(preprocessing.input_columns) + [str(c) for c in classes]
        longest = max(names, key=len, default="")
        raise DataError(f"the names of this model ({d:,} features, {k:,} classes) would take {len(text):,} bytes of "
                        f"{MODEL_JSON}, more than the {max_bytes - reserve:,} such a model may have; shorten the column "
                        f"names, category values or class labels (the longest has {len(longest):,} characters)")


def _refuse_metadata_size(json_bytes: int, n_values: int | None, tensor_bytes: int, where: str) -> None:
    """ModelFileError when model.json's size or value count exceed :func:`metadata_limits` (the value count
    is not checked when None)."""
    max_bytes, max_values = metadata_limits(tensor_bytes)
    if json_bytes > max_bytes or (n_values is not None and n_values > max_values):
        what = f"{json_bytes:,} bytes" if json_bytes > max_bytes else f"{n_values:,} values"
        raise ModelFileError(f"{where} has {what}; beside a tensor file of {tensor_bytes:,} bytes a model.json may "
                             f"have at most {max_bytes:,} bytes and {max_values:,} values ({MAX_JSON_BYTES >> 20} MiB "
                             f"and {MAX_VALUES:,}, plus {JSON_BYTES_PER_TENSOR_BYTE} bytes and 1/8 value per tensor "
                             "byte)")


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode an ordinary open() would have
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    try:  # makes the rename itself durable; not available on every platform
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# classes keep their type
# --------------------------------------------------------------------------------------------------
def classes_to_json(classes: np.ndarray) -> dict:
    c = np.asarray(classes)
    if c.dtype.kind == "b":
        return {"type": "bool", "values": [bool(v) for v in c]}
    if c.dtype.kind in "iu":
        return {"type": "int", "values": [int(v) for v in c]}
    if c.dtype.kind == "f":
        if np.all(c == np.round(c)):
            return {"type": "int", "values": [int(v) for v in c]}
        return {"type": "float", "values": [float(v) for v in c]}
    return {"type": "str", "values": [str(v) for v in c]}


def classes_from_json(obj: dict) -> np.ndarray:
    kind, values = obj["type"], obj["values"]
    if not isinstance(values, list):
        raise TypeError("classes.values must be a list")
    dtype = {"bool": bool, "int": np.int64, "float": np.float64, "str": str}.get(kind)
    if dtype is None:
        raise ValueError(f"unknown classes.type {kind!r}")
    if kind == "str" and not all(isinstance(v, str) for v in values):
        raise TypeError("classes.values must be strings")
    if kind in ("int", "float", "bool") and not all(isinstance(v, (int, float, bool)) for v in values):
        raise TypeError("classes.values must be numbers")
    return np.array(values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """What a model folder holds.  ``meta`` is the rest of model.json (estimator, training, metrics, ...)."""

    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    preprocessing: Preprocessing
    loss_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))
    target: str | None = None
    status: str = "complete"
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    json_text: str | None = None  # model.json as loaded and validated (what ``info --json`` prints)
    tensor_bytes: int = 0  # the size of the tensor file that was loaded
    notes: list[str] = field(default_factory=list)  # what the loader wants the user to know (old format)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_features(self) -> int:
        return self.preprocessing.n_features

    def decision_function(self, X) -> np.ndarray:
        """Logits ``z = X Θᵀ + b`` (N×K) for already preprocessed features X."""
        return np.asarray(X @ self.coef.T) + self.intercept

    def predict_proba(self, X) -> np.ndarray:
        """``softmax(X Θᵀ + b)`` through :func:`softxent.loss.softmax` (the one home of the formula)."""
        from ..loss import softmax

        return softmax(self.decision_function(X))

    def estimator(self, **params):
        """A fitted :class:`softxent.SoftmaxRegression` carrying this model's Θ, b and classes.

        With ``warm_start=True`` in ``params`` its ``fit`` continues from them (``--resume``).
        """
        from ..estimator import SoftmaxRegression

        est = SoftmaxRegression(**params)
        est.classes_ = self.classes.copy()
        est.coef_ = self.coef.copy()
        est.intercept_ = self.intercept.copy()
        est.n_features_in_ = self.n_features
        return est


def save_model(directory: str | os.PathLike, model: SavedModel) -> Path:
    """Write the model folder so that at every instant it holds the old model or the new one, whole.

    The protocol (``model.json``, written last, is the commit point; it names the tensors by SHA-256):

    1. the new tensors go to ``.model.safetensors.<sha256>`` beside the old files (atomically: temporary
       file, fsync, rename, fsync of the folder);
    2. ``model.json`` is replaced atomically — from here on the folder holds the new model, its tensors
       found under the staged name until
    3. the staged file is renamed to ``model.safetensors``;
    4. leftovers of earlier interrupted saves (staged files, temporary files) are removed.

    A process killed at any step leaves the old model (before 2) or the new one (after 2); :func:`load_model`
    looks for the tensors under both names and takes the one whose SHA-256 ``model.json`` names.  Saves into
    one folder are serialised by an advisory lock on the folder (POSIX).
    """
    from safetensors.numpy import save as st_save

    from .. import __version__

    d = Path(directory)
    k, dim = model.coef.shape
    tensors = {
        "coef": np.ascontiguousarray(model.coef, dtype=np.float64),
        "intercept": np.ascontiguousarray(model.intercept, dtype=np.float64),
        "loss_curve": np.ascontiguousarray(model.loss_curve, dtype=np.float64).reshape(-1),
        **{n: np.ascontiguousarray(v, dtype=np.float64) for n, v in model.preprocessing.tensors().items()},
    }
    _check_shapes(tensors, k, dim, model.preprocessing.impute is not None, where="the model to save")
    blob = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    tensor_sha = hashlib.sha256(blob).hexdigest()
    meta = _jsonable({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "softxent_version": __version__,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": model.status,
        "classes": classes_to_json(model.classes),
        "target": model.target,
        "features": model.preprocessing.to_json(),
        **{key: v for key, v in model.meta.items() if key not in _RESERVED},
        "tensors": {
            "file": MODEL_TENSORS,
            "sha256": tensor_sha,
            "bytes": len(blob),
            "shapes": {n: list(v.shape) for n, v in tensors.items()},
        },
    })
    validate(meta, "the model", saving=True)  # what the loader would refuse is never written
    meta["checksum"] = {"sha256": canonical_sha256(meta)}
    text = _dumps(meta) + "\n"
    try:  # the loader's own limits and parser on the very text: a model that saves is a model that loads
        data = text.encode("utf-8")
        _refuse_metadata_size(len(data), None, len(blob), MODEL_JSON)
        parse_strict(data, MODEL_JSON, max_values=metadata_limits(len(blob))[1])
    except (ModelFileError, UnicodeEncodeError) as exc:
        raise ModelFileError(f"the model cannot be saved: {exc}") from None
    d.mkdir(parents=True, exist_ok=True)
    with _folder_lock(d):
        staged = d / _staged_name(tensor_sha)
        atomic_write_bytes(staged, blob)
        atomic_write_text(d / MODEL_JSON, text)
        os.replace(staged, d / MODEL_TENSORS)
        _fsync_dir(d)
        _remove_leftovers(d)
    return d


def _staged_name(tensor_sha: str) -> str:
    return f".{MODEL_TENSORS}.{tensor_sha}"


# the names save_model (and format version 1's atomic writes) give their staged and temporary files
_LEFTOVER = re.compile(r"\.\.?model\.(json|safetensors)\..+\Z")


def _remove_leftovers(d: Path) -> None:
    """Remove staged and temporary files of interrupted saves (called with the lock held, after the commit)."""
    for entry in os.scandir(d):
        if _LEFTOVER.match(entry.name) and not entry.is_dir(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


@contextlib.contextmanager
def _folder_lock(d: Path):
    """An exclusive advisory lock (flock) on the folder for one save; a no-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_RESERVED = {"format", "format_version", "softxent_version", "written", "status", "classes", "target",
             "features", "tensors", "checksum"}


def _jsonable(x):
    """JSON-safe copy: numpy scalars -> Python, non-finite floats -> None (model.json is strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if x is None or isinstance(x, (str, int)):
        return x
    return str(x)


def _dumps(obj, indent: int = 0) -> str:
    """Strict JSON, indented by 2, with lists of scalars (classes, feature names) kept on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder for MODEL: the folder itself, or the folder of a model.json / model.safetensors."""
    p = Path(path)
    if p.name in (MODEL_JSON, MODEL_TENSORS) and (p.is_file() or p.is_symlink()):
        return p.parent
    if not p.exists():
        raise ModelFileError(f"no such model folder: {str(p)!r}")
    if not p.is_dir():
        raise ModelFileError(f"{str(p)!r} is not a model folder (give the folder that 'softxent train' wrote, "
                             f"holding {MODEL_JSON} and {MODEL_TENSORS})")
    return p


class _ChangedWhileReading(Exception):
    """model.json was replaced while the folder was being read (a save in progress): read it again."""


def load_model(path: str | os.PathLike) -> SavedModel:
    """Read and validate a model folder; every problem is a :class:`ModelFileError` with a one-line reason.

    Order of checks, so that nothing is read that its header does not declare:
    model.json (a regular file inside the folder, within :func:`metadata_limits` of the largest tensor file
    beside it) -> strict JSON -> format and version -> checksum of the metadata (version 2) -> schema; then
    the tensor file: its size must be
    the ``tensors.bytes`` model.json declares, its 8-byte header length and JSON header must describe exactly
    the tensors and shapes model.json lists, and only then is the body read, into one buffer of that size,
    and its SHA-256 compared.  Errors name the file and the rule, never the bytes found.
    """
    d = resolve_model_dir(path)
    for _ in range(5):
        try:
            return _load_once(d)
        except _ChangedWhileReading:
            continue
        except OSError as exc:  # unreadable entries, a symlink loop, a folder removed meanwhile, ...
            where = f": {exc.filename}" if exc.filename else f" in {str(d)!r}"
            raise ModelFileError(f"cannot read the model folder ({exc.strerror or type(exc).__name__}{where})") \
                from None
    raise ModelFileError(f"{str(d)!r} kept changing while it was read (5 times; is a training run saving into it?); "
                         "try again")


def _load_once(d: Path) -> SavedModel:
    real_dir = os.path.realpath(d)
    jpath, tpath = d / MODEL_JSON, d / MODEL_TENSORS
    fd = _open_member(d, real_dir, MODEL_JSON)
    if fd is None:
        raise ModelFileError(f"{str(d)!r} holds no {MODEL_JSON}; is it a folder written by 'softxent train'?")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        on_disk = _tensor_bytes_on_disk(d, real_dir)
        _refuse_metadata_size(size, None, on_disk, str(jpath))  # before a byte of it is read
        raw_json = _read_exact(f, size, jpath)
    meta = parse_strict(raw_json, str(jpath), max_values=metadata_limits(on_disk)[1])
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{jpath} is not a softxent model file (its 'format' is not {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{jpath} is corrupt: format_version must be a positive integer; got "
                             f"{repr(version)[:40]}")
    if version > FORMAT_VERSION:
        written_by = meta.get("softxent_version")
        written_by = written_by if isinstance(written_by, str) and len(written_by) <= 40 else "?"
        raise ModelFileError(f"{jpath} has model format version {version}, newer than this softxent "
                             f"({written_by} wrote it; this softxent reads up to version "
                             f"{FORMAT_VERSION}); upgrade softxent to load it")
    notes = []
    if version >= 2:
        verify_checksum(meta, str(jpath))
    else:
        notes.append(f"{jpath} has model format version 1, which has no checksum of its own content: damage to it "
                     "cannot be detected; save the model again (e.g. train --resume) to upgrade it")
    layout = validate(meta, str(jpath))

    tensors, problem = None, None
    # see save_model: between its steps 2 and 3 the tensors are under the staged name; the primary name
    # once more for a reader that looked just before a save's step 3 and at the staged name just after it
    for name in (MODEL_TENSORS, _staged_name(layout.tensor_sha256), MODEL_TENSORS):
        try:
            tensors = _read_tensors(d / name, real_dir, layout)
            break
        except (ModelFileError, OSError) as exc:
            problem = problem or exc  # the primary file's problem is the one to report
    if tensors is None:
        if _read_json_again(d, real_dir) != raw_json:
            raise _ChangedWhileReading
        raise problem
    if layout.tensor_bytes < on_disk:  # the limits came from a larger (staged) file than the one loaded
        _refuse_metadata_size(len(raw_json), count_values(raw_json), layout.tensor_bytes, str(jpath))
    for name in ("coef", "intercept", "feature_mean", "feature_scale", "impute_values"):
        if name in tensors and not np.all(np.isfinite(tensors[name])):
            raise ModelFileError(f"{tpath} is corrupt: tensor {name!r} holds NaN or infinite values")
    if np.any(tensors["feature_scale"] <= 0):
        raise ModelFileError(f"{tpath} is corrupt: tensor 'feature_scale' has a value <= 0")
    pre = Preprocessing.from_json(layout.features, tensors)
    rest = {k: v for k, v in meta.items() if k not in _RESERVED or k in ("softxent_version", "written")}
    return SavedModel(classes=layout.classes, coef=tensors["coef"], intercept=tensors["intercept"],
                      preprocessing=pre, loss_curve=tensors["loss_curve"], target=layout.target,
                      status=layout.status, meta=rest, path=d, json_text=raw_json.decode("utf-8"),
                      tensor_bytes=layout.tensor_bytes, notes=notes)


_STAGED = re.compile(r"\.model\.safetensors\.[0-9a-f]{64}\Z")


def _tensor_bytes_on_disk(d: Path, real_dir: str) -> int:
    """The size of the largest tensor file the loader could use (model.safetensors, or a staged copy between
    a save's steps 2 and 3), which sets model.json's limits before model.json is read.  A file mostly made of
    holes counts its allocated bytes only: a sparse 4 GiB file must not let a 64 GiB model.json be read.
    (On a file system that allocates late, e.g. ZFS before its next sync, a freshly saved tensor file may look
    sparse for a few seconds; only model.json files above 16 MiB can then be refused.)  Entries that cannot
    be opened are skipped: reading the tensors reports them."""
    largest = 0
    for name in [MODEL_TENSORS] + sorted(e.name for e in os.scandir(d) if _STAGED.match(e.name)):
        try:
            fd = _open_member(d, real_dir, name)
        except (ModelFileError, _ChangedWhileReading, OSError):
            continue
        if fd is None:
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        size = st.st_size
        allocated = 512 * getattr(st, "st_blocks", size)
        if allocated < size // 8:  # mostly holes (float64 tensors compress far less than 8x)
            size = allocated
        largest = max(largest, size)
    return largest


def _open_member(d: Path, real_dir: str, name: str) -> int | None:
    """An fd for ``d/name`` read-only, or None if there is no such entry.

    Refused with ModelFileError: a symbolic link whose target lies outside the folder (``real_dir``), and
    anything but a regular file (directory, FIFO, device, socket).  O_NONBLOCK: opening a FIFO must not
    wait for a writer; O_NOFOLLOW on the resolved path: a link swapped in after the check is not followed.
    """
    p = d / name
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    target = str(p)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(p)
        if os.path.commonpath([target, real_dir]) != real_dir or target == real_dir:
            raise ModelFileError(f"{p} is a symbolic link leading out of the model folder; softxent reads only "
                                 "files inside the folder")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        if stat.S_ISLNK(st.st_mode):
            raise ModelFileError(f"{p} is a dangling symbolic link") from None
        raise _ChangedWhileReading from None  # renamed away between lstat and open: a save in progress
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelFileError(f"{p} is a symbolic link loop") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelFileError(f"{p} is not a regular file (a directory, FIFO, device or socket)")
    return fd


def _read_json_again(d: Path, real_dir: str) -> bytes | None:
    fd = _open_member(d, real_dir, MODEL_JSON)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        fits = size <= metadata_limits(_tensor_bytes_on_disk(d, real_dir))[0]
        return _read_exact(f, size, d / MODEL_JSON) if fits else None


def _read_exact(f, n: int, where: Path) -> bytes:
    """Exactly ``n`` bytes from ``f`` into one buffer (the size was checked before: no more is ever read)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise _ChangedWhileReading if where.name == MODEL_JSON else ModelFileError(
                f"{where} is truncated (it shrank while being read)")
        got += k
    return bytes(buf) if where.name == MODEL_JSON else buf


def _read_tensors(path: Path, real_dir: str, layout) -> dict:
    """The tensors of ``path`` if its size, header and SHA-256 are those model.json declares; else
    ModelFileError.  The size and the header are checked before the body is read; the body is read into one
    buffer of the declared size and the arrays are views of it (peak memory: the file's size, once).
    """
    fd = _open_member(path.parent, real_dir, path.name)
    if fd is None:
        raise ModelFileError(f"{str(path.parent)!r} holds no {MODEL_TENSORS} ({MODEL_JSON} is there); the model "
                             "is incomplete")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != layout.tensor_bytes:
            what = "truncated" if size < layout.tensor_bytes else "corrupt"
            raise ModelFileError(f"{path} is {what}: it has {size} bytes; {MODEL_JSON} says {layout.tensor_bytes}")
        head = _read_exact(f, 8, path)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(f"{path} is corrupt (its 8-byte header length is implausible: over "
                                 f"{min(_MAX_HEADER, size - 8)} bytes)")
        header_bytes = _read_exact(f, n, path)
        offsets = _parse_header(bytes(header_bytes), size - 8 - n, layout.tensor_shapes, path)
        body = _read_exact(f, size - 8 - n, path)
    digest = hashlib.sha256(head)
    digest.update(header_bytes)
    digest.update(body)
    if digest.hexdigest() != layout.tensor_sha256:
        raise ModelFileError(f"{path} is corrupt: its SHA-256 does not match the one in {MODEL_JSON} (the file "
                             "was changed or damaged after it was written)")
    return {t: np.frombuffer(body, dtype="<f8", count=math.prod(shape), offset=a).reshape(shape)
            for t, (shape, a) in offsets.items()}


def _parse_header(raw: bytes, data_len: int, shapes: dict, path: Path) -> dict:
    """Check the safetensors JSON header against model.json: each listed tensor F64 with its shape, the
    tensors tiling the data section exactly.  Returns ``{name: (shape, byte offset)}``."""
    try:
        header = parse_strict(raw, f"{path}'s header")
    except ModelFileError:
        raise ModelFileError(f"{path} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is corrupt (its header is not a JSON object)")
    extra = header.pop("__metadata__", {})
    if not (isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())):
        raise ModelFileError(f"{path} is corrupt (its __metadata__ is not an object of strings)")
    if set(header) != set(shapes):
        raise ModelFileError(f"{path} does not hold the tensors {MODEL_JSON} lists (it has "
                             f"{len(header)} tensors; expected {', '.join(sorted(shapes))})")
    spans, out = [], {}
    for name, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise ModelFileError(f"{path} is corrupt (tensor {name!r}: malformed header entry)")
        if info["dtype"] != "F64":
            raise ModelFileError(f"{path}: tensor {name!r} is not F64 (float64), the dtype softxent writes")
        if info["shape"] != list(shapes[name]):
            shown = info["shape"] if isinstance(info["shape"], list) and len(info["shape"]) <= 4 else "another"
            raise ModelFileError(f"{path}: tensor {name!r} has shape {shown} but {MODEL_JSON} says "
                                 f"{list(shapes[name])}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in offs)):
            raise ModelFileError(f"{path} is corrupt (tensor {name!r}: data_offsets must be two integers)")
        a, b = offs
        if not 0 <= a <= b or b - a != 8 * math.prod(shapes[name]):
            raise ModelFileError(f"{path} is corrupt (tensor {name!r}: its offsets do not fit its shape)")
        spans.append((a, b))
        out[name] = (shapes[name], a)
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise ModelFileError(f"{path} is corrupt (its tensors overlap or leave gaps in the data)")
        end = b
    if end != data_len:
        raise ModelFileError(f"{path} is corrupt (its tensors cover {end} data bytes; the file has {data_len})")
    return out


def _check_shapes(tensors: dict, k: int, d: int, impute: bool, *, where: str) -> None:
    expected = {"coef": (k, d), "intercept": (k,), "feature_mean": (d,), "feature_scale": (d,)}
    if impute:
        expected["impute_values"] = (d,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{where} lacks the tensor {name!r}")
        got = tuple(np.shape(tensors[name]))
        if got != shape:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {got} but model.json describes {k} classes "
                                 f"× {d} features (expected {shape})")
    if "loss_curve" in tensors and np.ndim(tensors["loss_curve"]) != 1:
        raise ModelFileError(f"{where}: tensor 'loss_curve' must be 1-D; got shape {np.shape(tensors['loss_curve'])}")
