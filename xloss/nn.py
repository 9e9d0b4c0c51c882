"""``torch.nn.Module`` wrappers around the xloss functions.

Two kinds of module live here:

* **Drop-in replacements for open_clip** — :class:`ClipLoss` and :class:`SigLipLoss` take open_clip's
  constructor arguments and call signatures (``open_clip/loss.py``), so that migrating is a change of import::

      from xloss.nn import ClipLoss      # was: from open_clip.loss import ClipLoss
      loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
      total = loss(image_features, text_features, model.logit_scale.exp())

  They compute the same numbers (and, on one process, the same gradients) without the ``[N, N]`` logits.
  How the distributed options map onto xloss is documented in each class.

* **Thin modules for the other losses** — :class:`InfoNCELoss`, :class:`LateInteractionLoss`,
  :class:`GramLoss`, :class:`SymileLoss`: ``__init__`` takes the function's keyword options and checks them
  (so a bad option fails at construction, not at the first batch), ``forward`` calls the function.  Each can
  own a learnable logit scale, stored CLIP-style as its logarithm in the Parameter ``logit_scale`` and used as
  ``exp(logit_scale)`` (clamped at ``max_logit_scale``, 100 as in CLIP).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import _checks, _dispatch
from ._api import renamed as _renamed  # (late interaction: score_reduction= → token_reduction=)
from .gram import gram_loss as _gram_loss
from .infonce import info_nce as _info_nce
from .infonce import target_rule as _target_rule
from .late_interaction import DIRECTIONS as _LI_DIRECTIONS
from .late_interaction import MASK_MODES as _LI_MASK_MODES
from .late_interaction import TOKEN_REDUCTIONS as _LI_TOKEN_REDUCTIONS
from .late_interaction import late_interaction_loss as _late_interaction_loss
from .soft_targets import distill_loss as _distill_loss
from .symile import SAMPLINGS as _SYMILE_SAMPLINGS
from .symile import symile_loss as _symile_loss

_CLIP_INIT = math.log(1 / 0.07)  # CLIP's initial log logit scale


# ----------------------------------------------------------------------------------------------- helpers
def _sigmoid_loss():
    """``xloss.sigmoid_loss``, imported when first needed (the sigmoid family is optional here)."""
    try:
        from .sigmoid import sigmoid_loss
    except ImportError as e:  # pragma: no cover - only without the sigmoid family
        raise NotImplementedError("SigLipLoss needs xloss.sigmoid_loss (xloss/sigmoid), which is missing") from e
    return sigmoid_loss


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_backend(backend) -> None:
    if backend not in _dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)


def _check_rank(rank, world_size) -> None:
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got rank={rank}")


def _world_group(rank: int, world_size: int):
    """The default process group, after checking that it agrees with the module's ``rank``/``world_size``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} needs an initialised torch.distributed default process group "
            "(torch.distributed.init_process_group)"
        )
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with torch.distributed "
            f"(rank {dist.get_rank()} of {dist.get_world_size()})"
        )
    return dist.group.WORLD


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _AllReduceGrad(torch.autograd.Function):
    """Identity in forward; sums the gradient over the ranks of ``group`` in backward.

    xloss gives a replicated scalar (the logit scale) only this rank's share of its gradient; open_clip, which
    computes the whole loss on every rank, gives every rank the full gradient.  Summing the shares restores
    that.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _gather_no_grad(x: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """``[world_size·N, D]``: every rank's ``x`` in rank order, without gradient (open_clip's plain gather)."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------------- open_clip drop-ins
