"""Double backward (issue 15, item 3): every family either differentiates twice correctly or raises one clear
error.  The fused engines' gradients are exact to first order and, under ``create_graph=True``, require grad and
raise ``xloss.<loss>: double backward ... is not supported`` when differentiated again (never a silent constant);
``backend="reference"`` and ``backend="dense"`` (which "auto" takes for small problems) are twice differentiable.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close64

import xloss

F64 = torch.float64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g, dtype=F64).requires_grad_() for _ in range(3)]


LOSSES = {
    "info_nce": lambda a, b, c, backend: xloss.info_nce(a, b, logit_scale=2.0, backend=backend),
    "info_nce groups": lambda a, b, c, backend: xloss.info_nce(
        a, b, query_groups=torch.tensor([0, 0, 1, 1, 2, 2]), key_groups=torch.tensor([0, 1, 1, 2, 2, 0]),
        backend=backend),
    "sigmoid_loss": lambda a, b, c, backend: xloss.sigmoid_loss(a, b, logit_scale=2.0, logit_bias=-1.0,
                                                                backend=backend),
    "sigmoid_loss none": lambda a, b, c, backend: xloss.sigmoid_loss(
        a, b, logit_scale=2.0, logit_bias=-1.0, reduction="none", backend=backend).sum(),
    "gram_loss": lambda a, b, c, backend: xloss.gram_loss(a, b, c, temperature=0.5, backend=backend),
    "gram_volume": lambda a, b, c, backend: xloss.gram_volume(a, b, c, backend=backend).sum(),
    "symile_loss n_squared": lambda a, b, c, backend: xloss.symile_loss(
        a, b, c, logit_scale=2.0, negative_sampling="n_squared", backend=backend),
    "late_interaction_loss": lambda a, b, c, backend: xloss.late_interaction_loss(
        a.view(2, 3, 4), b.view(2, 3, 4), logit_scale=2.0, backend=backend),
    "maxsim": lambda a, b, c, backend: xloss.maxsim(a.view(2, 3, 4), b.view(2, 3, 4), backend=backend).sum(),
    "distill_loss": lambda a, b, c, backend: xloss.distill_loss(a, b, c.detach(), c.detach() + 1,
                                                                backend=backend),
    "cwcl_loss": lambda a, b, c, backend: xloss.cwcl_loss(a, b, symmetric=True, backend=backend),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fused_gradients_under_create_graph_are_exact_and_refuse_a_second_order(name):
    fn = LOSSES[name]
    a, b, c = _inputs()
    plain = torch.autograd.grad(fn(a, b, c, "chunked"), (a, b))
    graph = torch.autograd.grad(fn(a, b, c, "chunked"), (a, b), create_graph=True)
    for x, y in zip(graph, plain):
        assert x.requires_grad, "a gradient under create_graph=True must not silently be a constant"
        assert_close64(x.detach(), y, what=f"{name}: first-order gradient under create_graph=True")
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported .* backend='reference'"):
        (graph[0] ** 2).sum().backward()


@pytest.mark.parametrize("backend", ["reference", "dense", "auto"])  # "auto" takes "dense" at this size
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reference_and_dense_are_twice_differentiable(name, backend):
    fn = LOSSES[name]

    def second_order(backend):
        a, b, c = _inputs(1)
        ga = torch.autograd.grad(fn(a, b, c, backend), a, create_graph=True)[0]
        (ga ** 2).sum().backward()
        return b.grad

    got = second_order(backend)
    assert got is not None and torch.isfinite(got).all()
    if backend != "reference":
        assert_close64(got, second_order("reference"), what=f"{name}: second derivative on {backend}")
