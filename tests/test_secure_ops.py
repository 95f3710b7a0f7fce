"""Secure operators in one CrypTen process (world size 1): every operator is exercised, quickly."""
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_mpc
from timm_mpc.layers import quad2_weights, relu_softmax_weights
from timm_mpc.secure import SecureSettings, UnsupportedModelError, build_plan, check_images
from timm_mpc.secure import approximations
from timm_mpc.secure.crypten import ops
from timm_mpc.secure.calibration import FixedPointRangeError, calibrate
from timm_mpc.secure.crypten.compat import apply_settings, import_crypten


@pytest.fixture(scope='module')
def crypten(tmp_path_factory):
    crypten = import_crypten()
    os.environ.update(RENDEZVOUS=f'file://{tmp_path_factory.mktemp("rdv")}/store', WORLD_SIZE='1', RANK='0',
                      DISTRIBUTED_BACKEND='gloo')
    apply_settings(SecureSettings(provider='TFP_INSECURE'), crypten)  # one process: nothing to deal, nobody to hide from
    crypten.init()
    yield crypten
    crypten.uninit()


def test_crypten_imports_with_the_onnx_stand_in():
    import sys
    crypten = import_crypten()
    assert hasattr(crypten, 'cryptensor')
    stand_in = sys.modules['torch.onnx._internal.registration']
    assert stand_in.registry is None or hasattr(stand_in, 'registry')