class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (CLIP's symmetric InfoNCE) on top of :func:`xloss.info_nce`.

    ``½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)]`` for image features ``I [N, D]`` and text features
    ``T [N, D]``, without materialising the ``[N, N]`` logits.  On one process (``world_size=1``) the value
    and the gradients of both feature tensors and of ``logit_scale`` equal open_clip's (to rounding).

    Distributed (``world_size > 1``, torch.distributed initialised; ``rank``/``world_size`` must agree with
    it).  xloss always computes this rank's rows against the global columns and never forms global logits.
    Let ``L`` be the loss of the global batch ``B = W·N`` (``W = world_size``) and ``L_r`` the loss of rank r's
    rows (open_clip's ``local_loss``; ``L = mean_r L_r``).  open_clip's per-rank values and gradients (which
    DDP then averages) are reproduced exactly, except one per-rank split of the scale gradient noted below:

    ======================  ===============  ======================  ===============  ======================
    local_loss, gather_w_g  value (rank r)   feature grad (rank r)   logit_scale grad how
    ======================  ===============  ======================  ===============  ======================
    False, False (default)  ``L``            ``∂L/∂x_r``             ``∂L/∂s``        mean, scale all-reduce
    False, True             ``L``            ``W·∂L/∂x_r``           ``∂L/∂s``        same, features × W
    True, True              ``L_r``          ``W·∂L/∂x_r``           see below        local terms, mean
    True, False             ``L_r``          row terms of L_r only   ``∂L_r/∂s``      gather, one-way
    ======================  ===============  ======================  ===============  ======================

    How: ``xloss.info_nce(..., group=WORLD, grad_reduction="sum")`` returns ``L`` with the exact ``∂L/∂x_r`` and this rank's share of
    ``∂L/∂s`` (the shares sum to ``∂L/∂s``).  Rows 1-2: the module sums the ``logit_scale`` shares over the
    ranks in backward (open_clip computes the whole loss on every rank) and multiplies the feature gradients
    by ``W`` where open_clip's gather-with-gradient does.  Row 3: ``reduction="none"`` gives this rank's
    per-query terms ``½(row_i + col_i)``; their mean is ``L_r``, and since every rank backpropagates the same
    ``1/N`` xloss differentiates ``Σ_r L_r = W·L`` — open_clip's feature gradients with no extra
    communication.  Its ``logit_scale`` gradient is this rank's share of ``∂(W·L)/∂s`` split by query rows,
    where open_clip's ``∂L_r/∂s`` also holds the column terms of rank r's texts: per rank they differ, their
    sum over ranks (so the DDP-averaged gradient) is the same.
    Row 4: open_clip detaches the gathered features, so each rank's features get only their own rows'
    gradient (the column terms are lost; open_clip recommends ``gather_with_grad=True``).  That truncated
    gradient is not the gradient of any global loss, so it is reproduced literally: features all-gathered
    without gradient (``[B, D]``, as open_clip) and ``xloss.info_nce`` run one-way on the local rows against
    them, still without ``[N, B]`` logits.  After DDP's averaging, rows 2 and 3 train on the exact gradient
    of ``L``; row 1 gives the features ``1/W`` of it (the logit scale all of it) and row 4 a truncated one —
    exactly as open_clip does.

    Every rank must hold the same ``N`` (as in open_clip).  ``use_horovod=True`` is refused when
    ``world_size > 1``: xloss communicates through torch.distributed only.

    Args:
        local_loss, gather_with_grad, rank, world_size, use_horovod: as open_clip (see above).
        cache_labels: accepted for compatibility; xloss needs no label tensor, so there is nothing to cache.
        backend: xloss backend (``"auto"``, ``"triton"``, ``"cpu"``, ``"reference"``).

    Shapes:
        ``image_features [N, D]``, ``text_features [N, D]`` (same dtype/device), ``logit_scale`` a float or
        0-dim tensor (already exponentiated, e.g. ``model.logit_scale.exp()``).  Returns a 0-dim loss (fp32 for
        half inputs, where open_clip returns the input dtype), or ``{"contrastive_loss": loss}`` with
        ``output_dict=True``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                            ("cache_labels", cache_labels), ("use_horovod", use_horovod)):
            _check_bool(name, value)
        _check_rank(rank, world_size)
        _check_backend(backend)
        if use_horovod and world_size > 1:
            raise NotImplementedError(
                "use_horovod=True is not supported: xloss exchanges features through torch.distributed; "
                "initialise a torch.distributed process group and pass use_horovod=False"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        """Args as open_clip's ``ClipLoss.forward``.

        ``logit_bias`` (open_clip adds it to every logit) cancels in each softmax, so it changes neither the
        loss nor any gradient; a bias tensor still receives its (zero) gradient, as in open_clip.
        """
        if self.world_size == 1:
            loss = _info_nce(image_features, text_features, logit_scale=logit_scale, backend=self.backend)
        else:
            loss = self._distributed(image_features, text_features, logit_scale)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # exact zero gradient, keeps the bias in the graph
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image_features, text_features, logit_scale):
        w = self.world_size
        group = _world_group(self.rank, w)
        if self.local_loss and not self.gather_with_grad:
            # open_clip's truncated gradient, literally: local rows against detached global columns.
            n = image_features.shape[0]
            labels = torch.arange(n, device=image_features.device) + n * self.rank
            all_image = _gather_no_grad(image_features, w, group)
            all_text = _gather_no_grad(text_features, w, group)
            common = {"logit_scale": logit_scale, "labels": labels, "symmetric": False, "backend": self.backend}
            return (_info_nce(image_features, all_text, **common) + _info_nce(text_features, all_image, **common)) / 2
        if self.local_loss:  # and gather_with_grad
            # This rank's per-query terms ½(row_i + col_i); their local mean is open_clip's L_r, and with the
            # same grad_output 1/N on every rank xloss differentiates Σ_r L_r = W·L: W·∂L/∂x_r for the
            # features and ∂L_r/∂s (this rank's rows) for the scale, exactly open_clip's per-rank gradients.
            terms = _info_nce(image_features, text_features, logit_scale=logit_scale, reduction="none",
                              backend=self.backend, group=group, grad_reduction="sum")
            return terms.mean()
        if self.gather_with_grad:  # open_clip's gather-with-gradient sums every rank's copy of L: W·∂L/∂x_r
            image_features = _ScaleGrad.apply(image_features, float(w))
            text_features = _ScaleGrad.apply(text_features, float(w))
        scale = logit_scale
        if isinstance(scale, torch.Tensor) and scale.requires_grad:  # every open_clip rank gets the full ∂L/∂s
            scale = _AllReduceGrad.apply(scale, group)
        return _info_nce(image_features, text_features, logit_scale=scale, backend=self.backend, group=group,
                         grad_reduction="sum")


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss`` (CLIP loss plus in-batch distillation from a teacher CLIP) on top of
    :func:`xloss.info_nce` and :func:`xloss.distill_loss`: neither the student's nor the teacher's ``[N, N]``
    logits are ever formed.

    Constructor: as :class:`ClipLoss` (and open_clip).  ``forward(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale, output_dict=False)`` returns open_clip's
    ``(contrastive_loss, distill_loss)`` (or the dict).  The distillation term is ``½[softCE(t_I, z_I) +
    softCE(t_T, z_T)]`` with the teacher's logits ``t = dist_logit_scale·I_T T_Tᵀ`` (the teacher's width may
    differ); the teacher gets no gradient (its features and ``dist_logit_scale`` are frozen, as in distillation).

    Distributed: the four ``local_loss`` / ``gather_with_grad`` modes reproduce open_clip's per-rank values and
    gradients exactly as :class:`ClipLoss` documents (the teacher's features travel with the student's).
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        contrastive = ClipLoss.forward(self, image_features, text_features, logit_scale)
        teacher = (dist_image_features.detach(), dist_text_features.detach(), _detached(dist_logit_scale))
        if self.world_size == 1:
            distill = _distill_loss(image_features, text_features, teacher[0], teacher[1], logit_scale=logit_scale,
                                    teacher_logit_scale=teacher[2], backend=self.backend)
        else:
            distill = self._distributed_distill(image_features, text_features, logit_scale, *teacher)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def _distributed_distill(self, image_features, text_features, logit_scale, t_image, t_text, t_scale):
        """The distillation term in each open_clip mode, as ``ClipLoss._distributed`` does the contrastive one."""
        w = self.world_size
        group = _world_group(self.rank, w)
        common = {"teacher_logit_scale": t_scale, "backend": self.backend}
        if self.local_loss and not self.gather_with_grad:  # local rows against detached global columns
            all_i, all_t = _gather_no_grad(image_features, w, group), _gather_no_grad(text_features, w, group)
            all_ti, all_tt = _gather_no_grad(t_image, w, group), _gather_no_grad(t_text, w, group)
            one_way = {"logit_scale": logit_scale, "symmetric": False, **common}
            return (_distill_loss(image_features, all_t, t_image, all_tt, **one_way)
                    + _distill_loss(text_features, all_i, t_text, all_ti, **one_way)) / 2
        if self.local_loss:  # and gather_with_grad: this rank's paired terms ½(row_i + col_i), see ClipLoss
            return _distill_loss(image_features, text_features, t_image, t_text, logit_scale=logit_scale,
                                 reduction="none", group=group, grad_reduction="sum", **common).mean()
        if self.gather_with_grad:
            image_features = _ScaleGrad.apply(image_features, float(w))
            text_features = _ScaleGrad.apply(text_features, float(w))
        scale = logit_scale
        if isinstance(scale, torch.Tensor) and scale.requires_grad:
            scale = _AllReduceGrad.apply(scale, group)
        return _distill_loss(image_features, text_features, t_image, t_text, logit_scale=scale, group=group,
                             grad_reduction="sum", **common)


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


