"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) with a message
that names the argument and, where it helps, the shapes involved.  Value checks on CUDA tensors use
``torch._assert_async`` so that validating never forces a host sync.
"""

from __future__ import annotations

import functools
import numbers

import torch

REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_float_tensor(name: str, t, ndim: int | None = None) -> None:
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and (ndim is None or t.dim() == ndim) and t.numel():
        return  # valid (the common case, in one test)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_shape(t)}")


def matrices_ok(tensors, same_shape: bool = False) -> bool:
    """True when every tensor is a non-empty 2-D float tensor of the first one's dtype and device (and its shape,
    with ``same_shape``): valid multi-tensor input passes in one test (a per-call cost that small batches
    notice), and False sends the caller through its checks, which name what is wrong."""
    t0 = tensors[0]
    if not (isinstance(t0, torch.Tensor) and t0.dtype.is_floating_point and t0.dim() == 2 and t0.numel()):
        return False
    dtype, device, shape = t0.dtype, t0.device, t0.shape
    for t in tensors[1:]:
        if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == device
                and (t.shape == shape if same_shape else t.dim() == 2 and t.numel())):
            return False
    return True


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    (n0, t0) = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n0} and {name} must be on the same device, got {t0.device} and {t.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{n0} and {name} must have the same dtype, got {t0.dtype} and {t.dtype}")


def _value_check(cond: torch.Tensor, message) -> None:
    """Raise unless the boolean 0-dim tensor ``cond`` holds, without reading it back to the host.

    ``torch._assert_async``: on CUDA (and under ``torch.compile``) a device-side assert, so no host sync (the error
    surfaces as a RuntimeError at the next synchronisation); on the CPU it checks at once, and the error is
    re-raised as the ValueError it is.  ``message``: a string, or a function that makes it (formatted on the
    CPU only when the check fails: printing a tensor's value costs more than the check)."""
    if cond.device.type == "cpu" and not torch.compiler.is_compiling():
        try:
            torch._assert_async(cond)
        except RuntimeError:
            raise ValueError(message() if callable(message) else message) from None
    else:
        torch._assert_async(cond, message() if callable(message) else message)


def check_labels(labels, n: int, num_classes: int, device: torch.device) -> None:
    """`labels` must be an integer tensor of shape [n] with values in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one positive key per query), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as query ({device}), got {labels.device}")
    _value_check(
        (labels.min() >= 0) & (labels.max() < num_classes),
        f"labels must lie in [0, {num_classes}) (the number of keys), got values outside that range",
    )


def check_groups(name: str, groups, n: int, device: torch.device, of: str) -> None:
    """Group ids (``query_groups`` / ``key_groups``): an integer tensor of shape ``[n]`` (one id per row of ``of``)
    on ``device``.  Any integer values; two rows are positives of each other iff their ids are equal."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer group ids, got {type(groups).__name__}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {groups.dtype}")
    if groups.dim() != 1 or groups.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one group id per row of {of}), got {_shape(groups)}")
    if groups.device != device:
        raise ValueError(f"{name} must be on the same device as {of} ({device}), got {groups.device}")


def check_query_key_groups(query_groups, key_groups, n: int, m: int, device: torch.device, labels) -> bool:
    """``query_groups`` and ``key_groups`` come together, never with ``labels``; True when they are given."""
    if query_groups is None and key_groups is None:
        return False
    if query_groups is None or key_groups is None:
        missing = "key_groups" if key_groups is None else "query_groups"
        raise ValueError(f"query_groups and key_groups go together: {missing} is missing")
    if labels is not None:
        raise ValueError("labels and query_groups/key_groups are mutually exclusive: groups already say which keys "
                         "are each query's positives (give labels as query_groups=labels, "
                         "key_groups=torch.arange(M) if that is what you mean)")
    check_groups("query_groups", query_groups, n, device, "query")
    check_groups("key_groups", key_groups, m, device, "key")
    return True


def check_positives(labels, n: int, m: int, device: torch.device, rows: str, cols: str, col_noun: str) -> None:
    """The positive of each of ``n`` rows among ``m`` candidates: ``labels`` checked when given; without
    labels the positive of row i is candidate i, which needs ``n <= m``."""
    if labels is None:
        if n > m:
            raise ValueError(
                f"{rows} has more rows than {cols} ({n} > {m}): pass labels to say which {col_noun} is each "
                "query's positive"
            )
        return
    check_labels(labels, n, m, device)


