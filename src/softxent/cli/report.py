"""Metrics, plots and the self-contained ``report.html`` of a training or evaluation run.

Everything here works from arrays, so it is tested without training anything:

- :func:`compute_metrics` — accuracy, log-loss (= the mean cross-entropy, computed by
  :func:`softxent.loss.cross_entropy` on the log-probabilities), macro-F1 and the expected calibration error
  of the top-label confidence;
- the PNGs — objective curve, confusion matrix, reliability diagram, and each class's row of Θ drawn as an
  image when the features are the pixels of a square image;
- :func:`write_report` — ``report.html`` with the plots embedded as base64 PNG (no external file, script
  or style sheet), and the PNGs beside it.  Every file is written atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model_io import atomic_write_bytes, atomic_write_text

__all__ = [
    "Metrics",
    "compute_metrics",
    "reliability_bins",
    "wilson_interval",
    "plot_objective_curve",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_coef_images",
    "Plot",
    "ReportContent",
    "per_class_rows",
    "build_plots",
    "render_html",
    "write_report",
]

PNG_NAMES = {
    "objective": "objective_curve.png",
    "confusion": "confusion_matrix.png",
    "reliability": "reliability_diagram.png",
    "coef_images": "class_weights.png",
}


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
@dataclass
class Metrics:
    """Scores of one split.  ``log_loss`` is ``-(1/N) Σ log h(x_i)_{y_i}``, the unpenalised mean CE."""

    n: int
    accuracy: float
    log_loss: float
    macro_f1: float
    ece: float

    def to_json(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "log_loss": self.log_loss, "macro_f1": self.macro_f1,
                "ece": self.ece}


def compute_metrics(y_idx: np.ndarray, log_proba: np.ndarray) -> Metrics:
    """Metrics from class indices ``y_idx`` (N,) and log-probabilities ``log_proba`` (N, K)."""
    from sklearn.metrics import f1_score

    from ..loss import cross_entropy

    y_idx = np.asarray(y_idx, dtype=np.int64)
    log_proba = np.asarray(log_proba, dtype=np.float64)
    pred = np.argmax(log_proba, axis=1)
    # log_softmax(log p) = log p when the rows of p sum to 1, so this is -(1/N) Σ log p_{y_i}, with the
    # formula's one home doing the sum (no clipping: a confident mistake costs what it costs).
    ll = float(cross_entropy(log_proba, y_idx))
    f1 = float(f1_score(y_idx, pred, average="macro", zero_division=0))
    conf = np.exp(np.max(log_proba, axis=1))
    correct = pred == y_idx
    _, mean_conf, acc, counts = reliability_bins(conf, correct)
    n = len(y_idx)
    ece = float(np.sum(counts * np.abs(np.nan_to_num(acc) - np.nan_to_num(mean_conf))) / max(n, 1))
    return Metrics(n=n, accuracy=float(np.mean(correct)) if n else float("nan"), log_loss=ll, macro_f1=f1, ece=ece)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10):
    """Equal-width bins of the top-label confidence: ``(edges, mean confidence, accuracy, count)`` per bin.

    Empty bins have NaN mean confidence and accuracy.  The expected calibration error is
    ``Σ_b count_b · |accuracy_b − confidence_b| / N``.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / counts
        acc = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins) / counts
    return edges, mean_conf, acc, counts


