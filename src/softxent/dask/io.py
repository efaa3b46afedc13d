"""Reading partitioned tables lazily for a Dask fit: Parquet or CSV files -> dask arrays ``X``, ``y``."""

from __future__ import annotations

import glob
import os

import numpy as np

__all__ = ["read_table", "frame_to_arrays"]

_PARQUET = (".parquet", ".pq", ".parq")
_CSV = (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".tsv", ".txt")


def _format_of(paths, fmt):
    if fmt is not None:
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"fmt must be 'parquet' or 'csv'; got {fmt!r}")
        return fmt
    kinds = set()
    for p in paths:
        name = p.lower().rstrip("/")
        if name.endswith(_PARQUET) or os.path.isdir(p):
            kinds.add("parquet")
        elif name.endswith(_CSV):
            kinds.add("csv")
        else:
            raise ValueError(f"cannot tell the format of {p!r} from its name; expected a Parquet file or folder "
                             f"({', '.join(_PARQUET)}) or CSV ({', '.join(_CSV)}), or pass fmt='parquet' / 'csv'")
    if len(kinds) != 1:
        raise ValueError(f"the files mix formats {sorted(kinds)}; read one format at a time")
    return kinds.pop()


def _is_numeric(dtype) -> bool:
    try:
        return bool(np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_))
    except TypeError:  # pandas extension dtypes (strings, categories) are not NumPy dtypes
        return False


def read_table(paths, target: str, *, fmt: str | None = None, features=None, blocksize="64MiB",
               dtype=np.float64):
    """Partitioned Parquet / CSV files -> ``(X, y, feature_names)``, lazily, for ``SoftmaxRegression.fit``.

    Args:
        paths: a path, a glob (``'data/*.parquet'``), a Parquet folder, or a list of them.  Files are
            read lazily with ``dask.dataframe``; one partition becomes one row block.
        target: the label column (any dtype: integers, strings ...).
        fmt: 'parquet' or 'csv' (default: from the file names).
        features: the feature columns (default: every column but ``target``); they must be numeric.
        blocksize: CSV bytes per partition (Parquet keeps its files' / row groups' partitions).
        dtype: ``X``'s dtype (float64, or float32 to halve the memory).

    Returns:
        ``X`` ``(N, D)`` dask array of ``dtype`` with one chunk along the columns, ``y`` ``(N,)`` dask
        array, both with known row chunks (one cheap pass counts each partition's rows: Parquet reads
        it from the metadata where dask can), and ``feature_names`` (list of str).
    """
    import dask.dataframe as dd

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty; give at least one file, folder or glob")
    expanded = []
    for p in paths:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise ValueError(f"no files match {p!r}")
        for m in matches:
            if not os.path.exists(m):
                raise ValueError(f"{m!r} does not exist")
        expanded.extend(matches)
    kind = _format_of(expanded, fmt)
    df = dd.read_parquet(expanded) if kind == "parquet" else dd.read_csv(expanded, blocksize=blocksize)
    columns = list(df.columns)
    if target not in columns:
        raise ValueError(f"target column {target!r} is not in the data; its columns are {columns[:20]}"
                         + (" ..." if len(columns) > 20 else ""))
    if features is None:
        features = [c for c in columns if c != target]
    else:
        features = list(features)
        missing = [c for c in features if c not in columns]
        if missing:
            raise ValueError(f"feature columns {missing} are not in the data; its columns are {columns[:20]}")
        if target in features:
            raise ValueError(f"the target column {target!r} is also listed among the features")
    if not features:
        raise ValueError(f"the data has no feature columns besides the target {target!r}")
    X, y, _ = frame_to_arrays(df[features + [target]], features, target, dtype=dtype)
    return X, y, [str(c) for c in features]


def frame_to_arrays(frame, features, target=None, weight=None, *, dtype=np.float64):
    """A dask DataFrame -> dask arrays ``X`` (``features``), ``y`` (``target``), ``s`` (``weight``) with known,
    identical row chunks: one block per partition of ``frame``.

    All three come from the SAME partitions: dask's query optimiser may merge partitions differently for
    different column selections (Parquet reads of a few columns are fused), so ``frame[features]`` and
    ``frame[target]`` converted separately need not line up.  Counting the rows of each partition takes
    one pass over the data (Parquet metadata cannot be used once partitions are fused).
    """
    import dask
    import dask.array as da

    from . import _blocks

    dtypes = frame.dtypes
    bad = [c for c in features if not _is_numeric(dtypes[c])]
    if bad:
        raise ValueError(f"feature columns must be numeric for a Dask fit; {bad[:10]} are not "
                         f"(dtypes {[str(dtypes[c]) for c in bad[:10]]}); encode them first")
    parts = frame.to_delayed()
    lengths = [int(n) for n in dask.compute(*[dask.delayed(len)(p) for p in parts])]
    get = dask.delayed(_blocks.frame_column_values, pure=True)

    def column_array(columns, out_dtype, ndim):
        arrays = []
        for p, n in zip(parts, lengths):
            shape = (n, len(columns)) if ndim == 2 else (n,)
            arrays.append(da.from_delayed(get(p, columns, out_dtype), shape=shape, dtype=out_dtype))
        return da.concatenate(arrays, axis=0) if arrays else None

    X = column_array(list(features), np.dtype(dtype), 2)
    y = None
    if target is not None:
        target_dtype = frame.dtypes[target]
        y_dtype = target_dtype if isinstance(target_dtype, np.dtype) else np.dtype(object)
        y = column_array(target, y_dtype, 1)
    s = None if weight is None else column_array(weight, np.dtype(dtype), 1)
    return X, y, s
