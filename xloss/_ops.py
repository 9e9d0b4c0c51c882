"""Helpers shared by the families' ``ops.py`` (the ``torch.library`` custom ops behind ``torch.compile``)."""

from __future__ import annotations

import torch


class FunctionCtx:
    """The part of an autograd ctx that the families' ``Function.forward``/``backward`` use, so that a custom
    op's kernel can run those bodies as they are (no math repeated in the ops)."""

    def __init__(self, saved=(), needs_input_grad=(), **attrs):
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = tuple(needs_input_grad)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def autograd_inside():
    """A guard that lets autograd record again inside a custom op's kernel.

    Kernels run below the Autograd dispatch key (autograd is in the thread-local excluded set), but GRAM's
    backward differentiates the small per-sample adjugate polynomials (``gram.cpu.per_sample``, O(N·k²)) with
    ``torch.autograd.grad``: this takes the autograd keys out of the excluded set until exit (then restored).
    ``torch.enable_grad()`` is still needed beside it (the engine sets it).
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