# --------------------------------------------------------------------------------------------------
# plots (PNG bytes)
# --------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window
    # class labels and column names are data, not TeX: a label such as '$x^$' must print as written
    # (parsed as mathtext it made savefig raise after the model was saved)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_objective_curve(loss_curve, *, title: str = "objective per iteration") -> bytes:
    """Left: E(Θ, b) per iteration.  Right: E − min E on a log scale, which shows the convergence rate."""
    plt = _pyplot()
    curve = np.asarray(loss_curve, dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    it = np.arange(1, len(curve) + 1)
    axes[0].plot(it, curve, color="#1f77b4")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("objective E(Θ, b)")
    axes[0].set_title(title)
    if len(curve):
        gap = curve - np.min(curve)
        positive = gap > 0
        if positive.any():
            axes[1].semilogy(it[positive], gap[positive], color="#d62728")
        axes[1].set_title(f"E − min E   (min E = {np.min(curve):.6g})")
    axes[1].set_xlabel("iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], *, title: str) -> bytes:
    """Counts (rows: true class, columns: predicted), coloured by the share of each true class."""
    plt = _pyplot()
    cm = np.asarray(cm)
    k = cm.shape[0]
    size = min(2.0 + 0.45 * k, 14.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 25:
        ticks = np.arange(k)
        ax.set_xticks(ticks, labels=[_short(s) for s in labels], rotation=90 if k > 10 else 0)
        ax.set_yticks(ticks, labels=[_short(s) for s in labels])
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _png(fig)


# Reliability bins holding fewer rows than this are drawn faint and hatched: their accuracy is noise.
RELIABILITY_MIN_ROWS = 10


def wilson_interval(acc: np.ndarray, counts: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a proportion ``acc`` measured on ``counts`` rows (95 % for z = 1.96);
    (0, 1) for an empty bin.  Unlike acc ± z·se it stays inside [0, 1] and is wide for a bin of few rows."""
    acc = np.nan_to_num(np.asarray(acc, dtype=np.float64))
    n = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1 + z * z / n
        centre = (acc + z * z / (2 * n)) / denom
        half = z * np.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, np.clip(centre - half, 0, 1), 0.0)
    hi = np.where(n > 0, np.clip(centre + half, 0, 1), 1.0)
    return np.minimum(lo, acc), np.maximum(hi, acc)


def plot_reliability(log_proba: np.ndarray, y_idx: np.ndarray, *, title: str, n_bins: int = 10) -> bytes:
    """Reliability diagram: accuracy against mean top-label confidence per bin, and the bin counts."""
    plt = _pyplot()
    log_proba = np.asarray(log_proba, dtype=np.float64)
    pred = np.argmax(log_proba, axis=1)
    conf = np.exp(np.max(log_proba, axis=1))
    edges, mean_conf, acc, counts = reliability_bins(conf, pred == np.asarray(y_idx), n_bins)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.2, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    ok = counts > 0
    few = ok & (counts < RELIABILITY_MIN_ROWS)
    full = ok & ~few
    ax.bar(centres[full], acc[full], width=width, edgecolor="black", alpha=0.7, label="accuracy")
    if few.any():  # a bin of a handful of rows says little: drawn faint and hatched, its count written on it
        ax.bar(centres[few], acc[few], width=width, edgecolor="black", color="white", hatch="//", alpha=0.6,
               label=f"accuracy, bin of < {RELIABILITY_MIN_ROWS} rows")
    lo, hi = wilson_interval(acc, counts)
    ax.errorbar(centres[ok], acc[ok], yerr=[acc[ok] - lo[ok], hi[ok] - acc[ok]], fmt="none", ecolor="black",
                capsize=2, lw=0.8, label="95 % interval (Wilson)")
    for x, n in zip(centres[ok], counts[ok]):  # each bin's rows, at the foot of its bar
        ax.annotate(f"n={int(n)}", (x, 0.0), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=6.5, color="#202020")
    ax.plot(mean_conf[ok], acc[ok], "o-", color="#d62728", label="(mean confidence, accuracy)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centres, counts, width=edges[1] - edges[0], edgecolor="black", color="#7f7f7f")
    axh.set_xlabel("top-label confidence")
    axh.set_ylabel("rows")
    axh.set_xlim(0, 1)
    return _png(fig)


def plot_coef_images(coef: np.ndarray, image_shape: tuple[int, int], labels: list[str], *,
                     max_classes: int = 100) -> bytes:
    """Each class's row of Θ reshaped to ``image_shape``; red pushes towards the class, blue away from it."""
    plt = _pyplot()
    coef = np.asarray(coef)[:max_classes]
    k = coef.shape[0]
    cols = min(k, 10)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 1.45 * rows + 0.4), squeeze=False)
    vmax = float(np.max(np.abs(coef))) or 1.0
    im = None
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < k:
            im = ax.imshow(coef[i].reshape(image_shape), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                           interpolation="nearest")
            ax.set_title(_short(labels[i], 12), fontsize=9)
    fig.suptitle("rows of Θ as images (class k's weight on each pixel, standardised units)", fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    return _png(fig)


def _short(s, n: int = 16) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


# --------------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------------
@dataclass
class Plot:
    key: str  # one of PNG_NAMES
    title: str
    png: bytes
    caption: str = ""

    @property
    def filename(self) -> str:
        return PNG_NAMES.get(self.key, f"{self.key}.png")


@dataclass
class ReportContent:
    title: str
    summary: list[tuple[str, str]]  # (label, value) rows about the data and the model
    metrics: dict[str, Metrics]  # split name -> metrics
    plots: list[Plot] = field(default_factory=list)
    per_class: list[tuple] | None = None  # (class, precision, recall, f1, support) rows
    per_class_split: str = ""


def per_class_rows(y_idx, log_proba, labels: list[str]) -> list[tuple]:
    from sklearn.metrics import precision_recall_fscore_support

    k = len(labels)
    pred = np.argmax(log_proba, axis=1)
    p, r, f, s = precision_recall_fscore_support(y_idx, pred, labels=np.arange(k), zero_division=0)
    return [(labels[i], float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i in range(k)]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0}figcaption{color:#555;font-size:.9rem}img{max-width:100%;height:auto}
footer{margin-top:2rem;color:#777;font-size:.85rem}
"""


def render_html(content: ReportContent) -> str:
    """The report as one HTML string; images are ``data:image/png;base64`` URIs, so it is self-contained."""
    from .. import __version__

    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(content.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(content.title)}</h1>",
        "<h2>Run</h2><table>",
        *[f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in content.summary],
        "</table>",
    ]
    if content.metrics:
        names = list(content.metrics)
        parts += ["<h2>Metrics</h2><table><tr><th>metric</th>", *[f"<th>{e(n)}</th>" for n in names], "</tr>"]
        for label, attr, fmt in (("rows", "n", "{:d}"), ("accuracy", "accuracy", "{:.4f}"),
                                 ("log-loss", "log_loss", "{:.4f}"), ("macro-F1", "macro_f1", "{:.4f}"),
                                 ("expected calibration error", "ece", "{:.4f}")):
            cells = "".join(f'<td class="num">{e(fmt.format(getattr(content.metrics[n], attr)))}</td>'
                            for n in names)
            parts.append(f"<tr><th>{e(label)}</th>{cells}</tr>")
        parts.append("</table>")
    if content.per_class:
        parts += [f"<h2>Per class ({e(content.per_class_split)})</h2><table>",
                  "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>rows</th></tr>"]
        for c, p, r, f, s in content.per_class:
            parts.append(f'<tr><td>{e(str(c))}</td><td class="num">{p:.3f}</td><td class="num">{r:.3f}</td>'
                         f'<td class="num">{f:.3f}</td><td class="num">{s}</td></tr>')
        parts.append("</table>")
    for plot in content.plots:
        b64 = base64.b64encode(plot.png).decode("ascii")
        parts += [f"<h2>{e(plot.title)}</h2><figure>",
                  f'<img alt="{e(plot.title)}" src="data:image/png;base64,{b64}">',
                  f"<figcaption>{e(plot.caption)} (also saved as {e(plot.filename)})</figcaption></figure>"]
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    parts += [f"<footer>softxent {e(__version__)} — written {e(now)}</footer></body></html>"]
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | Path, content: ReportContent) -> Path:
    """Write the PNGs and ``report.html`` (self-contained) into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    for plot in content.plots:
        atomic_write_bytes(out / plot.filename, plot.png)
    path = out / "report.html"
    atomic_write_text(path, render_html(content))
    return path


def build_plots(*, loss_curve, y_idx, log_proba, labels: list[str], split: str, coef=None,
                image_shape=None) -> list[Plot]:
    """The standard plots of a run: objective curve (if any), confusion matrix, reliability, Θ images."""
    from sklearn.metrics import confusion_matrix

    plots = []
    if loss_curve is not None and len(loss_curve):
        plots.append(Plot("objective", "Objective curve", plot_objective_curve(loss_curve),
                          "E(Θ, b) = mean weighted cross-entropy + penalty, after each solver iteration "
                          "(epoch for sgd/adam)."))
    k = len(labels)
    if y_idx is not None and len(y_idx):
        pred = np.argmax(log_proba, axis=1)
        cm = confusion_matrix(y_idx, pred, labels=np.arange(k))
        plots.append(Plot("confusion", f"Confusion matrix ({split})",
                          plot_confusion_matrix(cm, labels, title=f"confusion matrix ({split}, {len(y_idx)} rows)"),
                          "Rows: true class; columns: predicted class; numbers are counts."))
        plots.append(Plot("reliability", f"Reliability diagram ({split})",
                          plot_reliability(log_proba, y_idx, title=f"reliability ({split})"),
                          "Accuracy against the predicted probability of the top class, in 10 bins; "
                          "on the diagonal means calibrated.  The number on a bar is its rows; bins of "
                          f"fewer than {RELIABILITY_MIN_ROWS} rows are hatched; whiskers are 95 % "
                          "(Wilson) intervals."))
    if coef is not None and image_shape is not None:
        plots.append(Plot("coef_images", "Each class's row of Θ as an image",
                          plot_coef_images(coef, tuple(image_shape), labels),
                          "Θ acts on standardised features; red pixels raise the class's logit, blue ones "
                          "lower it."))
    return plots
