"""Comparisons by function secret sharing (``SecureSettings(fss_comparisons=True)``): the DCF is exact on every edge
case, a party's key alone does not depend on the compared point, the dealer checks the requests' form, and a real run
(two parties and the dealer) gives the plain-text logits in fewer rounds and bytes, as its dry run predicts."""
import json

import numpy as np
import pytest
import torch

from timm_mpc.secure import SecureSettings, secure_predict
from timm_mpc.secure.crypten.comparison import key_words, sign_client_numel
from timm_mpc.secure.crypten.dealer import DealerError, check_requests
from timm_mpc.secure.crypten.dry_run import dry_run
from timm_mpc.secure.crypten.offline import client_numel, request_numel
from timm_mpc.secure.approximations import GELU_SPLINE, GELU_SPLINE_RESOLUTION_BITS, GELU_SPLINE_THRESHOLDS
from timm_mpc.secure.dcf import _layout, coarse, correction_words, dcf_eval, dcf_keys, sign_eval, sign_keys

from small_models import MIXED, random_images, small_mpcvit

FSS = SecureSettings(fss_comparisons=True, gelu='spline')  # the new protocol's comparisons and GeLU
TOP = np.uint64(2 ** 63)


def _uniform(rng, *shape):
    return rng.integers(0, 2 ** 64, size=shape, dtype=np.uint64)


def _shares_of(value, rng):
    share = _uniform(rng, *value.shape)
    return value - share, share


@pytest.mark.parametrize('bits', [1, 2, 7, 32, 63, 64])
def test_the_dcf_is_exact_at_every_edge(bits):
    """``β·[x < α]`` on points at 0, 1, the domain's top and next to it, and random ones, evaluated at each point
    itself, one either side, 0 and the top of the domain."""
    rng = np.random.default_rng(bits)
    top = np.uint64(2 ** bits - 1)
    n = 600
    alpha = _uniform(rng, n) & top
    alpha[:4] = [0, 1, top, top - np.uint64(1) if bits > 1 else 0]
    beta = _uniform(rng, n)
    beta[:2] = [1, 2 ** 64 - 1]
    seeds = _uniform(rng, n, 2), _uniform(rng, n, 2)
    words = dcf_keys(alpha, beta, *seeds, bits)
    assert words.shape == (n * correction_words(bits),)
    for x in (alpha, alpha - np.uint64(1), alpha + np.uint64(1), np.zeros(n, np.uint64), np.full(n, top)):
        x = x & top
        got = dcf_eval(0, seeds[0], words, x, bits) + dcf_eval(1, seeds[1], words, x, bits)
        assert np.array_equal(got, np.where(x < alpha, beta, np.uint64(0)))
    if bits < 64:  # (every 64-bit point is in the 64-bit domain)
        with pytest.raises(ValueError, match=f'below 2\\^{bits}'):
            dcf_keys(alpha | np.uint64(2 ** bits), beta, *seeds, bits)