@pytest.mark.slow
def test_a_plain_import_crypten_after_timm_mpc_secure_gets_timm_mpcs_crypten():
    """In a fresh process: `import crypten` alone fails on this PyTorch (CrypTen's ONNX import); after
    `import timm_mpc.secure` it works, with the cryptographic randomness in place."""
    import subprocess
    import sys
    code = ('import timm_mpc.secure, crypten; from crypten.common import rng; '
            'from timm_mpc.secure.crypten.compat import random_ring_element as r; '
            'assert rng.generate_random_ring_element is r; crypten.init(); '
            'print(crypten.cryptensor([1.5, 2.0]).mul(2).get_plain_text().tolist())')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == '[3.0, 4.0]', done.stderr[-1500:]
    alone = subprocess.run([sys.executable, '-c', 'import crypten'], capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and 'torch.onnx._internal.registration' in alone.stderr


def test_crypten_draws_its_randomness_from_a_keyed_cryptographic_stream(crypten):
    """CrypTen's masks, zero shares and triples come from torch's Mersenne Twister, which uses only 32 bits of
    its seed and whose state follows from its outputs; timm-mpc replaces them by SHAKE-128 streams keyed by the
    full seed, drawn in the same order by every holder of that seed."""
    import crypten.common.rng as rng
    import crypten.mpc.primitives.arithmetic as arithmetic
    import crypten.mpc.provider.ttp_provider as ttp_provider
    from timm_mpc.secure.crypten.compat import _dealer_seeds, kbit_random_tensor, random_ring_element
    assert rng.generate_random_ring_element is random_ring_element is arithmetic.generate_random_ring_element
    assert ttp_provider.generate_kbit_random_tensor is kbit_random_tensor
    assert ttp_provider.TTPServer._setup_generators is _dealer_seeds

    def generator(seed):
        g = torch.Generator()
        g.manual_seed(seed)
        return g
    full_range = (-(2 ** 63), 2 ** 63 - 1)
    # the weakness: seeds that share their low 32 bits give torch the same stream
    assert torch.equal(torch.randint(*full_range, (64,), generator=generator(2 ** 40 + 7)),
                       torch.randint(*full_range, (64,), generator=generator(7)))
    first = random_ring_element((1000,), generator=(g := generator(2 ** 40 + 7)))
    assert torch.equal(first, random_ring_element((1000,), generator=generator(2 ** 40 + 7)))  # holders agree
    assert not torch.equal(first, random_ring_element((1000,), generator=g))  # each draw moves on
    assert not torch.equal(first, random_ring_element((1000,), generator=generator(7)))  # the whole seed counts
    assert not torch.equal(first, torch.randint(*full_range, (1000,), generator=generator(2 ** 40 + 7)))
    assert first.float().abs().mean() > 2 ** 61  # spread over the whole ring
    bits = kbit_random_tensor((20000,), bitlength=16, generator=generator(3))
    assert bits.min() >= 0 and bits.max() < 2 ** 16 and abs(bits.double().mean() / 2 ** 15 - 1) < 0.02


def _emulate_newton(kind, x, iters):
    def exp_limit(z, n=8):
        return (1 + z / 2 ** n) ** (2 ** n)
    with np.errstate(all='ignore'):
        if kind == 'inv_sqrt':
            y = 2.2 * exp_limit(-(x / 2 + 0.2)) + 0.2 - x / 1024
            for _ in range(iters):
                y = y * (3 - x * y * y) / 2
            return np.abs(y * np.sqrt(x) - 1)
        y = 3 * exp_limit(1 - 2 * x) + 0.003
        for _ in range(iters):
            y = 2 * y - y * y * x
        return np.abs(y * x - 1)


@pytest.mark.parametrize('kind, table', [('inv_sqrt', approximations.INV_SQRT_DOMAIN), ('reciprocal', approximations.RECIPROCAL_DOMAIN)])
def test_newton_domain_tables_hold(kind, table):
    """Re-derive the domains by emulating CrypTen's iterations in float64."""
    for iters, (lo, hi) in table.items():
        x = np.logspace(math.log10(lo) + 0.01, math.log10(hi) - 0.01, 400)
        assert _emulate_newton(kind, x, iters).max() <= 2.5e-3, (kind, iters)


def _fixed(v):  # a product truncated to 16 fractional bits, as a secure multiplication leaves it
    return np.floor(v * 2 ** 16) / 2 ** 16


def test_cubic_inv_sqrt_domains_hold_in_fixed_point_and_end_where_they_say():
    """The cubic first guess and two-round Newton iterations, emulated with every product truncated: accurate to
    0.2% inside each table range, and no longer just below it (the ranges are as wide as they can be)."""
    def emulate(x, iters):
        c3, c2, c1, c0 = approximations.INV_SQRT_CUBIC[iters][2]
        x2 = _fixed(x * x)
        y = _fixed(c3 * _fixed(x * x2)) + _fixed(c2 * x2) + _fixed(c1 * x) + c0
        for _ in range(iters):
            y = _fixed(1.5 * y) - _fixed(0.5 * _fixed(_fixed(x * y) * _fixed(y * y)))
        return np.abs(y * np.sqrt(x) - 1)
    for iters, (lo, hi, _) in approximations.INV_SQRT_CUBIC.items():
        assert emulate(_fixed(np.logspace(math.log10(lo), math.log10(hi), 500)), iters).max() <= 2.5e-3, iters
        assert emulate(np.array([lo / 1.5]), iters)[0] > 2e-3, iters
    # for a range CrypTen's guess covers with 3 iterations, the cubic needs 2 rounds fewer than CrypTen's 8 + 3·3
    domain = approximations.inv_sqrt_domain('cubic')
    assert approximations.newton_schedule(0.1, 5.0, domain, 2)[1] * 2 + 2 < 8 + 3 * 3 - 2


def test_newton_schedule_covers_the_range_with_fewest_iterations():
    scale, iters = approximations.newton_schedule(0.0005, 0.5, approximations.INV_SQRT_DOMAIN, 3)
    lo, hi = approximations.INV_SQRT_DOMAIN[iters]
    assert lo <= 0.0005 / scale and 0.5 / scale <= hi and math.log(scale, 4).is_integer()
    lo_prev, hi_prev = approximations.INV_SQRT_DOMAIN[iters - 1]
    assert not all(lo_prev <= v / s and v / s <= hi_prev for s in (4.0 ** k for k in range(-10, 10)) for v in (0.0005, 0.5))
    assert approximations.newton_schedule(1.0, 65.0, approximations.RECIPROCAL_DOMAIN, 4)[1] < 10  # softmax sums need fewer than CrypTen's 10


@pytest.mark.parametrize('fused', [True, False])
def test_beaver_products_are_exact_in_the_ring(crypten, fused):
    """The two-product Beaver protocol (and CrypTen's three) give x·y and x@y exactly modulo 2^64 on random
    64-bit ring elements, the extreme values included (one process holds every share)."""
    import crypten.mpc.primitives.beaver as beaver
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from timm_mpc.secure.crypten.compat import use_fused_beaver
    torch.manual_seed(0)
    extremes = torch.tensor([2 ** 63 - 1, -(2 ** 63), -1, 0, 1])
    x = torch.randint(-(2 ** 63), 2 ** 63 - 1, (65, 192))
    y = torch.randint(-(2 ** 63), 2 ** 63 - 1, (192, 64))
    x[0, :5], y[:5, 0] = extremes, extremes
    use_fused_beaver(fused)
    try:
        shared = [ArithmeticSharedTensor.from_shares(t, precision=0) for t in (x, y)]
        assert torch.equal(beaver.matmul(*shared).share, x @ y)
        assert torch.equal(beaver.mul(shared[0], ArithmeticSharedTensor.from_shares(x.flip(0), precision=0)).share,
                           x * x.flip(0))
    finally:
        use_fused_beaver(True)


def test_secure_gelu_is_accurate_beyond_taylor_range(crypten):
    x = torch.linspace(-12, 12, 241)
    exact = F.gelu(x)
    fit = ops.gelu(crypten.cryptensor(x), SecureSettings()).get_plain_text()
    assert (fit - exact).abs().max() < 2e-3
    # CrypTen's Taylor erf (its pos_pow assumes a positive base) is off already inside [-2, 2]: why exp_fit is the default
    taylor = ops.gelu(crypten.cryptensor(x), SecureSettings(gelu='erf')).get_plain_text()
    inside = x.abs() <= 2
    assert (taylor - exact)[inside].abs().max() > 0.1
    assert (fit - exact)[inside].abs().max() < 2e-3


def test_secure_quad_gelu_and_relu(crypten):
    x = torch.linspace(-3, 3, 61)
    assert torch.allclose(ops.quad_gelu(crypten.cryptensor(x)).get_plain_text(), timm_mpc.quad_gelu(x), atol=1e-3)
    assert torch.allclose(ops.relu(crypten.cryptensor(x)).get_plain_text(), x.relu(), atol=1e-4)


@pytest.mark.parametrize('spread', [0.02, 1.0, 30.0])
def test_secure_layer_norm_over_small_and_large_variances(crypten, spread):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * spread + 3.0
    w, b = torch.rand(64) + 0.5, torch.randn(64) * 0.1
    var = x.var(-1, unbiased=False)
    for method, batch in (('cubic', True), ('cubic', False), ('crypten', True)):
        s = SecureSettings(batch_independent=batch, inv_sqrt=method)
        scale, iters = approximations.newton_schedule(float(var.min()), float(var.max()), approximations.inv_sqrt_domain(method), 2)
        got = ops.layer_norm(crypten.cryptensor(x), crypten.cryptensor(w), crypten.cryptensor(b), 1e-5, s, scale,
                             iters).get_plain_text()
        assert (got - F.layer_norm(x, (64,), w, b, 1e-5)).abs().max() < 2e-2, method


def test_secure_attention_kinds(crypten):
    torch.manual_seed(0)
    scores = torch.randn(1, 2, 9, 9) * 2
    softmax = ops.softmax(crypten.cryptensor(scores), 6, 4.0).get_plain_text()
    assert (softmax - scores.softmax(-1)).abs().max() < 5e-3  # CrypTen's 8-squaring exp
    relu = crypten.cryptensor(scores).relu()
    denom = relu.sum(-1, keepdim=True) + 1e-5
    got = (relu * ops.reciprocal(denom, 10)).get_plain_text()
    assert (got - relu_softmax_weights(scores)).abs().max() < 5e-3
    numer = (crypten.cryptensor(scores) + 5.0).square()
    got = (numer * ops.reciprocal(numer.sum(-1, keepdim=True), 10, 256.0)).get_plain_text()
    assert (got - quad2_weights(scores)).abs().max() < 2e-3


def test_the_reciprocal_is_unbiased_across_its_domain(crypten):
    """After the ladder's guess the reciprocal takes two Newton iterations: one leaves up to 0.2%, always below
    ``1 / d`` and by an amount that depends on where ``d`` falls between two thresholds, enough to flip the top-1 of an
    image whose two best logits lie 0.004 apart. Two leave only the fixed-point encoding's error, of either sign."""
    low, high = approximations.RECIPROCAL_DOMAIN[4]
    d = torch.round(torch.logspace(math.log10(low), math.log10(high), 200) * 2 ** 16) / 2 ** 16  # exactly encoded
    error = ops.reciprocal(crypten.cryptensor(d), 4).get_plain_text() * d - 1
    assert error.abs().max() < 2e-4, error.abs().max()
    assert error.mean().abs() < 5e-5, error.mean()


def test_the_ladders_first_guess_holds_beyond_the_calibrated_domain(crypten):
    """The reciprocal's and the inverse square root's first guesses by comparisons reach 16 times below the domain's
    bottom and above its top (:data:`~timm_mpc.secure.crypten.ops.LADDER_OCTAVES_BEYOND`): an input outside the
    calibrated domain (an image unlike the calibration images) keeps the accuracy of its Newton iterations, where a
    guess from the domain's edge would leave tens of percent."""
    from timm_mpc.secure.crypten.comparison import fss_comparisons_in_use
    assert fss_comparisons_in_use()
    low, high = approximations.RECIPROCAL_DOMAIN[4]
    d = torch.tensor([low / 12, low / 3, low, (low * high) ** 0.5, high, high * 3, high * 12])
    got = ops.reciprocal(crypten.cryptensor(d), 4).get_plain_text()
    assert ((got * d - 1).abs() < 1e-2).all(), (got * d).tolist()
    settings = SecureSettings()
    low, high = approximations.inv_sqrt_domain(settings.inv_sqrt)[2]
    v = torch.tensor([low / 12, low / 3, low, (low * high) ** 0.5, high, high * 3, high * 12])
    got = ops.inv_sqrt(crypten.cryptensor(v), 2, settings).get_plain_text()
    assert ((got * v.sqrt() - 1).abs() < 1e-2).all(), (got * v.sqrt()).tolist()


def test_plan_refuses_unsupported_models_naming_the_module():
    with pytest.raises(UnsupportedModelError, match=r'blocks.0.attn \(Attention\).*convert_to_mpc'):
        build_plan(timm.create_model('vit_tiny_patch16_224'))
    with pytest.raises(UnsupportedModelError, match=r'blocks.0.attn has heads in search mode.*binarize'):
        build_plan(timm.create_model('mpcvit_tiny'))
    # a family timm-mpc does not know is refused by conversion and by the plan, both naming its attention module
    beit = timm.create_model('beit_base_patch16_224', depth=1)
    with pytest.raises(ValueError, match=r"unsupported types \['timm.models.beit.Attention'\]"):
        timm_mpc.convert_to_mpc(beit)
    with pytest.raises(UnsupportedModelError, match=r'blocks.0.attn \(timm.models.beit.Attention\).*does not know'):
        build_plan(beit)
    # a Swin whose windows do not tile the token grid (timm would pad it) is refused naming the block
    swin = timm.create_model('swin_tiny_patch4_window7_224', img_size=24, window_size=4, depths=(1, 1), num_heads=(1, 2),
                             embed_dim=8)
    with pytest.raises(UnsupportedModelError, match=r'layers.0.blocks.0 .*windows that tile the token grid'):
        build_plan(timm_mpc.convert_to_mpc(swin))
    # nor one that merges an odd token grid (timm pads it)
    swin = timm.create_model('swin_tiny_patch4_window7_224', img_size=56, window_size=7, depths=(1, 1, 1),
                             num_heads=(1, 2, 4), embed_dim=8)
    with pytest.raises(UnsupportedModelError, match=r'layers.2.downsample .*even token grid .*\[7, 7\]'):
        build_plan(timm_mpc.convert_to_mpc(swin))
    model = timm.create_model('mpcvit_tiny', attn_pattern='softmax', act_layer='gelu_tanh')
    with pytest.raises(UnsupportedModelError, match=r"blocks.0.mlp.act \(GELUTanh\).*'gelu', 'quad_gelu', 'relu', 'silu', 'identity'"):
        build_plan(model)


def test_images_are_checked_before_any_protocol():
    from timm_mpc.secure import InputRangeError
    plan = build_plan(timm.create_model('mpcvit_tiny', attn_pattern='scaling'))
    low, high = plan.input_bounds[0]
    assert low == pytest.approx(-0.286 / 0.353) and high == pytest.approx(0.714 / 0.353)  # pixels 0 and 1
    images = (torch.rand(2, 3, 32, 32) - 0.286) / 0.353
    assert check_images(plan, images) is images
    for factor in (10, 1e6):
        with pytest.raises(InputRangeError, match=r"channel 0 has values in .* accepted \[-0.81.*, 2.02.*\].*clamp"):
            check_images(plan, images * factor)
    clamped = check_images(plan, images * 1e6, clamp=True)
    assert clamped.min() == pytest.approx(low) and clamped.max() == pytest.approx(high)
    with pytest.raises(ValueError, match=r'shape \(batch, 3, 32, 32\); got \(2, 3, 28, 28\)'):
        check_images(plan, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match='floating-point'):
        check_images(plan, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='NaN'):
        check_images(plan, torch.full((1, 3, 32, 32), float('nan')))


def test_the_public_plan_holds_schedules_not_statistics_and_refuses_what_it_does_not_know():
    import json
    from timm_mpc.secure import PlanError, SecurePlan, build_secure_plan
    from timm_mpc.secure.plan import PLAN_VERSION
    model = timm.create_model('mpcvit_tiny', depth=2, img_size=16, attn_pattern=[['relu_softmax', '2quad', 'softmax',
                                                                                   'scaling']] * 2, act_layer='gelu')
    plan = build_secure_plan(model, SecureSettings())
    wire = json.loads(plan.to_json())
    assert 'ranges' not in wire and SecurePlan.from_dict(wire) == plan
    assert not any(name.endswith(('.alpha', '.beta')) for name in plan.params)  # pattern parameters are not shared
    assert set(plan.schedules) == {'norm', 'blocks.0.norm1', 'blocks.0.norm2', 'blocks.1.norm1', 'blocks.1.norm2',
                                   'blocks.0.mlp.act', 'blocks.1.mlp.act', *(f'blocks.{i}.attn.{k}' for i in (0, 1)
                                                                             for k in ('relu_softmax', '2quad', 'softmax'))}
    for schedule in wire['schedules'].values():  # a power of 4 and an iteration count: no measured value
        assert set(schedule) == {'scale', 'iters'} and isinstance(schedule['iters'], int)
        assert math.log(schedule['scale'], 4) == round(math.log(schedule['scale'], 4))
    assert plan.schedules['blocks.0.mlp.act'].iters >= 8  # timm's GELU (act_layer='gelu') is calibrated too
    bad = [({**wire, 'version': 1}, f'plan version 1; this timm-mpc reads version {PLAN_VERSION}'),
           ({**wire, 'ranges': {}}, r"plan fields: missing \[\], unknown \['ranges'\]"),
           ({**wire, 'embed_dim': '64'}, r"plan.embed_dim must be int, got '64'"),
           ({**wire, 'blocks': [{**wire['blocks'][0], 'attn': {**wire['blocks'][0]['attn'], 'kinds': ['exp'] * 4}}]},
            r"plan blocks.0.attn: unknown attention kind 'exp'"),
           ({**wire, 'schedules': {k: v for k, v in wire['schedules'].items() if k != 'blocks.1.attn.2quad'}},
            r"plan schedules miss \['blocks.1.attn.2quad'\]")]
    for data, match in bad:
        with pytest.raises(PlanError, match=match):
            SecurePlan.from_dict(data)


def _corrupt(wire, path, value):
    """``wire`` with the field at ``path`` (slashes; list indices as numbers) set to ``value``."""
    import copy
    data = copy.deepcopy(wire)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split('/')]
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return data


