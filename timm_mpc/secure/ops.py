"""Secure operators on CrypTen tensors: what a ViT needs beyond CrypTen's own functions.

Each takes and returns ``crypten.CrypTensor``; public constants are plain Python numbers. Where two
multiplications do not depend on each other they are stacked into one, so they cost one round.
"""
import math
from typing import Any, Dict, Optional, Tuple

import torch

from .settings import SecureSettings

__all__ = [
    'linear', 'layer_norm', 'inv_sqrt', 'inv_sqrt_domain', 'reciprocal', 'softmax', 'gelu', 'quad_gelu', 'relu', 'silu',
    'newton_schedule', 'gelu_exp_iterations', 'gelu_bound', 'INV_SQRT_DOMAIN', 'INV_SQRT_CUBIC', 'RECIPROCAL_DOMAIN',
    'GELU_TAIL_A', 'GELU_TAIL_B', 'GELU_MAX_EXP_ITERATIONS', 'reveal_to',
]

# GELU(x) = relu(x) - |x| * Phi(-|x|), and |x| * Phi(-|x|) ≈ 0.5 |x| exp(-A |x| - B x²): a two-parameter
# minimax fit of the Gaussian tail on [0, 12] (max error 7.8e-4; 1.5e-3 with an 8-squaring exp).
GELU_TAIL_A = 0.76079453
GELU_TAIL_B = 0.39000894
GELU_MAX_EXP_ITERATIONS = 12  # beyond, 1 + z / 2^k loses the exponent's precision in 16 fractional bits


def gelu_bound(exp_iterations: int) -> float:
    """Largest |x| whose Gaussian-tail exponent ``-A|x| - Bx²`` the limit exp with ``exp_iterations`` squarings
    takes (it needs ``1 + z / 2^k > 0``)."""
    domain = 2.0 ** exp_iterations
    return (-GELU_TAIL_A + math.sqrt(GELU_TAIL_A ** 2 + 4 * GELU_TAIL_B * domain)) / (2 * GELU_TAIL_B)


def gelu_exp_iterations(abs_max: float, min_iters: int) -> Optional[int]:
    """The fewest squarings (at least ``min_iters``) under which secure GeLU covers inputs up to ``abs_max``,
    or None beyond :data:`GELU_MAX_EXP_ITERATIONS`."""
    for iters in range(min_iters, GELU_MAX_EXP_ITERATIONS + 1):
        if abs_max < gelu_bound(iters):
            return iters
    return None


def _crypten() -> Any:
    from .crypten_compat import import_crypten
    return import_crypten()


def _mul_pairs(settings: SecureSettings, *pairs):
    """Products of ``(a, b)`` pairs of equal shape: one stacked multiplication (one round) when batching."""
    if settings.batch_independent and len(pairs) > 1:
        crypten = _crypten()
        out = crypten.stack([a for a, _ in pairs]) * crypten.stack([b for _, b in pairs])
        return [out[i] for i in range(len(pairs))]
    return [a * b for a, b in pairs]


def linear(x, weight_t, bias=None):
    """``x @ weight_t + bias`` with ``weight_t`` of shape ``(in, out)``: one round."""
    y = x.matmul(weight_t)
    return y + bias if bias is not None else y


# Where CrypTen's Newton iterations (with CrypTen's exp-based first guess) are accurate to 0.2%:
# iterations -> (lowest, highest) input. Emulated in float64; tests/test_secure_ops.py re-derives them.
INV_SQRT_DOMAIN = {3: (0.118, 6.96), 4: (0.0579, 167.0), 5: (0.0269, 180.0), 6: (0.0122, 188.0),
                   7: (0.00546, 194.0), 8: (0.00244, 197.0), 9: (0.00108, 200.0), 10: (0.000481, 201.0),
                   11: (0.000215, 202.0), 12: (9.55e-05, 203.0)}
RECIPROCAL_DOMAIN = {4: (0.0431, 1.95), 5: (0.0228, 2.34), 6: (0.0117, 2.76), 7: (0.00591, 3.24),
                     8: (0.00298, 3.87), 9: (0.00149, 252.0), 10: (0.000745, 252.0), 11: (0.000373, 252.0),
                     12: (0.000187, 252.0), 13: (9.33e-05, 252.0), 14: (4.68e-05, 252.0)}