_SIGLIP_EXCHANGE = {"bidir": "ring", "shift": "ring", "reduce": "all_gather", "gather": "all_gather"}


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (SigLIP's pairwise sigmoid loss) on top of :func:`xloss.sigmoid_loss`.

    ``−Σ_ij log σ(y_ij·(s·<x_i, t_j> + b)) / N`` with ``y_ij = +1`` on the diagonal and ``−1`` elsewhere, for
    image features ``x [N, D]`` and text features ``t [N, D]``, without the ``[N, N]`` logits.  On one process
    the value and the gradients of the features, ``logit_scale`` and ``logit_bias`` equal open_clip's.

    Distributed (``world_size > 1``): open_clip's rank r returns ``L_r`` = its images against every rank's
    texts, summed and divided by the local ``N``; its four ``dist_impl`` exchange the texts with gradient, so
    rank r's features get ``∂(Σ_r' L_r')/∂x_r`` and ``logit_scale``/``logit_bias`` get ``∂L_r/∂(s, b)``.  Here
    ``xloss.sigmoid_loss(..., reduction="none", group=WORLD)`` gives this rank's row sums; their sum over
    ``N`` is ``L_r``, and because every rank backpropagates the same ``1/N`` xloss differentiates
    ``Σ_r L_r``: the same values and per-rank gradients as open_clip (the scale and bias get this rank's
    share, which is ``∂L_r/∂(s, b)``).  ``dist_impl`` picks the exchange: ``"bidir"``/``"shift"`` → ring,
    ``"reduce"``/``"gather"`` → all-gather (values and gradients do not depend on it).  The ``"none"``
    reduction costs a second pass over the keys in backward (open_clip's autograd does the same).

    Args:
        cache_labels: accepted for compatibility (no labels are built).
        rank, world_size, dist_impl: as open_clip (``dist_impl`` in ``bidir``, ``shift``, ``reduce``,
            ``gather``; default ``bidir``).
        chunk_size: open_clip's memory knob, accepted (a positive int or None); xloss always tiles the logits.
        bidir, use_horovod: older open_clip's arguments (``bidir=False`` is ``dist_impl="shift"``; horovod is
            refused with ``world_size > 1``).
        backend: xloss backend.

    Shapes:
        ``image_features [N, D]``, ``text_features [N, D]``; ``logit_scale`` and ``logit_bias`` floats or 0-dim
        tensors (``logit_scale`` already exponentiated).  Returns a 0-dim loss or ``{"contrastive_loss": loss}``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 chunk_size: int | None = None, bidir: bool | None = None, use_horovod: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        _check_bool("cache_labels", cache_labels)
        _check_rank(rank, world_size)
        _check_backend(backend)
        # chunk_size (open_clip's memory knob): accepted and checked; xloss always streams the logits in tiles.
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, 1)
        if bidir is not None:  # older open_clip: bidir=True/False before dist_impl existed
            _check_bool("bidir", bidir)
            if dist_impl is None:
                dist_impl = "bidir" if bidir else "shift"
        _check_bool("use_horovod", use_horovod)
        if use_horovod and world_size > 1:
            raise NotImplementedError("use_horovod=True is not supported: xloss exchanges features through "
                                      "torch.distributed (open_clip's SigLipLoss refuses it too)")
        dist_impl = dist_impl or "bidir"
        _checks.check_choice("dist_impl", dist_impl, tuple(_SIGLIP_EXCHANGE))
        self.chunk_size = chunk_size
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, backend={self.backend!r}"

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        """Args as open_clip's ``SigLipLoss.forward``; ``logit_bias=None`` means no bias (as open_clip)."""
        sigmoid_loss = _sigmoid_loss()
        if logit_bias is None:
            logit_bias = 0.0
        if self.world_size == 1:
            loss = sigmoid_loss(image_features, text_features, logit_scale=logit_scale, logit_bias=logit_bias,
                                backend=self.backend)
        else:
            group = _world_group(self.rank, self.world_size)
            # This rank's row sums; their sum over N is open_clip's L_r, and the same grad_output 1/N on every
            # rank makes xloss differentiate Σ_r L_r: open_clip's per-rank gradients exactly.
            rows = sigmoid_loss(image_features, text_features, logit_scale=logit_scale, logit_bias=logit_bias,
                                reduction="none", backend=self.backend, group=group, grad_reduction="sum",
                                exchange=_SIGLIP_EXCHANGE[self.dist_impl])
            loss = rows.sum() / image_features.shape[0]
        return {"contrastive_loss": loss} if output_dict else loss