@pytest.mark.parametrize('path, value, match', [
    ('logit_bound', float('inf'), 'plan.logit_bound must be a finite number, got inf'),
    ('schedules/norm/scale', float('nan'), r'plan.schedules.norm.scale must be a finite number, got nan'),
    ('schedules/norm/scale', 0.0, r'schedules.norm.scale must be a positive scale'),
    ('schedules/norm/scale', -4.0, r'schedules.norm.scale must be a positive scale'),
    ('blocks/0/attn/scale', float('nan'), 'must be a finite number'),
    ('blocks/0/attn/scale', 0.0, r'blocks.0.attn.scale must be a positive scale'),
    ('schedules/norm/iters', -1, r'plan.schedules.norm.iters must be a whole number from 0 to 2147483648, got -1'),
    ('schedules/norm/iters', 10 ** 9, r'schedules.norm.iters 1000000000; accepted: 0 to 32'),
    ('patch_size', [0, 0], r'plan patch_size must be whole numbers from 1 to 4096, got \[0, 0\]'),
    ('embed_dim', -64, 'plan.embed_dim must be a whole number from 0 to'),
    ('embed_dim', 0, 'plan embed_dim must be whole numbers from 1'),
    ('num_classes', 10 ** 12, 'must be a whole number from 0 to 2147483648'),
    ('params/head.weight', [10 ** 6, 10 ** 6], r'plan params hold .* accepted: 268435456 per parameter'),
    ('blocks/0/norm1/eps', 0.0, r'plan blocks.0.norm1.eps must be in \(0, 1\)'),
    ('blocks/0/attn/num_heads', 0, 'blocks.0.attn.num_heads must be whole numbers from 1'),
    ('input_bounds', [[-1e300, 1e300]] * 3, r'input_bounds must lie in \[-2\^16, 2\^16\]'),
    ('num_prefix_tokens', 3, 'num_prefix_tokens 3 is not cls_token'),
    ('blocks/0/mlp/gelu_tokens', [2] * 17, 'gelu_tokens must be 0 or 1 for each of the 17 tokens'),
])
def test_a_corrupt_plan_is_refused_for_its_values(path, value, match):
    """What a deviating owner could send in a well-typed plan: each refused with the field, the value and what is
    accepted, before the client computes anything from it (one that went through gave a ZeroDivisionError or a
    30-second wait)."""
    import json
    from timm_mpc.secure import PlanError, SecurePlan, build_secure_plan
    model = timm.create_model('mpcvit_tiny', depth=1, img_size=16, embed_dim=64, gelu_pattern='linear',
                              attn_pattern='relu_softmax')
    wire = json.loads(json.dumps(build_secure_plan(model, SecureSettings()).to_dict()))
    SecurePlan.from_dict(wire)  # the plan as sent is accepted
    with pytest.raises(PlanError, match=match):
        SecurePlan.from_dict(json.loads(json.dumps(_corrupt(wire, path, value))))  # JSON carries NaN and Infinity


