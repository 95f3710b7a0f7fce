"""Attention kinds, HeadKinds, activations and the MPCViT+ MLP against hand-computed values."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp

import timm_mpc
from timm_mpc.layers import (
    HeadKinds, LinearizableMlp, MPCAttention, QuadGELU, quad2_weights, relu_softmax_weights, scaling_weights, searched_tensors, softmax_weights,
)

SCORES = torch.tensor([[[[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]]])  # (B=1, H=1, Nq=2, Nk=3)


def test_kind_formulas_match_hand_computed_values():
    assert torch.allclose(softmax_weights(SCORES)[0, 0, 0], torch.tensor([2.718282, 0.135335, 20.085537]) / 22.939154)
    # relu: [1, 0, 3] / (4 + 1e-5); an all-zero row stays zero instead of dividing by zero
    assert torch.allclose(relu_softmax_weights(SCORES)[0, 0, 0], torch.tensor([1, 0, 3]) / (4 + 1e-5))
    assert torch.equal(relu_softmax_weights(SCORES)[0, 0, 1], torch.zeros(3))
    assert torch.allclose(scaling_weights(SCORES)[0, 0, 0], torch.tensor([1 / 3, -2 / 3, 1.0]))
    # 2quad with c = 5: [36, 9, 64] / 109
    assert torch.allclose(quad2_weights(SCORES)[0, 0, 0], torch.tensor([36, 9, 64]) / 109.)
    assert torch.allclose(relu_softmax_weights(SCORES, eps=0.5)[0, 0, 0], torch.tensor([1, 0, 3]) / 4.5)


def test_keep_mask_zeroes_masked_keys_for_every_kind():
    keep = torch.tensor([True, False, True])
    for fn in (softmax_weights, relu_softmax_weights, scaling_weights, quad2_weights):
        w = fn(SCORES, keep)
        assert torch.equal(w[..., 1], torch.zeros_like(w[..., 1])), fn.__name__
    assert torch.allclose(scaling_weights(SCORES, keep)[0, 0, 0], torch.tensor([0.5, 0.0, 1.5]))


def test_mixed_heads_equal_each_kind_computed_alone():
    scores = torch.randn(2, 4, 5, 5)
    heads = HeadKinds(4, ['softmax', 'scaling', 'relu_softmax', '2quad'])
    out = heads(scores)
    for h, fn in enumerate((softmax_weights, scaling_weights, relu_softmax_weights, quad2_weights)):
        assert torch.allclose(out[:, h], fn(scores[:, h:h + 1])[:, 0])


def test_search_mode_mixes_relu_softmax_and_scaling_with_alpha():
    scores = torch.randn(1, 2, 3, 3)
    heads = HeadKinds(2, 'search')
    assert heads.searching and torch.equal(heads.alpha.detach().flatten(), torch.ones(2))
    heads.set_alpha(torch.tensor([0.25, 1.0]))
    out = heads(scores)
    expected0 = 0.25 * relu_softmax_weights(scores[:, :1]) + 0.75 * scores[:, :1] / 3
    assert torch.allclose(out[:, :1], expected0)
    assert torch.allclose(out[:, 1:], relu_softmax_weights(scores[:, 1:]))
    out.sum().backward()
    assert heads.alpha.grad is not None and heads.alpha.grad.shape == (1, 2, 1, 1)


@pytest.mark.parametrize('pattern', ['search', 'relu_softmax'])
def test_searched_values_are_buffers_that_stay_trainable_leaves_across_moves(pattern):
    """α and β are no parameters (a fixed pattern leaves them unused, and timm's tests and DDP want a gradient for
    every parameter); in search mode they stay leaves that require a gradient after a dtype or device move."""
    model = timm.create_model('mpcvit_tiny', depth=2, attn_pattern=pattern, gelu_pattern=pattern.replace('relu_softmax', 'gelu'))
    assert not any(n.endswith(('.alpha', '.beta')) for n, _ in model.named_parameters())
    model.to(torch.float64)
    searched = searched_tensors(model)
    assert len(searched) == (4 if pattern == 'search' else 0)
    assert all(t.is_leaf and t.requires_grad and t.dtype == torch.float64 for t in searched)
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).sum().backward()
    assert all(t.grad is not None for t in searched)
    torch.optim.SGD(searched or [torch.zeros(1, requires_grad=True)], lr=0.1)  # an optimizer takes them


@pytest.mark.parametrize('bad', [torch.tensor([1.5, 0.0]), torch.tensor([-0.1, 0.5]), torch.tensor([float('nan'), 0.])])
def test_alpha_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r'alpha must lie in \[0, 1\]'):
        HeadKinds(2, 'search').set_alpha(bad)


@pytest.mark.parametrize('pattern, match', [
    ('softmaxx', "unknown attention kind 'softmaxx'"),
    (['softmax', 'scaling'], 'list of 3 kinds'),
    (['softmax', 'scaling', 'exp'], "unknown attention kind 'exp'"),
    (3, 'list of 3 kinds'),
])
def test_bad_head_patterns_name_what_is_accepted(pattern, match):
    with pytest.raises(ValueError, match=match) as info:
        HeadKinds(3, pattern)
    assert 'relu_softmax' in str(info.value) or 'one per head' in str(info.value)


def test_head_pattern_travels_with_state_dict_in_both_directions():
    fixed = HeadKinds(3, ['softmax', 'scaling', '2quad'])
    searching = HeadKinds(3, 'search')
    searching.load_state_dict(fixed.state_dict())
    assert searching.pattern == ['softmax', 'scaling', '2quad'] and not searching.searching
    src = HeadKinds(3, 'search')
    src.set_alpha(torch.tensor([0.2, 0.4, 0.6]))
    fixed.load_state_dict(src.state_dict())
    assert fixed.searching and torch.allclose(fixed.alpha.flatten(), torch.tensor([0.2, 0.4, 0.6]))


@pytest.mark.parametrize('state, match', [
    ({'kinds': torch.tensor([0, 7, 1])}, 'unknown attention kind code 7'),
    ({'kinds': torch.tensor([0, 1])}, r'shape \(3,\)'),
    ({'alpha': torch.tensor([0.5, 2.0, 0.1])}, r'alpha must lie in \[0, 1\]'),
])
def test_corrupt_head_state_is_refused(state, match):
    with pytest.raises(RuntimeError, match=match):
        HeadKinds(3).load_state_dict(state)


def test_plain_timm_attention_state_dict_loads_strictly():
    torch.manual_seed(0)
    ref = Attention(64, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    ref.fused_attn = False
    mpc = MPCAttention(64, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm,
                       attn_pattern=['softmax', 'relu_softmax', 'scaling', '2quad'])
    result = mpc.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert mpc.heads.pattern == ['softmax', 'relu_softmax', 'scaling', '2quad']  # kept: the state had none
    mpc.heads.set_pattern('softmax')
    x = torch.randn(2, 10, 64)
    assert torch.allclose(mpc(x), ref(x), atol=1e-6)


def test_causal_and_bool_masks():
    torch.manual_seed(0)
    attn = MPCAttention(16, num_heads=2, attn_pattern='scaling')
    x = torch.randn(1, 4, 16)
    causal = attn(x, is_causal=True)
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.allclose(causal, attn(x, attn_mask=keep))
    x2 = x.clone()
    x2[:, -1] += 10  # the last token must not change any earlier token's output
    assert torch.allclose(attn(x2, is_causal=True)[:, :-1], causal[:, :-1], atol=1e-6)


def test_quad_gelu_values_and_timm_name():
    x = torch.tensor([-2.0, 0.0, 1.0])
    assert torch.allclose(QuadGELU()(x), torch.tensor([0.5 - 1 + 0.25, 0.25, 0.125 + 0.5 + 0.25]))
    assert timm.layers.get_act_layer('quad_gelu') is QuadGELU


def test_linearizable_mlp_matches_hand_formula():
    torch.manual_seed(0)
    mlp = LinearizableMlp(4, 6, token_shape=(3,), gelu_pattern=[1, 0, 1])
    x = torch.randn(2, 3, 4)
    h = mlp.fc1(x)
    gelu_tokens = mlp.fc2(F.gelu(h))
    linear_tokens = F.relu(mlp.fc2(h))  # no GeLU, ReLU after the second linear layer
    out = mlp(x)
    assert torch.allclose(out[:, [0, 2]], gelu_tokens[:, [0, 2]], atol=1e-6)
    assert torch.allclose(out[:, 1], linear_tokens[:, 1], atol=1e-6)
    mlp.set_beta(torch.tensor([0.5, 0.5, 0.5]))
    hb = 0.5 * F.gelu(h) + 0.5 * h
    yb = mlp.fc2(hb)
    assert torch.allclose(mlp(x), 0.5 * F.relu(yb) + 0.5 * yb, atol=1e-6)


def test_linearizable_mlp_loads_plain_mlp_weights_and_equals_it_with_all_gelu():
    torch.manual_seed(0)
    plain = Mlp(8, 16)
    mlp = LinearizableMlp(8, 16, token_shape=(5,), gelu_pattern='gelu')
    assert not mlp.load_state_dict(plain.state_dict(), strict=True).missing_keys
    x = torch.randn(2, 5, 8)
    assert torch.equal(mlp(x), plain(x))


@pytest.mark.parametrize('pattern, match', [
    ('relu', "unknown GeLU pattern 'relu'"),
    ([1, 0], r'one value per token, shape \(3,\)'),
    ([1, 0.5, 1], 'holds 0 .* or 1'),
])
def test_bad_gelu_patterns(pattern, match):
    with pytest.raises(ValueError, match=match):
        LinearizableMlp(4, 6, token_shape=(3,), gelu_pattern=pattern)


def test_beta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r'beta must lie in \[0, 1\]'):
        LinearizableMlp(4, 6, token_shape=(2,), gelu_pattern='search').set_beta(torch.tensor([1.2, 0.3]))


def test_layer_names_registered_in_timm():
    from timm.models.vision_transformer import ATTN_LAYERS
    for name, cls in {'softmax': timm_mpc.SoftmaxAttention, 'relu_softmax': timm_mpc.ReLUSoftmaxAttention,
                      'scaling': timm_mpc.ScalingAttention, '2quad': timm_mpc.Quad2Attention,
                      'search': timm_mpc.SearchAttention}.items():
        assert ATTN_LAYERS[name] is cls
    timm_mpc.register_timm_layers()  # idempotent