# --------------------------------------------------------------------------------- generic loss modules
class _ScaledLoss(nn.Module):
    """A loss with a logit scale ``s``: fixed (``logit_scale`` or ``temperature=1/s``) or learnable.

    ``learnable_scale=True`` creates the Parameter ``logit_scale`` = ``init_logit_scale`` (the log of ``s``,
    as CLIP: default ``log(1/0.07)``), used as ``exp(min(logit_scale, log(max_logit_scale)))``.  A fixed
    scale is a plain attribute (not in the state dict).  ``forward(..., logit_scale=...)`` overrides a fixed
    scale for one call (e.g. a scale owned by the model); it is refused when the module owns a learnable one.
    """

    def __init__(self, logit_scale, temperature, learnable_scale: bool, init_logit_scale: float,
                 max_logit_scale: float | None, required: bool):
        super().__init__()
        _check_bool("learnable_scale", learnable_scale)
        if logit_scale is not None and temperature is not None:
            raise ValueError("give either logit_scale or temperature, not both (temperature=t means logit_scale=1/t)")
        if max_logit_scale is not None:
            max_logit_scale = _check_positive("max_logit_scale", max_logit_scale)
        self.max_logit_scale = max_logit_scale
        self.fixed_scale: float | None = None
        if learnable_scale:
            if logit_scale is not None or temperature is not None:
                raise ValueError(
                    "learnable_scale=True takes its start from init_logit_scale (the log of the scale); "
                    "do not also pass logit_scale or temperature"
                )
            if isinstance(init_logit_scale, bool) or not isinstance(init_logit_scale, numbers.Real) \
                    or not math.isfinite(init_logit_scale):
                raise TypeError(f"init_logit_scale must be a finite float (log of the scale), got {init_logit_scale!r}")
            self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        else:
            self.register_parameter("logit_scale", None)
            if logit_scale is not None:
                self.fixed_scale = _check_positive("logit_scale", logit_scale)
            elif temperature is not None:
                self.fixed_scale = 1.0 / _check_positive("temperature", temperature)
            elif required:
                raise ValueError(
                    f"{type(self).__name__} needs a scale: pass logit_scale=s, temperature=t or learnable_scale=True"
                )

    @property
    def scale(self):
        """The multiplicative scale ``s`` in use: a 0-dim tensor when learnable, else a float or None."""
        if self.logit_scale is None:
            return self.fixed_scale
        p = self.logit_scale
        if self.max_logit_scale is not None:
            p = p.clamp(max=math.log(self.max_logit_scale))
        return p.exp()

    def _resolve(self, override, device):
        if override is not None:
            if self.logit_scale is not None:
                raise ValueError(
                    f"this {type(self).__name__} owns a learnable logit_scale; do not pass logit_scale to forward"
                )
            return override
        s = self.scale
        if isinstance(s, torch.Tensor):
            s = s.to(device)
        return s

    def _scale_repr(self) -> str:
        if self.logit_scale is not None:
            return f"learnable_scale=True, max_logit_scale={self.max_logit_scale}"
        return f"logit_scale={self.fixed_scale}"


