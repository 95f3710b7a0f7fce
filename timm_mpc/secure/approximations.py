"""The public approximations every engine's operators share: the Gaussian tail of GeLU, and the accurate domains,
first guesses and input scales of the Newton iterations (reciprocal, inverse square root). Plain Python numbers; the
plan's schedules are computed from them (:mod:`.plan`), the engines' operators evaluate them."""
import math
from typing import Dict, Optional, Tuple

__all__ = ['GELU_TAIL_A', 'GELU_TAIL_B', 'GELU_MAX_EXP_ITERATIONS', 'gelu_bound', 'gelu_exp_iterations',
           'GELU_SPLINE_THRESHOLDS', 'GELU_SPLINE', 'GELU_SPLINE_RESOLUTION_BITS', 'gelu_spline_bits',
           'INV_SQRT_DOMAIN', 'INV_SQRT_CUBIC', 'RECIPROCAL_DOMAIN', 'newton_schedule', 'inv_sqrt_domain']

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


# GELU as a piecewise cubic (``gelu='spline'``, with comparisons by the dealer's keys): 0 below -4, x from 4 on, and
# between, on six intervals of width 4/3, the minimax cubic of each interval widened by 1/64 below (the comparisons'
# resolution, GELU_SPLINE_RESOLUTION_BITS): max error 4.9e-4 wherever an input near a threshold falls. Coefficients
# c0..c3 per interval, from below the first threshold to above the last; tests/test_fss_comparisons.py re-derives the
# error.
GELU_SPLINE_THRESHOLDS = (-4.0, -8 / 3, -4 / 3, 0.0, 4 / 3, 8 / 3, 4.0)
GELU_SPLINE = (
    (0.0, 0.0, 0.0, 0.0),
    (-0.35107521, -0.27728427, -0.07334365, -0.00649006),
    (-0.35981713, -0.20726628, -0.01484627, 0.00516098),
    (0.00044139, 0.51366356, 0.46616024, 0.11202),
    (0.00026709, 0.48756056, 0.46408652, -0.11103466),
    (-0.35111271, 1.19374543, -0.00798496, -0.00629988),
    (-0.35795476, 1.28355458, -0.07523552, 0.00667905),
    (0.0, 1.0, 0.0, 0.0),
)
GELU_SPLINE_RESOLUTION_BITS = 6
"""The spline's comparisons look at its inputs to 2^-6: an input within 1/64 below a threshold may take the next
interval's cubic, which is fitted there too."""


def gelu_spline_bits(exp_iterations: int, precision_bits: int) -> int:
    """The bit width of the spline's comparisons for a GeLU whose plan schedule is ``exp_iterations`` (the range class
    the owner calibrated: inputs below :func:`gelu_bound` of it): ``|x - t|`` for every threshold ``t`` in fixed point,
    with a factor of 2 to spare, as a signed value."""
    largest = gelu_bound(exp_iterations) + max(abs(t) for t in GELU_SPLINE_THRESHOLDS)
    return min(64, math.ceil(math.log2(largest)) + precision_bits + 2)


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
