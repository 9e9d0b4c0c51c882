"""Memory-efficient InfoNCE / CLIP loss (SPEC.md §1): the whole family in one place.

Layout (op → Function → function, as quack):

* ``engine.py``   the engine interface (``InfoNCEEngine``): a statistics sweep ``lse`` and a gradient sweep
  ``grad``; implemented by ``chunked.py`` (row strips in PyTorch, any device) and ``triton.py`` (fused kernels);
* ``ops.py``      each sweep as a ``torch.library`` custom op (``xloss::info_nce_lse``, ``xloss::info_nce_grad``);
* ``sweeps.py``   where the keys come from: one process, a ring of ranks, or an all-gather;
* here            :class:`InfoNCEOptions`, the one autograd Function :class:`InfoNCEFunction` (the loss formula,
  once, for eager, ``torch.compile`` and multi-rank runs alike) and the public :func:`info_nce`.

Everything besides the two sweeps is O((N+M)·D) and lives in the Function: the positive logits, label
smoothing, the reduction, the target terms of the gradient and the gradient of the logit scale
(``ds = Σ_i <q_i, dq_u_i>``).  Structured targets (``targets.py``) and Matryoshka prefixes (``matryoshka.py``) are
further sweeps of the same engines, through the same Function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _comm, _dispatch
from .. import reference as _reference
from .._autograd import first_order_only
from .._tiling import accumulation_dtype, in_accumulation_dtype
from . import chunked as _chunked
from . import matryoshka as _matryoshka
from . import sweeps
from .matryoshka import Matryoshka
from .targets import TargetRule


@dataclass(frozen=True)
class InfoNCEOptions:
    """Every non-tensor option of one call (hashable: a constant for ``torch.compile``)."""

    symmetric: bool = True
    label_smoothing: float = 0.0
    reduction: str = "mean"
    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)
    keep_logits: bool = False  # the chunked engine keeps small logits for backward (3 sweeps instead of 4)
    targets: TargetRule | None = None  # structured targets (groups, exclude_self, margin, ...); None: labels only
    matryoshka: Matryoshka | None = None  # prefixes of D (issue 12); None: the whole D once


class InfoNCEFunction(torch.autograd.Function):
    """Autograd for InfoNCE: saves the inputs and the split LSE statistics, recomputes tiles in backward.

    Forward args: ``q [n, D]``, ``k [m, D]`` (this rank's rows; the whole batch on one process), ``scale``
    (0-dim), ``labels [n]`` (long, global key indices), ``options`` (:class:`InfoNCEOptions`), ``comm`` (a
    communicator of ``xloss._comm``: ``LOCAL`` on one process).  Gradients are multiplied by
    ``comm.grad_factor`` (the world size under the default ``grad_reduction="mean"``, else 1).

    With ``options.targets`` (structured targets) ``labels`` holds the query group ids and ``key_groups [M]`` the
    global key group ids (for labels: the labels and ``arange(M)``); the formula is then the one of
    :func:`_targets_forward` / :func:`_targets_backward`.

    With ``options.matryoshka`` (prefixes of D) ``rq [P, n]`` and ``rk [P, m]`` are the inverse prefix norms of this
    rank's queries and keys (None without normalisation), inputs that get gradients; the formula is then
    :func:`xloss.infonce.matryoshka.forward` / ``backward``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, labels, options: InfoNCEOptions, comm, key_groups=None, rq=None, rk=None):
        if options.matryoshka is not None:
            return _matryoshka.forward(ctx, q, k, scale, labels, options, comm, rq, rk)
        if options.targets is not None:
            return _targets_forward(ctx, q, k, scale, labels, key_groups, options, comm)
        acc = accumulation_dtype(q.dtype)
        eps, symmetric = options.label_smoothing, options.symmetric
        N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
        s = scale.detach().to(acc)
        qf, kf = (q.to(acc), k.to(acc)) if eps else (None, None)  # only smoothing needs them here
        sums = comm.all_reduce(torch.stack([qf.sum(0), kf.sum(0)])) if eps else None  # global Σ q, Σ k
        # z_pos comes from the same tiles as the maxima, so max - z_pos is exactly 0 when the positive wins.
        row, col, z_pos, keys, logits = sweeps.lse(comm, q, k, s, labels, symmetric, options.keep_logits,
                                                   options.engine)
        rows = (row[0] - z_pos) + row[1]  # LSE - z_pos, the max subtracted first (as log_softmax)
        if eps:
            rows = rows + eps * (z_pos - s * (qf @ sums[1]) / M)  # ε(LSE - mean_j z_ij) - ε(LSE - z_pos)
        if symmetric:
            cols = (col[0, labels] - z_pos) + col[1, labels]
            if eps:
                e_key = s * comm.gather_keys(kf @ sums[0]) / N  # mean_i z_ij of every key j
                cols = cols + eps * (z_pos - e_key[labels])
            terms = (rows + cols) / 2
        else:
            terms = rows
        ctx.save_for_backward(q, k, scale, labels, row, col, sums, keys, logits)
        ctx.options, ctx.comm = options, comm
        return comm.reduce(terms, options.reduction, N)

    @staticmethod
    @first_order_only("info_nce")
    def backward(ctx, grad_out):
        if ctx.options.matryoshka is not None:
            return _matryoshka.backward(ctx, grad_out)
        if ctx.options.targets is not None:
            return _targets_backward(ctx, grad_out) + (None, None)
        q, k, scale, labels, row, col, sums, keys, logits = ctx.saved_tensors
        options, comm = ctx.options, ctx.comm
        eps, symmetric = options.label_smoothing, options.symmetric
        acc = row.dtype
        n, m = q.shape[0], k.shape[0]
        N, M = comm.total_rows(n), comm.total_keys(m)
        g = grad_out.to(acc)
        g = (g / N if options.reduction == "mean" else g).expand(n)  # d loss / d term_i of this rank's queries
        a = g / 2 if symmetric else g  # weight of row i's softmax
        w = None
        if symmetric:  # weight of column j's softmax: Σ a_i over the queries (of every rank) whose positive is j
            w = comm.all_reduce(torch.zeros(M, dtype=acc, device=q.device).index_add_(0, labels, a))
        s = scale.detach().to(acc)
        pos = (1 - eps) * (a + a if symmetric else a)  # weight of the target entry (i, labels[i])
        qf = q.to(acc)
        dq, dk = sweeps.grad(comm, q, qf, k, keys, s, row, col, a, w, labels, pos, logits, options.engine)
        if eps:  # the uniform ε/M and ε/N parts of smoothing; Σ_i a_i q_i and Σ_j w_j k_j are global sums
            qsum, ksum = sums[0], sums[1]
            off = comm.key_offset()
            w_own = w[off : off + m] if symmetric else None
            kf = k.to(acc)
            aq, wk = comm.all_reduce(torch.stack([a @ qf, w_own @ kf if symmetric else torch.zeros_like(qsum)]))
            dq -= (eps / M) * a[:, None] * ksum
            dk -= (eps / M) * aq
            if symmetric:
                dq -= (eps / N) * wk
                dk -= (eps / N) * w_own[:, None] * qsum
        return _input_grads(ctx, q, qf, k, scale, s, dq, dk) + (None, None, None, None, None, None)