class InfoNCELoss(_ScaledLoss):
    """Module form of :func:`xloss.info_nce` (CLIP / InfoNCE without the N×M logits).

    Args:
        logit_scale: fixed scale ``s`` (default 1 when nothing is given), or
        temperature: fixed ``τ = 1/s``, or
        learnable_scale: own a Parameter ``logit_scale`` (log of s), started at ``init_logit_scale`` and
            capped at ``max_logit_scale``.
        symmetric, exclude_self, false_negative_margin, decoupled, hardness, label_smoothing, reduction,
            matryoshka_dims, matryoshka_weights, matryoshka_normalize, backend: as :func:`xloss.info_nce`
            (``matryoshka_dims`` increasing: sentence-transformers' ``[768, 512, 256, 128, 64]`` is
            ``[64, 128, 256, 512, 768]`` here, weights in the same order).

    Forward:
        ``query [N, D]``, ``key [M, D]``, optional ``labels [N]`` or ``query_groups [N]`` and ``key_groups [M]``
        (multi-positive targets), and ``logit_scale`` (overrides a fixed scale).  Returns what
        :func:`xloss.info_nce` returns.
    """

    def __init__(self, *, logit_scale=None, temperature=None, learnable_scale: bool = False,
                 init_logit_scale: float = _CLIP_INIT, max_logit_scale: float | None = 100.0,
                 symmetric: bool = True, exclude_self: bool = False, false_negative_margin: float | None = None,
                 decoupled: bool = False, hardness: float = 0.0, label_smoothing: float = 0.0,
                 reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_normalize: bool = True, backend: str = "auto"):
        from .infonce import matryoshka as _matryoshka  # (here, not at the top: this class's lines only)

        super().__init__(logit_scale, temperature, learnable_scale, init_logit_scale, max_logit_scale, required=False)
        _check_bool("symmetric", symmetric)
        _checks.check_label_smoothing(label_smoothing)
        _checks.check_reduction(reduction)
        _check_backend(backend)
        # the options' own checks, now rather than at the first call (groups come with the inputs)
        rule = _target_rule(False, symmetric, exclude_self, false_negative_margin, decoupled, hardness,
                            label_smoothing, reduction)
        prefixes = _matryoshka.check(matryoshka_dims, matryoshka_weights, matryoshka_normalize, None)  # D: at forward
        if prefixes is not None and rule is not None:
            raise ValueError("matryoshka_dims cannot be combined with exclude_self, false_negative_margin, "
                             "decoupled or hardness")
        self.matryoshka_dims = None if prefixes is None else list(prefixes.dims)
        self.matryoshka_weights = None if prefixes is None or matryoshka_weights is None else list(prefixes.weights)
        self.matryoshka_normalize = matryoshka_normalize
        self.symmetric = symmetric
        self.exclude_self = exclude_self
        self.false_negative_margin = false_negative_margin
        self.decoupled = decoupled
        self.hardness = hardness
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        targets = "".join(f", {name}={getattr(self, name)!r}" for name, default in _TARGET_DEFAULTS.items()
                          if getattr(self, name) != default)
        if self.matryoshka_dims is not None:
            targets += f", matryoshka_dims={self.matryoshka_dims}"
            if self.matryoshka_weights is not None:
                targets += f", matryoshka_weights={self.matryoshka_weights}"
            if not self.matryoshka_normalize:
                targets += ", matryoshka_normalize=False"
        return (f"{self._scale_repr()}, symmetric={self.symmetric}{targets}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, backend={self.backend!r}")

    def forward(self, query, key, labels=None, *, query_groups=None, key_groups=None, logit_scale=None):
        return _info_nce(query, key, logit_scale=self._resolve(logit_scale, query.device), labels=labels,
                         query_groups=query_groups, key_groups=key_groups, symmetric=self.symmetric,
                         exclude_self=self.exclude_self, false_negative_margin=self.false_negative_margin,
                         decoupled=self.decoupled, hardness=self.hardness, label_smoothing=self.label_smoothing,
                         reduction=self.reduction, matryoshka_dims=self.matryoshka_dims,
                         matryoshka_weights=self.matryoshka_weights, matryoshka_normalize=self.matryoshka_normalize,
                         backend=self.backend)


