"""Cross-rank negatives: contrastive losses over a batch spread across the ranks of a process group.

Each rank ``r`` holds local query rows ``q_r [n_r, D]`` and local key rows ``k_r [m_r, D]``.  The loss is the
single-process loss of the concatenated batch ``q = cat_r q_r`` (``[N, D]``), ``k = cat_r k_r`` (``[M, D]``),
and no rank ever holds the global ``N×M`` logits.  Only ``torch.distributed`` collectives and point-to-point
ops are used (gloo on CPU, NCCL on CUDA); the tile work is done by the same engines as on one process.

Entry points: ``xloss.info_nce(..., group=g, exchange=..., grad_reduction=...)``,
``xloss.sigmoid_loss(..., group=g, ...)`` and ``xloss.late_interaction_loss(..., group=g, exchange="all_gather")``
(token sets: the documents' tokens, masks and weights are gathered with a differentiable all_gather whose
backward returns every rank's document gradients to their owners; ``xloss/late_interaction/ranks.py``).  There is no separate multi-rank code path: each family's one
autograd Function takes a communicator (``xloss/_comm.py``: a no-op one on a single process, a
``GroupComm`` across ranks) and its sweeps (``xloss/<family>/sweeps.py``) move the key blocks.  This module
documents the semantics and keeps ``info_nce`` / ``sigmoid_loss`` here as aliases of the public functions
(imported on first call: it imports no family).

Semantics
---------
* **Labels are global.**  ``labels`` (``[n_r]``, optional) gives each local query's positive as an index into
  the concatenated keys, ``[0, M)``.  Default: local query ``i`` of rank ``r`` ↔ global key
  ``offset_r + i`` where ``offset_r = m_0 + … + m_{r-1}``, which needs ``n_r <= m_r`` on every rank (as the
  single-process default needs ``N <= M``).  With the usual equal split of a CLIP batch this is the diagonal.
* **Group ids are global too.**  ``query_groups`` / ``key_groups``: each rank passes the ids of its own rows
  (``[n_r]``, ``[m_r]``); a pair is positive iff its ids are equal, whichever ranks hold the two rows.  Only
  the key ids travel (``M`` integers per rank), never ``[N, M]`` targets.  Pass them on every rank or on
  none (the metadata exchange checks it); with group ids no default pairing is assumed, so ``n_r > m_r`` is
  fine.  ``exclude_self`` (InfoNCE) pairs global query ``i`` with global key ``i``.
* **Uneven per-rank batch sizes** are supported: the sizes are gathered once per call (one small all_gather
  that also checks D, dtype, device, logit scale and label range on every rank at once, so that a bad input
  raises the same error on every rank instead of hanging the others).
* **Returned value**: for ``reduction="mean"`` / ``"sum"`` the GLOBAL loss, bit-identical on every rank; for
  ``"none"`` this rank's per-query terms ``[n_r]``.  (The sigmoid loss forms its gradients in the forward
  pass for ``"mean"``/``"sum"``; for ``"none"`` its backward exchanges the keys once more.)
* **Gradients** (``grad_reduction``):

  - ``"mean"`` (default): DDP and FSDP AVERAGE parameter gradients over ranks, so every gradient that leaves
    the loss is multiplied by the world size ``W``: after DDP's average the parameters get exactly the
    single-process gradient of the global loss, with no change to the training loop (as open_clip's
    ``ClipLoss(gather_with_grad=True)`` and Inf-CL).  Then ``query.grad`` / ``key.grad`` of rank ``r`` are
    ``W ×`` the ``q_r`` / ``k_r`` slices of the single-process gradient, and a replicated ``logit_scale`` (and
    ``logit_bias``) gets ``W ×`` this rank's share, so the mean over ranks is the full gradient.
  - ``"sum"``: the exact shares: ``query.grad`` / ``key.grad`` are the slices of the single-process gradient
    and a replicated scale gets the part of this rank's query rows, so the SUM over ranks is the gradient.
    For users who all-reduce gradients with a sum themselves.

  Precisely, rank ``r``'s ``grad_output`` weighs the loss terms of rank ``r``'s queries; with the same
  ``grad_output`` on every rank (the normal case: the loss is one global number) every gradient above is
  ``grad_output ×`` that.  (The sigmoid loss with ``"mean"``/``"sum"`` forms its gradients in forward and
  scales them by this rank's ``grad_output``: same value on every rank assumed.)
* **Under torch.compile**: a ``group=`` call runs eagerly behind a graph break (the metadata exchange reads
  values on the host and the ring is Python loops over point-to-point ops), with the same values and gradients;
  ``fullgraph=True`` refuses it and says why.  Single-process calls compile into one graph.
* Every rank must call the loss, and every rank must run its backward (backward communicates too).

Exchanges
---------
* ``exchange="ring"`` (default; the Inf-CL idea): key blocks travel around the ring with
  ``batch_isend_irecv``; the next block is in flight while the current block's tiles are computed.
  Forward: row statistics of the local queries merge over the blocks; the column statistics of a block travel
  with it and arrive back, complete, at its owner.  Backward: the same ring carries each block's ``dk``
  accumulator, which every rank adds its queries' contribution to, back to its owner.  Extra memory per rank
  is independent of the world size: two fixed receive buffers for key blocks (one with two ranks), two for
  the travelling ``dk`` accumulators and the engine's ``dk`` part of the current block, i.e. about
  ``5·max_r m_r·D`` numbers besides the engine's own tiles and ``O(n_r·D)``, plus ``O(M)`` scalars (the
  per-key column statistics and column-softmax weights, needed where a positive lives on another rank).
* ``exchange="all_gather"``: all keys are gathered in forward (``O(M·D)`` per rank, saved for backward);
  column statistics merge with two all_reduces (max, then sum); backward sums the ``dk`` pieces of every rank
  with ``reduce_scatter`` on a padded ``[world·max m_r, D]`` buffer (all_reduce of it where the backend has
  no reduce_scatter).  Fewer, larger messages: faster on
  small worlds with a fast interconnect, but the memory grows with the world size.
"""

from __future__ import annotations

from ._comm import EXCHANGES, GRAD_REDUCTIONS, world_size


def info_nce(query, key, **kwargs):
    """``xloss.info_nce`` (the same arguments; pass ``group=`` for a batch spread over ranks)."""
    from .infonce import info_nce as _info_nce

    return _info_nce(query, key, **kwargs)


def sigmoid_loss(query, key, **kwargs):
    """``xloss.sigmoid_loss`` (the same arguments; pass ``group=`` for a batch spread over ranks)."""
    from .sigmoid import sigmoid_loss as _sigmoid_loss

    return _sigmoid_loss(query, key, **kwargs)


__all__ = ["EXCHANGES", "GRAD_REDUCTIONS", "info_nce", "sigmoid_loss", "world_size"]
