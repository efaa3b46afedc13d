"""Data sets for the command line: loading, the target column, and the feature preprocessing.

Formats (picked from the file name, or forced with ``--format``):

=============  ==========================================  ==================================
format         file names                                   features / labels
=============  ==========================================  ==================================
``csv``        ``.csv``, ``.tsv`` (+ ``.gz .bz2 .xz .zip``)  columns by header; ``--target COL``
``parquet``    ``.parquet``, ``.pq``                         columns by name; ``--target COL``
``npz``        ``.npz``                                      arrays ``X`` (N×D) and ``y`` (N,)
``svmlight``   ``.svm``, ``.svmlight``, ``.libsvm`` (+gz)    sparse X, the label is field one
=============  ==========================================  ==================================

Several files (or a glob such as ``'part-*.csv'``) are one data set: their rows are stacked; they must
have the same format and the same columns.  No file at all means the bundled default, scikit-learn's
digits (1797 8×8 images, 10 classes), which ships inside scikit-learn, so nothing is downloaded.
Nothing here unpickles: ``.npz`` files are read with ``allow_pickle=False``.

The features of a model are the columns of its Θ (K×D).  :class:`Preprocessing` maps raw rows to them::

    raw columns --one-hot(categorical)--> x (N×D, NaN allowed) --impute(mean)--> --standardise--> (x - mean) / scale

``mean`` and ``scale`` (the population standard deviation, 1 for a constant feature) are fitted on the
training split only.  Sparse (svmlight) data is scaled but not centred, so it stays sparse.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import DataError

__all__ = [
    "FORMATS",
    "RawData",
    "Preprocessing",
    "expand_paths",
    "detect_format",
    "load_data",
    "load_default",
    "split_target",
    "normalize_labels",
    "train_test_indices",
]

MISSING_CATEGORY = "<missing>"
# A text column at least this share of whose non-missing cells are numbers is a numeric column with some
# bad cells (a typo, a unit, a stray 'n/a'), not a category: one-hot encoding it would silently turn one
# feature into one column per distinct value.
MOSTLY_NUMERIC = 0.9

# format -> recognised suffixes (the last suffix, after stripping one compression suffix)
FORMATS: dict[str, tuple[str, ...]] = {
    "csv": (".csv", ".tsv"),
    "parquet": (".parquet", ".pq"),
    "npz": (".npz",),
    "svmlight": (".svm", ".svmlight", ".libsvm"),
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip")

# Limits proportional to what a file really holds, so that a small hostile file cannot claim gigabytes
# (see docs/cli.md, "Limits"): a compressed file may expand to EXPANSION_RATIO times its size, or to
# EXPANSION_FLOOR bytes when that is more (real CSV compresses 3-20x; a "zip bomb" 1000x); the same
# bound applies to the uncompressed size a Parquet file's metadata claims and to the arrays of an npz.
EXPANSION_RATIO = 100
EXPANSION_FLOOR = 256 << 20
#: svmlight: the largest feature index accepted is max(SVMLIGHT_MIN_FEATURES, the file's non-zeros):
#: every column a model learns costs K coefficients, and an index beyond both is a typo or an attack.
SVMLIGHT_MIN_FEATURES = 1 << 20
#: tables wider than this are consolidated once after reading (see _load_tables)
WIDE_TABLE_COLUMNS = 10_000
#: class labels longer than this are refused (they go into model.json, the report and its plots)
MAX_LABEL_CHARS = 1000


@dataclass
class RawData:
    """Rows as loaded, before the target is split off and the features are encoded.

    ``frame`` is set for tables (CSV / Parquet): every column by name, the target among them.
    ``X`` (dense N×D or CSR) and ``y`` (N,) or None are set for matrices (npz / svmlight / the default).
    """

    fmt: str
    sources: list[str]
    frame: object | None = None  # pandas.DataFrame
    X: np.ndarray | sp.csr_matrix | None = None
    y: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)
    image_shape: tuple[int, int] | None = None
    zero_based: bool | None = None  # svmlight only: were feature indices 0-based?
    target_name: str | None = None
    note: str = ""

    @property
    def n_rows(self) -> int:
        return len(self.frame) if self.frame is not None else self.X.shape[0]

    def describe(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0]
        return f"{len(self.sources)} {self.fmt} files ({self.sources[0]}, ...)"


# --------------------------------------------------------------------------------------------------
# files and formats
# --------------------------------------------------------------------------------------------------
def expand_paths(args: list[str]) -> list[Path]:
    """Each argument as a file, or as a glob when it names no file and holds ``* ? [``; sorted, in order."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.exists():
            if p.is_dir():
                raise DataError(f"data path {arg!r} is a directory; give the data files (a glob such as "
                                f"'{arg.rstrip('/')}/*.csv' takes them all)")
            if not p.is_file():  # /dev/zero never ends, a FIFO may never open: neither has a size to bound
                raise DataError(f"data path {arg!r} is not a regular file (a device, FIFO or socket); "
                                "give a data file")
            out.append(p)
            continue
        if any(c in arg for c in "*?["):
            matches = sorted(m for m in glob.glob(arg, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"no file matches the pattern {arg!r}")
            out.extend(Path(m) for m in matches)
            continue
        raise DataError(f"no such data file: {arg!r}")
    return out


def detect_format(path: Path, fmt: str | None = None) -> str:
    """The format of ``path`` from its suffix (a compression suffix is looked through), or ``fmt``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    for name, exts in FORMATS.items():
        if last in exts:
            return name
    known = ", ".join(e for exts in FORMATS.values() for e in exts)
    raise DataError(f"unknown data format for {str(path)!r} (suffix {last or 'none'!r}); expected one of "
                    f"{known}, or name it with --format {{{','.join(FORMATS)}}}")


def load_default() -> RawData:
    """scikit-learn's digits: 1797 8×8 grey-level images (features 0..16), labels 0..9; no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    names = list(getattr(bunch, "feature_names", [])) or [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return RawData(fmt="digits", sources=["digits (scikit-learn's bundled copy, 1797 8x8 images)"],
                   X=np.asarray(bunch.data, dtype=np.float64), y=np.asarray(bunch.target),
                   feature_names=names, image_shape=(8, 8), target_name="digit")


