"""xloss.nn: open_clip drop-ins (ClipLoss, SigLipLoss) against open_clip itself, the generic loss modules
against their functions, constructor checks, learnable scales, and (when xloss.distributed is there) a
2-rank gloo run of ClipLoss against open_clip's ClipLoss in every local_loss / gather_with_grad combination."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from tolerance import assert_close64

import xloss
from xloss import nn as xnn


def load_open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    mspec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)  # `import open_clip` would fail: it needs torchvision
    return module


def _features(n, d, seed, dtype=torch.float64, m=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(m or n, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def _grads(fn, *tensors, grad_out=1.0):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    (loss * grad_out).backward()
    return loss.detach(), [t.grad for t in leaves]


def _close(a, b, tol=1e-10):
    """fp64: the suite's rule (``tolerance.assert_close64``) at ``tol``; other dtypes: rtol = atol = ``tol``."""
    if a.dtype == b.dtype == torch.float64:
        assert_close64(a, b, rtol=tol)
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- ClipLoss parity
@pytest.mark.parametrize("n,d,scale", [(1, 4, 10.0), (7, 16, 14.3), (33, 8, 100.0)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_clip_loss_matches_open_clip(n, d, scale, backend):
    oc = load_open_clip_loss()
    x, y = _features(n, d, seed=n)
    s = torch.tensor(scale, dtype=torch.float64)
    ref_val, ref_g = _grads(lambda a, b, c: oc.ClipLoss()(a, b, c), x, y, s, grad_out=0.7)
    val, g = _grads(lambda a, b, c: xnn.ClipLoss(backend=backend)(a, b, c), x, y, s, grad_out=0.7)
    _close(val, ref_val)
    for a, b in zip(g, ref_g):
        _close(a, b)


def test_clip_loss_output_dict_cache_labels_and_bias():
    oc = load_open_clip_loss()
    ours, theirs = xnn.ClipLoss(cache_labels=True), oc.ClipLoss(cache_labels=True)
    for n in (5, 5, 9):  # cached labels must follow a change of batch size
        x, y = _features(n, 6, seed=n)
        out = ours(x, y, 20.0, output_dict=True)
        assert set(out) == {"contrastive_loss"}
        _close(out["contrastive_loss"], theirs(x, y, 20.0, output_dict=True)["contrastive_loss"])
    # logit_bias: open_clip adds it to every logit, which cancels in each softmax; it still gets a 0 gradient.
    x, y = _features(6, 5, seed=3)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ref_val, ref_g = _grads(lambda *t: theirs(*t), x, y, s, b)
    val, g = _grads(lambda *t: ours(*t), x, y, s, b)
    _close(val, ref_val)
    for a, r in zip(g, ref_g):
        _close(a, r)
    assert torch.all(g[3] == 0)


def test_clip_loss_float32_and_positional_signature():
    oc = load_open_clip_loss()
    x, y = _features(16, 32, seed=1, dtype=torch.float32)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    # positional (image, text, logit_scale, logit_bias, output_dict), as open_clip's forward
    ours = xnn.ClipLoss()(x, y, scale, None, True)["contrastive_loss"]
    theirs = oc.ClipLoss()(x, y, scale, None, True)["contrastive_loss"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert xnn.ClipLoss()(x, y, scale).requires_grad is False


# ----------------------------------------------------------------------------------- SigLipLoss parity


@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 8)])
def test_siglip_loss_matches_open_clip(n, d):
    oc = load_open_clip_loss()
    x, y = _features(n, d, seed=10 + n)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ref_val, ref_g = _grads(lambda *t: oc.SigLipLoss()(*t), x, y, s, b, grad_out=1.3)
    val, g = _grads(lambda *t: xnn.SigLipLoss()(*t), x, y, s, b, grad_out=1.3)
    _close(val, ref_val)
    for a, r in zip(g, ref_g):
        _close(a, r)


def test_siglip_loss_output_dict_and_float_scale():
    oc = load_open_clip_loss()
    x, y = _features(9, 6, seed=2)
    out = xnn.SigLipLoss(cache_labels=True, dist_impl="gather")(x, y, 5.0, -2.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    _close(out["contrastive_loss"], oc.SigLipLoss()(x, y, 5.0, -2.0))
    _close(xnn.SigLipLoss()(x, y, 5.0, None), oc.SigLipLoss()(x, y, 5.0, None))  # no bias
    x32, y32 = x.float(), y.float()
    torch.testing.assert_close(xnn.SigLipLoss()(x32, y32, 10.0, -10.0), oc.SigLipLoss()(x32, y32, 10.0, -10.0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, True), (True, False), (True, True)])
