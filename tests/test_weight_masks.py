"""Weights masked once per session (``SecureSettings(weight_masks=True)``): the dealer keeps a mask for each linear
weight alone, its difference is opened when the weights are shared, and each product then opens only activations."""
import json
import math

import pytest
import torch

from timm_mpc.secure import SecureSession, SecureSettings, build_secure_plan, secure_predict
from timm_mpc.secure.crypten.dealer import DealerError, _fixed, _mask, check_requests
from timm_mpc.secure.crypten.offline import mask_requests
from timm_mpc.secure.secure_vit import SecureViT

from small_models import MIXED, random_images, small_mpcvit

MASKED, UNMASKED = SecureSettings(weight_masks=True), SecureSettings(weight_masks=False)


@pytest.fixture(scope='module')
def model():
    return small_mpcvit(attn_pattern=MIXED, gelu_pattern=[[1, 0] * 8 + [1], 'linear'])


def test_the_masks_requests_come_from_the_plan_and_name_each_linear_weight(model):
    plan = build_secure_plan(model, MASKED, random_images(4))
    linear = SecureViT.linear_weights(plan)
    assert linear['patch_embed.proj.weight'] == [3 * 4 * 4, 64] and linear['head.weight'] == [64, 10]
    assert linear['blocks.0.attn.qkv.weight'] == [64, 192] and 'blocks.0.norm1.weight' not in linear
    requests = mask_requests(plan, MASKED)
    assert [r[2] for r in requests] == [(key, shape) for key, shape in enumerate(linear.values())]
    check_requests(json.loads(json.dumps(requests)))  # the form the dealer receives: JSON
    assert mask_requests(plan, UNMASKED) == []


class _Server:  # the dealer's state as serve_dealer keeps it: generators stand in for the parties' seeds
    def __init__(self):
        self.masks = {}
        self.draws = 0

    def _get_additive_PRSS(self, size, remove_rank=False):
        self.draws += 1
        return torch.full(tuple(size), self.draws, dtype=torch.int64)


def test_a_weights_mask_is_made_once_and_meets_no_other_matrix():
    server = _Server()
    assert _mask(server, 0, [4, 3]).numel() == 0  # the parties draw their shares: nothing is sent
    with pytest.raises(DealerError, match='asked for the mask of weight 0 again'):
        _mask(server, 0, [4, 3])
    assert _fixed(server, 0, [2, 4], [4, 3], 'matmul').shape == (2, 3)
    with pytest.raises(DealerError, match=r'for a matrix of size \[3, 4\], which is not its \[4, 3\]'):
        _fixed(server, 0, [2, 3], [3, 4], 'matmul')
    with pytest.raises(DealerError, match='which no weight has'):
        _fixed(server, 1, [2, 4], [4, 3], 'matmul')


@pytest.mark.parametrize('request_, match', [
    (['mask', None, [[4, 3]], {}], "mask takes a weight's number and its size"),
    (['mask', None, [True, [4, 3]], {}], "mask takes a weight's number"),
    (['fixed', None, [0, [2, 4], [4, 3], 'mul'], {}], "a fixed-mask triple is a matmul, not 'mul'"),
    (['fixed', None, [0, [2, 4], [4, 3]], {}], 'fixed takes a weight'),
    (['fixed', None, [0, [2, -4], [4, 3], 'matmul'], {}], 'not a size'),
])
def test_malformed_mask_requests_are_named(request_, match):
    with pytest.raises(DealerError, match=match):
        check_requests([request_])


@pytest.mark.slow
def test_masked_weights_give_the_same_logits_and_open_only_activations(model):
    """Real runs (two parties and the dealer): a session with masked weights gives the logits of plain text; its first
    call opens the weights' differences once, in the setup, and each call sends what the unmasked protocol sends less
    those differences; its next call masks nothing; the dry run still predicts a call's rounds and bytes exactly."""
    images = random_images(3)
    with torch.no_grad():
        plain = model(images)
    unmasked = secure_predict(model, images, UNMASKED, return_result=True)
    with SecureSession(model, MASKED) as session:
        first = session.predict(images, return_result=True)
        second = session.predict(images[:2], return_result=True)  # a new batch size: its own dry run
    for result, expected in ((unmasked, plain), (first, plain), (second, plain[:2])):
        assert torch.equal(result.logits.argmax(-1), expected.argmax(-1)), result
        assert (result.logits - expected).abs().max() < 2e-2
    weights = sum(math.prod(shape) for shape in SecureViT.linear_weights(first.plan).values())
    opened = {(r.layer, r.op): r for r in first.profile.setup}[('weights', 'mask')]  # every δ, in one round
    assert opened.rounds == 1 and opened.bytes > 0 and opened.bytes % weights == 0
    # a call: the same rounds (ε and δ were opened together), and no δ any more
    assert first.profile.rounds == unmasked.profile.rounds
    assert unmasked.profile.bytes - first.profile.bytes == opened.bytes
    assert (first.estimate.rounds, first.estimate.bytes) == (first.profile.rounds, first.profile.bytes)
    assert not second.profile.setup and (second.estimate.rounds, second.estimate.bytes) == (second.profile.rounds,
                                                                                            second.profile.bytes)
