"""Every family convert_to_mpc supports runs securely: a small configuration of each, converted with a mixed
per-head pattern, gives its plain-text logits under two real parties."""
import warnings

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import timm_mpc
from timm_mpc.secure import InsecureSettingWarning, secure_predict
from timm_mpc.secure.plan import build_plan

TOLERANCE = 2e-2  # largest logit error at 16 (CrypTen) and 18 (SPU) fractional bits, on logits of order one


def _images(n, size):
    """Random pixels in [0, 1], normalized with timm's ImageNet mean and std."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) - mean) / std


def _trained_like(model):
    with torch.no_grad():  # prefix tokens of order one, not timm's tiny init, so every token matters
        for name, p in model.named_parameters():
            if name in ('cls_token', 'dist_token', 'reg_token'):
                p.normal_(0, 1)
    return model


def _agree(model, images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', InsecureSettingWarning)
        result = secure_predict(model, images, return_result=True, **kwargs)
    with torch.no_grad():
        plain = model(images)
    assert torch.equal(result.logits.argmax(-1), plain.argmax(-1))
    assert (result.logits - plain).abs().max() < TOLERANCE
    return result


def _deit_distilled():
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=48,
                              num_heads=4, num_classes=10).eval()
    return _trained_like(model)


@pytest.mark.parametrize('engine', [dict(), dict(engine='spu', protocol='semi2k')], ids=['crypten', 'spu-semi2k'])
def test_deit_distilled_both_heads_and_the_distillation_token(engine):
    model = timm_mpc.convert_to_mpc(_deit_distilled(), [['softmax', 'relu_softmax', 'scaling', '2quad'], 'scaling'],
                                    gelu_pattern=['gelu', [1, 0] * 8 + [1, 0]], input_size=(3, 32, 32))
    plan = build_plan(model)
    assert plan.dist_token and plan.num_prefix_tokens == 2 and {'dist_token', 'head_dist.weight'} <= set(plan.params)
    with torch.no_grad():
        model.head_dist.weight.mul_(4)  # the two heads differ: a forward that read one token twice would show
    result = _agree(model, _images(2, 32), **engine)
    assert {'relu', 'gelu', 'scaling', 'relu_softmax', 'softmax', '2quad'} <= set(result.profile.by('op'))
