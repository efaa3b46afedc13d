"""The typer application: one function per command.

``softxent train`` fits :class:`softxent.SoftmaxRegression` on a data set (the bundled digits when none is
given) and writes a model folder (``model.safetensors`` + ``model.json``), ``report.html`` and PNGs;
``predict`` / ``evaluate`` / ``info`` / ``export`` read that folder; ``gradcheck`` verifies the seed's
derivation.  Problems with the user's input end with one line on stderr and exit status 2 (a traceback
only with ``--debug``); Ctrl-C during training saves the last completed iterate and exits with 130.

Heavy imports (NumPy, scikit-learn, pandas, matplotlib, onnx) happen inside the commands, so that
``softxent --help`` is quick.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import EXIT_INTERRUPTED
from .errors import DataError, ModelFileError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="softxent: softmax cross-entropy, softmax regression and its tools.")
console = Console()
err_console = Console(stderr=True)
for _c in (console, err_console):  # in a log or a pipe, long lines stay whole instead of wrapping at 80 columns
    _c.soft_wrap = not _c.is_terminal

EXIT_USER_ERROR = 2
_STATE = {"debug": False}

SOLVER_HELP = ("auto | lbfgs | newton-cg | gd | proximal | sgd | adam  (auto: lbfgs for L2, proximal for "
               "L1/elastic net)")
_DEFAULTS = {"alpha": 1e-4, "l1_ratio": 0.0, "solver": "auto", "max_iter": 1000, "tol": 1e-6, "batch_size": 256,
             "learning_rate": "auto", "class_weight": None, "test_size": 0.2, "seed": 0}

DebugOption = typer.Option(False, "--debug", help="show the full traceback of an error")
FormatOption = typer.Option(None, "--format", help="csv | parquet | npz | svmlight (default: from the file name)")


# --------------------------------------------------------------------------------------------------
# errors: one line, exit 2, traceback only with --debug
# --------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename!s}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _error(msg: str) -> None:
    typer.echo(f"softxent: error: {msg}", err=True)


def _click_exceptions() -> tuple[type, ...]:
    """The usage-error types that typer reports itself (exit 2 with its usage text).  Recent typer versions
    vendor click (``typer._click``) and the ``cli`` extra does not install click, so the types are found
    from typer's own ``BadParameter``; a separately installed click's are added when it is importable."""
    types = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        import click
    except ImportError:
        return types
    return types + (click.exceptions.ClickException,)


@contextlib.contextmanager
def _handled(debug: bool):
    """Turn exceptions into one-line messages and exit codes (2: bad input, 130: Ctrl-C, 1: a bug)."""
    debug = debug or _STATE["debug"] or os.environ.get("SOFTXENT_DEBUG", "") not in ("", "0")
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if isinstance(exc, _click_exceptions()) or debug:
            raise
        if isinstance(exc, (UserInputError, ValueError, OSError)):
            # UserInputError: our checks; ValueError: the estimator's and scikit-learn's input checks
            _error(_one_line(exc))
            raise typer.Exit(EXIT_USER_ERROR) from None
        _error(f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while a model is being saved, so that a second Ctrl-C cannot cut the save short."""
    pending = []
    try:
        old = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def _default_out(suffix: str = "") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}{suffix}"
    out, n = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{n}")
        n += 1
    return out


def _align_labels(y, classes):
    """Labels ``y`` in the type of the model's ``classes`` (CSV may read '1' as 1 and back)."""
    import numpy as np

    kind = classes.dtype.kind  # strings: "U", or "O" (data.normalize_labels keeps labels as objects)
    if kind in "UO" and y.dtype.kind not in "UO":
        return y.astype(str)
    if kind in "iu" and y.dtype.kind in "UO":
        try:
            return y.astype(np.int64)
        except ValueError:
            return y
    if kind == "b" and y.dtype.kind in "UO":
        return np.array([v == "True" for v in y]) if set(y) <= {"True", "False"} else y
    return y


def _class_indices(y, classes, what: str):
    import numpy as np

    y = _align_labels(y, classes)
    unknown = np.setdiff1d(np.unique(y), classes) if y.dtype.kind == classes.dtype.kind or (
        y.dtype.kind in "iu" and classes.dtype.kind in "iu") or (
        y.dtype.kind in "UO" and classes.dtype.kind in "UO") else np.unique(y)
    if unknown.size:
        shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in unknown[:10])
        n = int(np.isin(y, unknown).sum())
        raise DataError(f"{what} has labels the model does not know: {shown} ({n} rows); the model's classes "
                        f"are {_show_classes(classes)}")
    return np.searchsorted(classes, y)


def _show_classes(classes, limit: int = 20) -> str:
    vals = [c.item() if hasattr(c, "item") else c for c in classes[:limit]]
    return ", ".join(map(repr, vals)) + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def _rows(features, idx):
    return features.iloc[idx] if hasattr(features, "iloc") else features[idx]


