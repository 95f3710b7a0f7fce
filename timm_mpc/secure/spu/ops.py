"""Secure operators for the SPU engine, with the signatures of :mod:`..crypten.ops`: each is one JAX function compiled by SPU,
so it uses SPU's own approximations (exp, Goldschmidt reciprocal, inverse square root, erf).

CrypTen's Newton schedules (iteration counts, input scales for the reciprocal) do not apply: SPU normalizes the
inputs of its reciprocal and inverse square root by their bit length itself. The LayerNorm's calibrated public
scale is kept: it lifts a small variance off the fixed-point floor before squaring, as with CrypTen.
"""
from typing import Any, Optional

from ..approximations import GELU_TAIL_A, GELU_TAIL_B
from ..settings import SecureSettings
from .runtime import static_key

__all__ = ['linear', 'layer_norm', 'reciprocal', 'softmax', 'gelu', 'quad_gelu', 'relu', 'silu']


def _run(key: tuple, fn: Any, *inputs: Any) -> Any:
    inputs = [x for x in inputs if x is not None]
    return inputs[0].session.run(key, fn, inputs)[0]


def linear(x, weight_t, bias=None):
    """``x @ weight_t + bias`` with ``weight_t`` of shape ``(in, out)``."""
    if bias is None:
        return x.matmul(weight_t)
    return _run(('linear',), lambda a, w, b: a @ w + b, x, weight_t, bias)


def layer_norm(x, weight, bias, eps: float, settings: Optional[SecureSettings] = None, var_scale: float = 1.0,
               iters: int = 3):
    """LayerNorm over the last dimension; the centred values are scaled by the public ``var_scale ** -0.5``
    before they are squared (``iters`` is CrypTen's and unused)."""
    import jax
    pre = var_scale ** -0.5
    has_weight, has_bias = weight is not None, bias is not None

    def fn(a, *affine):
        centred = a - a.mean(-1, keepdims=True)
        z = centred * pre
        inv = jax.lax.rsqrt((z * z).mean(-1, keepdims=True) + eps / var_scale) * pre
        y = centred * inv
        if has_weight:
            y = y * affine[0]
        return y + affine[-1] if has_bias else y
    return _run(('layer_norm', eps, pre, has_weight, has_bias), fn, x, weight, bias)


def reciprocal(d, iters: int = 0, scale: float = 1.0):
    """``1 / d`` (SPU's Goldschmidt division; CrypTen's ``iters`` and ``scale`` are unused)."""
    return d.reciprocal()


def softmax(scores, iters: int = 0, scale: float = 1.0, keep: Any = None):
    """Softmax over the last dimension: row max, SPU's exp, and its division. Keys where the public 0/1 ``keep`` is
    0 get weight 0: lowered by 100 so as not to be the row's max, and their exp (whatever SPU's approximation gives
    so far out) multiplied by 0."""
    import jax
    if keep is None:
        return _run(('softmax',), lambda s: jax.nn.softmax(s, axis=-1), scores)
    mask = keep.detach().numpy().astype('float32')

    def masked(s):
        s = s + (mask - 1) * 100.0
        e = jax.numpy.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))) * mask
        return e / e.sum(axis=-1, keepdims=True)
    return _run(('softmax', static_key(keep)), masked, scores)


def gelu(x, settings: Optional[SecureSettings] = None, exp_iterations: Optional[int] = None):
    """Exact GeLU: ``exp_fit`` (default; ReLU minus the fitted Gaussian tail of :func:`.ops.gelu`, with SPU's exp)
    or SPU's ``erf`` (far more rounds and bytes)."""
    import jax
    if settings is not None and settings.gelu == 'erf':
        return _run(('gelu', 'erf'), lambda a: jax.nn.gelu(a, approximate=False), x)

    def exp_fit(a):
        relu = jax.numpy.maximum(a, 0)
        abs_a = 2 * relu - a
        return relu - 0.5 * abs_a * jax.numpy.exp(-GELU_TAIL_A * abs_a - GELU_TAIL_B * a * a)
    return _run(('gelu', 'exp_fit'), exp_fit, x)


def silu(x, settings: Optional[SecureSettings] = None):
    """SiLU ``x · sigmoid(x)``, the sigmoid as ``1 / (1 + exp(-|x|))`` mirrored for negative inputs (SPU's exp of a
    non-positive value stays in range; its own logistic defaults to a coarse approximation)."""
    import jax

    def fn(a):
        positive = a >= 0
        s = 1 / (1 + jax.numpy.exp(-jax.numpy.where(positive, a, -a)))
        return a * jax.numpy.where(positive, s, 1 - s)
    return _run(('silu',), fn, x)


def quad_gelu(x, settings: Optional[SecureSettings] = None):
    """MPCFormer's ``0.125x² + 0.5x + 0.25``."""
    return _run(('quad_gelu',), lambda a: 0.125 * a * a + 0.5 * a + 0.25, x)


def relu(x, settings: Optional[SecureSettings] = None):
    return x.relu()