def load_data(args: list[str] | None, fmt: str | None = None, *, label_key: str | None = None,
              n_features: int | None = None, zero_based: bool | None = None) -> RawData:
    """Load DATA arguments (files or globs) as one data set; no arguments: the bundled default.

    ``label_key`` names the npz array of labels (default ``y``); a table's target column is looked up
    later by :func:`split_target`.  ``n_features`` / ``zero_based`` make svmlight files line up with a model.
    """
    if not args:
        return load_default()
    paths = expand_paths(list(args))
    fmts = {str(p): detect_format(p, fmt) for p in paths}
    kinds = sorted(set(fmts.values()))
    if len(kinds) > 1:
        raise DataError("the data files mix formats (" + ", ".join(f"{k}: {v}" for k, v in fmts.items())
                        + "); give files of one format")
    kind = kinds[0]
    if kind in ("csv", "parquet"):
        return _load_tables(paths, kind)
    if kind == "npz":
        return _load_npz(paths, label_key)
    return _load_svmlight(paths, n_features, zero_based)


def _expansion_limit(path: Path) -> int:
    """The most bytes ``path`` may expand to (see ``EXPANSION_RATIO``)."""
    return max(EXPANSION_RATIO * os.path.getsize(path), EXPANSION_FLOOR)


def _too_large(path: Path, what: str) -> DataError:
    limit = _expansion_limit(path)
    return DataError(f"{str(path)!r} {what}, more than the limit of {limit:,} bytes (the larger of "
                     f"{EXPANSION_RATIO}x its {os.path.getsize(path):,} bytes and {EXPANSION_FLOOR >> 20} MiB); "
                     "decompress it and read the plain file if it is genuine")


def check_decompressed_size(path: Path) -> None:
    """Stream a compressed file once (constant memory) and raise a DataError when it expands beyond
    :func:`_expansion_limit` or is damaged; uncompressed files pass untouched."""
    if path.suffix.lower() not in _COMPRESSION:
        return
    limit = _expansion_limit(path)
    with _stream_errors(path), _open_binary(path) as stream:
        total = 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise _too_large(path, f"expands to more than {limit:,} bytes when decompressed")


@contextlib.contextmanager
def _stream_errors(path: Path):
    """What reading ``path``'s bytes through its compression may raise, as a DataError naming the file."""
    import lzma
    import zipfile
    import zlib

    try:
        yield
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, ValueError) as exc:
        suffix = path.suffix.lower()
        what = f"decompress {str(path)!r} ({suffix[1:]})" if suffix in _COMPRESSION else f"read {str(path)!r}"
        raise DataError(f"cannot {what}: {_first_line(exc)}") from None


def _parquet_metadata(path: Path):
    """The footer of a Parquet file (the data is not read), refused when it has more than
    :data:`MAX_TABLE_COLUMNS` columns."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    if meta.num_columns > MAX_TABLE_COLUMNS:
        raise _too_wide(path, f"{meta.num_columns:,}")
    return meta


def _check_parquet_size(path: Path) -> None:
    """Refuse a Parquet file whose metadata claims more columns than :data:`MAX_TABLE_COLUMNS` or more
    uncompressed bytes than the expansion limit (the footer is read, not the data)."""
    meta = _parquet_metadata(path)
    claimed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if claimed > _expansion_limit(path):
        raise _too_large(path, f"claims {claimed:,} uncompressed bytes")


def check_table_width(path: Path, fmt: str | None = None) -> None:
    """Refuse a CSV or Parquet file wider than :data:`MAX_TABLE_COLUMNS` from its header or footer alone,
    for readers that bring their own parser (``train --dask``); other formats pass."""
    kind = detect_format(path, fmt)
    if kind == "csv":
        raw_csv_header(path, _csv_separator(path))
    elif kind == "parquet":
        try:
            _parquet_metadata(path)
        except DataError:
            raise
        except Exception as exc:  # not Parquet, damaged footer: the reader names it in its own words
            raise DataError(f"cannot read {str(path)!r} as parquet: {_first_line(exc)}") from None


def _csv_separator(path: Path) -> str:
    return "\t" if ".tsv" in path.name.lower() else ","


@contextlib.contextmanager
def _open_binary(path: Path):
    """``path`` opened for reading bytes, through its compression (by suffix); a zip's one member."""
    import bz2
    import gzip
    import lzma
    import zipfile

    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise DataError(f"{str(path)!r} must hold exactly one file; it holds {len(members)}")
            with zf.open(members[0]) as stream:
                yield stream
        return
    with {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)(path, "rb") as stream:
        yield stream