def test_the_plan_the_client_reads_is_the_owners_byte_for_byte():
    """The plan read back from the wire serializes exactly as the owner's (no 4 for a 4.0): the client's dry runs
    of it are then the owner's, found in the cache on one machine instead of run again."""
    import json
    from timm_mpc.secure import SecurePlan, build_secure_plan
    from timm_mpc.secure.crypten.dry_run import _cache_key
    from small_models import MIXED, random_images, small_mpcvit
    settings = SecureSettings()
    plan = build_secure_plan(small_mpcvit(attn_pattern=MIXED), settings, random_images(4))  # calibrated schedules
    assert plan.schedules
    read = SecurePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert json.dumps(read.to_dict(), sort_keys=True) == json.dumps(plan.to_dict(), sort_keys=True)
    assert _cache_key(read, settings, 2) == _cache_key(plan, settings, 2)


def test_a_plan_of_100000_blocks_is_refused_before_it_is_read():
    import json
    from timm_mpc.secure import PlanError, SecurePlan, build_secure_plan
    model = timm.create_model('mpcvit_tiny', depth=1, img_size=16, embed_dim=64, attn_pattern='scaling')
    wire = json.loads(build_secure_plan(model, SecureSettings()).to_json())
    with pytest.raises(PlanError, match=r'plan blocks \(their number\) must be whole numbers from 1 to 256, got 100000'):
        SecurePlan.from_dict({**wire, 'blocks': wire['blocks'] * 100_000})