def _input_grads(ctx, q, qf, k, scale, s, dq, dk):
    """``(grad_q, grad_k, grad_scale)`` from the unscaled products ``dq = G k``, ``dk = Gᵀ q`` (this rank's
    rows), multiplied by the communicator's gradient factor; None where no gradient is needed."""
    needs, f = ctx.needs_input_grad, ctx.comm.grad_factor
    grad_scale = grad_q = grad_k = None
    if needs[2]:  # Σ G∘(q kᵀ) (this rank's share on many)
        grad_scale = ((qf * dq).sum() * f if f != 1 else (qf * dq).sum()).to(scale.dtype)
    if needs[0]:
        grad_q = ((s * f) * dq if f != 1 else s * dq).to(q.dtype)
    if needs[1]:
        grad_k = ((s * f) * dk if f != 1 else s * dk).to(k.dtype)
    return grad_q, grad_k, grad_scale


def _has_set(stats, pos, rule: TargetRule, candidates: int):
    """Which rows (or columns) have a term: a positive, and a non-empty log-sum-exp set.

    ``candidates``: the size of the other side (M keys for rows, N queries for columns).  The set is empty when
    decoupled leaves only positives, or the margin drops every negative.  Without the margin its size is known:
    every candidate but the self pair and (decoupled) the positives, so a set whose members are all −inf keeps its
    −inf / NaN term, as the reference's; the margin drops negatives by value, and there an empty set is the one
    whose max is −inf.
    """
    if rule.margin is None:
        members = candidates - (1 if rule.exclude_self else 0) - (pos[1] if rule.decoupled else 0)
        return (pos[1] > 0) & (members > 0)
    return (pos[1] > 0) & (stats[0] != float("-inf"))