#: The widest table (CSV or Parquet) softxent reads, in columns.  A text table that wide is almost always
#: sparse data in the wrong format, and the per-column costs of a table reader and of the data-frame steps
#: after it grow faster than the file: a 10^6-column CSV of 6 rows took 122 s and 2.2 GB inside
#: pandas.read_csv alone, and pyarrow.csv is no faster on wide files (~25 us per column: 2.7 s for 10^5, and
#: the frame's later steps cost per column as much again).  So the header is counted first and wider tables
#: are refused: at this limit, train and predict on a 6-row file (0.9 MB) take ~3 s each with the imports
#: done (2 busy cores) and grow memory by 140-170 MiB, inside issue 18's 10 s and 10x the file + 200 MB;
#: 10^5 columns would not be.  Wider data belongs in svmlight/libsvm (sparse, up to 2**20 features or one
#: per non-zero) or in an .npz array (dense X, any width), whose readers cost per value, not per column.
MAX_TABLE_COLUMNS = 50_000
#: The longest CSV header line read, in bytes (MAX_TABLE_COLUMNS names of ~330 bytes): the header is read
#: and counted before the body, so a file with one endless first line costs at most this much.
MAX_HEADER_BYTES = 16 << 20
_WIDE_HINT = ("save wide data as svmlight/libsvm (sparse; .svm, .libsvm) or as an .npz with arrays X and y, which "
              "have no column limit")


def _too_wide(path: Path, n_columns: str) -> DataError:
    return DataError(f"{str(path)!r} has {n_columns} columns, more than the {MAX_TABLE_COLUMNS:,} a CSV or Parquet "
                     f"table may have; {_WIDE_HINT}")


def raw_csv_header(path: Path, sep: str) -> list[str]:
    """The header row as written (pandas renames a repeated name ``a`` to ``a.1``, hiding duplicates).

    Read before the body with a bounded read: the first line (a newline inside double quotes does not end
    it) is scanned in 1 MiB pieces, counting separators outside quotes, and the scan stops as soon as the
    line has more than :data:`MAX_TABLE_COLUMNS` columns or :data:`MAX_HEADER_BYTES` bytes, each a DataError.
    """
    import csv

    sep_byte = sep.encode()
    head, n_seps, in_quotes, end = [], 0, False, None
    with _stream_errors(path), _open_binary(path) as stream:
        size = 0
        while end is None:
            piece = stream.read(1 << 20)
            if not piece:
                break
            # split at quotes: every other part lies inside a quoted field ('""' toggles twice, so it counts
            # as the quote it stands for); only the parts outside hold separators and the line's end
            parts = piece.split(b'"')
            offset = 0
            for k, part in enumerate(parts):
                if k:
                    in_quotes = not in_quotes
                if not in_quotes:
                    cut = min((i for i in (part.find(b"\n"), part.find(b"\r")) if i >= 0), default=-1)
                    if cut >= 0:
                        n_seps += part.count(sep_byte, 0, cut)
                        end = size + offset + cut
                        break
                    n_seps += part.count(sep_byte)
                offset += len(part) + 1
            head.append(piece)
            size += len(piece)
            if n_seps + 1 > MAX_TABLE_COLUMNS:
                shown = f"{n_seps + 1:,}" if end is not None else f"more than {n_seps + 1:,}"
                raise _too_wide(path, shown)
            if (end if end is not None else size) > MAX_HEADER_BYTES:
                raise DataError(f"the header line of {str(path)!r} is longer than {MAX_HEADER_BYTES >> 20} MiB "
                                f"(the limit for its column names); is it a CSV file? {_WIDE_HINT}")
    line = b"".join(head)[: end if end is not None else None]
    try:
        return next(csv.reader(io.StringIO(line.decode("utf-8-sig", errors="replace")), delimiter=sep), [])
    except csv.Error as exc:
        raise DataError(f"cannot parse the header of {str(path)!r}: {_first_line(exc)}") from None


