"""Regenerate the real-session transcript of docs/cli.md (and README's excerpt) and the report PNGs under docs/.

    .venv/bin/python docs/make_cli_transcript.py

Runs a short ``softxent`` session in an empty temporary folder (train on the bundled digits, info, export, a CSV
with a mistyped target, train + predict on it, a training run stopped with Ctrl-C and resumed), then replaces the
text between the ``transcript`` markers in docs/cli.md and README.md and copies the first run's PNGs to
docs/cli_*.png.  Run it on a quiet machine: the times in the transcript are measured.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOFTXENT = [sys.executable, "-m", "softxent.cli"]
PNGS = ("objective_curve", "confusion_matrix", "reliability_diagram", "class_weights")

IRIS = """
import pandas as pd
from sklearn.datasets import load_iris
iris = load_iris(as_frame=True)
df = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
df["species"] = iris.target_names[iris.target]
df = df.drop(columns="target")
df.to_csv("iris.csv", index=False)
df.drop(columns="species").sample(5, random_state=1).to_csv("new-flowers.csv", index=False)
"""


def main() -> None:
    env = {**os.environ, "COLUMNS": "100"}
    log: list[str] = []

    def run(*args: str, shown: str | None = None) -> None:
        log.append(f"\n$ {shown or 'softxent ' + ' '.join(args)}")
        proc = subprocess.run([*SOFTXENT, *args], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        log.append(proc.stdout.rstrip("\n"))
        if proc.returncode:
            log.append(f"[exit status {proc.returncode}]")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("train")
        first = sorted((work / "runs").iterdir())[0]
        rel = first.relative_to(work)
        log.append(f"\n$ ls {rel}\n" + "\n".join(sorted(p.name for p in first.iterdir())))
        run("info", str(rel))
        run("export", str(rel), "--onnx", "digits.onnx")
        subprocess.run([sys.executable, "-c", IRIS], cwd=work, check=True)
        log.append("\n$ head -3 iris.csv\n" + "\n".join((work / "iris.csv").read_text().splitlines()[:3]))
        run("train", "iris.csv", "--target", "Species")
        run("train", "iris.csv", "--target", "species", "--out", "runs/iris")
        run("predict", "runs/iris", "new-flowers.csv", "--proba")

        long = ["train", "--solver", "gd", "--learning-rate", "0.05", "--max-iter", "100000", "--out", "runs/long"]
        log.append(f"\n$ softxent {' '.join(long)}   # Ctrl-C after a few seconds")
        proc = subprocess.Popen([*SOFTXENT, *long], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (work / "runs/long/model.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        log.append(out.rstrip("\n") + f"\n[exit status {proc.returncode}]")
        run("train", "--out", "runs/long", "--resume", "--solver", "lbfgs", "--no-report")

        for name in PNGS:
            shutil.copyfile(first / f"{name}.png", ROOT / "docs" / f"cli_{name}.png")

    text = "\n".join(line.rstrip() for line in "\n".join(log).strip("\n").splitlines())
    excerpt = re.split(r"\n\$ ls ", text)[0].rstrip()  # README shows the first command only
    _replace(ROOT / "docs" / "cli.md", text)
    _replace(ROOT / "README.md", excerpt)
    print(text)


def _replace(path: Path, body: str) -> None:
    """Put ``body`` in the ```text block between the transcript markers of ``path``."""
    src = path.read_text(encoding="utf-8")
    start, end = "<!-- transcript:start -->", "<!-- transcript:end -->"
    if start not in src or end not in src:
        raise SystemExit(f"{path} lacks the {start} ... {end} markers")
    head, rest = src.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n```text\n{body}\n```\n{end}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
