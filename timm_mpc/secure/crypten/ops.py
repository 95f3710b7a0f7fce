"""Secure operators on CrypTen tensors: what a ViT needs beyond CrypTen's own functions.

Each takes and returns ``crypten.CrypTensor``; public constants are plain Python numbers. Where two
multiplications do not depend on each other they are stacked into one, so they cost one round.
"""
import math
from typing import Any, Optional

import torch

from ..approximations import (GELU_SPLINE, GELU_SPLINE_RESOLUTION_BITS, GELU_SPLINE_THRESHOLDS, GELU_TAIL_A,
                              GELU_TAIL_B, INV_SQRT_CUBIC, RECIPROCAL_DOMAIN, gelu_spline_bits, inv_sqrt_domain)
from ..settings import SecureSettings
from .comparison import fss_comparisons_in_use, less_than

__all__ = ['linear', 'layer_norm', 'inv_sqrt', 'reciprocal', 'softmax', 'gelu', 'quad_gelu', 'relu', 'silu', 'reveal_to']


def _crypten() -> Any:
    from .compat import import_crypten
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


def inv_sqrt(v, iters: int, settings: SecureSettings):
    """``1 / sqrt(v)`` for positive ``v`` with ``iters`` Newton iterations, from the first guess that
    ``settings.inv_sqrt`` names: CrypTen's exp-based one, or the cubic of :data:`INV_SQRT_CUBIC`. With comparisons by
    the dealer's keys, from a guess by comparisons across that domain and one iteration (:data:`INV_SQRT_LADDER`)."""
    if fss_comparisons_in_use() and iters in inv_sqrt_domain(settings.inv_sqrt):
        step, newton = INV_SQRT_LADDER
        y = _ladder_guess(v, *inv_sqrt_domain(settings.inv_sqrt)[iters], step, -0.5)
        for _ in range(newton):
            y = _newton_inv_sqrt(v, y, settings)
        return y
    if settings.inv_sqrt == 'crypten':
        crypten = _crypten()
        with crypten.cfg.temp_override({'functions.sqrt_nr_iters': iters}):
            return v.inv_sqrt()
    c3, c2, c1, c0 = INV_SQRT_CUBIC[iters][2]
    square = v.square()
    y = (v * square).mul(c3) + square.mul(c2) + v.mul(c1) + c0
    for _ in range(iters):
        y = _newton_inv_sqrt(v, y, settings)
    return y


def _newton_inv_sqrt(v, y, settings: SecureSettings):
    """One Newton iteration of ``v^-1/2``, ``y <- 1.5y - 0.5 v y^3``: ``y^2`` and ``v·y`` together, then their product."""
    y_squared, vy = _mul_pairs(settings, (y, y), (v, y))
    return y.mul(1.5) - (vy * y_squared).mul(0.5)


RECIPROCAL_LADDER = (2 ** 0.125, 2)
"""The reciprocal's first guess by comparisons: thresholds an eighth of an octave apart (within each interval the guess
is within 4.4% of ``1 / d``), then two Newton iterations (to 4e-6). One would reach 2e-3, but always below ``1 / d``
and by an amount that depends on where ``d`` falls in its interval: enough to flip a near-tie's top-1."""
INV_SQRT_LADDER = (2 ** 0.0625, 1)
"""LayerNorm's inverse square root: thresholds a sixteenth of an octave apart (the guess within 1.1% of ``d^-1/2``),
then one Newton iteration (to 2e-4, as close as a second gets at 16 fractional bits)."""
LADDER_HEADROOM_BITS = 8
"""The ladders compare values of up to 2^8 times their domain's top exactly (beyond it, Newton's method diverges as it
does without them): the bit width of their comparisons."""
LADDER_OCTAVES_BEYOND = (4, 4)
"""How far a ladder's thresholds go below its domain's bottom and above its top (the calibrated range with its margin):
values an image takes beyond the calibration images' still get a guess within the step, not the edge's. Not further
down: there the guess, and its square in the Newton iteration, would grow large enough to make a failed truncation
likely, for values whose numerator is as small (a ReLU-Softmax row of zeros)."""