def test_clip_loss_distributed_options_are_inert_on_one_process(local_loss, gather_with_grad):
    oc = load_open_clip_loss()
    x, y = _features(6, 4, seed=11)
    s = torch.tensor(7.0, dtype=torch.float64)
    opts = {"local_loss": local_loss, "gather_with_grad": gather_with_grad}
    ref_val, ref_g = _grads(lambda *t: oc.ClipLoss(**opts)(*t), x, y, s)
    val, g = _grads(lambda *t: xnn.ClipLoss(**opts)(*t), x, y, s)
    _close(val, ref_val)
    for a, r in zip(g, ref_g):
        _close(a, r)


# ----------------------------------------------------------------------------- generic modules = functions
def test_info_nce_module_equals_function():
    x, y = _features(7, 5, seed=4, m=11)
    labels = torch.tensor([3, 0, 10, 2, 2, 5, 9])
    mod = xnn.InfoNCELoss(temperature=0.1, symmetric=False, label_smoothing=0.1, reduction="sum")
    _close(mod(x, y, labels), xloss.info_nce(x, y, temperature=0.1, labels=labels, symmetric=False,
                                              label_smoothing=0.1, reduction="sum"))
    # forward's logit_scale overrides the fixed one; no scale at all means s = 1
    _close(mod(x, y, labels, logit_scale=3.0), xloss.info_nce(x, y, logit_scale=3.0, labels=labels,
                                                               symmetric=False, label_smoothing=0.1,
                                                               reduction="sum"))
    _close(xnn.InfoNCELoss(reduction="none")(x, y), xloss.info_nce(x, y, reduction="none"))


def test_learnable_scale_gradient_clamp_and_state_dict():
    x, y = _features(6, 4, seed=5)
    mod = xnn.InfoNCELoss(learnable_scale=True, init_logit_scale=math.log(5.0)).double()
    loss = mod(x, y)
    loss.backward()
    p = mod.logit_scale.detach().clone().requires_grad_(True)  # log(5) rounded to fp32, then made fp64
    ref = xloss.reference.info_nce(x, y, logit_scale=p.exp())
    ref.backward()
    _close(loss, ref)
    _close(mod.logit_scale.grad, p.grad)
    # CLIP's cap at 100: above it the scale stays 100
    with torch.no_grad():
        mod.logit_scale.fill_(10.0)
    assert mod.scale.item() == pytest.approx(100.0)
    # state_dict round trip
    state = mod.state_dict()
    assert list(state) == ["logit_scale"]
    other = xnn.InfoNCELoss(learnable_scale=True).double()
    other.load_state_dict(state)
    assert other.logit_scale.item() == 10.0
    _close(other(x, y), mod(x, y))
    assert xnn.InfoNCELoss(temperature=0.5).state_dict() == {}
    with pytest.raises(ValueError, match="owns a learnable logit_scale"):
        mod(x, y, logit_scale=2.0)


def test_late_interaction_module_equals_function():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    d = torch.randn(5, 6, 5, generator=g, dtype=torch.float64)
    qm = torch.rand(3, 4, generator=g) > 0.3
    qm[:, 0] = True
    dm = torch.rand(5, 6, generator=g) > 0.3
    dm[:, 0] = True
    mod = xnn.LateInteractionLoss(logit_scale=2.0, direction="both", label_smoothing=0.05, mask_mode="zero")
    _close(mod(q, d, qm, dm), xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, direction="both",
                                                          label_smoothing=0.05, mask_mode="zero"))
    learn = xnn.LateInteractionLoss(learnable_scale=True, init_logit_scale=0.5).double()
    _close(learn(q, d), xloss.late_interaction_loss(q, d, logit_scale=learn.logit_scale.detach().exp()))
    labels = torch.tensor([4, 0, 2])
    _close(xnn.LateInteractionLoss(temperature=0.5, reduction="none", token_reduction="mean")(q, d, labels=labels),
           xloss.late_interaction_loss(q, d, logit_scale=2.0, labels=labels, reduction="none",
                                       token_reduction="mean"))


