"""The dealer's checks on what the owner commits, in this process (tests/test_security.py runs the real processes), and
the dealer asked during the inference (offline_phase=False), in real processes."""
import warnings

import pytest
import torch

from timm_mpc.secure import InsecureSettingWarning, SecureSettings, secure_predict
from timm_mpc.secure.crypten.dealer import DealerError, check_requests, request_digest

from small_models import MIXED, random_images, small_mpcvit

PLAN_LIKE = [  # the form a dry run records: (function, device, args, kwargs), sizes as tuples
    ('additive', None, ((1, 17, 64), (64, 192), 'matmul'), {}),
    ('square', None, ((1, 17, 64),), {}),
    ('binary', None, ((1, 17, 4), (1, 17, 4)), {}),
    ('wraps', None, ((1, 17, 256),), {}),
    ('B2A', None, ((1, 17, 256),), {}),
    ('additive', 'cpu', ((2, 3, 16, 16), (64, 3, 8, 8), 'conv2d'), dict(stride=8)),
]


def test_the_plans_requests_pass_and_their_digest_is_their_order():
    requests = [list(r) for r in PLAN_LIKE]
    import json
    check_requests(json.loads(json.dumps(requests)))
    assert request_digest(PLAN_LIKE) == request_digest(json.loads(json.dumps(requests)))  # tuples or lists alike
    assert request_digest(PLAN_LIKE) != request_digest(PLAN_LIKE[::-1])
    assert request_digest(PLAN_LIKE) != request_digest(PLAN_LIKE + [('square', None, ((0,),), {})])


@pytest.mark.parametrize('request_, match', [
    (['_get_additive_PRSS', None, [[4096]], {'remove_rank': True}], r"asks for '_get_additive_PRSS'; the dealer serves"),
    (['additive', 'cuda', [[2], [2], 'mul'], {}], "names device 'cuda'"),
    (['additive', None, [[2], [2], 'exec'], {}], "needs two sizes and one of"),
    (['additive', None, [[2]], {}], "needs two sizes and one of"),
    (['square', None, [[2 ** 40]], {}], r"not a size .*\[1099511627776\]"),
    (['square', None, [[2 ** 16, 2 ** 16]], {}], 'has 4294967296 elements'),
    (['square', None, [[-1]], {}], 'not a size'),
    (['square', None, [[True]], {}], 'not a size'),
    (['wraps', None, [[4], [4]], {}], 'wraps takes one size'),
    (['binary', None, [[4], [4]], {'x': 1}], 'a binary triple takes two sizes'),
    (['square', None, [[4]]], r'not \[function, device, args, kwargs\]'),
    ('square', r'not \[function, device, args, kwargs\]'),
])
def test_requests_the_dealer_does_not_serve_are_named(request_, match):
    with pytest.raises(DealerError, match=match):
        check_requests([['square', None, [[4]], {}], request_])
    with pytest.raises(DealerError, match='not a list'):
        check_requests({'commit': request_})


def test_requests_during_the_inference_are_an_insecure_setting():
    settings = SecureSettings(offline_phase=False)
    assert settings.dealer and not settings.secure
    with pytest.warns(InsecureSettingWarning, match='offline_phase=False: .* cannot check those requests'):
        settings.warn_if_insecure()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        SecureSettings().warn_if_insecure()  # the default is private: no warning
    assert SecureSettings().secure and not SecureSettings(provider='TFP_INSECURE').dealer


@pytest.mark.slow
def test_requests_during_the_inference_give_the_plain_text_logits():
    """offline_phase=False (cost comparisons only): the owner asks the dealer for each triple when the protocol needs
    it, each answer arrives in its request's shape, and the logits are plain text's."""
    model, images = small_mpcvit(attn_pattern=MIXED), random_images(1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', InsecureSettingWarning)
        result = secure_predict(model, images, SecureSettings(offline_phase=False), return_result=True)
    with torch.no_grad():
        plain = model(images)
    assert torch.equal(result.logits.argmax(-1), plain.argmax(-1)) and (result.logits - plain).abs().max() < 2e-2
    assert result.profile.dealer['requests'] > 10  # one exchange per request, during the inference