def _duplicates(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted (linear: a Counter, not a count per name)."""
    from collections import Counter

    return sorted(name for name, n in Counter(names).items() if n > 1)


def _read_table(path: Path, kind: str):
    import pandas as pd

    try:
        if kind == "parquet":
            _check_parquet_size(path)
            df = pd.read_parquet(path)
            for c in df.columns:  # Arrow checks string bytes only when they are converted: check them now
                if hasattr(df[c].array, "__arrow_array__"):
                    import pyarrow as pa

                    pa.array(df[c].array).validate(full=True)
            return df
        sep = _csv_separator(path)
        header = raw_csv_header(path, sep)  # first: a bounded read, before anything reads the body
        check_decompressed_size(path)
        dup = _duplicates(header)
        if dup:
            raise DataError(f"{str(path)!r} has duplicate column names: {', '.join(map(repr, dup[:20]))}"
                            + (f", ... ({len(dup)} in all)" if len(dup) > 20 else ""))
        return pd.read_csv(path, sep=sep)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {str(path)!r} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {str(path)!r} as {kind}: {_first_line(exc)}") from None
    except MemoryError:
        raise DataError(f"{str(path)!r} does not fit in memory as a {kind} table") from None
    except Exception as exc:
        # pyarrow raises ArrowInvalid (a ValueError) on a file that is not Parquet, a JSONDecodeError or a
        # KeyError on damaged pandas metadata; whatever a reader raises on a file is about that file
        raise DataError(f"cannot read {str(path)!r} as {kind}: {_first_line(exc)}") from None


def _load_tables(paths: list[Path], kind: str) -> RawData:
    import pandas as pd

    frames = []
    for p in paths:
        df = _read_table(p, kind)
        if df.shape[1] > WIDE_TABLE_COLUMNS:
            # the CSV reader makes one block per column, and every later column selection, drop or
            # conversion then costs per column (200 000 columns: 14 s for drop); a copy joins them by dtype
            df = df.copy()
        df.columns = [str(c) for c in df.columns]
        dup = _duplicates(list(df.columns))  # Parquet keeps repeated names; so may str() of distinct ones
        if dup:
            raise DataError(f"{str(p)!r} has duplicate column names: {', '.join(map(repr, dup))}")
        if frames and list(df.columns) != list(frames[0].columns):
            first = list(frames[0].columns)
            missing = [c for c in first if c not in df.columns]
            extra = [c for c in df.columns if c not in first]
            detail = "; ".join(x for x in (
                f"missing {', '.join(map(repr, missing))}" if missing else "",
                f"extra {', '.join(map(repr, extra))}" if extra else "",
                "same columns in another order" if not missing and not extra else "") if x)
            raise DataError(f"{str(p)!r} does not have the columns of {str(paths[0])!r} ({detail}); "
                            "the files of one data set must share their columns")
        frames.append(df)
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(frame) == 0:
        raise DataError(f"the data ({', '.join(map(str, paths))}) has no rows")
    return RawData(fmt=kind, sources=[str(p) for p in paths], frame=frame)


def _load_npz(paths: list[Path], target: str | None) -> RawData:
    xs, ys, names = [], [], None
    y_key = target or "y"
    missing_key_note = ""
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.files)
                for key in ("X", y_key, "feature_names"):
                    _check_npz_member_size(p, z, key)
                if "X" not in keys:
                    raise DataError(f"{str(p)!r} has no array 'X' (arrays: {', '.join(keys) or 'none'}); "
                                    "save the features as X (N×D) and the labels as y (N,)")
                X = z["X"]
                y = z[y_key] if y_key in keys else None
                if y is None:
                    missing_key_note = f" (arrays: {', '.join(keys)})"
                fn = [str(s) for s in z["feature_names"]] if "feature_names" in keys else None
        except DataError:
            raise
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DataError(f"{str(p)!r} holds an object (pickled) array, which softxent never loads; "
                                "save X and y as numeric or string arrays") from None
            raise DataError(f"cannot read {str(p)!r} as npz: {_first_line(exc)}") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot read {str(p)!r} as npz: {_first_line(exc) or type(exc).__name__}") from None
        except Exception as exc:  # zipfile.BadZipFile and friends
            raise DataError(f"cannot read {str(p)!r} as npz ({type(exc).__name__}: {_first_line(exc)})") from None
        if X.ndim != 2:
            raise DataError(f"array X in {str(p)!r} must be 2-D (N×D); got shape {X.shape}")
        if X.dtype.kind not in "biuf":
            raise DataError(f"array X in {str(p)!r} must be numeric; got dtype {X.dtype}")
        if y is not None and y.shape != (X.shape[0],):
            raise DataError(f"array {y_key!r} in {str(p)!r} must have shape ({X.shape[0]},) to match X "
                            f"{X.shape}; got {y.shape}")
        if xs and X.shape[1] != xs[0].shape[1]:
            raise DataError(f"X in {str(p)!r} has {X.shape[1]} columns but X in {str(paths[0])!r} has "
                            f"{xs[0].shape[1]}; the files of one data set must share their columns")
        if xs and (y is None) != (ys[0] is None):
            raise DataError(f"some npz files have labels {y_key!r} and some do not ({str(p)!r})")
        if fn is not None and len(fn) != X.shape[1]:
            raise DataError(f"feature_names in {str(p)!r} has {len(fn)} names for {X.shape[1]} columns")
        names = names or fn
        xs.append(X)
        ys.append(y)
    X = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = None if ys[0] is None else (np.concatenate(ys) if len(ys) > 1 else ys[0])
    if X.shape[0] == 0:
        raise DataError(f"the data ({', '.join(map(str, paths))}) has no rows")
    names = names or [f"x{j}" for j in range(X.shape[1])]
    return RawData(fmt="npz", sources=[str(p) for p in paths], X=X.astype(np.float64, copy=False), y=y,
                   feature_names=names, target_name=y_key, note=missing_key_note)


def _check_npz_member_size(path: Path, npz, key: str) -> None:
    """Refuse an npz array whose header declares more bytes than the expansion limit (np.savez_compressed
    stores a gigabyte of zeros in a megabyte) before NumPy allocates it."""
    from numpy.lib import format as npy

    name = f"{key}.npy"
    if name not in npz.zip.namelist():
        return
    with npz.zip.open(name) as fp:
        version = npy.read_magic(fp)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(fp)
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
    if nbytes > _expansion_limit(path):
        raise _too_large(path, f"declares an array {key!r} of shape {shape} ({nbytes:,} bytes)")


def _load_svmlight(paths: list[Path], n_features: int | None, zero_based: bool | None) -> RawData:
    from sklearn.datasets import load_svmlight_files

    files = [str(p) for p in paths]
    for p in paths:
        check_decompressed_size(p)
    try:
        if zero_based is None:
            # Read the indices as they are, then decide the way scikit-learn's "auto" does: 1-based when no
            # file uses index 0.  The decision is stored in the model so that predict lines up.
            parts = load_svmlight_files(files, zero_based=True, dtype=np.float64)
            Xs = parts[0::2]
            _check_svmlight_width(Xs, files)
            zero_based = any(X.nnz and X.indices.min() == 0 for X in Xs) or not any(X.nnz for X in Xs)
            if not zero_based:
                Xs = [X[:, 1:] for X in Xs]
            if n_features is not None and Xs[0].shape[1] > n_features:
                raise DataError(f"the svmlight data has {Xs[0].shape[1]} features but {n_features} are expected")
        else:
            parts = load_svmlight_files(files, zero_based=zero_based, dtype=np.float64, n_features=n_features)
            Xs = parts[0::2]
            _check_svmlight_width(Xs, files, n_features)
    except DataError:
        raise
    except OverflowError as exc:  # an index of 2**31 or more
        raise DataError(f"cannot parse {', '.join(files)} as svmlight/libsvm: a feature index or value is too "
                        f"large ({_first_line(exc)})") from None
    except ValueError as exc:
        msg = _first_line(exc)
        if "n_features was set" in msg:
            raise DataError(f"the svmlight data has more features than the model's {n_features}: {msg}") from None
        raise DataError(f"cannot parse {', '.join(files)} as svmlight/libsvm: {msg}") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"cannot read {', '.join(files)} as svmlight/libsvm: {_first_line(exc)}") from None
    ys = parts[1::2]
    d = n_features if n_features is not None else max(X.shape[1] for X in Xs)
    Xs = [X if X.shape[1] == d else sp.csr_matrix((X.data, X.indices, X.indptr), shape=(X.shape[0], d))
          for X in Xs]
    X = sp.vstack(Xs, format="csr") if len(Xs) > 1 else Xs[0].tocsr()
    if X.shape[0] == 0:
        raise DataError(f"the data ({', '.join(files)}) has no rows")
    return RawData(fmt="svmlight", sources=files, X=X, y=np.concatenate(ys),
                   feature_names=[f"f{j + (0 if zero_based else 1)}" for j in range(d)],
                   zero_based=bool(zero_based), target_name="label")


def _check_svmlight_width(Xs, files: list[str], n_features: int | None = None) -> None:
    """Refuse feature indices far beyond what the files hold (see ``SVMLIGHT_MIN_FEATURES``): checked on
    the sparse matrices as read, before any step allocates per column (1 ``1e8:1`` made a 22 GB fit)."""
    nnz = sum(X.nnz for X in Xs)
    width = max((int(X.indices.max()) + 1 for X in Xs if X.nnz), default=0)
    allowed = max(SVMLIGHT_MIN_FEATURES, nnz, n_features or 0)
    if width > allowed:
        at = next(f for f, X in zip(files, Xs) if X.nnz and int(X.indices.max()) + 1 == width)
        raise DataError(f"{at!r} uses feature index {width - 1:,}, but the data hold only {nnz:,} non-zero values; "
                        f"softxent accepts indices up to {allowed - 1:,} (the larger of {SVMLIGHT_MIN_FEATURES:,} and "
                        "the number of non-zeros): a model has one coefficient per class and index")


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# target and labels
# --------------------------------------------------------------------------------------------------
def normalize_labels(y, name: str) -> np.ndarray:
    """Labels as int64 (integral numbers), bool, or str; missing or non-integral numbers are errors."""
    import pandas as pd

    s = pd.Series(np.asarray(y) if not isinstance(y, pd.Series) else y)
    n_missing = int(s.isna().sum())
    if n_missing:
        rows = np.flatnonzero(s.isna().to_numpy())[:5]
        raise DataError(f"the target {name!r} has {n_missing} missing value(s) (rows {', '.join(map(str, rows))}"
                        f"{', ...' if n_missing > 5 else ''}); drop or fill those rows")
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(s):
        return s.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise DataError(f"the target {name!r} holds infinite values")
        frac = v != np.round(v)
        if frac.any():
            raise DataError(f"the target {name!r} holds non-integer numbers (e.g. {v[frac][0]:g}) — it looks "
                            "continuous, but softxent trains a classifier: give class labels")
        return v.astype(np.int64)
    # An object array of NumPy strings: a fixed-width str array costs every row the longest label's
    # width (one 100 MB label in a small file asked for 59 GiB); np.str_ keeps .item() and sorting.
    labels = s.astype(str).to_numpy(dtype=object)
    lengths = np.fromiter(map(len, labels), dtype=np.int64, count=len(labels))
    if len(lengths) and lengths.max() > MAX_LABEL_CHARS:
        row = int(np.argmax(lengths))
        raise DataError(f"the target {name!r} holds a label of {int(lengths[row]):,} characters (row {row}); class "
                        f"labels are limited to {MAX_LABEL_CHARS} characters: is {name!r} the label column?")
    return np.fromiter(map(np.str_, labels), dtype=object, count=len(labels))


def split_target(raw: RawData, target: str | None, *, required: bool):
    """``(features, y, target_name)``: features a DataFrame (tables) or a matrix; ``y`` None if absent.

    Tables need ``target`` (when ``required``); an unknown column lists the columns.  For prediction
    (``required=False``) a table without the target column is fine, and the column is dropped if present.
    """
    if raw.frame is None:
        if target is not None and target != raw.target_name:
            where = {"svmlight": "svmlight files carry the label as the first field of each line",
                     "digits": "the bundled digits carry their labels"}.get(raw.fmt, "")
            raise DataError(f"--target {target!r} does not apply to {raw.describe()}: {where or 'see --help'}")
        if raw.y is None:
            if required:
                raise DataError(f"{raw.describe()} has no labels: an npz needs an array {raw.target_name or 'y'!r} "
                                f"beside X{raw.note}")
            return raw.X, None, raw.target_name
        return raw.X, normalize_labels(raw.y, raw.target_name or "y"), raw.target_name
    cols = list(raw.frame.columns)
    if target is None:
        if required:
            raise DataError(f"{raw.describe()} is a table: name the label column with --target COL "
                            f"(columns: {_list_columns(cols)})")
        return raw.frame, None, None
    if target not in cols:
        if required:
            raise DataError(f"unknown target column {target!r}; the columns are: {_list_columns(cols)}")
        return raw.frame, None, target
    y = normalize_labels(raw.frame[target], target)
    return raw.frame.drop(columns=[target]), y, target


def _list_columns(cols: list[str], limit: int = 30) -> str:
    shown = ", ".join(map(repr, cols[:limit]))
    return shown + (f", ... ({len(cols)} in all)" if len(cols) > limit else "")


def train_test_indices(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and held-out splits: every class has a training row (a class of one row
    is never held out); stratified when there are enough held-out rows for one of each class."""
    n = len(y)
    if not 0.0 <= test_size < 1.0:
        raise DataError(f"--test-size must be in [0, 1); got {test_size}")
    idx = np.arange(n)
    if test_size == 0.0:
        return idx, idx[:0]
    n_test = int(math.ceil(test_size * n))
    if n_test >= n:
        raise DataError(f"--test-size {test_size} leaves no training rows out of {n}")
    from sklearn.model_selection import train_test_split

    _, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    # A class seen only in the held-out rows could be neither learned nor scored: every class keeps at
    # least one training row.  A class of one row trains; the others are split stratified when there are
    # enough held-out rows for one of each, else at random with one row of each class held back first.
    alone = counts[y_idx] == 1
    rest = idx[~alone]
    n_split_classes = int(np.sum(counts >= 2))
    n_test_rest = n_test
    if n_test_rest > len(rest) - n_split_classes:
        raise DataError(f"--test-size {test_size} holds out {n_test} of {n} rows, but every one of the "
                        f"{len(counts)} classes needs a training row; use a smaller --test-size")
    if n_split_classes and n_test_rest >= n_split_classes:
        tr, te = train_test_split(rest, test_size=n_test_rest, random_state=seed, stratify=y_idx[rest])
    else:
        rng = np.random.default_rng(seed)
        order = rest[rng.permutation(len(rest))]
        _, first = np.unique(y_idx[order], return_index=True)  # one row of each class, held back
        kept = np.zeros(len(order), dtype=bool)
        kept[first] = True
        pool = order[~kept]
        te, tr = pool[:n_test_rest], np.concatenate([order[kept], pool[n_test_rest:]])
    return np.sort(np.concatenate([tr, idx[alone]])), np.sort(te)


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
@dataclass
class Preprocessing:
    """Raw rows -> the model's features: one-hot, impute, standardise.  Fitted on the training split.

    Attributes:
        input_columns: the raw feature columns, in order (tables: names; matrices: their D names).
        categorical: column -> its categories, for the one-hot encoded columns (tables only).
        feature_names: the D features after encoding = the columns of Θ.
        impute: ``"mean"`` or None; ``impute_values`` (D,) fills NaN in feature j.
        standardize: whether ``(x - mean) / scale`` is applied; ``mean``, ``scale`` are (D,)
            (mean 0, scale 1 when off; mean 0 for sparse data).
        sparse: the data is a CSR matrix (svmlight).
        image_shape: (h, w) with h*w = D when the features are the pixels of a square image.
    """

    input_columns: list[str]
    feature_names: list[str]
    categorical: dict[str, list[str]] = field(default_factory=dict)
    impute: str | None = None
    impute_values: np.ndarray | None = None
    standardize: bool = True
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    sparse: bool = False
    table: bool = False
    image_shape: tuple[int, int] | None = None
    zero_based: bool | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # -- fit ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, features, *, categorical: bool = False, impute: str | None = None, standardize: bool = True,
            raw: RawData | None = None) -> "Preprocessing":
        """Learn the encoding from the training rows ``features`` (a DataFrame, array or CSR)."""
        if impute not in (None, "mean"):
            raise DataError(f"unknown --impute {impute!r}; expected 'mean'")
        if _is_frame(features):
            cols = list(features.columns)
            if not cols:
                raise DataError("the data has no feature columns besides the target")
            numeric = {t: _numeric_dtype(t) for t in set(features.dtypes)}  # per dtype, not per column
            non_numeric = [c for c, t in zip(cols, features.dtypes) if not numeric[t]]
            mostly_numeric = {c: share for c in non_numeric
                              if (share := _numeric_share(features[c])) >= MOSTLY_NUMERIC}
            if not categorical:  # numeric columns read as text: encode() parses them, naming bad cells
                non_numeric = [c for c in non_numeric if c not in mostly_numeric]
                mostly_numeric = {}
            for c, share in mostly_numeric.items():
                import warnings

                how_many = f"{min(share, 0.99):.0%} of its cells are" if share < 1 else "its training cells are all"
                warnings.warn(f"--categorical one-hot encodes column {c!r} although {how_many} numbers "
                              f"({features[c].nunique()} distinct values, one feature each); if the cells that are "
                              "not numbers are mistakes, fix or blank them instead", UserWarning, stacklevel=2)
            if non_numeric and not categorical:
                examples = []
                for c in non_numeric[:8]:
                    v = features[c].dropna()
                    examples.append(f"{c!r} (e.g. {_clip(v.iloc[0])!r})" if len(v) else repr(c))
                more = f" and {len(non_numeric) - 8} more" if len(non_numeric) > 8 else ""
                raise DataError(f"non-numeric feature column(s): {', '.join(examples)}{more}; one-hot encode "
                                "them with --categorical, or drop them from the data")
            cats = {c: sorted(set(_category_strings(features[c]))) for c in non_numeric}
            names = []
            for c in cols:
                names.extend([f"{c}={v}" for v in cats[c]] if c in cats else [c])
            pre = cls(input_columns=cols, feature_names=names, categorical=cats, impute=impute,
                      standardize=standardize, table=True)
        else:
            names = list(raw.feature_names) if raw is not None else [f"x{j}" for j in range(features.shape[1])]
            pre = cls(input_columns=names, feature_names=names, impute=impute, standardize=standardize,
                      sparse=sp.issparse(features), zero_based=raw.zero_based if raw is not None else None)
        X = pre.encode(features)
        pre._check_finite(X, fitting=True)
        if impute == "mean":
            pre.impute_values = _nan_column_means(X)
            X = pre._fill(X)
        d = X.shape[1]
        if standardize:
            if sp.issparse(X):
                mean = np.zeros(d)
                sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
                m = np.asarray(X.mean(axis=0)).ravel()
                std = np.sqrt(np.maximum(sq - m * m, 0.0))
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    mean = X.mean(axis=0)
                    std = X.std(axis=0)
                huge = ~(np.isfinite(mean) & np.isfinite(std))
                if huge.any():  # values near 1e308: sums and squares overflow; the column scaled first
                    top = np.max(np.abs(X[:, huge]), axis=0)
                    mean[huge] = X[:, huge].__truediv__(top).mean(axis=0) * top
                    std[huge] = X[:, huge].__truediv__(top).std(axis=0) * top
            pre.mean = mean
            pre.scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        else:
            pre.mean, pre.scale = np.zeros(d), np.ones(d)
        pre._check_magnitude(pre.standardise(X))
        if raw is not None and raw.image_shape is not None and raw.image_shape[0] * raw.image_shape[1] == d:
            pre.image_shape = tuple(raw.image_shape)
        elif not pre.categorical:
            s = math.isqrt(d)
            if s * s == d and s >= 8:
                pre.image_shape = (s, s)
        return pre

    # -- apply -------------------------------------------------------------------------------------
    def transform(self, features) -> np.ndarray | sp.csr_matrix:
        """The model's input for raw rows: encode, check, impute, standardise (float64, dense or CSR)."""
        X = self.encode(features)
        self._check_finite(X, fitting=False)
        if self.impute == "mean":
            X = self._fill(X)
        X = self.standardise(X)
        self._check_standardised(X, features)
        return X

    def _check_standardised(self, X, features) -> None:
        """Name the first value that standardising took beyond float64 (1.7e308 with a training scale below
        1): no model can score that row."""
        vals = X.data if sp.issparse(X) else X
        if np.all(np.isfinite(vals)):
            return
        if sp.issparse(X):
            coo = sp.coo_matrix(X)
            k = np.flatnonzero(~np.isfinite(coo.data))[0]
            i, j = coo.row[k], coo.col[k]
        else:
            i, j = np.argwhere(~np.isfinite(X))[0]
        row = features.index[i] if _is_frame(features) else i
        value = self.encode(_rows_at(features, [i]))[0, j]
        raise DataError(f"row {row}: feature {self.feature_names[j]!r} = {value:g} is beyond float64's range once "
                        f"standardised (mean {self.mean[j]:.6g}, scale {self.scale[j]:.6g}); softxent cannot score "
                        "it: remove or rescale that value")

    def _check_magnitude(self, X) -> None:
        """Refuse training features (as standardised) of which one value alone makes its row longer than the
        estimator's MAX_ROW_NORM, naming the columns; rows too long by several values are refused by the
        estimator's own check."""
        from ..estimator import MAX_ROW_NORM

        vals = X.data if sp.issparse(X) else X
        if not vals.size or float(np.max(np.abs(vals))) <= MAX_ROW_NORM:
            return
        col_max = (np.asarray(abs(X).max(axis=0).todense()).ravel() if sp.issparse(X)
                   else np.max(np.abs(X), axis=0))
        cols = np.flatnonzero(col_max > MAX_ROW_NORM)
        shown = ", ".join(f"{self.feature_names[j]!r} (up to {col_max[j]:.3g})" for j in cols[:8])
        fix = ("rescale those columns" if self.standardize else
               "standardise them (drop --no-standardize) or rescale those columns")
        raise DataError(f"feature value(s) beyond {MAX_ROW_NORM:.3g} (1/float64 eps) in column(s) {shown}"
                        f"{', ...' if len(cols) > 8 else ''}: at that scale no model can be fitted (the intercept's "
                        f"curvature is lost below rounding); {fix}")

    def standardise(self, X):
        if not self.standardize:
            return X
        if sp.issparse(X):
            return sp.csr_matrix(X.multiply(1.0 / self.scale))
        with np.errstate(over="ignore", invalid="ignore"):
            out = (X - self.mean) / self.scale
            if not np.all(np.isfinite(out)):  # x - mean overflowed (values of both signs near 1e308)
                out = np.where(np.isfinite(out), out, X / self.scale - self.mean / self.scale)
        return out

    def encode(self, features) -> np.ndarray | sp.csr_matrix:
        """Raw rows -> float64 features (N×D) in the order of ``feature_names``; NaN kept."""
        if self.table:
            if not _is_frame(features):
                raise DataError(f"the model was trained on a table with columns {_list_columns(self.input_columns)}"
                                "; give CSV or Parquet data")
            missing = [c for c in self.input_columns if c not in features.columns]
            if missing:
                raise DataError(f"the data lacks the model's feature column(s) {_list_columns(missing)} "
                                f"(the data has: {_list_columns(list(features.columns))})")
            if not self.categorical:
                # selecting columns costs per column (a frame read from CSV holds one block per column)
                same = list(features.columns) == self.input_columns
                chosen = features if same else features[self.input_columns]
                if all(_numeric_dtype(t) for t in chosen.dtypes):  # one conversion, not one per column
                    return chosen.to_numpy(dtype=np.float64, na_value=np.nan)
            blocks = []
            for c in self.input_columns:
                col = features[c]
                if c in self.categorical:
                    cats = self.categorical[c]
                    pos = {v: j for j, v in enumerate(cats)}
                    codes = np.array([pos.get(v, -1) for v in _category_strings(col)], dtype=np.int64)
                    block = np.zeros((len(col), len(cats)))
                    known = codes >= 0
                    block[np.flatnonzero(known), codes[known]] = 1.0
                    blocks.append(block)
                else:
                    if not _numeric_column(col):
                        col = _parse_numeric(col, c)
                    blocks.append(col.to_numpy(dtype=np.float64, na_value=np.nan).reshape(-1, 1))
            return np.hstack(blocks) if blocks else np.zeros((len(features), 0))
        if _is_frame(features):
            raise DataError(f"the model was trained on a {'sparse ' if self.sparse else ''}matrix of "
                            f"{self.n_features} features (npz or svmlight), not on a table")
        if features.shape[1] != self.n_features:
            raise DataError(f"the data has {features.shape[1]} features but the model expects {self.n_features}")
        if sp.issparse(features):
            return sp.csr_matrix(features, dtype=np.float64)
        return np.asarray(features, dtype=np.float64)

    def _check_finite(self, X, *, fitting: bool) -> None:
        vals = X.data if sp.issparse(X) else X
        nan = np.isnan(vals)
        inf = np.isinf(vals)
        if inf.any():
            raise DataError(f"infinite values in the features: {_count_by_column(X, np.isinf, self.feature_names)}"
                            "; softxent needs finite numbers")
        if nan.any() and self.impute is None:
            hint = ("fill them with --impute mean, or clean the data" if fitting else
                    "the model was trained without --impute, so it cannot fill them; clean the data")
            raise DataError(f"NaN in the features: {_count_by_column(X, np.isnan, self.feature_names)}; {hint}")

    def _fill(self, X):
        if sp.issparse(X):
            X = X.copy()
            bad = np.isnan(X.data)
            if bad.any():
                X.data[bad] = self.impute_values[X.indices[bad]]
            return X
        bad = np.isnan(X)
        if bad.any():
            X = np.where(bad, self.impute_values, X)
        return X

    # -- storage (model.json + tensors) ------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "input_columns": list(self.input_columns),
            "feature_names": list(self.feature_names),
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "impute": self.impute,
            "standardize": bool(self.standardize),
            "sparse": bool(self.sparse),
            "table": bool(self.table),
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "svmlight_zero_based": self.zero_based,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        t = {"feature_mean": np.asarray(self.mean, dtype=np.float64),
             "feature_scale": np.asarray(self.scale, dtype=np.float64)}
        if self.impute is not None:
            t["impute_values"] = np.asarray(self.impute_values, dtype=np.float64)
        return t

    @classmethod
    def from_json(cls, meta: dict, tensors: dict[str, np.ndarray]) -> "Preprocessing":
        return cls(
            input_columns=[str(c) for c in meta["input_columns"]],
            feature_names=[str(c) for c in meta["feature_names"]],
            categorical={str(k): [str(x) for x in v] for k, v in meta.get("categorical", {}).items()},
            impute=meta.get("impute"),
            impute_values=tensors.get("impute_values"),
            standardize=bool(meta.get("standardize", True)),
            mean=tensors["feature_mean"],
            scale=tensors["feature_scale"],
            sparse=bool(meta.get("sparse", False)),
            table=bool(meta.get("table", False)),
            image_shape=tuple(meta["image_shape"]) if meta.get("image_shape") else None,
            zero_based=meta.get("svmlight_zero_based"),
        )