def _metrics_table(metrics: dict, title: str = "metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for name in metrics:
        table.add_column(name, justify="right")
    for label, attr, fmt in (("rows", "n", "{:d}"), ("accuracy", "accuracy", "{:.4f}"),
                             ("log-loss", "log_loss", "{:.4f}"), ("macro-F1", "macro_f1", "{:.4f}"),
                             ("calibration error (ECE)", "ece", "{:.4f}")):
        table.add_row(label, *[fmt.format(getattr(m, attr)) for m in metrics.values()])
    return table


def _load_model(path):
    from .model_io import load_model

    model = load_model(path)
    _print_load_notes(model)
    if model.status != "complete":
        err_console.print(f"note: {model.path} holds the {model.status} model of a run that did not finish "
                          f"({model.meta.get('estimator', {}).get('n_iter', '?')} iterations)")
    return model


def _print_load_notes(model) -> None:
    for note in model.notes:  # e.g. an old format version
        err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _model_data(model, data: Optional[List[str]], fmt: Optional[str], target: Optional[str], *, required: bool):
    """Load DATA for an existing model and split off the target (the model's unless --target is given)."""
    from .data import load_data, split_target

    pre = model.preprocessing
    kw = {}
    if pre.zero_based is not None:
        kw = {"n_features": pre.n_features, "zero_based": pre.zero_based}
    raw = load_data(data, fmt, label_key=_npz_key(model, target), **kw)
    tgt = target if target is not None else model.target
    if raw.frame is None and target is None:
        tgt = None  # a matrix carries its labels (npz 'y', svmlight's first field)
    features, y, name = split_target(raw, tgt, required=required)
    return raw, features, y, name or tgt


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------
class _FitMonitor:
    """The estimator's per-iteration callback: progress bar, last completed iterate, periodic checkpoints."""

    def __init__(self, progress, task, checkpoint_every: float, save_checkpoint, describe=None):
        self.progress, self.task = progress, task
        self.describe = describe
        self.checkpoint_every = checkpoint_every
        self.save_checkpoint = save_checkpoint
        self.curve: list[float] = []
        self.last = None  # (coef, intercept) of the last completed iteration
        self._last_save = time.monotonic()

    def __call__(self, info) -> bool:
        import numpy as np

        self.curve.append(float(info.objective))
        self.last = (np.array(info.coef, dtype=np.float64), np.array(info.intercept, dtype=np.float64))
        if self.progress is not None:
            if self.describe is not None and len(self.curve) == 1:
                self.progress.update(self.task, description=self.describe())
            self.progress.update(self.task, completed=info.iteration, total=info.max_iter,
                                 objective=f"{info.objective:.6g}", grad=f"{info.grad_norm:.2e}")
        if self.checkpoint_every > 0 and time.monotonic() - self._last_save >= self.checkpoint_every:
            with _sigint_deferred():
                self.save_checkpoint(self.last, list(self.curve))
            self._last_save = time.monotonic()
        return False


class _PhaseLines:
    """The progress display without a terminal (CI logs, pipes): a plain line when the fit starts and one
    when it ends, instead of a bar redrawn in place (which a log records cut at its width)."""

    def __init__(self, console):
        self.console, self.fields, self.t0 = console, {}, time.monotonic()

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        f = self.fields
        if exc[0] is None:
            self.console.print(f"{f['description']}: {f.get('completed', 0)}/{f['total']}, objective "
                               f"{f['objective']}, |grad| {f['grad']}, {time.monotonic() - self.t0:.2f} s",
                               highlight=False)
        return False

    def add_task(self, description, **fields):
        self.fields = {"description": description, **fields}
        self.console.print(f"{description}: fitting (at most {fields.get('total')} iterations)", highlight=False)
        return 0

    def update(self, task, **fields):
        self.fields.update(fields)


def _finish_progress(progress, task, est, n_done: int, converged: bool) -> None:
    """The bar ends full, saying how the solver stopped (it may stop long before max_iter)."""
    if progress is not None:
        progress.update(task, total=max(n_done, 1), completed=n_done,
                        description=f"{est.solver_} {'converged' if converged else 'did not converge'}")


def _progress():
    if not err_console.is_terminal:
        return _PhaseLines(err_console)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn)
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        """Time left if every one of max_iter iterations runs (an upper bound: solvers usually stop early)."""

        def render(self, task):
            left = task.time_remaining
            if left is None:
                return Text("ETA ≤ -:--:--", style="progress.remaining")
            return Text(f"ETA ≤ {_dt.timedelta(seconds=int(left))}", style="progress.remaining")

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("objective {task.fields[objective]}"), TextColumn("|grad| {task.fields[grad]}"),
                    TimeElapsedColumn(), EtaColumn(), console=err_console, transient=False)