def _side_terms(stats, pos, rule: TargetRule, candidates: int):
    """``LSE − mean of the positives`` per row (or column) with a term (:func:`_has_set`), else 0; and that mask.

    ``stats [2, ·]`` split statistics, ``pos [2, ·]`` (sum of the positive logits, their count).  The max is
    subtracted first, as ``log_softmax``: with one positive that is the max the difference is exactly 0.
    """
    has = _has_set(stats, pos, rule, candidates)
    # A +inf max (and so no NaN in the set: the maxima keep NaN) makes the LSE +inf, as torch.logsumexp has it;
    # the engines' log Σ exp(z − max) is inf − inf there.
    rest = torch.where(stats[0] == float("inf"), stats[1].new_zeros(()), stats[1])
    terms = (stats[0] - pos[0] / pos[1].clamp(min=1)) + rest
    return torch.where(has, terms, terms.new_zeros(())), has


def _targets_forward(ctx, q, k, scale, qg, kg, options: InfoNCEOptions, comm):
    """Structured targets: ``½(Σ r / #rows with a positive + Σ c / #columns with a positive)`` (one-way: rows).

    Row terms are this rank's queries' (``[n]``), column terms every key's (``[M]``, the same on every rank);
    ``"none"`` with ``symmetric`` gives ``½(r_i + c_{qg_i})`` (labels: ``qg`` are key indices).
    """
    acc = accumulation_dtype(q.dtype)
    symmetric, rule, engine = options.symmetric, options.targets, options.engine
    s = scale.detach().to(acc)
    ref_r = ref_c = None
    if rule.margin is not None:
        ref_r, ref_c = sweeps.positive_max(comm, q, k, qg, kg, rule, symmetric, engine)
    row, col, pos_r, pos_c, keys = sweeps.masked_lse(comm, q, k, s, qg, kg, rule, ref_r, ref_c, symmetric, engine)
    N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
    rows, has_r = _side_terms(row, pos_r, rule, M)
    # Global counts and row sum in one exchange: [Σ r, #rows with a positive].
    row_total, n_rows = comm.global_sum(torch.stack([rows.sum(), has_r.sum().to(acc)])).unbind()
    cols = has_c = None
    if symmetric:
        cols, has_c = _side_terms(col, pos_c, rule, N)
    if options.reduction == "none":
        out = (rows + cols[qg]) / 2 if symmetric else rows
    elif options.reduction == "sum":
        out = (row_total + cols.sum()) / 2 if symmetric else row_total
    else:
        out = row_total / n_rows.clamp(min=1)
        if symmetric:
            out = (out + cols.sum() / has_c.sum().clamp(min=1)) / 2
    ctx.save_for_backward(q, k, scale, qg, kg, row, col, pos_r, pos_c, ref_r, ref_c, keys, n_rows)
    ctx.options, ctx.comm = options, comm
    return out


