"""The ranks of tests/test_torch_linear_ce_tp.py: each spawned process joins a gloo group on 127.0.0.1 and
runs a suite of checks of the vocabulary-parallel fused loss against the unsharded float64 reference
(tests/test_torch_linear_ce.py's ``reference``: softxent.loss on the full weight).  Every rank draws the
same inputs from the same seed, keeps its rows of the weight, and compares its loss, dx, dW rows, db rows
and lse with the reference's; each rank writes how many checks it ran (and the largest errors) to
``out_dir/rank{r}.json``.  A failed check raises in every rank alike (the inputs are the same), so no
rank is left waiting in a collective; the group's timeout bounds a hang anyway."""

from __future__ import annotations

import datetime
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_torch_linear_ce import rel_err, reference  # noqa: E402  (the shared float64 oracle)

from softxent.torch import LinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402
from softxent.torch import _vocab_parallel as vp  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6}
# bfloat16 dW / db are rounded once to bfloat16: half an ulp, 2**-8 of each element at most.  dx too: the
# ranks' partial dx are summed in float32 and rounded once (Suite.check_bf16_dx checks it element by
# element).
GRAD_TOL_BF16 = 2.0**-8
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


class CollectiveLog:
    """Wraps torch.distributed's collectives and records the number of elements of every tensor sent,
    so that a test can assert that no ``N x V_r`` tensor crosses the group."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_single", "broadcast", "all_to_all",
             "all_to_all_single", "gather", "scatter")

    def __init__(self):
        self.sizes: list[tuple[str, int]] = []
        self.originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            # the tensor this rank contributes: the first argument of all_reduce / broadcast / gather,
            # the input after the output elsewhere
            sent = args[0] if name in ("all_reduce", "broadcast", "gather") else args[1]
            n = (0 if sent is None else sum(t.numel() for t in sent) if isinstance(sent, (list, tuple))
                 else sent.numel())
            self.sizes.append((name, n))
            return fn(*args, **kwargs)

        return recorded

    def take(self) -> list[tuple[str, int]]:
        out, self.sizes = self.sizes, []
        return out


def split_sizes(V: int, P: int) -> list[int]:
    """Rows per rank: ceil(V / P) each, the last rank the rest (Megatron / DTensor's torch.chunk)."""
    per = -(-V // P)
    return [max(0, min(per, V - r * per)) for r in range(P)]


class Suite:
    def __init__(self, rank: int, world: int, seed: int):
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed)
        self.checks = 0
        self.worst = {}
        self.log = CollectiveLog()

    # ---------------------------------------------------------------------------------------------
    def draw(self, N, D, V, dtype, *, lead=None, bias=True, ignore_frac=0.0, targets=None):
        g = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        shape = (N,) if lead is None else tuple(lead)
        x = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
        if targets is None:
            y = torch.randint(0, V, shape, generator=g)
        else:
            lo, hi = targets
            y = torch.randint(lo, hi, shape, generator=g)
        mask = torch.rand(shape, generator=g) < ignore_frac
        y[mask] = -100
        return x, w, b, y

    def note(self, key, err, tol):
        self.checks += 1
        self.worst[key] = max(self.worst.get(key, 0.0), err)
        if not err <= tol:
            raise AssertionError(f"rank {self.rank}: {key}: relative error {err:.3g} > {tol:g}")

    def same_on_every_rank(self, t: torch.Tensor, what: str):
        """Bitwise equality across the ranks (gathered outside the recorded collectives)."""
        t = t.detach().reshape(-1).to(torch.float64).cpu()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.log.originals["all_gather"](out, t)
        for r, o in enumerate(out):
            if not torch.equal(o, t):
                raise AssertionError(f"rank {self.rank}: {what} differs from rank {r}'s")
        self.checks += 1

    # ---------------------------------------------------------------------------------------------
    def case(self, key, *, N=12, D=6, V=37, dtype=torch.float64, reduction="mean", options=(),
             lead=None, shift=0, ignore_frac=0.25, sizes=None, targets=None, grad_output=None,
             module=False, bias=True, sequence_parallel=False, impl="chunked", proba=None, extras=()):
        """One sharded call (and backward) against the unsharded float64 reference; asserts the
        communication volume.  ``proba``: probability targets (``'dirichlet'``, or ``'ties'``: every row
        uniform, so its most probable class is a tie across every rank); each rank passes its columns.
        ``extras``: ``'token'`` (z_loss_weighting='token'), ``'return_z_loss'``, ``'return_accuracy'``,
        ``'proba_grad'`` (the probabilities require grad); the oracle of those is the unsharded float64
        chunked path (tested against softxent.loss / PyTorch in tests/test_torch_linear_ce_options.py),
        the accuracy's the float64 logits."""
        x, w, b, y = self.draw(N, D, V, dtype, lead=lead, bias=bias, ignore_frac=0.0 if proba else ignore_frac,
                               targets=targets)
        if proba is not None:
            g = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
            y = (torch.full(y.shape + (V,), 1.0 / V, dtype=torch.float64) if proba == "ties" else
                 torch.from_numpy(self.rng.dirichlet(np.full(V, 0.5), size=tuple(y.shape)))
                 * torch.rand(y.shape + (1,), generator=g, dtype=torch.float64).add(0.5))
            if proba != "ties":
                y[torch.rand(y.shape, generator=g) < 0.2] = 0.0  # sparse rows, as distillation targets
        kw = {"reduction": reduction}
        ref_kw = {"reduction": reduction, "shift": shift}
        g = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        if "smoothing" in options:
            kw["label_smoothing"] = ref_kw["label_smoothing"] = 0.15
        if "z_loss" in options:
            kw["z_loss"] = ref_kw["z_loss"] = 0.05
        if "softcap" in options:
            kw["softcap"] = ref_kw["softcap"] = 2.5
        lead_shape = y.shape[:-1] if proba is not None else y.shape
        if "sample_weight" in options:
            kw["sample_weight"] = ref_kw["sample_weight"] = torch.rand(lead_shape, generator=g,
                                                                       dtype=torch.float64) * 2
        cw_full = (torch.rand(V, generator=g) * 1.8 + 0.2 if "class_weight" in options  # float32, as a
                   else None)                                                       # model's buffer
        if cw_full is not None:
            ref_kw["class_weight"] = cw_full
        if reduction == "sum_normalizer":
            kw["reduction"] = ref_kw["reduction"] = "sum"
            kw["normalizer"] = ref_kw["normalizer"] = 7.0
        if shift:
            kw["shift"] = shift
        flags = {"z_loss_weighting": "token"} if "token" in extras else {}
        flags.update({k: True for k in ("return_z_loss", "return_accuracy") if k in extras})
        out_shape = tuple(lead_shape[:-1]) + (lead_shape[-1] - shift,)
        if grad_output is None:
            grad_output = (torch.tensor(float(self.rng.uniform(0.3, 2.0)), dtype=torch.float64)
                           if kw["reduction"] != "none"
                           else torch.from_numpy(self.rng.uniform(-2, 2, out_shape)))
        loss_r, dx_r, dw_r, db_r, lse_r, (s_dx, s_dw, s_db) = reference(
            x, w, b, y, grad_output=grad_output.numpy(), with_scales=True, **ref_kw)
        oracle = None
        if extras:  # the unsharded float64 path has the options softxent.loss lacks
            oracle = self.unsharded64(x, w, b, y, grad_output, dict(kw, class_weight=cw_full, **flags),
                                      "proba_grad" in extras)
            if "token" in extras:
                loss_r, dx_r, dw_r, db_r, lse_r = (oracle[k] for k in ("loss", "dx", "dW", "db", "lse"))

        sizes = sizes or split_sizes(V, self.world)
        lo = sum(sizes[: self.rank])
        hi = lo + sizes[self.rank]
        dev = torch.device("cuda") if (impl == "triton" and torch.cuda.is_available() and not INTERPRETING) \
            else torch.device("cpu")
        # sequence parallel: this rank passes its block of N / P rows of x (dx: those rows)
        rows = slice(self.rank * N // self.world, (self.rank + 1) * N // self.world) if sequence_parallel \
            else slice(None)
        xs = x[rows].clone().to(dev).requires_grad_()
        ws = w[lo:hi].clone().to(dev).requires_grad_()
        bs = None if b is None else b[lo:hi].clone().to(dev).requires_grad_()
        ys = (y[..., lo:hi].clone() if proba is not None else y).to(dev)
        if "proba_grad" in extras:
            ys.requires_grad_()
        cws = None if cw_full is None else cw_full[lo:hi]
        if cws is not None:
            kw["class_weight"] = cws
        kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        self.log.take()
        if module:
            mod_kw = {k: kw.pop(k) for k in ("label_smoothing", "z_loss", "softcap", "shift", "class_weight",
                                             "reduction") if k in kw}
            loss_fn = LinearCrossEntropyLoss(process_group=dist.group.WORLD, **mod_kw)
            out = loss_fn(xs, ws, ys, bs, return_lse=True, **kw)
        elif sequence_parallel:
            out = vp.vocab_parallel_linear_cross_entropy(
                xs, ws, ys, bs, process_group=dist.group.WORLD, return_lse=True, sequence_parallel=True,
                impl=impl, **kw, **flags)
        else:
            out = linear_cross_entropy(xs, ws, ys, bs, process_group=dist.group.WORLD, return_lse=True,
                                       impl=impl, **kw, **flags)
        loss, lse = out[0], out[1]
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        loss.backward(grad_output.to(cdt).to(dev))
        sent = self.log.take()
        Nf = int(np.prod(out_shape))
        # forward: the facts (14 per rank), the rows' maxima (N),
        # the packed sums (N x (2..5) [+ 1]), with probability targets and the accuracy the most probable
        # class (N, N); backward: dx (sequence parallel: x's rows all-gathered, N / P x D each, and dx
        # reduce-scattered, N x D)
        allowed = ({len(vp._FACTS), Nf, Nf * D, Nf // self.world * D}
                   | {Nf * c + e for c in range(2, 6) for e in (0, 1)})
        V_r = sizes[self.rank]
        # every size sent is one of those, and (where N x V_r differs from all of them) smaller than N x V_r
        big = [s for s in sent if s[1] not in allowed or (V_r > max(D, 12) and Nf and s[1] >= Nf * V_r)]
        if big:
            raise AssertionError(f"rank {self.rank}: {key}: collectives sent {sent}; N={Nf}, "
                                 f"V_r={sizes[self.rank]}, D={D}")
        n_max = 4 + sequence_parallel + 2 * (proba is not None and "return_accuracy" in extras)
        if len(sent) > n_max:  # facts, max, sums, dx (+ the gather of x's rows, + the argmax of p)
            raise AssertionError(f"rank {self.rank}: {key}: {len(sent)} collectives ({sent}), expected <= {n_max}")
        self.checks += 1
        got = {"loss": rel_err(loss, loss_r), "lse": rel_err(lse, lse_r.reshape(lse.shape)),
               "dx": rel_err(xs.grad, dx_r[rows], s_dx), "dW": rel_err(ws.grad, dw_r[lo:hi], s_dw)}
        if b is not None:
            got["db"] = rel_err(bs.grad, db_r[lo:hi], s_db)
        if oracle is not None:
            if "return_z_loss" in extras:
                got["z_loss"] = rel_err(out.z_loss, oracle["z_loss"], max(abs(float(oracle["loss"])), 1e-30)
                                        if reduction != "none" else None)
            if "proba_grad" in extras:
                got["dp"] = rel_err(ys.grad, oracle["dp"][..., lo:hi])
        tol = {k: GRAD_TOL_BF16 if (dtype == torch.bfloat16 and k in ("dW", "db")) else TOL[dtype] for k in got}
        if dtype != torch.float64:
            # float32's own rounding of delta's cancelling terms can reach ~1e-6 of the scale (bfloat16:
            # the gradients' rounding to bfloat16): the bound is then twice the unsharded path's error on
            # the same inputs (the same arithmetic)
            base = self.unsharded_errors(x, w, b, y, grad_output.to(cdt), dict(kw, class_weight=cw_full, **flags),
                                         (loss_r, lse_r, dx_r, dw_r, db_r), (s_dx, s_dw, s_db), lo, hi, impl, dev)
            tol = {k: max(tol[k], 2 * base.get(k, 0.0)) for k in got}
        if dtype == torch.bfloat16:
            del got["dx"]  # element by element instead: one rounding of the float32 sum
            self.check_bf16_dx(key, xs.grad, dx_r[rows], s_dx, impl)
        for k, err in got.items():
            self.note(f"{key}/{k}", err, tol[k])
        if "return_accuracy" in extras:
            self.check_accuracy(key, out.accuracy, x, w, b, y, kw, reduction)
        assert loss.dtype == cdt and xs.grad.dtype == dtype and ws.grad.dtype == dtype
        self.same_on_every_rank(loss, f"{key}: the loss")
        if not sequence_parallel:
            self.same_on_every_rank(xs.grad, f"{key}: dx")
        return loss, xs.grad, ws.grad

    def unsharded64(self, x, w, b, y, grad_output, kw, proba_grad):
        """The unsharded impl='chunked' call in float64 with every output and gradient (dp: of the
        probabilities)."""
        kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kw.items() if v is not None}
        xs, ws = x.double().clone().requires_grad_(), w.double().clone().requires_grad_()
        bs = None if b is None else b.double().clone().requires_grad_()
        ys = y.clone().requires_grad_() if proba_grad else y
        out = linear_cross_entropy(xs, ws, ys, bs, impl="chunked", return_lse=True, **kw)
        out[0].backward(grad_output)
        res = {"loss": out[0].detach().numpy(), "lse": out[1].detach().numpy(),
               "dx": xs.grad.numpy(), "dW": ws.grad.numpy(), "db": None if b is None else bs.grad.numpy(),
               "dp": ys.grad.numpy() if proba_grad else None}
        if len(out) > 2 and out.z_loss is not None:
            res["z_loss"] = out.z_loss.numpy()
        return res

    def check_accuracy(self, key, acc, x, w, b, y, kw, reduction):
        """Each row's hit -- the logit of its target (probabilities: of the first most probable class)
        equal to the row's maximum -- from the float64 logits; a row whose two largest logits are closer
        than 1e-5 is left out (the sharded and the reference logits round differently)."""
        z = x.double().reshape(-1, x.shape[-1]) @ w.double().T + (0 if b is None else b.double())
        if kw.get("softcap") is not None:
            z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        yy = y.reshape(-1, y.shape[-1]).argmax(dim=1) if y.is_floating_point() else y.reshape(-1)
        counted = torch.ones_like(yy, dtype=torch.bool) if y.is_floating_point() else yy != -100
        top2 = z.topk(min(2, z.shape[1]), dim=1).values
        clear = (top2[:, 0] - top2[:, -1] > 1e-5) if z.shape[1] > 1 else torch.ones_like(counted)
        hits = (z.gather(1, torch.where(counted, yy, 0)[:, None])[:, 0] == z.amax(dim=1)) & counted
        got = acc.detach().cpu().reshape(-1).double()
        if reduction == "none":
            want, keep = hits.double(), clear
            bad = (got != want) & keep
        else:
            if not bool(clear.all()):
                return
            want = hits.double().sum() / max(int(counted.sum()), 1)
            # the fraction in the loss's dtype
            bad = torch.tensor([abs(float(got[0]) - float(want)) > (1e-12 if acc.dtype == torch.float64 else 1e-6)])
        if bool(bad.any()):
            raise AssertionError(f"rank {self.rank}: {key}: accuracy {got.tolist()} != {want.tolist()}")
        self.checks += 1

    def check_bf16_dx(self, key, dx, dx_ref, scale, impl):
        """A bfloat16 dx is the float32 sum of the ranks' partial dx rounded once: within half an ulp
        (2**-8 of itself) of the float64 dx, plus the error before that rounding -- float32's (chunked), or
        the Triton backward's float16 deltas (2**-11 of the scale: four times float16's rounding of
        each delta) -- below a bfloat16 ulp of the scale.  Rounding each rank's partial dx before the sum
        fails this wherever the partials cancel."""
        err = (dx.detach().cpu().double().numpy() - dx_ref)
        bound = 2.0**-8 * np.abs(dx_ref) + (2.0**-11 if impl == "triton" else 2e-5) * scale
        worst = float(np.max(np.abs(err) - bound, initial=-1.0))
        self.note(f"{key}/dx (excess over one rounding)", max(worst, 0.0) / scale, 0.0)

    def unsharded_errors(self, x, w, b, y, grad_output, kw, ref, scales, lo, hi, impl="chunked",
                         dev=torch.device("cpu")):
        """The unsharded call's relative errors on the same inputs with the same impl (dW, db: this rank's
        rows)."""
        kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if v is not None}
        xs, ws = x.clone().to(dev).requires_grad_(), w.clone().to(dev).requires_grad_()
        bs = None if b is None else b.clone().to(dev).requires_grad_()
        out = linear_cross_entropy(xs, ws, y.to(dev), bs, impl=impl, return_lse=True, **kw)
        loss, lse = out[0], out[1]
        loss.backward(grad_output.to(dev))
        loss_r, lse_r, dx_r, dw_r, db_r = ref
        out = {"loss": rel_err(loss, loss_r), "lse": rel_err(lse, lse_r.reshape(lse.shape)),
               "dx": rel_err(xs.grad, dx_r, scales[0]), "dW": rel_err(ws.grad[lo:hi], dw_r[lo:hi], scales[1])}
        if b is not None:
            out["db"] = rel_err(bs.grad[lo:hi], db_r[lo:hi], scales[2])
        return out

    def raises(self, key, match, fn):
        """``fn`` raises ValueError whose message contains ``match`` (on every rank: no hang); ``match``
        may be a dict rank -> text, with key None for the other ranks."""
        if isinstance(match, dict):
            match = match.get(self.rank, match[None])
        try:
            fn()
        except ValueError as exc:
            if match not in str(exc):
                raise AssertionError(f"rank {self.rank}: {key}: message {exc} lacks {match!r}") from exc
            self.checks += 1
            return
        raise AssertionError(f"rank {self.rank}: {key}: no ValueError")


OPTION_SETS = {
    "plain": (),
    "smoothing": ("smoothing",),
    "class_weight": ("class_weight",),
    "sample_weight": ("sample_weight",),
    "z_loss": ("z_loss",),
    "softcap": ("softcap",),
    "everything": ("smoothing", "class_weight", "sample_weight", "z_loss", "softcap"),
}
REDUCTIONS = ("mean", "sum", "none", "sum_normalizer")


def suite_options(s: Suite):
    """Every option x reduction x float32/float64 on a small uneven vocabulary."""
    for dtype in (torch.float64, torch.float32):
        for name, opts in OPTION_SETS.items():
            for red in REDUCTIONS:
                s.case(f"{name}/{red}/{dtype}", dtype=dtype, reduction=red, options=opts,
                       V=37 if dtype == torch.float64 else 41)
    # bfloat16 inputs (float32 math): dx rounded once (element by element), dW / db within half an ulp
    s.case("bfloat16", dtype=torch.bfloat16, options=OPTION_SETS["everything"], reduction="sum")
    # a leading (B, T) shape with shift, the module, no bias
    s.case("shift", lead=(2, 7), shift=1, options=("smoothing", "class_weight"), reduction="none")
    s.case("module", module=True, options=("softcap", "z_loss"), bias=False)
    # sequence parallel: x's rows split across the ranks, dx reduce-scattered
    for dtype in (torch.float64, torch.float32):
        for red in ("mean", "none"):
            s.case(f"sequence_parallel/{red}/{dtype}", dtype=dtype, reduction=red, sequence_parallel=True,
                   options=OPTION_SETS["everything"])
    x, w, _, y = s.draw(6, 4, 10, torch.float64)
    s.raises("sequence_parallel rows", "target all P x 6 = 12 rows",
             lambda: vp.vocab_parallel_linear_cross_entropy(x, w[:5] if s.rank == 0 else w[5:], y,
                                                            sequence_parallel=True))
    issue17_options(s, V=37)
    triton_cases(s)
    s.hf = hf_colwise_parallel(s)


def issue17_options(s: Suite, V: int):
    """Probability targets (each rank passes its columns) with the option sets and reductions, the z-loss
    weighted by tokens, return_z_loss, return_accuracy, the probabilities' own gradient and a most
    probable class tied across the ranks (every row uniform: the lowest id wins, as torch.argmax)."""
    for dtype in (torch.float64, torch.float32):
        for name in ("plain", "everything"):
            for red in ("mean", "sum", "none"):
                s.case(f"proba/{name}/{red}/{dtype}", V=V, dtype=dtype, reduction=red, options=OPTION_SETS[name],
                       proba="dirichlet")
        s.case(f"token+z_loss+accuracy/{dtype}", V=V, dtype=dtype, options=OPTION_SETS["everything"],
               extras=("token", "return_z_loss", "return_accuracy"))
        s.case(f"proba/accuracy/none/{dtype}", V=V, dtype=dtype, reduction="none", proba="dirichlet",
               options=("smoothing", "z_loss", "softcap"), extras=("return_z_loss", "return_accuracy"))
    s.case("proba/gradient", V=V, proba="dirichlet", options=OPTION_SETS["everything"], reduction="none",
           extras=("proba_grad",))
    s.case("proba/ties", V=V, proba="ties", reduction="none", extras=("return_accuracy",))


def triton_cases(s: Suite):
    """impl='triton': the forward kernel and the backward on each rank's shard (under TRITON_INTERPRET=1
    on the CPU; float32 and bfloat16 -- the kernels take no float64), V = 41 over 2 ranks."""
    f32 = torch.float32
    s.case("triton/plain/mean", impl="triton", dtype=f32, V=41)
    s.case("triton/everything/none", impl="triton", dtype=f32, V=41, reduction="none",
           options=OPTION_SETS["everything"])
    s.case("triton/token+z_loss+accuracy", impl="triton", dtype=f32, V=41, options=OPTION_SETS["everything"],
           extras=("token", "return_z_loss", "return_accuracy"))
    s.case("triton/proba/accuracy", impl="triton", dtype=f32, V=41, reduction="sum", proba="dirichlet",
           options=OPTION_SETS["everything"], extras=("return_accuracy",))
    s.case("triton/bfloat16", impl="triton", dtype=torch.bfloat16, V=41, reduction="sum",
           options=("smoothing", "softcap"))


def hf_colwise_parallel(s: Suite):
    """A tiny Llama whose lm_head is sharded by ColwiseParallel (a Shard(0) DTensor weight) trains on
    softxent.torch.hf.causal_lm_loss without gathering the head: loss and every gradient equal the
    unsharded model's own loss's (float32: 1e-5 relative)."""
    try:
        import transformers
    except ImportError:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from softxent.torch.hf import causal_lm_loss

    torch.manual_seed(int(s.rng.integers(2**31)))
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(int(s.rng.integers(2**31)))
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    ref(input_ids=ids, labels=labels).loss.backward()
    loss_ref = float(ref(input_ids=ids, labels=labels).loss)
    parallelize_module(model, init_device_mesh("cpu", (s.world,)), {"lm_head": ColwiseParallel()})
    loss = causal_lm_loss(model, ids, labels, impl="chunked")
    loss.backward()
    s.note("hf/loss", abs(float(loss) - loss_ref) / abs(loss_ref), 1e-6)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        want = grads[name].grad
        s.note(f"hf/{name}", float((got - want).abs().max() / want.abs().max()), 1e-5)
    return True


def suite_edges(s: Suite):
    """Three ranks, V = 1237 not divisible by 3, edge cases, bad inputs, DTensor."""
    V = 1237
    for dtype in (torch.float64, torch.float32):
        for red in ("mean", "none"):
            s.case(f"V1237/{red}/{dtype}", V=V, N=9, D=5, dtype=dtype, reduction=red,
                   options=OPTION_SETS["everything"])
    sizes = split_sizes(V, s.world)
    # every target in rank 0's shard: the other ranks hold none
    s.case("targets_on_rank0_only", V=V, N=8, D=4, targets=(0, sizes[0]), options=("smoothing",))
    # an empty shard (V=4 over 3 ranks: 2, 2, 0)
    s.case("empty_shard", V=4, N=6, D=3, sizes=[2, 2, 0], options=("class_weight", "smoothing"))
    # all targets ignored: loss 0, zero gradients, no NaN, on every rank
    for red in ("mean", "sum"):
        loss, dx, dw = s.case(f"all_ignored/{red}", V=V, N=5, D=4, ignore_frac=1.1, reduction=red)
        if not (float(loss) == 0.0 and not dx.abs().max() and not dw.abs().max()):
            raise AssertionError(f"rank {s.rank}: all ignored: loss {loss}, |dx| {dx.abs().max()}")
        s.checks += 1
    # issue 17's options on 3 ranks of an uneven vocabulary, an empty shard holding probabilities
    for dtype in (torch.float64, torch.float32):
        s.case(f"V1237/proba/{dtype}", V=V, N=9, D=5, dtype=dtype, proba="dirichlet",
               options=OPTION_SETS["everything"], extras=("return_z_loss", "return_accuracy"))
        s.case(f"V1237/token/none/{dtype}", V=V, N=9, D=5, dtype=dtype, reduction="none",
               options=OPTION_SETS["everything"], extras=("token", "return_z_loss", "return_accuracy"))
    s.case("proba/empty_shard", V=4, N=6, D=3, sizes=[2, 2, 0], proba="dirichlet",
           options=("class_weight", "smoothing"), extras=("return_accuracy", "proba_grad"))
    s.case("proba/ties", V=7, proba="ties", reduction="none", extras=("return_accuracy",))
    s.case("triton/empty_shard", V=4, N=6, D=3, sizes=[2, 2, 0], impl="triton", dtype=torch.float32,
           options=("class_weight", "smoothing", "z_loss"), extras=("return_accuracy",))
    finite_differences(s)
    lse_gradient(s)
    # an empty batch
    s.case("N=0", N=0, V=V, options=("smoothing",), reduction="sum")
    bad_inputs(s)
    dtensor_checks(s)


def finite_differences(s: Suite):
    """Central differences in float64 of the sharded loss (every option) at a few entries of x, of each
    rank's W rows and bias rows, and -- with probability targets -- of each rank's probability columns:
    every rank evaluates the loss, only the owner of an entry moves it."""
    V, D, N, h = 29, 3, 5, 1e-6
    x, w, b, y = s.draw(N, D, V, torch.float64, ignore_frac=0.2)
    sizes = split_sizes(V, s.world)
    lo = sum(sizes[: s.rank])
    hi = lo + sizes[s.rank]
    g = torch.Generator().manual_seed(int(s.rng.integers(2**31)))
    # rows summing to 1 (a loss of a few units: the differences' rounding stays near 1e-10) and away
    # from 0 (a step keeps them >= 0)
    p = torch.rand(N, V, generator=g, dtype=torch.float64) + 0.1
    p /= p.sum(dim=1, keepdim=True)
    kw = dict(label_smoothing=0.1, z_loss=0.02, softcap=3.0, process_group=dist.group.WORLD,
              sample_weight=torch.rand(N, generator=g, dtype=torch.float64),
              class_weight=(torch.rand(V, generator=g) + 0.5)[lo:hi])
    for target in (y, p[:, lo:hi]):
        proba = target.is_floating_point()
        inputs = {"x": x, "W": w[lo:hi], "b": b[lo:hi]} | ({"p": target} if proba else {})
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        linear_cross_entropy(leaves["x"], leaves["W"], leaves.get("p", y), leaves["b"], **kw).backward()

        def loss_at(which, owner, index, step):
            moved = {k: v.clone() for k, v in inputs.items()}
            if owner in (None, s.rank):
                moved[which].view(-1)[index] += step
            return float(linear_cross_entropy(moved["x"], moved["W"], moved.get("p", y), moved["b"], **kw))

        for which, leaf in leaves.items():
            grad = leaf.grad
            for owner in ([None] if which == "x" else range(s.world)):
                n_own = grad.numel() if owner in (None, s.rank) else 0
                counts = [torch.zeros((), dtype=torch.int64) for _ in range(s.world)]
                s.log.originals["all_gather"](counts, torch.tensor(n_own))
                n = int(counts[s.rank if owner is None else owner])
                for index in (0, n // 2, n - 1):
                    fd = (loss_at(which, owner, index, h) - loss_at(which, owner, index, -h)) / (2 * h)
                    if owner in (None, s.rank):
                        exact = float(grad.reshape(-1)[index])
                        s.note(f"finite differences/{'proba' if proba else 'index'}/{which}",
                               abs(fd - exact) / max(abs(exact), 1e-3), 1e-6)


def lse_gradient(s: Suite):
    """A gradient reaching the returned lse (with and without one reaching the loss): dx, each rank's dW
    and db rows equal the unsharded chunked path's in float64 (its lse gradient is checked against the
    reference in tests/test_torch_linear_ce_options.py)."""
    V = 29
    x, w, b, y = s.draw(7, 3, V, torch.float64, ignore_frac=0.2)
    sizes = split_sizes(V, s.world)
    lo = sum(sizes[: s.rank])
    hi = lo + sizes[s.rank]
    g = torch.from_numpy(s.rng.uniform(-2, 2, 7))
    kw = dict(label_smoothing=0.1, z_loss=0.02, softcap=3.0, reduction="sum")
    for with_loss in (True, False):
        grads = []
        for sharded in (True, False):
            xs = x.clone().requires_grad_()
            ws = (w[lo:hi] if sharded else w).clone().requires_grad_()
            bs = (b[lo:hi] if sharded else b).clone().requires_grad_()
            extra = dict(process_group=dist.group.WORLD) if sharded else dict(impl="chunked")
            loss, lse = linear_cross_entropy(xs, ws, y, bs, return_lse=True, **kw, **extra)
            ((loss if with_loss else 0) + (lse * g).sum()).backward()
            grads.append((xs.grad, ws.grad if sharded else ws.grad[lo:hi], bs.grad if sharded else bs.grad[lo:hi]))
        for name, got, want in zip(("dx", "dW", "db"), *grads):
            s.note(f"lse gradient/{name}", rel_err(got, want), 1e-12)


def bad_inputs(s: Suite):
    x, w, b, y = s.draw(6, 4, 20, torch.float64)
    sizes = split_sizes(20, s.world)
    lo = sum(sizes[: s.rank])
    wr = w[lo: lo + sizes[s.rank]]
    grp = dist.group.WORLD
    y_bad = y.clone()
    y_bad[2] = 20
    s.raises("target>=V", "class index 20, outside [0, 20)",
             lambda: linear_cross_entropy(x, wr, y_bad, process_group=grp))
    # shards that do not tile [0, V): every rank claims to start at 0
    s.raises("vocab_start", "must tile [0, V)",
             lambda: vp.vocab_parallel_linear_cross_entropy(x, wr, y, process_group=grp, vocab_start=0))
    # the hidden size differs on one rank
    wd = torch.randn(sizes[s.rank], 5 if s.rank == 1 else 4, dtype=torch.float64)
    xd = torch.randn(6, 5 if s.rank == 1 else 4, dtype=torch.float64)
    s.raises("D differs", "hidden size D", lambda: linear_cross_entropy(xd, wd, y, process_group=grp))
    # a bad bias shape on rank 1 only: rank 1 says what is wrong, the others that rank 1 refused
    bias_r = torch.zeros(sizes[s.rank] + (s.rank == 1), dtype=torch.float64)
    s.raises("bias on one rank", {1: "bias (this rank's shard) must have shape", None: "rank(s) [1]"},
             lambda: linear_cross_entropy(x, wr, y, bias_r, process_group=grp))
    # targets not replicated
    y_rank = y.clone()
    y_rank[0] = (int(y[0]) + 1 + s.rank) % 20
    s.raises("target not replicated", "target (replicated",
             lambda: linear_cross_entropy(x, wr, y_rank, process_group=grp))
    # x not replicated: caught by the debug checksum
    os.environ[vp.CHECK_REPLICATED_ENV] = "1"
    try:
        s.raises("x not replicated", "x (replicated", lambda: linear_cross_entropy(
            x + s.rank, wr, y, process_group=grp))
        linear_cross_entropy(x, wr, y, process_group=grp)  # replicated: passes the debug check
        s.checks += 1
    finally:
        del os.environ[vp.CHECK_REPLICATED_ENV]
    # sample weights or the normalizer not the same on every rank
    s.raises("sample_weight not replicated", "sample_weight (replicated",
             lambda: linear_cross_entropy(x, wr, y, process_group=grp,
                                          sample_weight=torch.full((6,), 1.0 + s.rank, dtype=torch.float64)))
    s.raises("normalizer differs", "normalizer must be the same on every rank", lambda: linear_cross_entropy(
        x, wr, y, process_group=grp, reduction="sum", normalizer=3.0 + s.rank))
    # a negative sample weight on every rank: the detailed message
    sw = torch.ones(6, dtype=torch.float64)
    sw[3] = -1
    s.raises("sample_weight<0", "sample_weight must be finite and >= 0",
             lambda: linear_cross_entropy(x, wr, y, process_group=grp, sample_weight=sw))
    # the options differ across ranks
    s.raises("options differ", "the call's options", lambda: linear_cross_entropy(
        x, wr, y, process_group=grp, label_smoothing=0.1 * s.rank))
    s.raises("impl", "impl='torch' is not available",
             lambda: linear_cross_entropy(x, wr, y, process_group=grp, impl="torch"))
    s.raises("options differ: return_accuracy", "the call's options", lambda: linear_cross_entropy(
        x, wr, y, process_group=grp, return_accuracy=s.rank == 0))
    # a class_weight shard whose size is not its weight shard's, on one rank
    cw_bad = torch.ones(sizes[s.rank] + (s.rank == 1), dtype=torch.float64)
    s.raises("class_weight shard", {1: "class_weight (this rank's shard) must have shape", None: "rank(s) [1]"},
             lambda: linear_cross_entropy(x, wr, y, process_group=grp, class_weight=cw_bad))
    # probability targets: each rank passes its columns; rank 1 passing all V columns is refused there,
    # and the others say that rank 1 refused
    proba = torch.softmax(torch.randn(6, 20, dtype=torch.float64), dim=1)
    p_r = proba if s.rank == 1 else proba[:, lo: lo + sizes[s.rank]]
    s.raises("proba: all columns on one rank", {1: "must hold this rank's V_r = ", None: "rank(s) [1]"},
             lambda: linear_cross_entropy(x, wr, p_r, process_group=grp))
    p_neg = proba[:, lo: lo + sizes[s.rank]].clone()
    if s.rank == 0:
        p_neg[1, 0] = -0.5
    s.raises("proba < 0", {0: "target probabilities must be finite and >= 0",
                           None: "got other values on rank 0 (target probabilities)"},
             lambda: linear_cross_entropy(x, wr, p_neg, process_group=grp))
    s.raises("proba with ignore_index >= 0", "ignore_index is not supported for floating point target",
             lambda: linear_cross_entropy(x, wr, proba[:, lo: lo + sizes[s.rank]], process_group=grp,
                                          ignore_index=3))


def dtensor_checks(s: Suite):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (s.world,))
    V, D = 23, 4
    x, w, b, y = s.draw(7, D, V, torch.float64, ignore_frac=0.2)
    ref = reference(x, w, b, y, label_smoothing=0.1)
    for placement in (Shard(0), Replicate()):
        wd = distribute_tensor(w, mesh, [placement]).requires_grad_()
        bd = distribute_tensor(b, mesh, [placement]).requires_grad_()
        xs = x.clone().requires_grad_()
        loss = linear_cross_entropy(xs, wd, y, bd, label_smoothing=0.1)
        loss.backward()
        s.note(f"dtensor {placement}/loss", rel_err(loss, ref[0]), 1e-12)
        s.note(f"dtensor {placement}/dx", rel_err(xs.grad, ref[1]), 1e-12)
        s.note(f"dtensor {placement}/dW", rel_err(wd.grad.full_tensor(), ref[2]), 1e-12)
        s.note(f"dtensor {placement}/db", rel_err(bd.grad.full_tensor(), ref[3]), 1e-12)
        if tuple(wd.grad.placements) != (placement,):
            raise AssertionError(f"dW placements {wd.grad.placements}")
    wr = distribute_tensor(w, mesh, [Replicate()])
    s.raises("dtensor Replicate + process_group", "process_group asks for vocabulary shards",
             lambda: linear_cross_entropy(x, wr, y, process_group=dist.group.WORLD))
    w1 = distribute_tensor(w, mesh, [Shard(1)])
    s.raises("dtensor Shard(1)", "placements (Shard(dim=1),)", lambda: linear_cross_entropy(x, w1, y))
    # issue 17's options with Shard(0) (and Replicate(): the plain path) against the plain call
    g = torch.Generator().manual_seed(int(s.rng.integers(2**31)))
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    proba = torch.softmax(torch.randn(7, V, generator=g, dtype=torch.float64), dim=1)
    opts = dict(z_loss=0.1, z_loss_weighting="token", return_z_loss=True, return_accuracy=True)
    for placement in (Shard(0), Replicate()):
        wd = distribute_tensor(w, mesh, [placement])
        cwd = distribute_tensor(cw, mesh, [placement])
        for target, t_place in ((y, Replicate()), (proba, Shard(1) if placement == Shard(0) else Replicate())):
            out = linear_cross_entropy(x, wd, distribute_tensor(target, mesh, [t_place]), class_weight=cwd,
                                       **opts)
            plain = linear_cross_entropy(x, w, target, class_weight=cw, **opts)
            for name in ("loss", "z_loss", "accuracy"):
                s.note(f"dtensor {placement} {t_place} target/{name}",
                       rel_err(getattr(out, name), getattr(plain, name)), 1e-12)
    s.raises("dtensor proba target Replicate()", "must be sharded over its class axis",
             lambda: linear_cross_entropy(x, distribute_tensor(w, mesh, [Shard(0)]),
                                          distribute_tensor(proba, mesh, [Replicate()])))


SUITES = {"options": suite_options, "edges": suite_edges}


def run_rank(rank: int, world: int, port: int, out_dir: str, suite: str, seed: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        s = Suite(rank, world, seed)
        SUITES[suite](s)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"checks": s.checks, "worst": s.worst, "hf": getattr(s, "hf", None)}, f)
    finally:
        dist.destroy_process_group()
