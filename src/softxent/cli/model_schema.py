"""What ``model.json`` may hold: strict parsing, the schema, and the checksum over the metadata.

:func:`parse_strict` reads JSON the way a model file must be: UTF-8, no duplicate keys, no ``NaN`` /
``Infinity``, no float that overflows, integers within int64, nesting at most :data:`MAX_DEPTH` deep, strings
without lone surrogates.  :func:`validate` checks the parsed object against the format (types, uniqueness,
sizes, integer ranges, and the agreements between its parts: the classes sorted and distinct, the feature
names exactly those that ``input_columns`` and ``categorical`` produce, the tensor shapes those of K classes
× D features) and returns what the loader needs.  Both raise :class:`~softxent.cli.errors.ModelFileError`;
the writer runs :func:`validate` too, so a model that saves is a model that loads.

The checksum (format version 2) is the SHA-256 of the canonical form of ``model.json`` without its
``checksum`` entry: ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.  It covers
every metadata value, and through ``tensors.sha256`` the tensor file too; whitespace and key order are free.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "ModelLayout", "parse_strict", "canonical_sha256", "verify_checksum", "validate"]

MAX_DEPTH = 16  # model.json written by softxent nests 4 deep (metrics -> split -> value)
MAX_VALUES = 2**20  # JSON values in a file, by default; model_io allows a model.json more (metadata_limits)
INT64 = 2**63
MAX_DIM = 2**40  # any tensor dimension; far above a real model, far below an overflow
STATUSES = ("complete", "interrupted", "checkpoint")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_FEATURE_KEYS = {"input_columns", "feature_names", "categorical", "impute", "standardize", "sparse", "table",
                 "image_shape", "svmlight_zero_based"}


class _Invalid(Exception):
    """A violated rule; ``validate`` turns it into a ModelFileError naming the file."""


# --------------------------------------------------------------------------------------------------
# strict JSON
# --------------------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise _Invalid(f"{name}, which is not JSON")


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Invalid(f"the key {_show(dup)} twice in one object")
    return obj


# all of these run over the whole text at C speed (regex, NumPy, json.dumps): a file built of millions of
# tiny values costs about what json.loads itself costs, not a Python loop per value
_STRING = re.compile(rb'"[^"]*"')  # once escaped backslashes and quotes are gone (no per-escape regex state)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b"[]{},:")))
_LONG_INT = re.compile(rb"(?<![0-9.eE+-])-?[0-9]{19,}(?![0-9.eE])")  # an integer token (not a float's digits)


def parse_strict(data: bytes, where: str, *, max_values: int = MAX_VALUES):
    """Parse ``data`` (the bytes of ``where``) as a model file's strict JSON of at most ``max_values`` values;
    ModelFileError otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{where} is corrupt (not UTF-8 text: byte {exc.start})") from None
    try:
        _check_text(data, max_values)
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        # inf (a float that overflowed: '1e999') and lone surrogates ('\ud800') cannot be written back
        json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{where} is corrupt or truncated (invalid JSON: {exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno})") from None
    except RecursionError:
        raise ModelFileError(f"{where} is corrupt (its JSON holds values nested deeper than {MAX_DEPTH} levels)") \
            from None
    except _Invalid as exc:
        raise ModelFileError(f"{where} is corrupt (its JSON holds {exc})") from None
    except UnicodeEncodeError:
        raise ModelFileError(f"{where} is corrupt (its JSON holds a string that is not valid Unicode: a lone "
                             "surrogate)") from None
    except ValueError:  # from json.dumps: a float that overflowed to inf
        raise ModelFileError(f"{where} is corrupt (its JSON holds a number that overflows a float64)") from None
    return obj