def _by_interval(x, below, values):
    """The value of each element's interval, from this party's shares of ``[x < t]`` for increasing thresholds
    (``below``) and a public value per interval (``values``, one more than the thresholds; a tuple of values gives one
    tensor per position): ``v_last - sum_j [x < t_j] (v_j+1 - v_j)``, linear in the comparison bits. ``x``'s
    fixed-point precision."""
    from crypten import communicator as comm
    from crypten.mpc import MPCTensor
    scale = x.encoder.scale
    out = []
    for column in zip(*values):
        share = torch.zeros(x.size(), dtype=torch.int64)
        if comm.get().get_rank() == 0:
            share += int(round(column[-1] * scale))
        for bit, v, v_next in zip(below, column, column[1:]):  # encoded steps telescope: exactly v_0 below all
            share -= bit * (int(round(v_next * scale)) - int(round(v * scale)))
        out.append(MPCTensor.from_shares(share, precision=x.encoder._precision_bits))
    return out


def _ladder_guess(d, low: float, high: float, step: float, power: float):
    """A first guess of ``d ** power`` for ``d`` in ``[low, high]`` by comparisons with the dealer's keys: ``[d < t]``
    for thresholds ``step`` apart (one opening; every threshold is local work on the same keys), and in each interval
    the power of its geometric mean (below the first threshold, of the first; above the last, of half a step beyond
    it), linear in the comparison bits; comparisons of the width :data:`LADDER_HEADROOM_BITS` gives. One round.

    The thresholds reach :data:`LADDER_OCTAVES_BEYOND` below ``low`` and above ``high``: an input outside the
    calibrated domain (an image unlike the calibration images) still starts within a step of its value, where one
    Newton iteration suffices; from the domain's edge it would not (a guess 4x off leaves 56% after one iteration)."""
    below, above = LADDER_OCTAVES_BEYOND
    first = max(low / 2.0 ** below, 2.0 ** -d.encoder._precision_bits)  # no positive fixed-point value lies below
    last = high * 2.0 ** above
    thresholds = [first * step ** k for k in range(max(1, math.ceil(math.log(last / first, step))) + 1)]
    guesses = ([thresholds[0] ** power] + [math.sqrt(a * b) ** power for a, b in zip(thresholds, thresholds[1:])]
               + [(thresholds[-1] * math.sqrt(step)) ** power])
    bits = min(64, math.ceil(math.log2(high)) + LADDER_HEADROOM_BITS + d.encoder._precision_bits + 1)
    return _by_interval(d, less_than(d, thresholds, bits), [(g,) for g in guesses])[0]


def reciprocal(d, iters: int, scale: float = 1.0):
    """``1 / d`` for positive ``d`` (``scale`` and ``iters`` from :func:`newton_schedule`). With comparisons by the
    dealer's keys, from a first guess by comparisons across the domain those give (:func:`_ladder_guess`) and the
    iterations of :data:`RECIPROCAL_LADDER`: 5 rounds, where CrypTen's exp-based guess takes 8 and its Newton iterations
    2 each."""
    if fss_comparisons_in_use() and iters in RECIPROCAL_DOMAIN:
        scaled = d if scale == 1.0 else d.mul(1 / scale)
        step, newton = RECIPROCAL_LADDER
        y = _ladder_guess(scaled, *RECIPROCAL_DOMAIN[iters], step, -1.0)
        for _ in range(newton):
            y = y.mul(2) - y.square() * scaled
        return y if scale == 1.0 else y.mul(1 / scale)
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
    shifted = scores - row_max(scores)
    numer = shifted.exp()
    if keep is not None:
        numer = numer * keep
    return numer * reciprocal(numer.sum(-1, keepdim=True), iters, scale)


def row_max(x):
    """The maximum over the last dimension (kept). With comparisons by the dealer's keys, a tree of pairwise maxima
    ``b + relu(a - b)``: two rounds a level. CrypTen's ``max`` (its ``max_method``) also computes the one-hot argmax,
    whose equality tests run on binary shares: kept for CrypTen's own comparisons, where the figures were measured."""
    if not fss_comparisons_in_use():
        return x.max(-1, keepdim=True)[0]
    crypten = _crypten()
    while x.size(-1) > 1:
        half = x.size(-1) // 2
        a, b = x[..., :half], x[..., half:2 * half]
        pairs = b + (a - b).relu()
        x = crypten.cat([pairs, x[..., 2 * half:]], dim=-1) if x.size(-1) % 2 else pairs
    return x