def _rows_at(features, rows):
    return features.iloc[rows] if _is_frame(features) else features[rows]


def _is_frame(x) -> bool:
    return hasattr(x, "columns") and hasattr(x, "iloc")


def _numeric_column(s) -> bool:
    return _numeric_dtype(s.dtype)


def _numeric_dtype(dtype) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))


def _numeric_share(col) -> float:
    """The share of the non-missing cells of a text column that parse as numbers (0 if none is present)."""
    import pandas as pd

    present = col.notna()
    n = int(present.sum())
    return float(pd.to_numeric(col[present], errors="coerce").notna().sum()) / n if n else 0.0


def _parse_numeric(col, name: str, limit: int = 5):
    """A text column of a numeric feature as numbers; a cell that is no number is an error that names it:
    its row (counting data rows from 1, the header excluded), the column and the value."""
    import pandas as pd

    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna() & col.notna()
    if bad.any():
        where = np.flatnonzero(bad.to_numpy())
        cells = ", ".join(f"row {_row_number(col.index[i])} {_clip(col.iloc[i])!r}" for i in where[:limit])
        more = f", ... ({len(where)} cells in all)" if len(where) > limit else ""
        raise DataError(f"feature column {name!r} holds numbers and {len(where)} cell(s) that are not: {cells}{more}"
                        "; fix those cells, or blank them (a blank cell is a missing value, which --impute mean "
                        "fills)")
    return num