def _structure(data: bytes) -> tuple[bytes, bytes]:
    """``(data with its strings emptied, its structural characters [ ] { } , :)``: brackets, commas and digits
    inside strings do not count."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    bare = _STRING.sub(b'""', unescaped)
    return bare, bare.translate(None, _NOT_STRUCTURE)


def count_values(data: bytes) -> int:
    """How many JSON values ``data`` holds, at most (each value but the first follows a ',' or ':' or opens
    with '[' / '{'), in a few passes at C speed."""
    return len(_structure(data)[1])


def _check_text(data: bytes, max_values: int) -> None:
    """Before parsing: the number of values, the nesting depth, and integers beyond int64 (3.10 would convert
    a million digits in quadratic time; 3.11+ refuses over 4300 with a ValueError of its own)."""
    bare, structure = _structure(data)
    if len(structure) > max_values:  # each value but the first follows a ',' or ':' or opens with '[' / '{'
        raise _Invalid(f"more than {max_values:,} values (a model.json lists its classes and features, each once)")
    for m in _LONG_INT.finditer(bare):
        token = m.group()
        if len(token.lstrip(b"-")) > 19 or not -INT64 <= int(token) < INT64:
            raise _Invalid(f"an integer beyond int64 ({len(token.lstrip(b'-'))} digits)")
    b = np.frombuffer(structure.translate(None, b",:"), dtype=np.uint8)
    depth = np.cumsum(np.where((b == ord("[")) | (b == ord("{")), 1, -1), dtype=np.int64)
    if len(depth) and int(depth.max()) > MAX_DEPTH:
        raise _Invalid(f"values nested deeper than {MAX_DEPTH} levels")


def canonical_sha256(meta: dict) -> str:
    """SHA-256 of ``meta`` without its ``checksum`` entry, in canonical JSON (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------------
# the schema
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelLayout:
    """The validated parts of model.json the loader needs (the rest stays in the dict)."""

    classes: np.ndarray
    features: dict
    status: str
    target: str | None
    tensor_sha256: str
    tensor_bytes: int
    tensor_shapes: dict[str, tuple[int, ...]]


def _show(v, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(ok: bool, path: str, expected: str, value) -> None:
    if not ok:
        raise _Invalid(f"{path} must be {expected}; got {_show(value)}")


def _dict(obj, path: str) -> dict:
    _need(isinstance(obj, dict), path, "an object", obj)
    return obj


def _int(v, path: str, lo: int, hi: int) -> int:
    _need(_is_int(v) and lo <= v <= hi, path, f"an integer in [{lo}, {hi}]", v)
    return v


def _str_list(v, path: str, *, min_len: int = 0, unique: bool = True) -> list[str]:
    _need(isinstance(v, list) and all(isinstance(x, str) for x in v), path, "a list of strings", v)
    _need(len(v) >= min_len, path, f"a list of at least {min_len} names", v)
    if unique and len(set(v)) != len(v):
        seen = set()
        dup = next(x for x in v if x in seen or seen.add(x))
        raise _Invalid(f"{path} lists {_show(dup)} twice")
    return v


def _optional(meta: dict, key: str, check) -> None:
    if key in meta and meta[key] is not None:
        check(meta[key])


def _classes(obj) -> np.ndarray:
    obj = _dict(obj, "classes")
    _need(set(obj) == {"type", "values"}, "classes", "an object with exactly 'type' and 'values'", sorted(obj))
    kind, values = obj["type"], obj["values"]
    _need(kind in ("bool", "int", "float", "str"), "classes.type", "'bool', 'int', 'float' or 'str'", kind)
    _need(isinstance(values, list), "classes.values", "a list", values)
    _need(len(values) >= 2, "classes.values", "a list of at least 2 classes", values)
    element = {"bool": (lambda x: isinstance(x, bool), "true or false"),
               "int": (_is_int, "an integer"),
               "float": (_is_number, "a number"),
               "str": (lambda x: isinstance(x, str), "a string")}[kind]
    for i, x in enumerate(values):
        _need(element[0](x), f"classes.values[{i}]", element[1] + f" (classes.type is {kind!r})", x)
    for i in range(1, len(values)):  # predict maps labels to rows of Θ by binary search: sorted, distinct
        if not values[i - 1] < values[i]:
            raise _Invalid(f"classes.values must be sorted and distinct; {_show(values[i - 1])} comes before "
                           f"{_show(values[i])}")
    return np.array(values, dtype={"bool": bool, "int": np.int64, "float": np.float64, "str": str}[kind])


def _features(obj) -> dict:
    f = _dict(obj, "features")
    missing, unknown = _FEATURE_KEYS - set(f), set(f) - _FEATURE_KEYS
    _need(not missing, "features", f"an object with {sorted(_FEATURE_KEYS)}", f"missing {sorted(missing)}")
    _need(not unknown, "features", "an object with the known entries only", f"unknown {sorted(unknown)}")
    inputs = _str_list(f["input_columns"], "features.input_columns", min_len=1)
    names = _str_list(f["feature_names"], "features.feature_names", min_len=1)
    for key in ("standardize", "sparse", "table"):
        _need(isinstance(f[key], bool), f"features.{key}", "true or false", f[key])
    _need(f["impute"] in (None, "mean"), "features.impute", "null or 'mean'", f["impute"])
    _need(f["svmlight_zero_based"] in (None, True, False), "features.svmlight_zero_based", "null, true or false",
          f["svmlight_zero_based"])
    cats = _dict(f["categorical"], "features.categorical")
    for col, values in cats.items():
        _need(col in inputs, f"features.categorical[{_show(col)}]", "one of input_columns", col)
        _str_list(values, f"features.categorical[{_show(col)}]", min_len=1)
        _need(values == sorted(values), f"features.categorical[{_show(col)}]", "sorted", values)
    if f["table"]:
        _need(not f["sparse"], "features.sparse", "false for a table", f["sparse"])
        expected = []  # what Preprocessing.fit names them: one-hot columns as 'column=value'
        for c in inputs:
            expected.extend([f"{c}={v}" for v in cats[c]] if c in cats else [c])
    else:
        _need(not cats, "features.categorical", "empty for a matrix (npz, svmlight)", cats)
        expected = inputs
    if names != expected:  # a swapped or renamed column would feed the wrong weights
        raise _Invalid("features.feature_names do not follow from features.input_columns and categorical "
                       "(columns swapped, renamed or missing)")
    shape = f["image_shape"]
    if shape is not None:
        _need(isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 1 for s in shape),
              "features.image_shape", "null or [height, width]", shape)
        _need(shape[0] * shape[1] == len(names), "features.image_shape", f"a shape of {len(names)} pixels", shape)
    return f


def _tensors(obj, k: int, d: int, impute: bool) -> tuple[str, int, dict]:
    t = _dict(obj, "tensors")
    _need(set(t) == {"file", "sha256", "bytes", "shapes"}, "tensors",
          "an object with exactly 'file', 'sha256', 'bytes' and 'shapes'", sorted(t))
    _need(t["file"] == "model.safetensors", "tensors.file", "'model.safetensors'", t["file"])
    _need(isinstance(t["sha256"], str) and bool(_SHA256.match(t["sha256"])), "tensors.sha256",
          "64 lowercase hex digits", t["sha256"])
    size = _int(t["bytes"], "tensors.bytes", 8, INT64 - 1)
    shapes = _dict(t["shapes"], "tensors.shapes")
    expected = {"coef": [k, d], "intercept": [k], "feature_mean": [d], "feature_scale": [d]}
    if impute:
        expected["impute_values"] = [d]
    _need(set(shapes) == set(expected) | {"loss_curve"}, "tensors.shapes",
          f"an object naming {sorted(set(expected) | {'loss_curve'})}", sorted(shapes))
    curve = shapes["loss_curve"]
    _need(isinstance(curve, list) and len(curve) == 1 and _is_int(curve[0]) and 0 <= curve[0] <= MAX_DIM,
          "tensors.shapes.loss_curve", f"[T] with 0 <= T <= {MAX_DIM}", curve)
    for name, shape in expected.items():
        _need(shapes[name] == shape, f"tensors.shapes.{name}", f"{shape} ({k} classes × {d} features)",
              shapes[name])
    return t["sha256"], size, {n: tuple(s) for n, s in shapes.items()}


def _known_sections(meta: dict) -> None:
    """Types of the entries the commands print or reuse (info, report, --resume)."""
    number_or_null = (lambda v: v is None or _is_number(v), "a number or null")

    def section(key, rules):
        if key not in meta:
            return
        sec = _dict(meta[key], key)
        for name, (ok, expected) in rules.items():
            if name in sec:
                _need(ok(sec[name]), f"{key}.{name}", expected, sec[name])

    count = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    text_or_null = (lambda v: v is None or isinstance(v, str), "a string or null")
    section("estimator", {"class": text_or_null, "solver": text_or_null, "n_iter": count,
                          "objective": number_or_null, "fit_seconds": number_or_null,
                          "params": (lambda v: isinstance(v, dict), "an object"),
                          "converged": (lambda v: isinstance(v, bool), "true or false")})
    section("training", {"data": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                                  "a list of strings"),
                         "format": text_or_null, "n_rows": count, "n_train": count, "n_test": count,
                         "test_size": number_or_null, "seed": (lambda v: v is None or _is_int(v), "an integer"),
                         "command": text_or_null, "dask": (lambda v: isinstance(v, bool), "true or false")})
    if "metrics" in meta:
        for split, m in _dict(meta["metrics"], "metrics").items():
            for name, v in _dict(m, f"metrics.{split}").items():
                _need(number_or_null[0](v), f"metrics.{split}.{name}", "a number or null", v)