def newton_schedule(low: Optional[float], high: float, domain: Dict[int, Tuple[float, float]], min_iters: int,
                    power: int = 4) -> Tuple[float, int]:
    """A public input scale (a power of ``power``) and the fewest Newton iterations (at least ``min_iters``)
    under which inputs in ``[low, high]`` fall in the method's accurate domain.

    The scale puts ``high`` just under the domain's top; iterations are added until the bottom is covered
    (up to the table's largest count). Values under a millionth of ``high`` are not covered: there the
    result is multiplied by a numerator as small.
    """
    low = max(low or 0.0, high * 1e-6)  # below a millionth of the top the value no longer matters
    for iters in sorted(domain):
        if iters < min_iters:
            continue
        lo, hi = domain[iters]
        scale = power ** math.ceil(math.log(high / (0.9 * hi), power))
        if low / scale >= lo:
            return scale, iters
    iters = max(domain)
    return power ** math.ceil(math.log(high / (0.9 * domain[iters][1]), power)), iters


# The 'cubic' inverse square root: a cubic first guess (least squares of the relative error against x^-1/2 on
# a range ending at 16, fitted per iteration count; from 5 iterations on, the slow first phase of Newton's
# method covers the small inputs) and Newton iterations y <- 1.5y - 0.5xy^3 of two rounds each: 2 rounds for
# x^2 and x^3 and 2 per iteration, against CrypTen's 8 for its exp-based guess and 3 per iteration.
# iterations -> (lowest, highest input accurate to 0.2%, coefficients of x^3, x^2, x, 1). Emulated in fixed
# point; tests/test_secure_ops.py re-derives the ranges.
_CUBIC_GUESS = {2: (-0.000599343, 0.0194744, -0.213696, 1.10138), 3: (-0.00113683, 0.0346919, -0.340891, 1.39333),
                4: (-0.00165286, 0.0491981, -0.460175, 1.65686), 5: (-0.00217255, 0.0647025, -0.594469, 1.96596)}
INV_SQRT_CUBIC = {iters: (low, 16.0, _CUBIC_GUESS[min(iters, 5)]) for iters, low in (
    (2, 0.814), (3, 0.255), (4, 0.0864), (5, 0.0284), (6, 0.0129), (7, 0.00581), (8, 0.00259), (9, 0.00116),
    (10, 0.000514), (11, 0.000228), (12, 0.000102))}


def inv_sqrt_domain(method: str) -> Dict[int, Tuple[float, float]]:
    """Iterations -> accurate input range of the inverse square root ``method`` (see :data:`INV_SQRT_METHODS`)."""
    if method == 'crypten':
        return INV_SQRT_DOMAIN
    return {iters: (low, high) for iters, (low, high, _) in INV_SQRT_CUBIC.items()}


def inv_sqrt(v, iters: int, settings: SecureSettings):
    """``1 / sqrt(v)`` for positive ``v`` with ``iters`` Newton iterations, from the first guess that
    ``settings.inv_sqrt`` names: CrypTen's exp-based one, or the cubic of :data:`INV_SQRT_CUBIC`."""
    if settings.inv_sqrt == 'crypten':
        crypten = _crypten()
        with crypten.cfg.temp_override({'functions.sqrt_nr_iters': iters}):
            return v.inv_sqrt()
    c3, c2, c1, c0 = INV_SQRT_CUBIC[iters][2]
    square = v.square()
    y = (v * square).mul(c3) + square.mul(c2) + v.mul(c1) + c0
    for _ in range(iters):  # y <- 1.5y - 0.5 v y^3: y^2 and v·y together, then their product
        y_squared, vy = _mul_pairs(settings, (y, y), (v, y))
        y = y.mul(1.5) - (vy * y_squared).mul(0.5)
    return y


def reciprocal(d, iters: int, scale: float = 1.0):
    """``1 / d`` for positive ``d`` (``scale`` and ``iters`` from :func:`newton_schedule`)."""
    crypten = _crypten()
    with crypten.cfg.temp_override({'functions.reciprocal_all_pos': True, 'functions.reciprocal_nr_iters': iters}):
        if scale == 1.0:
            return d.reciprocal()
        return d.mul(1 / scale).reciprocal().mul(1 / scale)


