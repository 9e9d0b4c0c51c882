"""What every family's autograd Function shares: one rule for double backward.

The fused backward sweeps are not themselves differentiable (they are custom ops without a backward of their own),
so a gradient of a gradient (``create_graph=True``, e.g. a gradient penalty) cannot be formed through them.  Rather
than returning gradients that silently do not require grad (the penalty would then be treated as a constant),
:func:`first_order_only` makes every such gradient raise one clear error when it is differentiated again; the
first-order gradients themselves are exact and usable.  The reference path (``backend="reference"``, plain PyTorch)
is twice differentiable and is the way to get second derivatives.
"""

from __future__ import annotations

import functools

import torch


def _message(name: str) -> bytes:
    return (f"xloss.{name}: double backward (differentiating a gradient, e.g. a gradient penalty with "
            f"create_graph=True) is not supported by the fused engines; compute that term with "
            f"backend='reference' (the naive definition, twice differentiable)").encode()


def first_order_only(name: str):
    """Decorator for ``Function.backward``: run it without a graph; under ``create_graph=True`` (grad mode on in
    backward) return gradients that require grad and raise the error above if differentiated again (as
    ``torch.autograd.function.once_differentiable``, but also when the incoming gradients do not require grad and
    with a message that says what to do)."""

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                outputs = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled() or not any(ctx.needs_input_grad):
                return outputs
            outs = outputs if isinstance(outputs, tuple) else (outputs,)

            def requiring_grad(t):
                if not isinstance(t, torch.Tensor):
                    return t
                t = t.detach()
                t.requires_grad_(True)
                return t

            failing = torch._C._functions.DelayedError(_message(name), len(outs))(*[requiring_grad(t) for t in outs])
            failing = failing if isinstance(failing, tuple) else (failing,)
            return failing if isinstance(outputs, tuple) else failing[0]

        return wrapper

    return wrap