@pytest.mark.parametrize('bits', [64, 24, 2])
def test_the_sign_of_a_masked_value_is_exact_on_the_whole_ring(bits):
    """``[x < 0]`` for ``bits``-bit signed x (the whole ring at 64) from the opened ``x + r``: x at 0, ±1, the
    extremes of its range, the mask's own value and its negation (an opened 0), and random values; masks at 0 and at
    the extremes too. Only the low ``bits`` bits of the shares and of the opened value count."""
    rng = np.random.default_rng(bits)
    n = 2000
    low = np.uint64(2 ** bits - 1)
    x = _uniform(rng, n) & low
    r = _uniform(rng, n) & low
    edges = [e & low for e in (np.uint64(0), np.uint64(1), low, np.uint64(2 ** (bits - 1)),
                                np.uint64(2 ** (bits - 1) - 1), np.uint64(2 ** (bits - 1) + 1))]
    x[:6] = edges
    r[6:12] = edges
    x[12:20] = r[12:20]  # x is the mask
    x[20:28] = (np.uint64(0) - r[20:28]) & low  # x + r opens as 0
    seeds = _uniform(rng, n, 2), _uniform(rng, n, 2)
    words = sign_keys(r, *seeds, bits)
    assert words.shape == (n * key_words(bits),)
    top = _shares_of((r >> np.uint64(bits - 1)) & np.uint64(1), rng)
    opened = x + r + (_uniform(rng, n) << np.uint64(bits) if bits < 64 else np.uint64(0))  # high bits: noise
    got = sign_eval(0, seeds[0], words, top[0], opened, bits) + sign_eval(1, seeds[1], words, top[1], opened, bits)
    assert np.array_equal(got, (x >> np.uint64(bits - 1)) & np.uint64(1))
    if bits < 64:
        return
    # one key at many points: x + r - t gives the sign of x - t in the ring (CrypTen's x < t: [x - t < 0], which is
    # x < t where x - t does not wrap), here for thresholds either side of 0 and at the extremes
    thresholds = np.array([1, 2 ** 20, 2 ** 63 - 1, 2 ** 64 - 5, 2 ** 63], dtype=np.uint64)  # 1, 2^20, max, -5, min
    points = opened[None, :] - thresholds[:, None]
    got = sign_eval(0, seeds[0], words, top[0], points) + sign_eval(1, seeds[1], words, top[1], points)
    difference = x[None, :] - thresholds[:, None]
    assert got.shape == (5, n) and np.array_equal(got, (difference >= TOP).astype(np.uint64))
    small = (x.view(np.int64) > -2 ** 40) & (x.view(np.int64) < 2 ** 40)  # no wrap: the order of the integers
    assert np.array_equal(got[:2, small], (x.view(np.int64)[small] < thresholds[:2, None].astype(np.int64)).astype(np.uint64))


def test_comparing_without_the_low_bits_blurs_the_threshold_below_it_only():
    """Keys for the top ``bits - dropped`` bits of a ``bits``-bit value: ``[x < 0]`` for every x but those in
    ``[-2^dropped, 0)``, which may compare as 0 (the carry of the dropped bits), whatever the mask."""
    rng = np.random.default_rng(5)
    bits, dropped, n = 24, 10, 4000
    x = rng.integers(-2 ** 12, 2 ** 12, size=n).astype(np.int64)
    x[:4] = [0, -1, -2 ** dropped, -2 ** dropped - 1]
    r = _uniform(rng, n)
    seeds = _uniform(rng, n, 2), _uniform(rng, n, 2)
    mask = coarse(r, bits, dropped)
    words = sign_keys(mask, *seeds, bits - dropped)
    top = _shares_of(mask >> np.uint64(bits - dropped - 1), rng)
    opened = coarse(x.view(np.uint64) + r, bits, dropped)
    got = (sign_eval(0, seeds[0], words, top[0], opened, bits - dropped)
           + sign_eval(1, seeds[1], words, top[1], opened, bits - dropped)).astype(np.int64)
    blurred = (x >= -2 ** dropped) & (x < 0)
    assert np.array_equal(got[~blurred], (x[~blurred] < 0).astype(np.int64))
    assert set(got[blurred].tolist()) <= {0, 1} and got[2] in (0, 1) and got[3] == 1 and got[0] == 0


def test_the_gelu_splines_error_wherever_the_blurred_comparisons_put_an_input():
    """The spline's cubics against exact GeLU on [-30, 30], each input taking its own interval or, within the
    comparisons' resolution below a threshold, the next: at most 5e-4 (the exp fit's is 1.5e-3)."""
    import math
    x = np.linspace(-30, 30, 300001)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    coefficients = np.array(GELU_SPLINE)
    for shift in (0.0, 0.999 * 2.0 ** -GELU_SPLINE_RESOLUTION_BITS):
        c = coefficients[np.searchsorted(np.array(GELU_SPLINE_THRESHOLDS), x + shift, side='right')]
        spline = c[:, 0] + x * (c[:, 1] + x * (c[:, 2] + x * c[:, 3]))
        assert np.abs(spline - exact).max() < 5e-4