def _row_number(label) -> str:
    return str(label + 1) if isinstance(label, (int, np.integer)) else repr(label)


def _clip(value, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _category_strings(s) -> list[str]:
    return [MISSING_CATEGORY if _isna(v) else str(v) for v in s.tolist()]


def _isna(v) -> bool:
    try:
        return bool(v != v) or v is None  # NaN, NaT, None; pd.NA raises on bool()
    except TypeError:
        return True


def _nan_column_means(X) -> np.ndarray:
    if sp.issparse(X):
        data = np.where(np.isnan(X.data), 0.0, X.data)
        Z = sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)
        n_nan = np.bincount(X.indices[np.isnan(X.data)], minlength=X.shape[1])
        return np.asarray(Z.sum(axis=0)).ravel() / np.maximum(X.shape[0] - n_nan, 1)
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(X), axis=0)
        sums = np.nansum(X, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def _count_by_column(X, test, names: list[str], limit: int = 8) -> str:
    if sp.issparse(X):
        per_col = np.bincount(X.indices[test(X.data)], minlength=X.shape[1])
    else:
        per_col = test(X).sum(axis=0)
    cols = np.flatnonzero(per_col)
    total = int(per_col.sum())
    shown = ", ".join(f"{names[j]!r} ({int(per_col[j])})" for j in cols[:limit])
    more = f", ... ({len(cols)} columns in all)" if len(cols) > limit else ""
    return f"{total} value(s) in column(s) {shown}{more}"