@app.command()
def train(
    data: Optional[List[str]] = typer.Argument(
        None, help="CSV, Parquet, .npz (X, y) or svmlight/libsvm files, or globs: one data set. "
                   "None: the bundled default, scikit-learn's digits (no download)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="the label column (CSV/Parquet) or npz array"),
    fmt: Optional[str] = FormatOption,
    test_size: Optional[float] = typer.Option(None, help="held-out share of the rows, in [0, 1)  \\[default: 0.2]"),
    alpha: Optional[float] = typer.Option(None, help="penalty strength α  \\[default: 1e-4]"),
    l1_ratio: Optional[float] = typer.Option(None, help="0 = L2, 1 = L1, between = elastic net  \\[default: 0]"),
    solver: Optional[str] = typer.Option(None, help=SOLVER_HELP + "  \\[default: auto]"),
    max_iter: Optional[int] = typer.Option(None, help="iterations (epochs for sgd/adam)  \\[default: 1000]"),
    tol: Optional[float] = typer.Option(None, help="stopping tolerance  \\[default: 1e-6]"),
    batch_size: Optional[int] = typer.Option(None, help="minibatch size for sgd/adam  \\[default: 256]"),
    learning_rate: Optional[str] = typer.Option(None, help="'auto' or a step size (gd, sgd, adam)"),
    class_weight: Optional[str] = typer.Option(None, help="'balanced' to weight classes by 1/frequency"),
    seed: Optional[int] = typer.Option(None, help="seed of the split and the minibatch shuffles  \\[default: 0]"),
    standardize: Optional[bool] = typer.Option(
        None, "--standardize/--no-standardize", help="scale features to mean 0, std 1 (fitted on the training "
                                                     "split)  \\[default: standardize]"),
    categorical: Optional[bool] = typer.Option(
        None, "--categorical/--no-categorical", help="one-hot encode non-numeric feature columns"),
    impute: Optional[str] = typer.Option(None, help="'mean': fill NaN features with the training mean"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder  \\[default: runs/<timestamp>/]"),
    resume: bool = typer.Option(False, "--resume", help="continue the model in --out (after Ctrl-C, or to "
                                                       "train longer)"),
    force: bool = typer.Option(False, "--force", help="overwrite a model already in --out"),
    checkpoint_every: float = typer.Option(10.0, help="seconds between checkpoints of the current iterate in "
                                                      "--out (0: none)"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.html and the PNGs"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    use_dask: bool = typer.Option(False, "--dask", help="fit on a Dask LocalCluster (127.0.0.1); DATA "
                                  "(Parquet/CSV files or globs) is read lazily, block by block"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="fit on the existing Dask cluster at "
                                            "ADDRESS (implies --dask)"),
    debug: bool = DebugOption,
) -> None:
    """Fit softmax regression on DATA (default: the bundled digits); write the model, report.html and plots.

    Ctrl-C stops cleanly: the last completed iterate is saved in --out (exit status 130) and --resume continues
    it; with --resume, options not given keep the saved model's values (its data settings cannot change).
    """
    with _handled(debug):
        _train(**locals())


def _train_on_dask(stack, *, data, target, fmt, alpha, l1_ratio, solver, max_iter, tol, batch_size, learning_rate,
                   class_weight, seed, standardize, out, force, quiet, scheduler, report):
    """``train --dask``: read the files lazily, standardise with the data's mean/std, fit with the objective as
    one map-reduce per evaluation (softxent.dask), save the same model files.  No held-out split: the files
    are assumed too large to reshuffle; evaluate on separate files with ``softxent evaluate``."""
    import numpy as np

    from ..dask import client_for, fit_dask, read_table
    from ..estimator import SoftmaxRegression
    from .data import Preprocessing, check_table_width, detect_format, expand_paths
    from .model_io import MODEL_JSON, SavedModel, check_metadata_fits, save_model
    from .report import compute_metrics

    out = out if out is not None else _default_out()
    if (out / MODEL_JSON).exists() and not force:
        raise UserInputError(f"{str(out)!r} already holds a model; overwrite it with --force or choose another --out")
    for path in expand_paths(list(data)):
        check_table_width(path, fmt)
    try:
        X, y, names = read_table(list(data), target, fmt=fmt)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise DataError(str(exc).splitlines()[0]) from None
    client = stack.enter_context(client_for(scheduler=scheduler))
    t0 = time.perf_counter()
    y_np = np.asarray(client.compute(y, sync=True))
    classes_all = np.unique(y_np)
    if len(classes_all) < 2:
        raise DataError(f"the target {target!r} has only one class ({classes_all[0]!r}); a classifier needs at least 2")
    do_std = True if standardize is None else standardize
    if do_std:
        mean, std = client.compute([X.mean(axis=0), X.std(axis=0)], sync=True)
        scale = np.where(np.asarray(std) > 0, std, 1.0)
        X_fit = (X - mean) / scale
    else:
        mean, scale, X_fit = np.zeros(X.shape[1]), np.ones(X.shape[1]), X
    pre = Preprocessing(input_columns=list(names), feature_names=list(names), table=True, standardize=do_std,
                        mean=np.asarray(mean, dtype=np.float64), scale=np.asarray(scale, dtype=np.float64))
    load_s = time.perf_counter() - t0
    sources = [str(p) for p in expand_paths(list(data))] or list(data)
    check_metadata_fits(pre, classes_all, {"training": {"data": sources}})
    kind = fmt or detect_format(Path(sources[0]))
    console.print(f"[bold]softxent train --dask[/bold]: {len(sources)} {kind} file(s) — {len(y_np)} rows, "
                  f"{len(names)} features, {len(classes_all)} classes, {X.numblocks[0]} row blocks on "
                  f"{len(client.scheduler_info().get('workers', {}))} worker(s)")
    cw = class_weight if class_weight not in (None, "none") else None
    lr = learning_rate if learning_rate in (None, "auto") else float(learning_rate)
    params = {k: v for k, v in {"alpha": alpha, "l1_ratio": l1_ratio, "solver": solver, "max_iter": max_iter,
                                "tol": tol, "batch_size": batch_size, "learning_rate": lr, "class_weight": cw,
                                "random_state": seed}.items() if v is not None}
    est = SoftmaxRegression(**params)
    progress = None if quiet else _progress()
    task = progress.add_task(est._resolve_solver(), total=est.max_iter, objective="-", grad="-") if progress else None
    monitor = _FitMonitor(progress, task, 0.0, lambda last, curve: None, describe=lambda: f"{est.solver} iteration")
    est.set_params(callback=monitor)
    t_fit = time.perf_counter()
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress if progress is not None else contextlib.nullcontext():
            fit_dask(est, X_fit, y, client=client)
            _finish_progress(progress, task, est, len(monitor.curve),
                             not any(issubclass(w.category, ConvergenceWarning) for w in caught))
    fit_s = time.perf_counter() - t_fit
    est.set_params(callback=None)
    notes = ([_not_converged_note(est, monitor.curve, do_std)]
             if any(issubclass(w.category, ConvergenceWarning) for w in caught) else [])
    _show_warnings(w for w in caught if not issubclass(w.category, ConvergenceWarning))
    # one Dask pass for every row's log-probabilities: the metrics and the report's plots use them
    logp = np.asarray(client.compute(est.predict_log_proba(X_fit), sync=True))
    y_idx = np.searchsorted(est.classes_, y_np)
    metrics = {"train": compute_metrics(y_idx, logp)}
    meta = {"training": {"data": sources, "format": kind, "n_rows": int(len(y_np)), "n_train": int(len(y_np)),
                         "n_test": 0, "test_size": 0.0, "seed": seed, "dask": True,
                         "command": _command_line()},
            "estimator": {"class": "softxent.SoftmaxRegression", "params": _json_params(est), "solver": est.solver_,
                          "n_iter": int(est.n_iter_), "objective": float(est.objective_), "fit_seconds": fit_s,
                          "converged": not notes},
            "metrics": {k: m.to_json() for k, m in metrics.items()}}
    model = SavedModel(classes=est.classes_, coef=np.asarray(est.coef_, dtype=np.float64),
                       intercept=np.asarray(est.intercept_, dtype=np.float64), preprocessing=pre,
                       loss_curve=np.asarray(est.loss_curve_, dtype=np.float64), target=target, status="complete",
                       meta=meta)
    out.mkdir(parents=True, exist_ok=True)
    with _sigint_deferred():
        save_model(out, model)
    console.print(f"solver {est.solver_}: {est.n_iter_} iterations, objective {est.objective_:.8g}; "
                  f"{fit_s:.2f} s fitting on Dask, {load_s:.2f} s scanning")
    for note in notes + _constant_model_notes(logp, est.alpha):
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    console.print(_metrics_table(metrics))
    console.print(f"model  → {out / 'model.safetensors'} + {out / 'model.json'}")
    if report:  # no held-out split on Dask: the plots score the training rows
        _write_train_report(out, model, f"{len(sources)} {kind} file(s) on Dask", list(est.loss_curve_), y_idx,
                            logp, "train", metrics, [("rows", str(len(y_np))), ("fit time", f"{fit_s:.2f} s on Dask"),
                                                     ("converged", "yes" if not notes else "no — " + notes[0])])


_FLAG_OF_PARAM = {"random_state": "--seed"}


def _flag(param: str) -> str:
    return _FLAG_OF_PARAM.get(param, "--" + param.replace("_", "-"))


def _check_train_options(*, alpha, l1_ratio, solver, max_iter, tol, batch_size, learning_rate, class_weight, seed,
                         test_size, impute, checkpoint_every, fmt):
    """Check the values given on the command line (None: not given) with the estimator's own constraints
    and the command's; the message names the flag.  Returns --learning-rate as the estimator takes it."""
    import math

    from sklearn.utils._param_validation import InvalidParameterError

    from ..estimator import SoftmaxRegression
    from ..solvers import SOLVERS

    lr = learning_rate
    if lr is not None and lr != "auto":
        try:
            lr = float(lr)
        except ValueError:
            raise UserInputError(f"--learning-rate must be 'auto' or a positive number; got {learning_rate!r}") from None
    if class_weight is not None and class_weight not in ("balanced", "none"):
        raise UserInputError(f"--class-weight must be 'balanced' or 'none'; got {class_weight!r}")
    if solver is not None and solver not in ("auto", *SOLVERS):
        import difflib

        close = difflib.get_close_matches(solver, ("auto", *SOLVERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserInputError(f"--solver must be one of auto, {', '.join(SOLVERS)}; got {solver!r}{hint}")
    given = {"alpha": alpha, "l1_ratio": l1_ratio, "solver": solver, "max_iter": max_iter, "tol": tol,
             "batch_size": batch_size, "learning_rate": lr,
             "class_weight": None if class_weight in (None, "none") else class_weight, "random_state": seed}
    est = SoftmaxRegression(**{k: v for k, v in given.items() if v is not None})
    try:
        est._validate_params()
    except InvalidParameterError as exc:
        raise UserInputError(_flag_message(str(exc))) from None
    if solver is not None and l1_ratio is not None:
        try:
            est._resolve_solver()
        except ValueError:
            raise UserInputError(f"--solver {solver} handles only the L2 penalty (--l1-ratio 0); got --l1-ratio "
                                 f"{l1_ratio}: use --solver proximal (or sgd / adam) for L1 and elastic net") from None
    for name, value in (("alpha", alpha), ("tol", tol), ("learning_rate", lr)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{_flag(name)} must be a finite number; got {value}")
    if test_size is not None and not 0.0 <= test_size < 1.0:
        raise UserInputError(f"--test-size must be in [0, 1) (the held-out share of the rows); got {test_size}")
    if impute is not None and impute not in ("mean", "none"):
        raise UserInputError(f"--impute must be 'mean' or 'none'; got {impute!r}")
    if not checkpoint_every >= 0 or math.isinf(checkpoint_every):
        raise UserInputError(f"--checkpoint-every must be a finite number of seconds >= 0; got {checkpoint_every}")
    _check_format(fmt)
    return lr


def _check_format(fmt) -> None:
    from .data import FORMATS

    if fmt is not None and fmt not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _flag_message(text: str) -> str:
    """scikit-learn's "The 'alpha' parameter of SoftmaxRegression must be X. Got Y instead." in the
    command line's words: "--alpha must be X; got Y"."""
    import re

    m = re.match(r"The '(\w+)' parameter of \w+ must be (.*)\. Got (.*) instead\.?$", " ".join(text.split()))
    if m is None:
        return text
    return f"{_flag(m.group(1))} must be {m.group(2)}; got {m.group(3)}"


def _check_writable_folder(folder: Path, flag: str) -> None:
    """Fail early, naming the user's path, when ``folder`` cannot be created or written: by making (and
    removing) a scratch folder in it, or in its nearest existing ancestor.  Creates nothing that stays."""
    import tempfile

    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == folder else f"cannot be created: {str(probe)!r} is"
        raise UserInputError(f"{flag} {str(folder)!r} {what} not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".softxent-write-check-", dir=probe))
    except OSError as exc:
        where = "" if probe == folder else f" (in {str(probe)!r})"
        raise UserInputError(f"{flag} {str(folder)!r} is not writable{where}: {exc.strerror or exc}") from None


def _train(*, data, target, fmt, test_size, alpha, l1_ratio, solver, max_iter, tol, batch_size, learning_rate,
           class_weight, seed, standardize, categorical, impute, out, resume, force, checkpoint_every, report,
           quiet, debug, use_dask=False, scheduler=None):
    import numpy as np

    # every option is checked before any data is read or any folder made (a bad flag costs nothing)
    lr = _check_train_options(alpha=alpha, l1_ratio=l1_ratio, solver=solver, max_iter=max_iter, tol=tol,
                              batch_size=batch_size, learning_rate=learning_rate, class_weight=class_weight,
                              seed=seed, test_size=test_size, impute=impute, checkpoint_every=checkpoint_every,
                              fmt=fmt)
    if out is not None or not resume:
        _check_writable_folder(out if out is not None else Path("runs"), "--out")
    dask_mode = bool(use_dask or scheduler)
    if dask_mode:
        if not data:
            raise UserInputError("--dask reads Parquet/CSV files: give DATA (files, folders or globs) and --target")
        if target is None:
            raise UserInputError("--dask needs --target (the label column)")
        for flag, value in (("--resume", resume), ("--categorical", categorical),
                            ("--impute", impute not in (None, "none"))):
            if value:
                raise UserInputError(f"{flag} is not supported with --dask; encode and impute the files first")
        stack = contextlib.ExitStack()
        with stack:
            return _train_on_dask(stack, data=data, target=target, fmt=fmt, alpha=alpha, l1_ratio=l1_ratio,
                                  solver=solver, max_iter=max_iter, tol=tol, batch_size=batch_size,
                                  learning_rate=learning_rate, class_weight=class_weight, seed=seed,
                                  standardize=standardize, out=out, force=force, quiet=quiet, scheduler=scheduler,
                                  report=report)

    from .data import Preprocessing, load_data, split_target, train_test_indices
    from .model_io import MODEL_JSON, SavedModel, check_metadata_fits, load_model, save_model

    # ---- the output folder, and the model to resume ------------------------------------------------
    previous = None
    if resume:
        if out is None:
            raise UserInputError("--resume continues the model in --out DIR; give --out")
        if not (out / MODEL_JSON).exists():
            raise UserInputError(f"--resume: {str(out)!r} holds no model to continue (no {MODEL_JSON})")
        previous = load_model(out)
        _check_resume_conflicts(previous, target=target, test_size=test_size, seed=seed, standardize=standardize,
                                categorical=categorical, impute=impute)
    else:
        out = out if out is not None else _default_out()
        if (out / MODEL_JSON).exists() and not force:
            raise UserInputError(f"{str(out)!r} already holds a model; continue it with --resume, overwrite it with "
                                 "--force, or choose another --out")
    prev_train = previous.meta.get("training", {}) if previous else {}
    if previous is not None and not data:
        data, fmt = _resume_data(prev_train, out, fmt)
    prev_params = previous.meta.get("estimator", {}).get("params", {}) if previous else {}

    def pick(name, value):
        if value is not None:
            return value
        if name in prev_params:
            return prev_params[name]
        if name in prev_train:
            return prev_train[name]
        return _DEFAULTS[name]

    test_size = float(pick("test_size", test_size))
    seed = int(pick("seed", seed))
    cw = pick("class_weight", class_weight)
    params = {"alpha": pick("alpha", alpha), "l1_ratio": pick("l1_ratio", l1_ratio), "solver": pick("solver", solver),
              "max_iter": pick("max_iter", max_iter), "tol": pick("tol", tol), "batch_size": pick("batch_size", batch_size),
              "learning_rate": pick("learning_rate", lr), "class_weight": None if cw in (None, "none") else cw,
              "random_state": seed}

    # ---- data ---------------------------------------------------------------------------------------
    if data:  # the table readers' import counts as starting, not as reading the data
        import pandas  # noqa: F401
    started_s = _seconds_since_start()
    t0 = time.perf_counter()
    kw = {}
    if previous is not None and previous.preprocessing.zero_based is not None:
        kw = {"n_features": previous.preprocessing.n_features, "zero_based": previous.preprocessing.zero_based}
    tgt = target if target is not None else (previous.target if previous is not None else None)
    raw = load_data(data, fmt, label_key=_npz_key(previous, target), **kw)
    features, y, target_name = split_target(raw, tgt, required=True)
    classes_all = np.unique(y)
    if len(classes_all) < 2:
        raise DataError(f"the target {target_name!r} has only one class ({classes_all[0].item()!r}) in "
                        f"{raw.n_rows} rows; a classifier needs at least 2")
    tr, te = train_test_indices(y, test_size, seed)
    y_tr, y_te = y[tr], y[te]
    if len(np.unique(y_tr)) < 2:
        raise DataError(f"the training split has only one class ({y_tr[0].item()!r}); use a smaller --test-size or "
                        "more data")
    if previous is not None:
        pre = previous.preprocessing
        y_tr = _align_labels(y_tr, previous.classes)
        y_te = _align_labels(y_te, previous.classes)
        if not np.array_equal(np.unique(y_tr), previous.classes):
            raise DataError(f"--resume: the training split's classes {_show_classes(np.unique(y_tr))} differ from "
                            f"the model's {_show_classes(previous.classes)}")
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre = Preprocessing.fit(_rows(features, tr), categorical=bool(categorical),
                                    impute=None if impute in (None, "none") else impute,
                                    standardize=True if standardize is None else standardize, raw=raw)
        _show_warnings(caught)
        check_metadata_fits(pre, classes_all, {"training": {"data": raw.sources}})
    X_tr = pre.transform(_rows(features, tr))
    X_te = pre.transform(_rows(features, te)) if len(te) else None
    load_s = time.perf_counter() - t0

    n_feat = pre.n_features
    console.print(f"[bold]softxent train[/bold]: {raw.describe()} — {raw.n_rows} rows, {n_feat} features, "
                  f"{len(classes_all)} classes; {len(tr)} train / {len(te)} held-out rows (seed {seed})"
                  + (f"; resuming {out}" if previous is not None else ""))

    # ---- model --------------------------------------------------------------------------------------
    from sklearn.exceptions import ConvergenceWarning

    from ..estimator import SoftmaxRegression

    if previous is not None:
        est = previous.estimator(**params, warm_start=True)
    else:
        est = SoftmaxRegression(**params)
    prev_curve = list(previous.loss_curve) if previous is not None else []
    prev_iter = int(previous.meta.get("estimator", {}).get("n_iter", len(prev_curve))) if previous else 0
    base_meta = {
        "training": {"data": raw.sources, "format": raw.fmt, "n_rows": raw.n_rows, "n_train": len(tr),
                     "n_test": len(te), "test_size": test_size, "seed": seed,
                     "command": _command_line()},
    }

    def model_of(coef, intercept, curve, status, extra=None):
        meta = dict(base_meta)
        meta["estimator"] = {"class": "softxent.SoftmaxRegression", "params": _json_params(est),
                             "solver": getattr(est, "solver_", params["solver"]), "n_iter": prev_iter + len(curve) - len(prev_curve),
                             **(extra or {})}
        classes = est.classes_ if hasattr(est, "classes_") else classes_all
        return SavedModel(classes=classes, coef=coef, intercept=intercept, preprocessing=pre,
                          loss_curve=np.asarray(curve, dtype=np.float64), target=target_name, status=status, meta=meta)

    def save(model):  # the folder is made with its first model: a run that fails before leaves nothing
        out.mkdir(parents=True, exist_ok=True)
        save_model(out, model)

    def save_checkpoint(last, curve):
        save(model_of(last[0], last[1], prev_curve + curve, "checkpoint",
                                 {"objective": curve[-1] if curve else None}))

    progress = None if quiet else _progress()
    task = None
    if progress is not None:
        task = progress.add_task(est._resolve_solver(), total=params["max_iter"], objective="-", grad="-")
    unit = "epoch" if params["solver"] in ("sgd", "adam") else "iteration"
    monitor = _FitMonitor(progress, task, checkpoint_every, save_checkpoint,
                          describe=lambda: f"{getattr(est, 'solver_', params['solver'])} {unit}")
    est.set_params(callback=monitor)
    try:  # Ctrl-C raises KeyboardInterrupt even where the parent process had SIGINT ignored
        previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        previous_handler = None
    t_fit = time.perf_counter()
    interrupted = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with progress if progress is not None else contextlib.nullcontext():
                est.fit(X_tr, y_tr)
                _finish_progress(progress, task, est, len(monitor.curve),
                                 not any(issubclass(w.category, ConvergenceWarning) for w in caught))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
    fit_s = time.perf_counter() - t_fit
    est.set_params(callback=None)
    notes = ([_not_converged_note(est, monitor.curve, pre.standardize)]
             if any(issubclass(w.category, ConvergenceWarning) for w in caught) else [])
    _show_warnings(w for w in caught if not issubclass(w.category, ConvergenceWarning))

    if interrupted:
        if not monitor.curve:
            err_console.print("[yellow]Interrupted before the first iteration completed; "
                              + ("the model in --out is unchanged." if previous else "no model saved.") + "[/yellow]")
            raise typer.Exit(EXIT_INTERRUPTED)
        coef, intercept = (est.coef_, est.intercept_) if hasattr(est, "coef_") else monitor.last
        with _sigint_deferred():
            save(model_of(np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64),
                                     prev_curve + monitor.curve, "interrupted",
                                     {"objective": monitor.curve[-1], "fit_seconds": fit_s}))
        err_console.print(f"[yellow]Interrupted after {len(monitor.curve)} iterations (objective "
                          f"{monitor.curve[-1]:.6g}).[/yellow] Saved the last completed iterate to {out}/. "
                          f"Continue with: softxent train {' '.join(data or [])}"
                          f"{' ' if data else ''}--out {out} --resume")
        raise typer.Exit(EXIT_INTERRUPTED)

    # ---- metrics, model, report ---------------------------------------------------------------------
    from .report import compute_metrics

    classes = est.classes_
    logp_tr = est.predict_log_proba(X_tr)
    metrics = {"train": compute_metrics(np.searchsorted(classes, y_tr), logp_tr)}
    logp_te = None
    if X_te is not None:
        logp_te = est.predict_log_proba(X_te)
        metrics["held-out"] = compute_metrics(_class_indices(y_te, classes, "the held-out split"), logp_te)
    curve = prev_curve + list(getattr(est, "loss_curve_", monitor.curve))
    extra = {"objective": float(est.objective_), "fit_seconds": fit_s, "converged": not notes}
    model = model_of(np.asarray(est.coef_, dtype=np.float64), np.asarray(est.intercept_, dtype=np.float64), curve,
                     "complete", extra)
    model.meta["metrics"] = {k: m.to_json() for k, m in metrics.items()}
    with _sigint_deferred():
        save(model)

    console.print(f"solver {est.solver_}: {len(curve) - len(prev_curve)} iterations"
                  + (f" (+{len(prev_curve)} before --resume)" if prev_curve else "")
                  + f", objective {est.objective_:.8g}; {fit_s:.2f} s fitting, {load_s:.2f} s reading data"
                  + (f", {started_s:.2f} s starting" if started_s is not None else ""))
    for note in notes + _constant_model_notes(logp_tr, est.alpha):
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)
    console.print(_metrics_table(metrics))
    console.print(f"model  → {out / 'model.safetensors'} + {out / 'model.json'}")
    if report:
        split = "held-out" if logp_te is not None else "train"
        y_eval, logp_eval = (y_te, logp_te) if logp_te is not None else (y_tr, logp_tr)
        _write_train_report(out, model, raw.describe(), curve, np.searchsorted(classes, y_eval), logp_eval, split,
                            metrics, [("rows (train / held-out)", f"{len(tr)} / {len(te)}"),
                                      ("fit time", f"{fit_s:.2f} s"),
                                      ("converged", "yes" if not notes else "no — " + notes[0])])


def _write_train_report(out, model, data_desc: str, curve, y_idx, logp, split: str, metrics, extra_rows) -> None:
    """report.html and the PNGs of a training run (local or on Dask), scored on ``split``'s rows."""
    from .report import ReportContent, build_plots, per_class_rows, write_report

    labels = [str(c) for c in model.classes]
    plots = build_plots(loss_curve=curve, y_idx=y_idx, log_proba=logp, labels=labels, split=split,
                        coef=model.coef, image_shape=model.preprocessing.image_shape)
    content = ReportContent(title=f"softxent train — {data_desc}",
                            summary=_summary_rows(model, data_desc, extra_rows=extra_rows),
                            metrics=metrics, plots=plots, per_class=per_class_rows(y_idx, logp, labels),
                            per_class_split=split)
    path = write_report(out, content)
    console.print(f"report → {path} (+ {len(plots)} PNGs)")


def _seconds_since_start() -> float | None:
    """How long this process has run (Linux: from /proc, to 10 ms), when it is the softxent command itself;
    None elsewhere (a test runner's process age means nothing here)."""
    if _command_line() is None:
        return None
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _command_line() -> str | None:
    """The command as typed, when this process is the softxent command (not, e.g., a test runner)."""
    import shlex

    if sys.argv and (Path(sys.argv[0]).name.startswith("softxent") or sys.argv[0].endswith("__main__.py")):
        return "softxent " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return None


def _npz_key(model, target):
    """The npz array holding the labels: --target, else the one the model was trained with (npz), else 'y'."""
    if target is not None:
        return target
    if model is not None and model.meta.get("training", {}).get("format") == "npz":
        return model.target
    return None


# A model whose probabilities differ by less than this between all training rows predicts the same for
# every row: numerically constant (the penalty has overwhelmed the data, or the features carry nothing).
CONSTANT_MODEL_SPREAD = 1e-6


def _constant_model_notes(log_proba, alpha) -> list[str]:
    """A warning when the fitted model is (numerically) constant over the training rows."""
    import numpy as np

    if len(log_proba) < 2:
        return []
    P = np.exp(log_proba)
    spread = float(np.max(P.max(axis=0) - P.min(axis=0)))
    if spread >= CONSTANT_MODEL_SPREAD:
        return []
    return [f"the fitted model is (numerically) constant: its probabilities differ by at most {spread:.1e} between "
            f"training rows, so every row gets the same prediction (the class frequencies). --alpha {alpha:g} is "
            "probably too strong for this data (the default is 1e-4); or the features carry no information."]


def _not_converged_note(est, curve, standardized: bool) -> str:
    """The command line's words for a fit that used up --max-iter before the convergence criterion held
    (softxent.solvers.converged, the same for every solver): how far it got, and what to do here."""
    unit = "epoch" if est.solver_ in ("sgd", "adam") else "iteration"
    g = getattr(est, "_final_optimality", float("nan"))
    recent = ""
    if len(curve) > 10:
        recent = f"; the objective fell by {curve[-11] - curve[-1]:.1e} over the last 10 {unit}s"
    what = (f"{est.solver_} stopped at --max-iter {est.max_iter} {unit}s before the gradient's max-norm reached "
            f"--tol {est.tol} (it is {g:.1e}{recent}).")
    if standardized:
        todo = ("The features are standardised already: continue with --resume and a larger --max-iter, or use "
                "--solver lbfgs (the default) or newton-cg, which need far fewer iterations.")
    else:
        todo = ("Standardise the features (drop --no-standardize), continue with --resume and a larger "
                "--max-iter, or use --solver newton-cg (it copes best with unscaled features).")
    return f"{what} {todo}"


def _show_warnings(caught) -> None:
    """Warnings caught during a step, one line each on stderr (deprecations are for developers)."""
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            err_console.print(f"[yellow]warning:[/yellow] {' '.join(str(w.message).split())}", highlight=False)


def _resume_data(prev_train: dict, out: Path, fmt):
    """``--resume`` without DATA: the data the model in ``out`` was trained on, as its model.json recorded
    it (the bundled digits, or the same files if they are still there)."""
    sources = [str(s) for s in prev_train.get("data") or []]
    kind = prev_train.get("format")
    if kind == "digits":
        return None, fmt
    missing = [s for s in sources if not Path(s).exists()]
    if not sources or missing:
        shown = ", ".join(repr(s) for s in (missing or sources)[:3]) or "(not recorded)"
        raise UserInputError(f"--resume without DATA trains on the data recorded in {str(out)!r}, but "
                             f"{shown} {'is' if len(missing) == 1 else 'are'} not there; give the data path: "
                             f"softxent train DATA --out {out} --resume")
    err_console.print(f"note: --resume without DATA: training on the data recorded in the model "
                      f"({', '.join(sources[:3])}{', ...' if len(sources) > 3 else ''})")
    return sources, fmt if fmt is not None else kind


def _check_resume_conflicts(previous, **given) -> None:
    """--resume keeps the data settings of the saved model; an explicit different value is an error."""
    pre = previous.preprocessing
    training = previous.meta.get("training", {})
    saved = {"target": previous.target, "test_size": training.get("test_size"), "seed": training.get("seed"),
             "standardize": pre.standardize, "impute": pre.impute or "none"}
    for name, value in given.items():
        if value is None:
            continue
        if name == "categorical":
            conflict = not value and bool(pre.categorical)  # --categorical on numeric data changes nothing
            shown = bool(pre.categorical)
        else:
            conflict = saved[name] is not None and value != saved[name]
            shown = saved[name]
        if conflict:
            flag = "--" + ("no-" if value is False else "") + name.replace("_", "-")
            given_text = flag if isinstance(value, bool) else f"{flag} {value!r}"
            raise UserInputError(f"--resume keeps the saved model's data settings: {given_text} differs from "
                                 f"the model's {name} = {shown!r}; drop {flag} or train a new model")


def _json_params(est) -> dict:
    p = est.get_params()
    p.pop("callback", None)
    p.pop("verbose", None)
    p.pop("warm_start", None)
    return p


def _summary_rows(model, data_desc: str, extra_rows=()) -> list[tuple[str, str]]:
    from .. import __version__

    est = model.meta.get("estimator", {})
    params = est.get("params", {})
    pre = model.preprocessing
    rows = [
        ("data", data_desc),
        ("model", f"softxent.SoftmaxRegression, {len(model.classes)} classes × {pre.n_features} features"),
        ("classes", _show_classes(model.classes)),
        ("solver", f"{est.get('solver', '?')} (alpha={params.get('alpha')}, l1_ratio={params.get('l1_ratio')}, "
                   f"max_iter={params.get('max_iter')}, tol={params.get('tol')})"),
        ("iterations", str(est.get("n_iter", "?"))),
        ("final objective", f"{est['objective']:.10g}" if isinstance(est.get("objective"), float) else "?"),
        ("preprocessing", _describe_pre(pre)),
        *extra_rows,
        ("softxent", __version__),
    ]
    return rows


def _describe_pre(pre) -> str:
    parts = []
    if pre.categorical:
        parts.append(f"one-hot: {', '.join(pre.categorical)}")
    if pre.impute:
        parts.append(f"NaN → training {pre.impute}")
    parts.append(("standardised (scale only: sparse)" if pre.sparse else "standardised (mean 0, std 1)")
                 if pre.standardize else "not standardised")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# predict / evaluate / info / export
# --------------------------------------------------------------------------------------------------
@app.command()
def predict(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help="the folder that 'softxent train' wrote"),
    data: List[str] = typer.Argument(..., help="data files or globs (the target column may be absent)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="out.csv or out.parquet (default: CSV on stdout)"),
    proba: bool = typer.Option(False, "--proba", help="add one probability column per class"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="the label column to drop, if not the model's"),
    fmt: Optional[str] = FormatOption,
    debug: bool = DebugOption,
) -> None:
    """Predict labels (in their original type) for DATA; --proba adds one probability column per class."""
    with _handled(debug):
        import numpy as np
        import pandas as pd

        from .model_io import atomic_write_bytes, atomic_write_text

        if output is not None and output.suffix.lower() not in (".csv", ".parquet"):
            raise UserInputError(f"--output must end in .csv or .parquet; got {str(output)!r}")
        _check_format(fmt)
        if output is not None:
            if output.is_dir():
                raise UserInputError(f"--output {str(output)!r} is a folder; give a file name ending in .csv or "
                                     ".parquet")
            _check_writable_folder(output.parent, f"--output {str(output)!r}: its folder")
        model = _load_model(model_dir)
        raw, features, _, _ = _model_data(model, data, fmt, target, required=False)
        X = model.preprocessing.transform(features)
        est = model.estimator()
        P = est.predict_proba(X)
        pred = model.classes[np.argmax(P, axis=1)]
        frame = pd.DataFrame({"prediction": pred})
        if proba:
            for j, c in enumerate(model.classes):
                frame[f"proba_{c}"] = P[:, j]
        if output is None:
            try:
                sys.stdout.write(frame.to_csv(index=False))
                sys.stdout.flush()
            except BrokenPipeError:  # `softxent predict ... | head`: the reader left, which is fine
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return
        try:
            if output.suffix.lower() == ".parquet":
                import io

                buf = io.BytesIO()
                frame.to_parquet(buf, index=False)
                atomic_write_bytes(output, buf.getvalue())
            else:
                atomic_write_text(output, frame.to_csv(index=False))
        except OSError as exc:  # the message names the user's path, not the temporary file beside it
            raise UserInputError(f"cannot write --output {str(output)!r}: {exc.strerror or exc}") from None
        err_console.print(f"{len(frame)} predictions → {output}")


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help="the folder that 'softxent train' wrote"),
    data: Optional[List[str]] = typer.Argument(None, help="labelled data files or globs (none: the bundled digits)"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="the label column (default: the model's)"),
    fmt: Optional[str] = FormatOption,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder  \\[default: runs/<timestamp>-evaluate/]"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.html and the PNGs"),
    debug: bool = DebugOption,
) -> None:
    """Score MODEL on labelled DATA: the metrics table, and report.html with the plots."""
    with _handled(debug):
        from .report import ReportContent, build_plots, compute_metrics, per_class_rows, write_report

        _check_format(fmt)
        if report:
            _check_writable_folder(out if out is not None else Path("runs"), "--out")
        model = _load_model(model_dir)
        raw, features, y, _ = _model_data(model, data, fmt, target, required=True)
        X = model.preprocessing.transform(features)
        y_idx = _class_indices(y, model.classes, raw.describe())
        logp = model.estimator().predict_log_proba(X)
        metrics = {"data": compute_metrics(y_idx, logp)}
        train_metrics = model.meta.get("metrics", {})
        console.print(f"[bold]softxent evaluate[/bold]: {model.path} on {raw.describe()} ({raw.n_rows} rows)")
        console.print(_metrics_table(metrics))
        if train_metrics:
            console.print("at training: " + "; ".join(
                f"{k} accuracy {v.get('accuracy', float('nan')):.4f}" for k, v in train_metrics.items()))
        if report:
            out = out if out is not None else _default_out("-evaluate")
            labels = [str(c) for c in model.classes]
            plots = build_plots(loss_curve=model.loss_curve, y_idx=y_idx, log_proba=logp, labels=labels, split="data",
                                coef=model.coef, image_shape=model.preprocessing.image_shape)
            content = ReportContent(title=f"softxent evaluate — {raw.describe()}",
                                    summary=_summary_rows(model, raw.describe(), [("model folder", str(model.path))]),
                                    metrics=metrics, plots=plots, per_class=per_class_rows(y_idx, logp, labels),
                                    per_class_split="data")
            path = write_report(out, content)
            console.print(f"report → {path} (+ {len(plots)} PNGs)")


@app.command()
def info(
    model_dir: Optional[Path] = typer.Argument(None, metavar="[MODEL]",
                                               help="the folder that 'softxent train' wrote"),
    as_json: bool = typer.Option(False, "--json", help="print model.json as it is (after validating the model)"),
    debug: bool = DebugOption,
) -> None:
    """Describe a saved model: classes, features, preprocessing, solver, objective, metrics, files.
    Without MODEL: this install (the row kernels in use, threads, BLAS, optional packages)."""
    with _handled(debug):
        if model_dir is None:
            from .._config import show_config

            show_config()
            return
        from .model_io import MODEL_JSON, MODEL_TENSORS, load_model

        model = load_model(model_dir)
        _print_load_notes(model)
        if as_json:
            sys.stdout.write(model.json_text)  # the bytes that were validated, not a second read
            return
        est = model.meta.get("estimator", {})
        train_meta = model.meta.get("training", {})
        table = Table(title=f"softxent model {model.path}", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        pre = model.preprocessing
        names = pre.feature_names
        rows = [
            ("status", model.status),
            ("classes", f"{len(model.classes)}: {_show_classes(model.classes)}"),
            ("target", str(model.target)),
            ("features", f"{len(names)}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"),
            ("preprocessing", _describe_pre(pre)),
            ("image shape", "×".join(map(str, pre.image_shape)) if pre.image_shape else "-"),
            ("solver", est.get("solver", "?")),
            ("parameters", ", ".join(f"{k}={v}" for k, v in est.get("params", {}).items())),
            ("iterations", str(est.get("n_iter", "?"))),
            ("objective", f"{est['objective']:.10g}" if isinstance(est.get("objective"), float) else "?"),
            ("training data", ", ".join(train_meta.get("data", [])) or "?"),
            ("split", f"{train_meta.get('n_train', '?')} train / {train_meta.get('n_test', '?')} held-out "
                      f"(test_size {train_meta.get('test_size', '?')}, seed {train_meta.get('seed', '?')})"),
        ]
        def num(v) -> str:  # metrics are numbers or null (an infinite log-loss is saved as null)
            return "?" if v is None else f"{v:.4f}"

        for split, m in model.meta.get("metrics", {}).items():
            rows.append((f"metrics ({split})", f"accuracy {num(m.get('accuracy'))}, log-loss "
                                               f"{num(m.get('log_loss'))}, macro-F1 {num(m.get('macro_f1'))}"))
        from .._config import kernels_line

        rows += [("files", f"{MODEL_JSON}, {MODEL_TENSORS} ({model.tensor_bytes} bytes)"),
                 ("row kernels here", kernels_line()),
                 ("written by", f"softxent {model.meta.get('softxent_version', '?')}")]
        from rich.text import Text

        for k, v in rows:
            table.add_row(Text(k), Text(v))  # Text: names from the model are not rich markup
        console.print(table)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., metavar="MODEL", help="the folder that 'softxent train' wrote"),
    onnx_path: Path = typer.Option(..., "--onnx", help="where to write the ONNX graph"),
    dtype: str = typer.Option("float32", help="float32 | float64: the graph's input and arithmetic"),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="run the graph under onnxruntime and compare with the model's predict_proba"),
    debug: bool = DebugOption,
) -> None:
    """Export MODEL as an ONNX graph (standardisation, logits, softmax, label) — input X is N×D features."""
    with _handled(debug):
        import numpy as np

        if dtype not in ("float32", "float64"):
            raise UserInputError(f"--dtype must be float32 or float64; got {dtype!r}")
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserInputError("export --onnx needs the 'onnx' extra: pip install 'softxent[onnx]'") from None
        from .onnx_export import export_onnx, onnx_predict_proba

        model = _load_model(model_dir)
        blob = export_onnx(model, onnx_path, dtype=dtype)
        console.print(f"ONNX graph → {onnx_path} ({len(blob)} bytes, opset 17, {dtype}); input 'X' "
                      f"(N×{model.n_features}), outputs 'label' (N,) and 'probabilities' (N×{model.n_classes})")
        if not check:
            return
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            err_console.print("note: onnxruntime is not installed; the graph was not run (pip install onnxruntime)")
            return
        pre = model.preprocessing
        rng = np.random.default_rng(0)
        X = pre.mean + pre.scale * rng.standard_normal((256, model.n_features))
        labels, P_onnx = onnx_predict_proba(blob, X)
        P = model.estimator().predict_proba(pre.standardise(X))
        diff = float(np.max(np.abs(P_onnx - P)))
        same = bool(np.array_equal(np.asarray(labels).astype(str),
                                   model.classes[np.argmax(P, axis=1)].astype(str)))
        tol = 1e-5 if dtype == "float32" else 1e-12
        console.print(f"check under onnxruntime on 256 random rows: max |p_onnx − predict_proba| = {diff:.2e} "
                      f"(tolerance {tol:g}); labels {'match' if same else 'DIFFER'}")
        if diff > tol or not same:
            _error("the ONNX graph does not reproduce predict_proba")
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------
@app.command()
def gradcheck(
    n: int = typer.Option(8, help="rows of random X"),
    d: int = typer.Option(5, help="features"),
    k: int = typer.Option(4, help="classes"),
    seed: int = typer.Option(0, help="random seed"),
    tol: float = typer.Option(1e-7, help="largest relative error that passes"),
) -> None:
    """Verify the seed's derivation numerically on random data and print what was checked."""
    from ..gradcheck import check_seed_derivation

    if min(n, d, k) < 1:
        raise typer.BadParameter(f"n, d and k must be >= 1; got n={n}, d={d}, k={k}")
    rows = check_seed_derivation(n=n, d=d, k=k, seed=seed)
    table = Table(title=f"softmax cross-entropy E = -(1/N) sum y.log softmax(X Theta^T + b)   "
                        f"(N={n}, D={d}, K={k}, seed={seed})")
    for col in ("derivative", "seed's formula", "vs finite differences", "vs closed form", "ok"):
        table.add_column(col)
    ok_all = True
    for r in rows:
        ok = r.fd_error < tol and r.closed_form_error < tol
        ok_all &= ok
        table.add_row(r.name, r.formula, f"{r.fd_error:.2e}", f"{r.closed_form_error:.2e}",
                      "yes" if ok else "NO")
    console.print(table)
    console.print("The seed's derivation holds." if ok_all else "[red]Gradient check FAILED.[/red]")
    raise typer.Exit(0 if ok_all else 1)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks (any command)")) -> None:
    """softxent: softmax cross-entropy, softmax regression and its tools."""
    _STATE["debug"] = debug


__all__ = ["app", "ModelFileError"]
