"""Every family convert_to_mpc supports runs securely: a small configuration of each, converted with a mixed
per-head pattern, gives its plain-text logits under two real parties."""
import copy
import warnings

import pytest
import timm
import torch

import timm_mpc
from timm_mpc.secure import InsecureSettingWarning, SecureSettings, secure_predict
from timm_mpc.secure.plan import PlanError, SecurePlan, build_plan, build_secure_plan, normalization, swin_windows

pytestmark = pytest.mark.slow  # real party processes

ENGINES = [pytest.param(dict(), id='crypten'),
           pytest.param(dict(engine='spu', protocol='semi2k'), id='spu-semi2k', marks=pytest.mark.spu)]
TOLERANCE = 2e-2  # largest logit error at 16 (CrypTen) and 18 (SPU) fractional bits, on logits of order one


def _images(model, n, size):
    """Random pixels in [0, 1], normalized with the model's mean and std."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model, 3))
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


@pytest.mark.parametrize('engine', ENGINES)
def test_deit_distilled_both_heads_and_the_distillation_token(engine):
    model = timm_mpc.convert_to_mpc(_deit_distilled(), [['softmax', 'relu_softmax', 'scaling', '2quad'], 'scaling'],
                                    gelu_pattern=['gelu', [1, 0] * 8 + [1, 0]], input_size=(3, 32, 32))
    plan = build_plan(model)
    assert plan.dist_token and plan.num_prefix_tokens == 2 and {'dist_token', 'head_dist.weight'} <= set(plan.params)
    with torch.no_grad():
        model.head_dist.weight.mul_(4)  # the two heads differ: a forward that read one token twice would show
    result = _agree(model, _images(model, 2, 32), **engine)
    assert {'relu', 'gelu', 'scaling', 'relu_softmax', 'softmax', '2quad'} <= set(result.profile.by('op'))


def _eva(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('eva02_tiny_patch14_224', **{**dict(img_size=28, depth=2, num_classes=10), **kwargs})
    with torch.no_grad():  # non-zero biases and LayerScale, so a forward that dropped one would show
        for name, p in model.named_parameters():
            if name.endswith(('q_bias', 'v_bias', 'gamma_1', 'gamma_2')) or name.endswith('proj.bias'):
                p.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.5)  # timm scales EVA's head init down: logits near zero would tie
    return _trained_like(model.eval())


@pytest.mark.parametrize('engine', ENGINES)
def test_eva02_rope_glu_and_layer_scale(engine):
    """eva02_tiny's layout: fused qkv with q and v biases, interleaved rotary embedding, GluMlp with SiLU."""
    model = timm_mpc.convert_to_mpc(_eva(init_values=0.5), [['softmax', 'relu_softmax', 'scaling'], ['scaling'] * 3])
    plan = build_plan(model)
    assert plan.rope is not None and plan.blocks[0].attn.qv_bias and plan.blocks[0].mlp.kind == 'glu'
    assert plan.blocks[0].mlp.act == 'silu' and plan.blocks[0].ls1 == 'gamma_1'
    result = _agree(model, _images(model, 2, 28), **engine)
    assert {'rope', 'silu', 'softmax', 'relu_softmax', 'scaling'} <= set(result.profile.by('op'))


def test_eva02_base_layout_separate_qkv_swiglu_with_its_norm_and_half_rotation():
    """eva02_base's layout: separate q/k/v projections, SwiGLU with a LayerNorm on the hidden features, the
    half rotation, and the scale norm before the projection."""
    model = _eva(embed_dim=48, num_heads=3, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                 rope_type='cat', rope_rotate_half=True, scale_attn_inner=True, mlp_ratio=2)
    timm_mpc.convert_to_mpc(model, [['relu_softmax', 'scaling', 'softmax'], 'relu_softmax'])
    plan = build_plan(model)
    spec = plan.blocks[0]
    assert spec.attn.qkv == 'separate' and spec.attn.rope_half and spec.attn.norm is not None
    assert spec.mlp.kind == 'swiglu' and spec.mlp.norm is not None
    assert {'blocks.0.attn.norm', 'blocks.0.mlp.norm'} <= set(plan.layer_norm_names())
    _agree(model, _images(model, 2, 28))


def _swin():
    torch.manual_seed(0)
    model = timm.create_model('swin_tiny_patch4_window7_224', img_size=32, window_size=4, depths=(2, 2),
                              num_heads=(2, 4), embed_dim=16, num_classes=10).eval()
    with torch.no_grad():  # a relative position bias of order one (timm initializes it near zero), so dropping it shows
        for name, p in model.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.normal_(0, 2)
            elif name.endswith(('attn.proj.weight', 'attn.qkv.weight')):
                p.normal_(0, 0.2)
        model.head.fc.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize('engine', ENGINES)
def test_swin_shifted_windows_relative_position_bias_and_patch_merging(engine):
    """Swin: windows, a shifted block with its mask, the relative position bias (a shared secret weight), patch
    merging, average pooling of the token grid, and MPCViT+ GeLU tokens on a shifted block."""
    model = timm_mpc.convert_to_mpc(_swin(), [['softmax', 'relu_softmax'], ['scaling', '2quad'],
                                              ['relu_softmax', 'softmax', 'scaling', 'softmax'], 'scaling'],
                                    gelu_pattern=['gelu', [1, 0] * 32, 'gelu', 'gelu'])
    plan = build_plan(model)
    shifted, merged = plan.blocks[1], plan.blocks[2]
    assert shifted.window.shift == [2, 2] and not swin_windows(shifted.window)[2].all()
    assert merged.merge.path == 'layers.1.downsample' and merged.window.resolution == [4, 4]
    assert plan.patch_norm is not None and plan.head == 'head.fc' and shifted.mlp.gelu_tokens == [1, 0] * 32
    assert 'layers.0.blocks.0.attn.relative_position_bias_table' in plan.params
    # the client refuses grids that do not follow from the input, before anything runs
    sent = build_secure_plan(model, SecureSettings()).to_dict()
    for path, value in (('resolution', [4, 4]), ('window_size', [0, 4]), ('shift', [2])):
        tampered = copy.deepcopy(sent)
        tampered['blocks'][1]['window'][path] = value
        with pytest.raises(PlanError, match=r'plan layers.0.blocks.1.window: .*accepted: the grid there \(\[8, 8\]\)'):
            SecurePlan.from_dict(tampered)
    tampered = copy.deepcopy(sent)
    tampered['blocks'][2]['merge']['resolution'] = [4, 4]
    with pytest.raises(PlanError, match=r'plan layers.1.downsample.resolution \[4, 4\]; the grid there is \[8, 8\]'):
        SecurePlan.from_dict(tampered)
    images = _images(model, 2, 32)
    with torch.no_grad():
        plain = model(images)
        without_bias = _swin()  # the same model with its bias zeroed gives other logits
        timm_mpc.convert_to_mpc(without_bias, timm_mpc.get_attn_pattern(model), gelu_pattern=timm_mpc.get_gelu_pattern(model))
        for name, p in without_bias.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.zero_()
        assert (without_bias(images) - plain).abs().max() > 10 * TOLERANCE
    result = _agree(model, images, **engine)
    assert {'softmax', 'relu_softmax', 'scaling', '2quad', 'gelu', 'relu'} <= set(result.profile.by('op'))
    assert 'layers.1.downsample' in result.profile.by('layer')