def test_calibration_refuses_values_that_would_overflow():
    model = timm.create_model('mpcvit_tiny', attn_pattern='relu_softmax').eval()
    images = torch.randn(2, 3, 32, 32)
    ranges = calibrate(model, images, SecureSettings())
    assert ranges['blocks.0.norm1']['max'] > 0 and 'max' in ranges['blocks.3.attn.relu_softmax']
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight.mul_(1e6)
    with pytest.raises(FixedPointRangeError, match=r'blocks.2.mlp.act \(squared inputs\) reaches .* 16 fractional bits'):
        calibrate(model, images, SecureSettings())


@pytest.mark.slow
def test_truncation_failures_are_measured_per_image_and_operator():
    """The expected number of local-truncation failures, |x| / 2^64 summed over every truncated element."""
    from timm_mpc.secure.crypten.truncation import truncation_failures
    torch.manual_seed(0)
    model = timm.create_model('mpcvit_tiny', depth=1, img_size=16, embed_dim=64,
                              attn_pattern=[['scaling', 'relu_softmax', 'scaling', 'softmax']]).eval()
    images = torch.rand(2, 3, 16, 16).sub(0.286).div(0.353)
    measured = truncation_failures(model, images)
    assert measured['images'] == 2 and {'linear', 'layernorm', 'gelu', 'softmax'} <= set(measured['by_op'])
    assert 0 < measured['per_image'] < 1e-2 and measured['per_image'] == pytest.approx(sum(measured['by_op'].values()))
    # the probability grows with the magnitude of what is truncated: larger weights, more failures
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(8)
    assert truncation_failures(model, images)['by_op']['linear'] > 2 * measured['by_op']['linear']


@pytest.mark.slow
def test_a_failed_truncation_puts_the_logits_beyond_the_plans_bound():
    """Failures put where they fall (by magnitude) in a published checkpoint: each leaves the logits as they were
    or puts them far beyond the public bound, where secure_predict catches them."""
    from timm_mpc.secure.crypten.truncation import truncation_failures
    model = timm_mpc.create_mpc_model(
        'mpcvit_tiny', checkpoint='checkpoints/timm-mpc/mpcvit_tiny.fmnist_softmax/model.safetensors').eval()
    images, _ = timm_mpc.data.example_images()
    measured = truncation_failures(model, images[:1], injections=3)
    assert measured['caught'] + measured['harmless'] == 3 and measured['caught'] >= 1
    assert min(c for c in measured['injected'] if c > 0.05) > 1e6 > measured['logit_bound']