def layer_norm(x, weight, bias, eps: float, settings: SecureSettings, var_scale: float = 1.0, iters: int = 3):
    """LayerNorm over the last dimension: mean, variance, inverse square root.

    ``var_scale`` and ``iters`` come from :func:`newton_schedule` on the calibrated variance range. The
    scaling is applied to the centred values before they are squared (by ``var_scale ** -0.5``, a power
    of 2), so a small variance keeps its relative precision in fixed point.
    """
    centred = x - x.mean(-1, keepdim=True)
    pre = var_scale ** -0.5
    z = centred if pre == 1.0 else centred.mul(pre)
    weighted = weight is not None and (fss_comparisons_in_use() or settings.batch_independent)
    if weighted and fss_comparisons_in_use():  # the new protocol: the weight opened at its own size
        squared, scaled = _square_and_product(z, centred, weight)
    elif weighted:  # the square for the variance and the scaling by weight do not depend on each other
        squared, scaled = _mul_pairs(settings, (z, z), (centred, weight.expand(centred.size())))
    else:
        squared, scaled = z.square(), centred
    inv = inv_sqrt(squared.mean(-1, keepdim=True) + eps / var_scale, iters, settings)
    if pre != 1.0:
        inv = inv.mul(pre)
    y = scaled * inv
    if weight is not None and not weighted:
        y = y * weight
    return y + bias if bias is not None else y


def _square_and_product(z, x, w):
    """``z²`` and ``x · w`` (``w`` broadcast over ``x``) in one round: CrypTen's square (``z - r`` opened) and a Beaver
    product whose triple has ``w``'s own size, so that ``w - b`` opens at that size and not expanded to ``x``'s (what
    stacking the two products costs): half the bytes of a LayerNorm's first round."""
    import crypten
    from crypten import communicator as comm
    from crypten.mpc import MPCTensor
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    provider = crypten.mpc.get_default_provider()
    r, r2 = provider.square(z.size(), device=z.device)
    a, b, c = provider.generate_additive_triple(x.size(), w.size(), 'mul', device=x.device)
    epsilon_z, epsilon, delta = ArithmeticSharedTensor.reveal_batch(
        [ArithmeticSharedTensor.from_shares(t.share - m.share, precision=0)
         for t, m in ((z._tensor, r), (x._tensor, a), (w._tensor, b))])
    owner = comm.get().get_rank() == 0
    square = r2.share + 2 * r.share * epsilon_z + (epsilon_z * epsilon_z if owner else 0)
    product = c.share + epsilon * (b.share + delta if owner else b.share) + a.share * delta  # the fused Beaver form
    out = []
    for share, like in ((square, z), (product, x)):
        truncated = ArithmeticSharedTensor.from_shares(share, precision=0).div_(like.encoder.scale)
        out.append(MPCTensor.from_shares(truncated.share, precision=like.encoder._precision_bits))
    return out


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
    ``settings.gelu_exp_iterations``), CrypTen's Taylor ``erf``, or ``spline`` (:func:`_spline_gelu`)."""
    if settings.gelu == 'spline':
        return _spline_gelu(x, settings, exp_iterations or settings.gelu_exp_iterations)
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


def _spline_gelu(x, settings: SecureSettings, exp_iterations: int):
    """GeLU as the piecewise cubic of :data:`GELU_SPLINE`: the interval of each input from comparisons with the
    dealer's keys (one opening; the seven thresholds on the same keys, at the bit width the plan's range class gives,
    :func:`gelu_spline_bits`, and to :data:`GELU_SPLINE_RESOLUTION_BITS` fractional bits), its coefficients linear in
    the comparison bits, then Horner's scheme: 4 rounds."""
    bits = gelu_spline_bits(exp_iterations, settings.precision_bits)
    below = less_than(x, GELU_SPLINE_THRESHOLDS, bits, max(0, settings.precision_bits - GELU_SPLINE_RESOLUTION_BITS))
    c0, c1, c2, c3 = _by_interval(x, below, GELU_SPLINE)
    return ((c3 * x + c2) * x + c1) * x + c0


def reveal_to(x: Any, dst: int, comm: Any) -> Optional[torch.Tensor]:
    """Open the secret-shared ``x`` to party ``dst`` only: the other party sends its share point to point, whatever
    the communicator's ``reduce`` does (gloo's ring reduce left the non-receiving party about half of the values)."""
    share = x.share.contiguous()
    if comm.get_rank() != dst:
        comm.send(share, dst)
        return None
    return x.encoder.decode(share + comm.recv(torch.empty_like(share), src=1 - dst))
