"""timm's own model checks for the registered models, in every head pattern.

timm's own tests/test_models.py runs in CI as well (.ci/timm_models). torch.jit.script is not among the checks:
TorchScript cannot compile the registry's dispatch to each kind's Python function, so CI puts mpcvit_* in timm's
own TorchScript exclusions (torch.compile and torch.fx, checked here, are PyTorch's supported paths).
"""
import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import timm_mpc  # noqa: F401  (registers the models)

HEADS = {'mpcvit_tiny': 4, 'mpcvit_small': 12}
KINDS = ['softmax', 'relu_softmax', 'scaling', '2quad']


def _patterns(name, depth=None):
    depth = depth or {'mpcvit_tiny': 7, 'mpcvit_small': 9}[name]
    mixed = [[KINDS[(h + layer) % 4] for h in range(HEADS[name])] for layer in range(depth)]
    tokens = {'mpcvit_tiny': 65, 'mpcvit_small': 257}[name]
    plus = dict(attn_pattern=mixed, gelu_pattern=[[h % 2 for h in range(tokens)]] * depth)
    return {**{k: dict(attn_pattern=k) for k in KINDS}, 'mixed': dict(attn_pattern=mixed),
            'search': dict(attn_pattern='search', gelu_pattern='search'), 'mpcvit_plus': plus}


CASES = [(name, pattern) for name in HEADS for pattern in _patterns(name)]


def _model(name, pattern, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **_patterns(name, kwargs.get('depth'))[pattern], **kwargs)


def _input(model, batch=2):
    return torch.randn(batch, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('name, pattern', CASES)
def test_forward_backward_default_cfg(name, pattern):
    model = _model(name, pattern, depth=2)  # the registered configuration but for depth: two blocks hold every path
    cfg = model.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier'):
        assert key in cfg, key
    assert model.get_submodule(cfg['first_conv']).in_channels == cfg['input_size'][0]
    assert model.get_submodule(cfg['classifier']).out_features == model.num_classes
    out = model(_input(model))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # as timm's backward test: α and β are buffers
    model.reset_classifier(0)
    assert model(_input(model)).shape == (2, model.num_features)


@pytest.mark.parametrize('pattern', ['search', 'mpcvit_plus'])
def test_built_on_the_meta_device_as_timm_checks_configs(pattern):
    """timm's factory ``device`` argument reaches every tensor, the pattern's too (timm checks configs on meta)."""
    model = _model('mpcvit_tiny', pattern, depth=2, device='meta')
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}
    assert model(torch.randn(1, 3, 32, 32, device='meta')).shape == (1, 10)


@pytest.mark.parametrize('name, pattern', CASES)
def test_features_only_and_forward_intermediates(name, pattern):
    model = _model(name, pattern, depth=3).eval()
    x = _input(model)
    final, intermediates = model.forward_intermediates(x)
    with torch.no_grad():
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
    grid = model.patch_embed.grid_size
    assert len(intermediates) == len(model.blocks) and intermediates[0].shape == (2, model.embed_dim, *grid)
    features = _model(name, pattern, depth=3, features_only=True, out_indices=(0, -1)).eval()
    assert features.feature_info.channels() == [model.embed_dim] * 2
    with torch.no_grad():
        maps = features(x)
    assert [m.shape for m in maps] == [(2, model.embed_dim, *grid)] * 2


@pytest.mark.parametrize('name, pattern', CASES)
def test_fx_trace_and_compile_without_graph_breaks(name, pattern):
    model = _model(name, pattern, depth=2).eval()  # the tracers' work grows with depth; two blocks hold every path
    x = _input(model)
    with torch.no_grad():
        eager = model(x)
        # torch.fx through timm's tracer, as timm's own tests trace models (HeadKinds is one of its leaf modules)
        _, eval_nodes = get_graph_node_names(model)
        fx = create_feature_extractor(model, [eval_nodes[-1]]).eval()
        assert (fx(x)[eval_nodes[-1]] - eager).abs().max() <= 1e-5
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend='eager')  # fullgraph: a graph break is an error
        assert (compiled(x) - eager).abs().max() <= 1e-5


@pytest.mark.slow
def test_compile_with_inductor_gives_eager_logits():
    # one block of four heads holds every kind and both GeLU token kinds: inductor's work grows with the graph
    model = _model('mpcvit_tiny', 'mpcvit_plus', depth=1).eval()
    x = _input(model)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        assert (torch.compile(model, fullgraph=True)(x) - eager).abs().max() <= 1e-5