def softmax(scores, iters: int, scale: float = 1.0, keep: Any = None):
    """Softmax over the last dimension: row max, exp, and a reciprocal of the sum, which lies in [1, N]. Keys where
    the public 0/1 ``keep`` is 0 get weight 0 (and never the row's max: they are lowered by 100 first, as timm's
    Swin masks them, within the range where the exp's limit approximation stays in [0, 1])."""
    if keep is not None:
        scores = scores + (keep - 1) * 100.0
    shifted = scores - scores.max(-1, keepdim=True)[0]
    numer = shifted.exp()
    if keep is not None:
        numer = numer * keep
    return numer * reciprocal(numer.sum(-1, keepdim=True), iters, scale)


def layer_norm(x, weight, bias, eps: float, settings: SecureSettings, var_scale: float = 1.0, iters: int = 3):
    """LayerNorm over the last dimension: mean, variance, inverse square root.

    ``var_scale`` and ``iters`` come from :func:`newton_schedule` on the calibrated variance range. The
    scaling is applied to the centred values before they are squared (by ``var_scale ** -0.5``, a power
    of 2), so a small variance keeps its relative precision in fixed point.
    """
    centred = x - x.mean(-1, keepdim=True)
    pre = var_scale ** -0.5
    z = centred if pre == 1.0 else centred.mul(pre)
    if weight is not None and settings.batch_independent:
        # the square for the variance and the scaling by weight do not depend on each other
        squared, scaled = _mul_pairs(settings, (z, z), (centred, weight.expand(centred.size())))
    else:
        squared, scaled = z.square(), centred
    inv = inv_sqrt(squared.mean(-1, keepdim=True) + eps / var_scale, iters, settings)
    if pre != 1.0:
        inv = inv.mul(pre)
    y = scaled * inv
    if weight is not None and not settings.batch_independent:
        y = y * weight
    return y + bias if bias is not None else y


def relu(x, settings: Optional[SecureSettings] = None):
    return x.relu()


def silu(x, settings: Optional[SecureSettings] = None):
    """SiLU ``x · sigmoid(x)`` (the gate of EVA-02's SwiGLU): CrypTen's sigmoid (a comparison, then the exp of
    ``-|x|`` and a reciprocal on [1, 2]) and one product."""
    return x * x.sigmoid()


def quad_gelu(x, settings: Optional[SecureSettings] = None):
    """MPCFormer's ``0.125x² + 0.5x + 0.25``: one round."""
    return x.square().mul(0.125) + x.mul(0.5) + 0.25


def gelu(x, settings: SecureSettings, exp_iterations: Optional[int] = None):
    """Exact (erf) GeLU, securely: ``exp_fit`` (default; ``exp_iterations`` squarings of its exp, by default
    ``settings.gelu_exp_iterations``) or CrypTen's Taylor ``erf``."""
    if settings.gelu == 'erf':
        crypten = _crypten()
        with crypten.cfg.temp_override({'functions.erf_iterations': settings.erf_iterations}):
            return x * (x.div(math.sqrt(2)).erf() + 1).mul(0.5)
    positive = x.ge(0)
    if settings.batch_independent:
        # a comparison yields integer bits (scale 1); stacking needs x's fixed-point scale
        positive = positive * int(x.encoder.scale)
        positive.encoder = x.encoder
    relu_x, square = _mul_pairs(settings, (x, positive), (x, x))
    abs_x = relu_x.mul(2) - x
    exponent = abs_x.mul(-GELU_TAIL_A) - square.mul(GELU_TAIL_B)
    crypten = _crypten()
    with crypten.cfg.temp_override({'functions.exp_iterations': exp_iterations or settings.gelu_exp_iterations}):
        tail = abs_x * exponent.exp()
    return relu_x - tail.mul(0.5)


def reveal_to(x: Any, dst: int, comm: Any) -> Optional[torch.Tensor]:
    """Open the secret-shared ``x`` to party ``dst`` only: the other party sends its share point to point.

    CrypTen's ``get_plain_text(dst=...)`` goes through ``torch.distributed.reduce``, which gloo runs as a ring
    reduce-scatter and gather: the non-receiving party keeps a fully reduced chunk (about half of the values).
    """
    share = x.share.contiguous()
    if comm.get_rank() != dst:
        comm.send(share, dst)
        return None
    return x.encoder.decode(share + comm.recv(torch.empty_like(share), src=1 - dst))