def test_a_partys_key_alone_does_not_depend_on_the_point():
    """Party 0's key (its seed and the correction words) for the point 0 and for 2^62, each with its own payload:
    every bit of every word is a fair coin in both (4,000 keys each), and the two are no more apart than two sets of
    keys for the same point. (Fixed seeds: the test is deterministic.)"""
    def bit_frequencies(alpha, beta, seed):
        rng = np.random.default_rng(seed)
        n = 4000
        words = dcf_keys(np.full(n, alpha, np.uint64), np.full(n, beta, np.uint64), _uniform(rng, n, 2),
                         _uniform(rng, n, 2), 63)
        seed_cw, v_cw, t_cw, final = _layout(words, n, 63)  # level-major: each element's words gathered
        per_element = np.concatenate([seed_cw.transpose(1, 0, 2).reshape(n, -1), v_cw.T, t_cw.T, final[:, None]], 1)
        bits = (per_element[:, :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        return bits.mean(0).reshape(-1)
    # bits fixed by the format, the same for every point: the seed corrections' lowest (the control bit's place) and
    # the top bit of the packed control bits (63 levels)
    low, high = bit_frequencies(0, 1, 1), bit_frequencies(2 ** 62, 2 ** 64 - 1, 2)
    again = bit_frequencies(0, 1, 3)
    used = np.abs(low - 0.5) < 0.45
    assert np.array_equal(used, np.abs(high - 0.5) < 0.45) and used.mean() > 0.99
    sigma = 0.5 / np.sqrt(4000)
    assert np.abs(low[used] - 0.5).max() < 6 * sigma and np.abs(high[used] - 0.5).max() < 6 * sigma
    apart, same = np.abs(low - high)[used], np.abs(low - again)[used]
    assert apart.mean() < 1.2 * same.mean() and apart.max() < 8 * sigma


def test_the_dealer_checks_a_comparisons_form_and_the_parties_sizes():
    check_requests(json.loads(json.dumps([('sign', None, ((2, 65, 512), 64, 0), {})])))
    for args in ([[4]], [[4], 24], [[4], [4], 0], [[4], 1, 0], [[4], 65, 0], [[4], True, 0], [[4], 24, 23]):
        with pytest.raises(DealerError, match='sign takes a size, a bit width from 2 to 64 and the low bits it drops'):
            check_requests([['sign', None, args, {}]])
    with pytest.raises(DealerError, match='not a size'):
        check_requests([['sign', None, [[4, -1], 64, 0], {}]])
    request = ('sign', None, ((3, 5), 24, 10), {})
    assert request_numel(request) == 15 * (1 + key_words(14)) and client_numel(request) == sign_client_numel((3, 5), 24, 10)
    assert key_words(14) < key_words(64)
    assert client_numel(('additive', None, ((3,), (3,), 'mul'), {})) == 0


def test_fss_comparisons_are_a_crypten_setting_of_its_offline_phase():
    with pytest.raises(ValueError, match='setting of the CrypTen engine with its offline phase'):
        SecureSettings(fss_comparisons=True, offline_phase=False)
    with pytest.raises(ValueError, match='setting of the CrypTen engine'):
        SecureSettings(fss_comparisons=True, engine='spu')


@pytest.mark.slow
def test_fss_comparisons_give_the_plain_text_logits_in_fewer_rounds_as_the_dry_run_predicts():
    """A real run with every kind of head (Softmax's max, ReLU-Softmax's ReLU) and exact GeLU: the logits of plain
    text; fewer rounds and bytes than CrypTen's comparisons (their dry run); the run's rounds and bytes, and what the
    dealer sent, exactly what its own dry run predicted."""
    model = small_mpcvit(attn_pattern=MIXED, gelu_pattern=[[1, 0] * 8 + [1], 'linear'])
    images = random_images(2)
    with torch.no_grad():
        plain = model(images)
    result = secure_predict(model, images, settings=FSS, return_result=True)
    assert torch.equal(result.logits.argmax(-1), plain.argmax(-1)) and (result.logits - plain).abs().max() < 2e-2
    profile = result.profile
    assert (result.estimate.rounds, result.estimate.bytes) == (profile.rounds, profile.bytes)
    predicted = dry_run(result.plan, FSS, 2)
    assert profile.dealer['bytes'] >= predicted.dealer_bytes > 0
    assert sum(r[0] == 'sign' for r in predicted.requests) > 0
    crypten_compare = dry_run(result.plan, SecureSettings(fss_comparisons=False), 2)
    assert profile.rounds < crypten_compare.rounds and profile.bytes < crypten_compare.bytes