def resolve_scale(logit_scale, temperature, device: torch.device, prefix: str = "") -> torch.Tensor:
    """Return the multiplicative logit scale s as a 0-dim tensor on `device`.

    ``temperature=τ`` means ``s = 1/τ`` (and its gradient flows back to τ when it is a tensor); neither given
    means ``s = 1``.  ``prefix`` names the arguments in errors (``"teacher_"``: ``teacher_logit_scale``...).
    """
    if temperature is None:
        return _scalar(prefix + "logit_scale", 1.0 if logit_scale is None else logit_scale, device)
    temp_name = prefix + "temperature"
    if logit_scale is not None:
        raise ValueError(f"give either {prefix}logit_scale or {temp_name}, not both ({temp_name}=t means "
                         f"{prefix}logit_scale=1/t)")
    if _is_number(temperature) and not torch.compiler.is_compiling():  # checked here, no tensor op
        if not float(temperature) > 0:
            raise ValueError(f"{temp_name} must be positive, got {temperature}")
        return _constant(1.0 / float(temperature), device)
    t = _scalar(temp_name, temperature, device)
    _value_check(t > 0, lambda: f"{temp_name} must be positive, got {_shown(temperature, t)}")
    return 1.0 / t


def _is_number(value) -> bool:
    return type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)))


@functools.lru_cache(maxsize=256)
def _constant(value: float, device: torch.device) -> torch.Tensor:
    """The 0-dim float64 tensor of a Python number, made once per (value, device) and shared: a scale given as
    a float costs no tensor creation per call (a fixed cost that matters for small batches).  Nothing writes
    to it (no in-place op on a scale anywhere), and it needs no gradient."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def _shown(value, t: torch.Tensor):
    """``value`` for an error message, when printing it needs no device sync (nor a graph break in compile)."""
    if t.device.type != "cpu" or (isinstance(value, torch.Tensor) and torch.compiler.is_compiling()):
        return "a non-positive value"
    return value


def _scalar(name: str, value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype.is_floating_point and value.device == device:
            return value  # as given: no view node in the graph (a per-call cost for small problems)
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {_shape(value)}")
        if value.device != device and value.dim() != 0:
            raise ValueError(f"{name} must be on {device} (or be a 0-dim tensor), got {value.device}")
        return value.reshape(()).to(device)
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    # float64 so that a Python float loses nothing with float64 inputs; it is cast to the compute dtype later.
    if torch.compiler.is_compiling():  # a fresh constant in the traced graph
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    return _constant(float(value), device)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing) -> None:
    if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:  # the common case, without the ABC check
        return
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def check_choice(name: str, value, choices: tuple) -> None:
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_token_mask(name: str, mask, shape: tuple, device: torch.device, of: str) -> None:
    """A boolean token mask of exactly ``shape`` ([N, L] of the tensor ``of``), on ``device``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = valid token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the first two dims of {of}), got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the same device as {of} ({device}), got {mask.device}")


def check_token_weights(name: str, weights, shape: tuple, device: torch.device, of: str) -> None:
    """Per-token float weights of exactly ``shape`` ([N, L] of the tensor ``of``), on ``device``."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a float torch.Tensor of shape {shape} or None, got {type(weights).__name__}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {weights.dtype}")
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the first two dims of {of}), got {_shape(weights)}")
    if weights.device != device:
        raise ValueError(f"{name} must be on the same device as {of} ({device}), got {weights.device}")


def check_query_key(query, key) -> None:
    """The two-tower inputs: 2-D float tensors of one dtype and device with the same feature dimension D."""
    # Valid input passes one combined test (a per-call cost that small batches notice); anything else goes
    # through the checks below, which name what is wrong.
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dtype == key.dtype
            and query.dtype.is_floating_point and query.dim() == 2 and key.dim() == 2
            and query.shape[1] == key.shape[1] and query.shape[0] and key.shape[0] and query.shape[1]
            and query.device == key.device):
        return
    check_float_tensor("query", query, ndim=2)
    check_float_tensor("key", key, ndim=2)
    check_same_dtype_device(query=query, key=key)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query and key must have the same feature dimension D, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )


def distinct_inputs(tensors) -> list:
    """The tensors, each one passed more than once replaced by a view of itself after its first place: the same
    values and gradients (autograd sums them into the tensor), but distinct inputs of ``Function.apply``, which
    torch.compile does not trace with a repeated tensor (e.g. ``symile_loss(x, y, x)``)."""
    out = []
    for t in tensors:
        out.append(t.view_as(t) if any(t is u for u in out) else t)
    return out