_TARGET_DEFAULTS = {"exclude_self": False, "false_negative_margin": None, "decoupled": False, "hardness": 0.0}


class LateInteractionLoss(_ScaledLoss):
    """Module form of :func:`xloss.late_interaction_loss` (ColBERT / FILIP: MaxSim scores, cross-entropy).

    Args:
        logit_scale / temperature / learnable_scale (+ ``init_logit_scale``, ``max_logit_scale``): the scale;
            one is required (ColBERT uses ``logit_scale=1``).
        direction, label_smoothing, reduction, mask_mode, token_reduction, backend: as the function
            (``score_reduction=`` is the deprecated old name of ``token_reduction=``, for one release).

    Forward:
        ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, optional ``q_mask [Nq, Lq]``, ``d_mask [Nd, Ld]`` (bool or 0/1),
        ``labels [Nq]``, ``q_weights``, ``d_weights`` and ``logit_scale`` (overrides a fixed scale).
    """

    @_renamed(score_reduction="token_reduction")
    def __init__(self, *, logit_scale=None, temperature=None, learnable_scale: bool = False,
                 init_logit_scale: float = _CLIP_INIT, max_logit_scale: float | None = 100.0,
                 direction: str = "q2d", label_smoothing: float = 0.0, reduction: str = "mean",
                 mask_mode: str = "exclude", token_reduction: str | None = None, backend: str = "auto"):
        super().__init__(logit_scale, temperature, learnable_scale, init_logit_scale, max_logit_scale, required=True)
        _checks.check_choice("direction", direction, _LI_DIRECTIONS)
        _checks.check_label_smoothing(label_smoothing)
        _checks.check_reduction(reduction)
        _checks.check_choice("mask_mode", mask_mode, _LI_MASK_MODES)
        if token_reduction is not None:
            _checks.check_choice("token_reduction", token_reduction, _LI_TOKEN_REDUCTIONS)
        _check_backend(backend)
        self.direction = direction
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.mask_mode = mask_mode
        self.token_reduction = token_reduction
        self.backend = backend

    @property
    def score_reduction(self):  # the old name of token_reduction, for one release
        return self.token_reduction

    def extra_repr(self) -> str:
        return (f"{self._scale_repr()}, direction={self.direction!r}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, mask_mode={self.mask_mode!r}, "
                f"token_reduction={self.token_reduction!r}, backend={self.backend!r}")

    def forward(self, q, d, q_mask=None, d_mask=None, labels=None, *, q_weights=None, d_weights=None,
                logit_scale=None):
        return _late_interaction_loss(
            q, d, q_mask, d_mask, logit_scale=self._resolve(logit_scale, q.device), labels=labels,
            direction=self.direction, label_smoothing=self.label_smoothing, reduction=self.reduction,
            mask_mode=self.mask_mode, token_reduction=self.token_reduction, q_weights=q_weights,
            d_weights=d_weights, backend=self.backend,
        )