def test_gram_module_equals_function():
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    _close(xnn.GramLoss(temperature=0.07)(a, b, c), xloss.gram_loss(a, b, c, temperature=0.07))
    mod = xnn.GramLoss(learnable_scale=True, init_logit_scale=math.log(1 / 0.2), label_smoothing=0.0,
                       stopgrad_gathered=True, reduction="sum").double()
    loss = mod(a, b)
    loss.backward()
    t = mod.logit_scale.detach().clone().requires_grad_(True)
    ref = xloss.gram_loss(a, b, temperature=1 / t.exp(), label_smoothing=0.0, stopgrad_gathered=True,
                          reduction="sum")
    ref.backward()
    _close(loss, ref)
    _close(mod.logit_scale.grad, t.grad)
    labels = torch.tensor([4, 4, 0, 1])  # 4 anchors, 5 samples, a duplicate positive
    _close(xnn.GramLoss(temperature=0.5, reduction="none")(a[:4], b, c, labels=labels),
           xloss.gram_loss(a[:4], b, c, logit_scale=2.0, labels=labels, reduction="none"))


def test_symile_module_equals_function():
    g = torch.Generator().manual_seed(8)
    reps = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mod = xnn.SymileLoss(logit_scale=3.0, negative_sampling="n_squared")
    want = xloss.symile_loss(*reps, logit_scale=3.0, negative_sampling="n_squared")
    _close(mod(reps), want)
    _close(mod(*reps), want)
    # "n" sampling draws from the generator: the same seed gives the same loss
    a = xnn.SymileLoss()(reps, generator=torch.Generator().manual_seed(1))
    _close(a, xloss.symile_loss(*reps, generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize("make,exc,match", [
    (lambda: xnn.ClipLoss(local_loss=1), TypeError, "local_loss"),
    (lambda: xnn.ClipLoss(rank=2, world_size=2), ValueError, "rank"),
    (lambda: xnn.ClipLoss(world_size=0), ValueError, "world_size"),
    (lambda: xnn.ClipLoss(world_size=2, rank=0, use_horovod=True), NotImplementedError, "horovod"),
    (lambda: xnn.ClipLoss(backend="gpu"), ValueError, "backend"),
    (lambda: xnn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    (lambda: xnn.InfoNCELoss(logit_scale=2.0, temperature=0.5), ValueError, "either"),
    (lambda: xnn.InfoNCELoss(temperature=0.0), ValueError, "temperature"),
    (lambda: xnn.InfoNCELoss(logit_scale="10"), TypeError, "logit_scale"),
    (lambda: xnn.InfoNCELoss(learnable_scale=True, temperature=0.1), ValueError, "init_logit_scale"),
    (lambda: xnn.InfoNCELoss(learnable_scale=True, init_logit_scale=float("nan")), TypeError, "init_logit_scale"),
    (lambda: xnn.InfoNCELoss(reduction="avg"), ValueError, "reduction"),
    (lambda: xnn.InfoNCELoss(label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: xnn.InfoNCELoss(symmetric=None), TypeError, "symmetric"),
    (lambda: xnn.InfoNCELoss(learnable_scale=True, max_logit_scale=-1.0), ValueError, "max_logit_scale"),
    (lambda: xnn.LateInteractionLoss(), ValueError, "needs a scale"),
    (lambda: xnn.LateInteractionLoss(logit_scale=1.0, direction="qd"), ValueError, "direction"),
    (lambda: xnn.LateInteractionLoss(logit_scale=1.0, mask_mode="pad"), ValueError, "mask_mode"),
    (lambda: xnn.LateInteractionLoss(logit_scale=1.0, token_reduction="max"), ValueError, "token_reduction"),
    (lambda: xnn.GramLoss(), ValueError, "needs a scale"),
    (lambda: xnn.GramLoss(temperature=0.07, eps=-1.0), ValueError, "eps"),
    (lambda: xnn.GramLoss(temperature=0.07, stopgrad_gathered="yes"), TypeError, "stopgrad_gathered"),
    (lambda: xnn.SymileLoss(negative_sampling="all"), ValueError, "negative_sampling"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_world_size_needs_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x, y = _features(4, 3, seed=9)
    with pytest.raises(RuntimeError, match="init_process_group"):
        xnn.ClipLoss(rank=1, world_size=2)(x, y, 10.0)


# --------------------------------------------------------------------------------- 2-rank gloo vs open_clip
def _run_both(oc_module, ours_module, x, y, scalars, grad_out):
    """Values and gradients (features, then each scalar) of open_clip's module and ours, as lists."""
    per = []
    for mod in (oc_module, ours_module):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        ps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in scalars]
        loss = mod(xs, ys, ps[0].exp(), *ps[1:])
        (loss * grad_out).backward()
        per.append([t.tolist() for t in (loss.detach(), xs.grad, ys.grad, *(p.grad for p in ps))])
    return per


def _run_both_distill(oc_module, ours_module, x, y, tx, ty, log_scale, grad_out):
    """``_run_both`` for DistillClipLoss: the two losses combined as ``contrastive + 2·distill``."""
    per = []
    for mod in (oc_module, ours_module):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        p = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
        contrastive, distill = mod(xs, ys, p.exp(), tx, ty, torch.tensor(20.0, dtype=torch.float64))
        loss = contrastive + 2 * distill
        (loss * grad_out).backward()
        per.append([t.tolist() for t in (loss.detach(), xs.grad, ys.grad, p.grad)])
    return per


def _dist_worker(rank, world, path, out):
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)  # forked children: no OpenMP pool inherited from the parent
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    results = {}
    try:
        oc = load_open_clip_loss()
        n, d = 5, 6
        x_all, y_all = _features(n * world, d, seed=123)
        x, y = x_all[rank * n:(rank + 1) * n], y_all[rank * n:(rank + 1) * n]
        for local_loss in (False, True):
            for gwg in (False, True):
                opts = {"local_loss": local_loss, "gather_with_grad": gwg, "rank": rank, "world_size": world}
                results[f"clip local_loss={local_loss} gather_with_grad={gwg}"] = _run_both(
                    oc.ClipLoss(**opts), xnn.ClipLoss(**opts), x, y, [math.log(12.0)], 0.9)
                tx_all, ty_all = _features(n * world, d + 2, seed=321)
                tx, ty = tx_all[rank * n:(rank + 1) * n], ty_all[rank * n:(rank + 1) * n]
                results[f"distill local_loss={local_loss} gather_with_grad={gwg}"] = _run_both_distill(
                    oc.DistillClipLoss(**opts), xnn.DistillClipLoss(**opts), x, y, tx, ty, math.log(12.0), 0.9)
        for impl in ("bidir", "gather"):
            opts = {"rank": rank, "world_size": world, "dist_impl": impl}
            results[f"siglip dist_impl={impl}"] = _run_both(
                oc.SigLipLoss(**opts), xnn.SigLipLoss(**opts), x, y, [math.log(10.0), -5.0], 1.1)
    except Exception:  # noqa: BLE001 (reported by the test)
        import traceback

        results["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def test_two_ranks_match_open_clip(tmp_path):
    """Every rank's value and every gradient (features, logit_scale, logit_bias) equal open_clip's on that
    rank, for all four ClipLoss and DistillClipLoss option combinations and for SigLipLoss (ring and all-gather
    exchange)."""
    import json

    import torch.multiprocessing as mp

    load_open_clip_loss()
    world = 2
    mp.start_processes(_dist_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")
    ranks = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
        assert "error" not in ranks[rank], f"rank {rank}:\n{ranks[rank]['error']}"
        assert len(ranks[rank]) == 10
    names = ["value", "image grad", "text grad", "logit_scale grad", "logit_bias grad"]

    def close(a, b, what):
        torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")

    for case in ranks[0]:
        for rank in range(world):
            theirs, ours = ranks[rank][case]
            for i, (name, a, b) in enumerate(zip(names, ours, theirs)):
                if case.endswith("local_loss=True gather_with_grad=True") and name == "logit_scale grad":
                    # xloss's share of ∂/∂s is rank r's query rows; open_clip's is rank r's rows AND columns.
                    # The shares differ per rank, their sum (what DDP averages) is the same.
                    a = sum(ranks[r][case][1][i] for r in range(world))
                    b = sum(ranks[r][case][0][i] for r in range(world))
                close(a, b, f"rank {rank}, {case}, {name}")


def test_siglip_loss_takes_open_clip_arguments_of_every_version():
    """open_clip's current SigLipLoss takes chunk_size; older ones bidir and use_horovod: a plain swap works."""
    x, y = _features(6, 4, seed=5)
    want = xnn.SigLipLoss()(x, y, 10.0, -5.0)
    for kwargs in ({"chunk_size": 2}, {"chunk_size": None}, {"bidir": True}, {"bidir": False},
                   {"use_horovod": False}, {"dist_impl": "gather", "chunk_size": 64}):
        torch.testing.assert_close(xnn.SigLipLoss(**kwargs)(x, y, 10.0, -5.0), want)
    assert xnn.SigLipLoss(bidir=False).dist_impl == "shift"
    with pytest.raises(ValueError, match="chunk_size"):
        xnn.SigLipLoss(chunk_size=0)
    with pytest.raises(NotImplementedError, match="horovod"):
        xnn.SigLipLoss(world_size=2, rank=0, use_horovod=True)
