"""Fuzz: hostile model folders.  Each case either loads and predicts exactly like the original model, or is
refused with :class:`ModelFileError` (on the command line: exit 2, one line, no traceback) — never another
exception, a hang, more than 1 GiB, a read outside the folder, or a silently different prediction.

The cases: byte mutations of either file (bit flips, truncations, insertions, overwrites, appended bytes);
edits of model.json's JSON and of the safetensors header's JSON (values replaced by hostile ones, keys and
elements deleted, added, duplicated, swapped; NaN, huge integers, deep nesting, duplicate keys, lone
surrogates), each both as is and *sealed* (both checksums recomputed, as a deliberate editor would: then the
schema is what must catch it, and a valid edit may load as the different model it describes); and a fixed
list of hostile folder entries (symbolic links out of the folder, to /dev/zero, to FIFOs, loops; FIFOs,
directories and sparse 4 GiB files in place of the files; missing, empty and extra files; the staged copy
of an interrupted save).

Every case runs in a forked checker process (one per test, replaced after a hang): ``load_model``, then
``softxent info`` and ``softxent predict --proba`` through typer's CliRunner, under an address-space limit
of 1 GiB above the process's size, with the peak resident memory measured per case (``/proc/self/
clear_refs``), the 10 s limit enforced by the parent, and every file opened recorded by an audit hook.
CI draws a few hundred cases from fixed seeds; ``pytest --fuzz`` twenty times as many.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("typer")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from typer.testing import CliRunner  # noqa: E402

from softxent.cli.app import app  # noqa: E402
from softxent.cli.errors import ModelFileError  # noqa: E402
from softxent.cli.model_io import MODEL_JSON, MODEL_TENSORS, load_model  # noqa: E402
from softxent.cli.model_schema import canonical_sha256  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and rlimits: Linux")

CASE_SECONDS = 10
CASE_BYTES = 2**30
SECRET = b"SECRET-0123456789-outside-the-folder\n"
# what judge() reports, by a phrase of its message; counted (zeros included) for the summary line
FAILURE_KINDS = ("hang", "crash", "checker died", "took", "peak memory", "read outside", "but info exited",
                 "exited", "not one error line", "traceback", "echoes outside", "did not exit 2",
                 "silently different", "different predict output")
STATS = collections.Counter({f"failed: {k}": 0 for k in FAILURE_KINDS})


# --------------------------------------------------------------------------------------------------
# the models and what they predict
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two trained folders (a table with a categorical column, NaN imputed and string classes; an 8×8 image
    matrix with int classes), their data, and the outside files that links will point at."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(5)
    n = 90
    frame = pd.DataFrame({"f0": rng.standard_normal(n) * 10, "f1": rng.standard_normal(n),
                          "colour": rng.choice(["red", "green", "blue"], n), "f2": rng.standard_normal(n)})
    frame.loc[3, "f1"] = np.nan
    frame["label"] = np.array(["ant", "bee", "cat"])[np.argmax(frame[["f0", "f1", "f2"]].fillna(0).to_numpy(), 1)]
    frame.to_csv(root / "table.csv", index=False)
    X = rng.standard_normal((80, 64))
    np.savez(root / "image.npz", X=X, y=np.argmax(X[:, :4], axis=1) * 3 - 2)
    runner = CliRunner()
    for name, data, extra in (("table", "table.csv", ["--target", "label", "--categorical", "--impute", "mean"]),
                              ("image", "image.npz", [])):
        res = runner.invoke(app, ["train", str(root / data), "--out", str(root / name), "--alpha", "1e-2", "-q",
                                  "--no-report", *extra])
        assert res.exit_code == 0, res.output
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET * 4)
    for name in ("table", "image"):  # exact copies: a link that were followed would load them perfectly
        shutil.copy(root / name / MODEL_TENSORS, outside / f"{name}.safetensors")
        shutil.copy(root / name / MODEL_JSON, outside / f"{name}.json")
    os.mkfifo(outside / "fifo")
    refs = {}
    for name, data in (("table", "table.csv"), ("image", "image.npz")):
        res = runner.invoke(app, ["predict", str(root / name), str(root / data), "--proba"])
        assert res.exit_code == 0, res.output
        refs[name] = {"folder": root / name, "data": root / data, "predict": res.stdout,
                      "json": (root / name / MODEL_JSON).read_bytes()}
    return {"root": root, "outside": outside, "refs": refs}


def model_facts(m) -> dict:
    """Everything a loaded model is, for exact comparison."""
    pre = m.preprocessing
    arrays = {"coef": m.coef, "intercept": m.intercept, "loss_curve": m.loss_curve, "mean": pre.mean,
              "scale": pre.scale, "impute": pre.impute_values if pre.impute_values is not None else np.zeros(0)}
    return {"classes": [m.classes.dtype.kind, m.classes.tolist()], "status": m.status, "target": m.target,
            "features": pre.to_json(), "meta": json.dumps(m.meta, sort_keys=True), **{k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                                          for k, v in arrays.items()}}


# --------------------------------------------------------------------------------------------------
# the checker process
# --------------------------------------------------------------------------------------------------
def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _check_folder(folder: str, ref: dict, facts: dict, forbidden: list[str], opened: list) -> dict:
    """In the checker: load, info, predict; what happened, for the parent to judge."""
    opened.clear()
    vm = _proc_kib("VmSize:") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + CASE_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size
    rss0 = _proc_kib("VmRSS:")
    out = {}
    try:
        facts_now = model_facts(load_model(folder))
        out["load"] = "same" if facts_now == facts else "different"
        out["differs_in"] = sorted(k for k in facts if facts_now[k] != facts[k]) if facts_now != facts else []
    except ModelFileError as exc:
        out["load"], out["message"] = "refused", str(exc)
    except BaseException as exc:  # the failure this suite looks for
        out["load"], out["message"] = "crash", f"{type(exc).__name__}: {exc}"[:400]
    runner = CliRunner()
    for cmd, args in (("info", ["info", folder]), ("predict", ["predict", folder, str(ref["data"]), "--proba"])):
        res = runner.invoke(app, args)
        out[cmd] = {"exit": res.exit_code, "stderr": res.stderr[-2000:], "stdout_same": res.stdout == ref["predict"],
                    "stdout": res.stdout[-300:]}
    out["peak_kib"] = _proc_kib("VmHWM:") - rss0
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out["outside_reads"] = sorted({p for p in opened if any(p == f or p.startswith(f + "/") for f in forbidden)})
    return out


class Checker:
    """A forked process that checks one folder at a time; replaced when a case runs past its limit."""

    def __init__(self, world, name: str):
        self.ref = world["refs"][name]
        self.facts = model_facts(load_model(self.ref["folder"]))
        self.forbidden = [str(world["outside"].resolve()), "/etc/passwd", "/dev/zero"]
        self.pid = None
        self._start()

    def _start(self):
        req_r, self.req_w = os.pipe()
        self.res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the checker: never returns into pytest
            try:
                os.close(self.req_w)
                os.close(self.res_r)
                opened: list[str] = []

                def audit(event, args):
                    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                        opened.append(os.path.realpath(os.fsdecode(args[0])))

                sys.addaudithook(audit)
                with os.fdopen(req_r, "r") as requests, os.fdopen(res_w, "w") as results:
                    for line in requests:
                        result = _check_folder(line.rstrip("\n"), self.ref, self.facts, self.forbidden, opened)
                        results.write(json.dumps(result) + "\n")
                        results.flush()
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(res_w)
        self.pid = pid
        self.buffer = b""

    def check(self, folder: Path) -> dict:
        t0 = time.monotonic()
        os.write(self.req_w, (str(folder) + "\n").encode())
        while b"\n" not in self.buffer:
            left = t0 + CASE_SECONDS - time.monotonic()
            ready = select.select([self.res_r], [], [], max(left, 0))[0]
            chunk = os.read(self.res_r, 1 << 16) if ready else b""
            if not chunk:
                self.close()
                self._start()
                return {"load": "hang" if not ready else "checker died", "seconds": time.monotonic() - t0}
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        result = json.loads(line)
        result["seconds"] = time.monotonic() - t0
        return result

    def close(self):
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.req_w)
            os.close(self.res_r)
            self.pid = None


def judge(result: dict, *, sealed: bool) -> list[str]:
    """The rules, as a list of what was broken (empty: the case passed)."""
    bad = []
    load = result["load"]
    if load in ("crash", "hang", "checker died"):
        bad.append(f"{load}: {result.get('message', '')}")
        return bad
    if result["seconds"] > CASE_SECONDS:
        bad.append(f"took {result['seconds']:.1f} s")
    if result["peak_kib"] * 1024 > CASE_BYTES:
        bad.append(f"peak memory {result['peak_kib']} KiB")
    if result["outside_reads"]:
        bad.append(f"read outside the folder: {result['outside_reads']}")
    for cmd in ("info", "predict"):
        r = result[cmd]
        lines = r["stderr"].strip().splitlines()
        errors = [x for x in lines if x.startswith("softxent: error: ")]
        if r["exit"] not in (0, 2):
            bad.append(f"{cmd} exited {r['exit']}: {r['stderr'][-300:]}")
        elif r["exit"] == 2 and (len(errors) != 1 or any(not x.startswith(("softxent: error: ", "note: "))
                                                          for x in lines)):
            bad.append(f"{cmd}: not one error line: {r['stderr'][-300:]}")
        if "Traceback" in r["stderr"] or SECRET.decode().strip() in r["stderr"] + r["stdout"] or "root:" in r["stderr"]:
            bad.append(f"{cmd} printed a traceback or outside bytes: {r['stderr'][-300:]}")
    if SECRET.decode().strip() in result.get("message", ""):
        bad.append("the error echoes outside bytes")
    if load == "refused":
        if result["info"]["exit"] != 2 or result["predict"]["exit"] != 2:
            bad.append(f"load_model refused ({result['message']}) but the CLI did not exit 2")
    else:
        if result["info"]["exit"] != 0:
            bad.append(f"load_model loaded but info exited {result['info']['exit']}: {result['info']['stderr']}")
        if load == "different" and not sealed:
            bad.append(f"silently different model (differs in {result['differs_in']})")
        if load == "same" and not (result["predict"]["exit"] == 0 and result["predict"]["stdout_same"]):
            bad.append(f"same model, different predict output: {result['predict']}")
    return bad


def run_cases(world, name: str, cases, request) -> None:
    """``cases`` yields (label, sealed, mutate(folder)); each runs on a fresh copy of the model folder."""
    checker = Checker(world, name)
    failures = []
    work = world["root"] / f"cases-{request.node.name}"
    try:
        for i, (label, sealed, mutate) in enumerate(cases):
            folder = work / f"{i}"
            shutil.copytree(world["refs"][name]["folder"], folder)
            mutate(folder)
            result = checker.check(folder)
            broken = judge(result, sealed=sealed)
            STATS["cases"] += 1
            STATS[{"refused": "refused (ModelFileError, exit 2)", "same": "loaded, predicts exactly as before",
                   "different": "loaded a different model a sealed edit describes"}.get(result["load"],
                                                                                   result["load"])] += 1
            STATS["max peak KiB"] = max(STATS["max peak KiB"], result.get("peak_kib", 0))
            STATS["max seconds x1000"] = max(STATS["max seconds x1000"], int(1000 * result["seconds"]))
            for problem in broken:
                kind = next((k for k in FAILURE_KINDS if k in problem), "other failure")
                STATS[f"failed: {kind}"] += 1
            if broken:
                failures.append(f"{label}: {'; '.join(broken)}")
            _remove(folder)
    finally:
        checker.close()
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:20])


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    if tr is not None and STATS["cases"]:
        tr.write_line("model-folder fuzz: " + ", ".join(f"{k}: {v}" for k, v in STATS.items()))


# --------------------------------------------------------------------------------------------------
# mutations
# --------------------------------------------------------------------------------------------------
HOSTILE = [None, True, False, 0, -1, 1, 2, 2**63 - 1, -(2**63), 1.5, -0.0, 1e308, "", "x", "[/bold]", "\x1b[31m",
           "\u202e", "model.safetensors", [], {}, [None], {"a": {"b": 1}}, [2**40, 2**40], [0, 1], ["a", "a"]]
# raw JSON text put in place of a value (what json.dumps cannot write)
RAW = ["NaN", "-Infinity", "1e999", "9" * 5000, "[" * 5000 + "]" * 5000, "[" * 40 + "]" * 40, '"\\ud800"',
       "1" + "0" * 25, '"a" , "a": 1']
SENTINEL = "__raw_text__"


def _slots(obj):
    """Every (container, key) in a JSON tree, in a fixed order."""
    found = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found.append((obj, k))
        found.extend(_slots(v))
    return found


def _copy(value):
    return json.loads(json.dumps(value))


def mutate_json(obj, rng) -> list[tuple[str, str]]:
    """One random edit of a JSON tree, in place.  Returns text replacements for what a tree cannot hold
    (raw values, a duplicate key), to apply to its serialisation (:func:`dumps_with`)."""
    container, key = (slots := _slots(obj))[rng.integers(len(slots))]
    op = rng.choice(["replace", "replace", "raw", "delete", "add", "duplicate", "swap"])
    if op == "replace":
        container[key] = _copy(HOSTILE[rng.integers(len(HOSTILE))])
    elif op == "raw":
        container[key] = SENTINEL
        return [(json.dumps(SENTINEL), RAW[rng.integers(len(RAW))])]
    elif op == "delete":
        del container[key]
    elif op == "add":
        value = _copy(HOSTILE[rng.integers(len(HOSTILE))])
        if isinstance(container, dict):
            container[f"extra{rng.integers(3)}"] = value
        else:
            container.insert(int(key), value)
    elif op == "duplicate":
        if isinstance(container, list):
            container.insert(int(key), _copy(container[key]))
        else:  # the same key twice in one object
            value, container[key] = json.dumps(container[key]), SENTINEL
            k = json.dumps(key)
            return [(f"{k}: {json.dumps(SENTINEL)}", f"{k}: {value}, {k}: {value}")]
    else:  # swap two siblings
        keys = list(container) if isinstance(container, dict) else list(range(len(container)))
        other = keys[rng.integers(len(keys))]
        container[key], container[other] = container[other], container[key]
    return []


def dumps_with(obj, replacements: list[tuple[str, str]]) -> bytes:
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    for old, new in replacements:
        text = text.replace(old, new)
    return text.encode("utf-8")


def seal(folder: Path, meta: dict | None = None, tensors: bytes | None = None) -> None:
    """Recompute both checksums, as someone editing the files on purpose would."""
    meta = json.loads((folder / MODEL_JSON).read_bytes()) if meta is None else meta
    if tensors is not None:
        meta["tensors"]["sha256"] = hashlib.sha256(tensors).hexdigest()
        meta["tensors"]["bytes"] = len(tensors)
        (folder / MODEL_TENSORS).write_bytes(tensors)
    meta["checksum"] = {"sha256": canonical_sha256(meta)}
    (folder / MODEL_JSON).write_text(json.dumps(meta, indent=1))


def byte_cases(rng, n: int):
    for i in range(n):
        target = MODEL_JSON if rng.random() < 0.5 else MODEL_TENSORS
        kind = rng.choice(["bitflip", "bitflip", "truncate", "insert", "overwrite", "append", "whitespace"])
        seed = int(rng.integers(2**32))

        def mutate(folder, target=target, kind=kind, seed=seed):
            r = np.random.default_rng(seed)
            p = folder / target
            b = bytearray(p.read_bytes())
            at = int(r.integers(len(b)))
            if kind == "bitflip":
                b[at] ^= 1 << int(r.integers(8))
            elif kind == "truncate":
                del b[at:]
            elif kind == "insert":
                b[at:at] = r.bytes(int(r.integers(1, 17)))
            elif kind == "overwrite":
                b[at:at + 8] = r.bytes(8)
            elif kind == "append":
                b += r.bytes(int(r.integers(1, 64)))
            else:  # whitespace between JSON tokens: still the same model.json (the checksum is canonical)
                if target == MODEL_JSON:
                    b = bytearray(bytes(b).replace(b",\n", b" ,\n\t", 1))
                else:
                    b[at:at] = b" "
            p.write_bytes(bytes(b))

        yield f"bytes #{i}: {kind} of {target}", False, mutate


def sealable_cases(rng, n: int, p_sealed: float, what: str, edit):
    """``n`` cases of ``edit(folder, sealed, rng)``, each sealed with probability ``p_sealed``."""
    for i in range(n):
        sealed = bool(rng.random() < p_sealed)
        seed = int(rng.integers(2**32))
        yield (f"{what} #{i} ({'sealed' if sealed else 'as is'})", sealed,
               lambda folder, sealed=sealed, seed=seed: edit(folder, sealed, np.random.default_rng(seed)))


def edit_model_json(folder: Path, sealed: bool, rng) -> None:
    meta = json.loads((folder / MODEL_JSON).read_bytes())
    if sealed:
        meta.pop("checksum")
    replacements = mutate_json(meta, rng)
    if sealed:  # (over the tree before the replacements: those are refused by the parser anyway)
        meta["checksum"] = {"sha256": canonical_sha256(meta)}
    (folder / MODEL_JSON).write_bytes(dumps_with(meta, replacements))


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join_safetensors(header_text: bytes, data: bytes, length_delta: int = 0) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text) + length_delta) + header_text + data


def edit_header(folder: Path, sealed: bool, rng) -> None:
    header, data = _split_safetensors((folder / MODEL_TENSORS).read_bytes())
    if rng.random() < 0.15:  # the 8-byte length field itself
        delta = int(rng.choice([-8, -1, 1, 8, 2**40, 2**63]))
        blob = _join_safetensors(json.dumps(header).encode(), data, delta)
    else:
        blob = _join_safetensors(dumps_with(header, mutate_json(header, rng)), data)
    if sealed:
        seal(folder, tensors=blob)
    else:
        (folder / MODEL_TENSORS).write_bytes(blob)


def _replace(folder: Path, name: str, make) -> None:
    p = folder / name
    p.unlink()
    make(p)


def entry_cases(world, name: str):
    """The fixed list of hostile folder entries."""
    out = world["outside"]
    ref = world["refs"][name]
    staged = f".{MODEL_TENSORS}.{json.loads(ref['json'])['tensors']['sha256']}"
    cases = []
    for member in (MODEL_JSON, MODEL_TENSORS):
        other = "json" if member == MODEL_JSON else "safetensors"
        cases += [
            (f"{member} -> an exact copy outside", lambda p, o=other: p.symlink_to(out / f"{name}.{o}")),
            (f"{member} -> /etc/passwd", lambda p: p.symlink_to("/etc/passwd")),
            (f"{member} -> the secret outside", lambda p: p.symlink_to(out / "secret")),
            (f"{member} -> /dev/zero", lambda p: p.symlink_to("/dev/zero")),
            (f"{member} -> a FIFO outside", lambda p: p.symlink_to(out / "fifo")),
            (f"{member} -> ../outside via a relative link", lambda p: p.symlink_to(os.path.relpath(out / "secret",
                                                                                                  p.parent))),
            (f"{member} is a FIFO", lambda p: os.mkfifo(p)),
            (f"{member} is a directory", lambda p: p.mkdir()),
            (f"{member} is a link loop", lambda p: p.symlink_to(p.name)),
            (f"{member} is a dangling link", lambda p: p.symlink_to("nowhere")),
            (f"{member} is missing", lambda p: None),
            (f"{member} is empty", lambda p: p.write_bytes(b"")),
            (f"{member} is a sparse 4 GiB file", lambda p: (p.touch(), os.truncate(p, 4 * 2**30))),
            (f"{member} is a link to a copy inside the folder",
             lambda p, m=member: (shutil.copy(ref["folder"] / m, p.parent / f"real-{m}"),
                                  p.symlink_to(f"real-{m}"))),
        ]
    mutations = [(label, lambda f, m=member, make=make: _replace(f, m, make))
                 for (label, make), member in zip(cases, [MODEL_JSON] * 14 + [MODEL_TENSORS] * 14)]
    mutations += [
        ("extra files", lambda f: [(f / n).write_bytes(b"junk") for n in ("notes.txt", ".model.json.x.tmp",
                                                                          ".model.safetensors.0000")]),
        ("a garbage staged copy", lambda f: (f / staged).write_bytes(b"\0" * 64)),
        ("model.safetensors damaged, a good staged copy", lambda f: (
            shutil.copy(f / MODEL_TENSORS, f / staged), (f / MODEL_TENSORS).write_bytes(b"\0" * 100))),
        ("model.safetensors missing, a good staged copy", lambda f: (f / MODEL_TENSORS).rename(f / staged)),
        ("model.safetensors replaced by the other model's", lambda f: shutil.copy(
            world["refs"]["image" if name == "table" else "table"]["folder"] / MODEL_TENSORS, f / MODEL_TENSORS)),
        ("model.json replaced by the other model's", lambda f: shutil.copy(
            world["refs"]["image" if name == "table" else "table"]["folder"] / MODEL_JSON, f / MODEL_JSON)),
        ("the folder is empty", lambda f: [p.unlink() for p in list(f.iterdir())]),
        ("model.json is 300 MiB (sparse)", lambda f: os.truncate(f / MODEL_JSON, 300 * 2**20)),
        # model.json's limit grows with the tensor file: holes must not count
        ("model.json is 300 MiB beside a sparse 4 GiB staged copy", lambda f: (
            (f / staged).touch(), os.truncate(f / staged, 4 * 2**30), os.truncate(f / MODEL_JSON, 300 * 2**20))),
        ("model.json is 16 MiB of one JSON list of zeros", lambda f: (f / MODEL_JSON).write_bytes(
            b"[" + b"0," * (8 * 2**20 - 1) + b"0]")),
        ("model.json is a list of 2**20 mixed values", lambda f: (f / MODEL_JSON).write_bytes(
            b"[" + b'0,"",0.5,{},' * (2**18 - 8) + b"0]")),
        ("model.json is 16 MiB of escapes in one string", lambda f: (f / MODEL_JSON).write_bytes(
            b'["' + b"\\n" * (8 * 2**20 - 8) + b'"]')),
        ("model.json is format version 1 (no checksum)", lambda f: _as_version_1(f)),
    ]
    for label, mutate in mutations:
        different = label.startswith("model.json replaced")  # a whole, valid model: the other one
        yield label, different, mutate


def _as_version_1(folder: Path) -> None:
    meta = json.loads((folder / MODEL_JSON).read_bytes())
    del meta["checksum"]
    meta["format_version"] = 1
    (folder / MODEL_JSON).write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["table", "image"])
def test_byte_mutations_of_either_file(world, name, fuzz_scale, request):
    rng = np.random.default_rng(1000 + len(name))
    run_cases(world, name, byte_cases(rng, 60 * fuzz_scale), request)


@pytest.mark.parametrize("name", ["table", "image"])
def test_edits_of_model_json(world, name, fuzz_scale, request):
    rng = np.random.default_rng(2000 + len(name))
    run_cases(world, name, sealable_cases(rng, 60 * fuzz_scale, 0.5, "model.json", edit_model_json), request)


@pytest.mark.parametrize("name", ["table", "image"])
def test_edits_of_the_safetensors_header(world, name, fuzz_scale, request):
    rng = np.random.default_rng(3000 + len(name))
    run_cases(world, name, sealable_cases(rng, 30 * fuzz_scale, 0.6, "safetensors header", edit_header), request)


@pytest.mark.parametrize("name", ["table", "image"])
def test_hostile_folder_entries(world, name, request):
    run_cases(world, name, entry_cases(world, name), request)


# --------------------------------------------------------------------------------------------------
# the cases the issue names, one by one, with their messages
# --------------------------------------------------------------------------------------------------
def _sealed(edit):
    def mutate(folder):
        meta = json.loads((folder / MODEL_JSON).read_bytes())
        meta.pop("checksum")
        edit(meta)
        seal(folder, meta)
    return mutate


def _text(old: str, new: str):
    def mutate(folder):
        text = (folder / MODEL_JSON).read_text()
        assert old in text
        (folder / MODEL_JSON).write_text(text.replace(old, new, 1))
    return mutate


def _flip_in_class_name(folder):
    b = bytearray((folder / MODEL_JSON).read_bytes())
    b[b.index(b'"bee"') + 3] ^= 0x01  # "bee" -> "bed": still sorted, a rename only the checksum can catch
    (folder / MODEL_JSON).write_bytes(bytes(b))


def _nested(depth: int):
    v = []
    for _ in range(depth):
        v = [v]
    return v


ISSUE_CASES = {
    "JSON nested 100000 deep": (lambda f: (f / MODEL_JSON).write_text("[" * 100_000), "nested deeper than 16"),
    "a value nested 30 deep (sealed)": (_sealed(lambda m: m["training"].update(command=_nested(30))),
                                        "nested deeper than 16"),
    "a shape of 2**70 (sealed)": (_sealed(lambda m: m["tensors"]["shapes"].update(coef=[2**70, 1])),
                                  "an integer beyond int64"),
    "a 5000-digit integer": (_text('"n_iter": ', '"n_iter": ' + "7" * 5000 + ", \"x\": "), "an integer beyond int64"),
    "duplicate classes (sealed)": (_sealed(lambda m: m["classes"].update(values=["ant", "ant", "cat"])),
                                   "sorted and distinct"),
    "a NaN class": (_text('"values": ["ant"', '"values": [NaN'), "NaN, which is not JSON"),
    "a fractional class in an int list (sealed)": (
        _sealed(lambda m: m["classes"].update(type="int", values=[0, 1.5, 2])), "must be an integer"),
    "input_columns swapped (sealed)": (
        _sealed(lambda m: m["features"]["input_columns"].reverse()), "do not follow from features.input_columns"),
    "a bit flip renames a class": (_flip_in_class_name, "does not match its checksum"),
    "model.safetensors -> /etc/passwd": (
        lambda f: _replace(f, MODEL_TENSORS, lambda p: p.symlink_to("/etc/passwd")), "leading out of the model"),
    "passwd's bytes in the folder": (
        lambda f: (f / MODEL_TENSORS).write_bytes(Path("/etc/passwd").read_bytes()[:8] * 10_000), "model.safetensors"),
    "an unknown features entry (sealed)": (_sealed(lambda m: m["features"].update(scale_by=2)), "unknown"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_the_issue_cases_are_one_line_errors_naming_the_rule(world, tmp_path, case):
    mutate, fragment = ISSUE_CASES[case]
    folder = tmp_path / "m"
    shutil.copytree(world["refs"]["table"]["folder"], folder)
    mutate(folder)
    with pytest.raises(ModelFileError, match=re.escape(fragment)):
        load_model(folder)
    for args in (["info", folder], ["info", folder, "--json"], ["predict", folder, world["refs"]["table"]["data"]]):
        res = CliRunner().invoke(app, [str(a) for a in args])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("softxent: error: "), res.output
        assert fragment in lines[0] and "root:" not in res.output and res.stdout == ""


@pytest.mark.parametrize("case", ["JSON nested 100000 deep", "a shape of 2**70 (sealed)", "a 5000-digit integer"])
def test_item_10_exits_2_in_a_real_process(world, tmp_path, case):
    folder = tmp_path / "m"
    shutil.copytree(world["refs"]["table"]["folder"], folder)
    ISSUE_CASES[case][0](folder)
    proc = subprocess.run([sys.executable, "-m", "softxent.cli", "info", str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("softxent: error: ")


def test_names_from_the_model_are_printed_not_interpreted(world, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(world["refs"]["table"]["folder"], folder)
    _sealed(lambda m: m["classes"].update(values=["[/bold]", "[red]b", "c\u202e"]))(folder)
    res = CliRunner().invoke(app, ["info", str(folder)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "'[/bold]', '[red]b'" in res.stdout
    res = CliRunner().invoke(app, ["predict", str(folder), str(world["refs"]["table"]["data"])])
    assert res.exit_code == 0 and set(res.stdout.splitlines()[1:]) <= {"[/bold]", "[red]b", "c\u202e"}


def test_model_json_limits_grow_with_the_tensor_file(world, tmp_path, monkeypatch):
    """Issue 18: model.json's fixed 16 MiB cap (and 2**20 values) made a model that trained on ~500 000
    features (or svmlight's 2**20) fail when saved.  The limits now grow with the tensor file; a model.json
    too large for the tensor file beside it is refused before it is parsed.  The fixed allowance is lowered
    here, so that 5000 features stand for 500 000."""
    from softxent.cli import model_io
    from softxent.cli.data import Preprocessing
    from softxent.cli.model_io import SavedModel, save_model

    monkeypatch.setattr(model_io, "MAX_JSON_BYTES", 64 << 10)
    monkeypatch.setattr(model_io, "MAX_VALUES", 4096)
    rng = np.random.default_rng(18)
    d = 5000
    names = [f"feature_{j:05d}" for j in range(d)]
    pre = Preprocessing(input_columns=names, feature_names=names, mean=rng.standard_normal(d), scale=np.ones(d))
    model = SavedModel(classes=np.array(["a", "b", "c"]), coef=rng.standard_normal((3, d)),
                       intercept=rng.standard_normal(3), preprocessing=pre)
    folder = tmp_path / "wide"
    save_model(folder, model)
    assert (folder / MODEL_JSON).stat().st_size > 2 * (64 << 10)
    loaded = load_model(folder)
    assert np.array_equal(loaded.coef, model.coef) and loaded.preprocessing.feature_names == names
    # the same model.json beside a small model's tensors, and a megabyte of junk as model.json: refused by size
    small = world["refs"]["image"]["folder"] / MODEL_TENSORS
    for label, mutate in (("small tensors", lambda f: shutil.copy(small, f / MODEL_TENSORS)),
                          ("junk", lambda f: (shutil.copy(small, f / MODEL_TENSORS),
                                              (f / MODEL_JSON).write_bytes(b"[" * (1 << 20))))):
        hostile = tmp_path / label
        shutil.copytree(folder, hostile)
        mutate(hostile)
        with pytest.raises(ModelFileError, match=f"beside a tensor file of {small.stat().st_size:,} bytes"):
            load_model(hostile)
    # a model whose names could never be saved is refused before it is fitted, nothing written
    csv = tmp_path / "long.csv"
    pd.DataFrame({"x" * 40_000: rng.standard_normal(20), "label": ["p", "q"] * 10}).to_csv(csv, index=False)
    res = CliRunner().invoke(app, ["train", str(csv), "--target", "label", "--out", str(tmp_path / "m"), "-q"])
    assert res.exit_code == 2 and "shorten the column names" in res.stderr and "40,000 characters" in res.stderr
    assert not (tmp_path / "m").exists()