class GramLoss(_ScaledLoss):
    """Module form of :func:`xloss.gram_loss` (GRAM: Gram-volume contrastive loss over k modalities).

    Args:
        temperature: fixed ``τ`` (the authors use 0.07), or ``logit_scale = 1/τ``, or ``learnable_scale``
            (Parameter ``logit_scale`` = log(1/τ)); one is required.
        label_smoothing (default 0.1, as the authors), stopgrad_gathered, eps, reduction, backend: as the
            function.

    Forward:
        ``anchor [N1, D]`` and 1 to 4 more ``[N2, D]`` tensors (``N1 == N2`` without labels); optional
        ``labels [N1]`` (each anchor's positive sample) and ``logit_scale`` (overrides a fixed one).
    """

    def __init__(self, *, temperature=None, logit_scale=None, learnable_scale: bool = False,
                 init_logit_scale: float = _CLIP_INIT, max_logit_scale: float | None = 100.0,
                 label_smoothing: float = 0.1, stopgrad_gathered: bool = False, eps: float = 0.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__(logit_scale, temperature, learnable_scale, init_logit_scale, max_logit_scale, required=True)
        _checks.check_label_smoothing(label_smoothing)
        _check_bool("stopgrad_gathered", stopgrad_gathered)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        _checks.check_reduction(reduction)
        _check_backend(backend)
        self.label_smoothing = float(label_smoothing)
        self.stopgrad_gathered = stopgrad_gathered
        self.eps = float(eps)
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"{self._scale_repr()}, label_smoothing={self.label_smoothing}, "
                f"stopgrad_gathered={self.stopgrad_gathered}, eps={self.eps}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")

    def forward(self, anchor, *others, labels=None, logit_scale=None):
        s = self._resolve(logit_scale, anchor.device)
        # (temperature=1/s, as in earlier releases: the same numbers bit for bit)
        return _gram_loss(anchor, *others, temperature=1.0 / s, labels=labels, label_smoothing=self.label_smoothing,
                          stopgrad_gathered=self.stopgrad_gathered, eps=self.eps, reduction=self.reduction,
                          backend=self.backend)


