"""convert_to_mpc on the timm families it supports, and refusals for the rest."""
import pytest
import timm
import torch

import timm_mpc
from timm_mpc import convert_to_mpc

FAMILIES = {  # two blocks (Swin: two stages) at 32x32 hold every path the conversion takes
    'vit_tiny_patch16_224': dict(reg_tokens=4, qk_norm=True, init_values=1e-5, qkv_bias=True, img_size=32,
                                 patch_size=8, depth=2),
    'deit_tiny_distilled_patch16_224': dict(img_size=32, patch_size=8, depth=2),
    'eva02_tiny_patch14_224': dict(num_classes=10, img_size=28, depth=2),  # ends in a LayerNorm: sum() has no gradient
    'swin_tiny_patch4_window7_224': dict(img_size=32, window_size=4, depths=(2, 2), num_heads=(3, 6)),
}
KINDS = ['softmax', 'relu_softmax', 'scaling', '2quad', 'search']


def _unfused(model):
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = False
    return model


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, images):
    """(name, original model, its input, its logits with timm's unfused attention)."""
    torch.manual_seed(0)
    model = _unfused(timm.create_model(request.param, **FAMILIES[request.param])).eval()
    # non-zero biases, so a conversion that dropped one would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('q_bias', 'v_bias', 'qkv.bias', 'relative_position_bias_table')):
                p.normal_(0, 0.5)
    size = model.patch_embed.img_size
    x = images[..., :size[0], :size[1]]
    with torch.no_grad():
        logits = model(x)
    return request.param, model, x, logits


def _fresh(family):
    name, model, x, logits = family
    clone = _unfused(timm.create_model(name, **FAMILIES[name])).eval()
    clone.load_state_dict(model.state_dict())
    return clone, x, logits


def test_softmax_conversion_reproduces_the_model_and_keeps_every_weight(family):
    model, images, logits = _fresh(family)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    model, report = convert_to_mpc(model, 'softmax', return_report=True)
    after = model.state_dict()
    for key, (ptr, value) in before.items():
        assert after[key].data_ptr() == ptr and torch.equal(after[key], value), key
    assert set(after) - set(before) == {f'{name}.heads.{key}' for name, _, _ in report.attention for key in ('kinds', 'alpha')}
    assert report.attention and all(new.startswith('MPC') for _, _, new in report.attention)
    with torch.no_grad():
        assert (model(images) - logits).abs().max() <= 1e-5


@pytest.mark.parametrize('kind', KINDS)
def test_every_kind_runs_forward_and_backward(family, kind):
    model, images, _ = _fresh(family)
    convert_to_mpc(model, kind)  # eval mode: stochastic depth would drop whole blocks from the gradient
    out = model(images[:1])
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith('qkv.weight') or n.endswith('q_proj.weight')]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    if kind == 'search':
        alphas = [b for n, b in model.named_buffers() if n.endswith('heads.alpha')]
        assert alphas and all(a.grad is not None for a in alphas)
        assert {id(a) for a in alphas} == {id(t) for t in timm_mpc.layers.searched_tensors(model)}
    # the kind is what the real forward path uses: the weights of the first attention layer are that kind's
    heads = next(m for m in model.modules() if isinstance(m, timm_mpc.HeadKinds))
    seen = {}
    hook = heads.register_forward_hook(lambda mod, args, out: seen.update(scores=args[0], weights=out))
    with torch.no_grad():
        model(images[:1])
    hook.remove()
    if kind != 'search':
        expected = getattr(timm_mpc.layers, f'{"quad2" if kind == "2quad" else kind}_weights')(seen['scores'])
        assert torch.allclose(seen['weights'], expected, atol=1e-6)
        if kind != 'softmax':
            assert not torch.allclose(seen['weights'], seen['scores'].softmax(-1), atol=1e-3)

def test_per_head_pattern_and_report(family):
    model, _, _ = _fresh(family)
    heads = [m.num_heads for m in model.modules() if type(m).__name__ in ('Attention', 'EvaAttention', 'WindowAttention')]
    pattern = [[('relu_softmax', 'scaling')[h % 2] for h in range(n)] for n in heads]
    model, report = convert_to_mpc(model, pattern, return_report=True)
    assert timm_mpc.get_attn_pattern(model) == pattern
    assert report.head_counts == {'relu_softmax': sum((n + 1) // 2 for n in heads), 'scaling': sum(n // 2 for n in heads)}
    assert f'attention modules converted: {len(heads)}' in str(report)

def test_activation_swap_and_mpcvit_plus_on_vit(images):
    model, report = convert_to_mpc(
        timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=3), 'relu_softmax',
        act_layer='quad_gelu', gelu_pattern='search', return_report=True)
    assert len(report.activations) == 3 and all(new == 'QuadGELU' for _, _, new in report.activations)
    assert len(report.mlps) == 3 and model.blocks[0].mlp.beta.shape == (1, 17, 1)
    assert isinstance(model.blocks[0].mlp.act, timm_mpc.QuadGELU)
    model(images[:1]).sum().backward()
    assert model.blocks[2].mlp.beta.grad is not None


def test_convert_then_load_original_weights_strictly():
    source = timm.create_model('vit_tiny_patch16_224')
    target = convert_to_mpc(timm.create_model('vit_tiny_patch16_224'), 'scaling')
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_created_with_timm_attn_layer_name(images):
    model = timm.create_model('vit_tiny_patch16_224', attn_layer='relu_softmax', act_layer='quad_gelu', img_size=32,
                              patch_size=8, depth=2)
    assert timm_mpc.count_head_kinds(model) == {'relu_softmax': 6}
    model(images[:1]).sum().backward()


def test_unsupported_model_names_types_and_families_and_changes_nothing():
    model = timm.create_model('resnet18')
    before = repr(model)
    with pytest.raises(ValueError, match=r'no attention modules \(top-level type ResNet\).*vit_\*.*swin_\*'):
        convert_to_mpc(model)
    assert repr(model) == before


def test_unsupported_attention_type_is_named():
    model = timm.create_model('vit_tiny_patch16_224', global_pool='map')  # attention pooling head
    with pytest.raises(ValueError, match=r"unsupported types \['timm.layers.attention_pool.AttentionPoolLatent'\]"):
        convert_to_mpc(model, 'scaling')
    assert not any(isinstance(m, timm_mpc.MPCAttention) for m in model.modules())


@pytest.mark.parametrize('kwargs, match', [
    (dict(attn_pattern='sigmoid'), "unknown attention kind 'sigmoid'"),
    (dict(attn_pattern=['softmax'] * 11), 'list of 12 layer patterns'),
    (dict(attn_pattern=[['softmax', 'scaling']] * 12), 'list of 3 kinds'),
    (dict(act_layer='cubic'), "unknown act_layer 'cubic'"),
    (dict(gelu_pattern='half'), "unknown gelu_pattern 'half'"),
    (dict(gelu_pattern=[[1] * 10] * 12), r'one value per token, shape \(197,\)'),
])
def test_bad_input_leaves_model_untouched(kwargs, match):
    model = timm.create_model('vit_tiny_patch16_224')
    before = repr(model)
    with pytest.raises(ValueError, match=match):
        convert_to_mpc(model, **kwargs)
    assert repr(model) == before


def test_gelu_pattern_needs_plain_mlp():
    with pytest.raises(ValueError, match=r'needs fc1 -> act -> fc2 MLPs \(timm Mlp\); blocks.0.mlp is GluMlp'):
        convert_to_mpc(timm.create_model('eva02_tiny_patch14_224'), gelu_pattern='linear')