def _targets_backward(ctx, grad_out):
    q, k, scale, qg, kg, row, col, pos_r, pos_c, ref_r, ref_c, keys, n_rows = ctx.saved_tensors
    options, comm = ctx.options, ctx.comm
    symmetric, acc = options.symmetric, row.dtype
    g = grad_out.to(acc)
    half = g / 2 if symmetric else g
    N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
    has_r = _has_set(row, pos_r, options.targets, M)
    has_c = _has_set(col, pos_c, options.targets, N) if symmetric else None
    zero = g.new_zeros(())
    w = pw = None
    if options.reduction == "none":  # d loss / d r_i = g_i (/2); d loss / d c_j = Σ_{i: qg_i = j} g_i / 2
        a = torch.where(has_r, half, zero)
        if symmetric:
            w = comm.all_reduce(torch.zeros(col.shape[1], dtype=acc, device=q.device).index_add_(0, qg, half))
    else:
        a = torch.where(has_r, half / (n_rows.clamp(min=1) if options.reduction == "mean" else 1), zero)
        if symmetric:
            w = half / (has_c.sum().clamp(min=1) if options.reduction == "mean" else 1)
    pa = a / pos_r[1].clamp(min=1)
    if symmetric:
        w = torch.where(has_c, w, zero)
        pw = w / pos_c[1].clamp(min=1)
    s = scale.detach().to(acc)
    dq, dk = sweeps.masked_grad(comm, q, k, keys, s, qg, kg, options.targets, ref_r, ref_c, row, col, a, w, pa, pw,
                                options.engine)
    return _input_grads(ctx, q, q.to(acc), k, scale, s, dq, dk) + (None, None, None, None)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    labels: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    symmetric: bool = True,
    exclude_self: bool = False,
    false_negative_margin: float | None = None,
    decoupled: bool = False,
    hardness: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    matryoshka_dims=None,
    matryoshka_weights=None,
    matryoshka_normalize: bool = True,
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE / CLIP contrastive loss without the N×M logits matrix.

    Equal to ``xloss.reference.info_nce`` (and to open_clip's ``ClipLoss`` with default labels): logits
    ``z_ij = s·<q_i, k_j>``, cross-entropy over each row (query→key) and, when ``symmetric``, over the
    positive key's column (key→query), averaged.

    Args:
        query: ``[N, D]`` float32/float16/bfloat16/float64 (image features in CLIP).
        key: ``[M, D]``, same dtype and device; ``M > N`` adds extra negatives.  ``M < N`` needs ``labels``.
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient), e.g.
            ``model.logit_scale.exp()``.  Default 1.
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give one or the other.
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        query_groups, key_groups: ``[N]``, ``[M]`` integer group ids, given together instead of ``labels``
            (multi-positive targets): key j is a positive of query i iff ``key_groups[j] == query_groups[i]``.  The
            row term is SupCon's L_out, ``LSE_{j∈A(i)} z_ij − mean_{p∈P(i)} z_ip``, the column term the same per
            key; ``"mean"`` averages over the rows (columns) that have a positive, and rows without one add 0 and
            get no gradient.  1-to-K (K captions per image): the K keys share their image's group id.  Across
            ranks the ids are this rank's rows'; equal ids on different ranks are the same group.
        symmetric: add the key→query term (CLIP); False gives the one-way InfoNCE.
        exclude_self: single-tower form (SimCLR, SupCon): needs ``N == M``; the pair (i, i) leaves every
            log-sum-exp and every positive set.  ``info_nce(z, z, query_groups=y, key_groups=y, exclude_self=True,
            symmetric=False, temperature=0.1)`` on L2-normalised ``z`` is SupCon; with ``z = cat([v1, v2])`` and
            ``labels=(arange(2B) + B) % 2B`` it is SimCLR's NT-Xent.
        false_negative_margin: ``m >= 0``: a non-positive key j leaves row i's log-sum-exp when
            ``<q_i, k_j> > <q_i, k_pos(i)> + m`` (raw inner products, before the scale; the best-scoring positive
            with groups); the same per column.  Qwen3-Embedding uses 0.1.  Costs one more sweep.
        decoupled: DCL: the positives leave the denominator, ``LSE_{j∉P(i)} z_ij − mean_{p∈P(i)} z_ip``.
        hardness: ``α >= 0``: negatives' logits become ``z_ij + α·sg(<q_i, k_j>)`` (sentence-transformers'
            ``hardness_mode="all_negatives"``, LLaVE): the value uses ``(s + α)·<q, k>``, the gradient ``s·<q, k>``.
        label_smoothing: ``ε`` in [0, 1], as ``F.cross_entropy``, on both terms (not with the five options
            above).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query terms ``[N]``).
        matryoshka_dims: Matryoshka representation learning: strictly increasing prefix widths
            ``d_1 < … < d_P <= D`` (a list or tuple of ints).  The loss is then ``Σ_m w_m · info_nce(q̂_m, k̂_m)``
            with ``q̂_m = q[:, :d_m]`` (and ``k̂_m``), every other option (labels, symmetric, the scale, label
            smoothing, the reduction; ``"none"``: ``Σ_m w_m`` times the per-query terms) applied to each term, as
            sentence-transformers' ``MatryoshkaLoss`` does around a loss.  All prefixes come from one sweep over
            the tiles (a prefix's dot products are partial sums of the full one): about the cost of one
            ``info_nce`` call, not P.  Not with ``query_groups``/``key_groups``, ``exclude_self``,
            ``false_negative_margin``, ``decoupled`` or ``hardness`` (ValueError).
        matryoshka_weights: ``w_m`` (floats, one per prefix); default all 1.
        matryoshka_normalize: L2-normalise each prefix of each row first (default True: cosine logits, as
            ``MatryoshkaLoss`` over ``MultipleNegativesRankingLoss``); False: raw prefix dot products.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"chunked"`` (alias
            ``"cpu"``; runs on any device) or ``"reference"`` (the naive definition).
        group: a ``torch.distributed`` ProcessGroup: ``query``/``key`` are this rank's rows of a batch spread
            over the group (sizes may differ across ranks), ``labels`` are GLOBAL key indices (default: local
            query ``i`` ↔ key ``offset_r + i``), and the returned value is the loss of the whole batch, the
            same on every rank (``"none"``: this rank's ``[n_r]`` terms).  None (default) or a one-rank group:
            single process.  Every rank must call the loss and run its backward.
        exchange: how keys cross ranks: ``"ring"`` (default; memory flat in the world size) or
            ``"all_gather"`` (fewer, larger messages).
        grad_reduction: how the caller combines gradients across ranks.  ``"mean"`` (default): gradients are
            scaled by the world size so that DDP's / FSDP's averaging of parameter gradients gives exactly the
            single-process gradient of the global loss, with no change to the training loop.  ``"sum"``: each
            rank gets its exact share (the sum over ranks is the gradient), for users who sum gradients.

    Returns:
        0-dim loss, or ``[N]`` per-query terms for ``reduction="none"`` (with the options above: ``r_i``, or
        ``½(r_i + c_{labels[i]})`` when ``symmetric``; not defined for symmetric groups); float32 for half inputs,
        float64 for float64 inputs.
    """
    _checks.check_query_key(query, key)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    n, m = query.shape[0], key.shape[0]
    device = query.device
    groups = _checks.check_query_key_groups(query_groups, key_groups, n, m, device, labels)
    rule = target_rule(groups, symmetric, exclude_self, false_negative_margin, decoupled, hardness,
                       label_smoothing, reduction)
    prefixes = _matryoshka.check(matryoshka_dims, matryoshka_weights, matryoshka_normalize, query.shape[1])
    if prefixes is not None and rule is not None:
        raise ValueError("matryoshka_dims cannot be combined with query_groups/key_groups, exclude_self, "
                         "false_negative_margin, decoupled or hardness")
    name = _dispatch.resolve("info_nce", backend, device, query.dtype, local=group is None,
                             cells=n * m if prefixes is None else n * m * len(prefixes.dims))
    scale = _checks.resolve_scale(logit_scale, temperature, device)
    need_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or scale.requires_grad)
    comm, _ = _comm.make(group, exchange, grad_reduction, query, key, labels, [scale], need_grad, name,
                         groups=groups)
    if rule is not None and rule.exclude_self and comm.total_rows(n) != comm.total_keys(m):
        raise ValueError(f"exclude_self=True needs as many queries as keys (one view matrix against itself), got "
                         f"N={comm.total_rows(n)} and M={comm.total_keys(m)}")
    if comm.is_local and not groups:
        _checks.check_positives(labels, n, m, device, "query", "key", "key")
    if name in ("dense", "reference"):
        q, k = _dispatch.dense_inputs(name, query, key)
        if labels is not None:
            labels = labels.long()
        if rule is None and prefixes is None:  # the options of plain InfoNCE only (a per-call cost)
            out = _reference.info_nce(q, k, logit_scale=scale, labels=labels, symmetric=symmetric,
                                      label_smoothing=label_smoothing, reduction=reduction)
        else:
            out = _reference.info_nce(
                q, k, logit_scale=scale, labels=labels, symmetric=symmetric, label_smoothing=label_smoothing,
                reduction=reduction, query_groups=query_groups, key_groups=key_groups, exclude_self=exclude_self,
                false_negative_margin=false_negative_margin, decoupled=decoupled, hardness=hardness,
                matryoshka_dims=None if prefixes is None else prefixes.dims,
                matryoshka_weights=None if prefixes is None else prefixes.weights,
                matryoshka_normalize=matryoshka_normalize)
        return in_accumulation_dtype(out, query.dtype)
    if prefixes is not None:
        if labels is None:
            labels = comm.default_labels(n, query.device)
        rq = rk = None
        if prefixes.normalize:  # outside the Function: autograd takes their gradients back to query and key
            rq, rk = _matryoshka.inverse_norms(query, prefixes.dims), _matryoshka.inverse_norms(key, prefixes.dims)
        options = InfoNCEOptions(symmetric, float(label_smoothing), reduction, name, matryoshka=prefixes)
        return InfoNCEFunction.apply(query, key, scale, labels.long(), options, comm, None, rq, rk)
    if rule is not None:  # labels are the case of one positive per query: the keys are their own groups
        if groups:
            labels, key_groups = query_groups.long(), comm.gather_keys(key_groups.long())
        else:
            labels = comm.default_labels(n, query.device) if labels is None else labels.long()
            key_groups = torch.arange(comm.total_keys(m), device=query.device)
        options = InfoNCEOptions(symmetric, 0.0, reduction, name, False, rule)
        return InfoNCEFunction.apply(query, key, scale, labels, options, comm, key_groups)
    if labels is None:
        labels = comm.default_labels(n, query.device)
    keep = comm.is_local and name == "chunked" and _chunked.keeps_logits(
        n, m, accumulation_dtype(query.dtype).itemsize)
    options = InfoNCEOptions(symmetric, float(label_smoothing), reduction, name, keep)
    return InfoNCEFunction.apply(query, key, scale, labels.long(), options, comm)


def target_rule(groups: bool, symmetric: bool, exclude_self, margin, decoupled, hardness, label_smoothing,
                 reduction) -> TargetRule | None:
    """The structured-target rule of a call, checked (errors name the argument); None when every option is at its
    default (labels only).  ``groups``: query_groups/key_groups were given."""
    if not groups and exclude_self is False and margin is None and decoupled is False and type(hardness) is float \
            and hardness == 0.0:
        return None  # every option at its default (the common case, in one test)
    for name, value in (("exclude_self", exclude_self), ("decoupled", decoupled)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise TypeError(f"false_negative_margin must be a float or None, got {type(margin).__name__}")
        if not margin >= 0 or margin == float("inf"):
            raise ValueError(f"false_negative_margin must be a finite number >= 0, got {margin}")
    if isinstance(hardness, bool) or not isinstance(hardness, (int, float)):
        raise TypeError(f"hardness must be a float, got {type(hardness).__name__}")
    if not hardness >= 0 or hardness == float("inf"):
        raise ValueError(f"hardness must be a finite number >= 0, got {hardness}")
    if not (groups or exclude_self or margin is not None or decoupled or hardness):
        return None
    if label_smoothing:
        raise ValueError("label_smoothing is not supported together with query_groups/key_groups, exclude_self, "
                         "false_negative_margin, decoupled or hardness")
    if groups and symmetric and reduction == "none":
        raise ValueError("reduction='none' with query_groups/key_groups and symmetric=True is not defined (row terms "
                         "are per query, column terms per key): use symmetric=False, or 'mean' / 'sum'")
    return TargetRule(exclude_self=exclude_self, decoupled=decoupled, hardness=float(hardness),
                      margin=None if margin is None else float(margin))


__all__ = ["InfoNCEFunction", "InfoNCEOptions", "Matryoshka", "TargetRule", "info_nce", "target_rule"]