class SymileLoss(_ScaledLoss):
    """Module form of :func:`xloss.symile_loss` (Symile: multilinear inner product over M modalities).

    Args:
        logit_scale / temperature / learnable_scale: the scale (default 1 when nothing is given).
        negative_sampling (``"n"`` or ``"n_squared"``), reduction, backend: as the function.

    Forward:
        ``reps``: a list/tuple of ``M`` tensors ``[N, D]``, or the ``M`` tensors as separate arguments;
        optional ``permutations``, ``generator`` (``"n"`` sampling) and ``logit_scale``.
    """

    def __init__(self, *, logit_scale=None, temperature=None, learnable_scale: bool = False,
                 init_logit_scale: float = _CLIP_INIT, max_logit_scale: float | None = 100.0,
                 negative_sampling: str = "n", reduction: str = "mean", backend: str = "auto"):
        super().__init__(logit_scale, temperature, learnable_scale, init_logit_scale, max_logit_scale, required=False)
        _checks.check_choice("negative_sampling", negative_sampling, _SYMILE_SAMPLINGS)
        _checks.check_reduction(reduction)
        _check_backend(backend)
        self.negative_sampling = negative_sampling
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"{self._scale_repr()}, negative_sampling={self.negative_sampling!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")

    def forward(self, *reps, permutations=None, generator=None, logit_scale=None):
        if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
            reps = reps[0]
        if not reps:
            raise ValueError("SymileLoss.forward needs the modalities: a list of [N, D] tensors or M tensors")
        s = self._resolve(logit_scale, reps[0].device if isinstance(reps[0], torch.Tensor) else None)
        return _symile_loss(*reps, logit_scale=1.0 if s is None else s,
                            negative_sampling=self.negative_sampling, permutations=permutations,
                            generator=generator, reduction=self.reduction, backend=self.backend)


__all__ = ["ClipLoss", "DistillClipLoss", "GramLoss", "InfoNCELoss", "LateInteractionLoss", "SigLipLoss", "SymileLoss"]