def verify_checksum(meta: dict, where: str) -> None:
    """Format version 2: ``checksum.sha256`` must be :func:`canonical_sha256` of the rest of model.json."""
    c = meta.get("checksum")
    if not (isinstance(c, dict) and set(c) == {"sha256"} and isinstance(c["sha256"], str)
            and _SHA256.match(c["sha256"])):
        raise ModelFileError(f"{where} is corrupt: its 'checksum' entry is missing or malformed (expected "
                             "{\"sha256\": 64 lowercase hex digits})")
    if canonical_sha256(meta) != c["sha256"]:
        raise ModelFileError(f"{where} is corrupt: its content does not match its checksum (the file was changed "
                             "or damaged after it was written)")


def validate(meta, where: str, *, saving: bool = False) -> ModelLayout:
    """Check a parsed model.json against the schema; ModelFileError naming ``where`` (the writer passes
    ``saving=True``: the problem is then a model that must not be written, not a corrupt file)."""
    try:
        _dict(meta, "model.json")
        _need(isinstance(meta.get("softxent_version"), str), "softxent_version", "a string",
              meta.get("softxent_version"))
        _optional(meta, "written", lambda v: _need(isinstance(v, str), "written", "a string", v))
        status = meta.get("status")
        _need(status in STATUSES, "status", " or ".join(map(repr, STATUSES)), status)
        _need(meta.get("target") is None or isinstance(meta.get("target"), str), "target", "a string or null",
              meta.get("target"))
        for key in ("classes", "features", "tensors"):
            _need(key in meta, key, "present", None)
        classes = _classes(meta["classes"])
        feats = _features(meta["features"])
        sha, size, shapes = _tensors(meta["tensors"], len(classes), len(feats["feature_names"]),
                                     feats["impute"] is not None)
        _known_sections(meta)
    except _Invalid as exc:
        raise ModelFileError(f"{where} {'cannot be saved' if saving else 'is corrupt'}: {exc}") from None
    return ModelLayout(classes=classes, features=feats, status=status, target=meta.get("target"),
                       tensor_sha256=sha, tensor_bytes=size, tensor_shapes=shapes)
