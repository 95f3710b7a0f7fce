"""The registry of attention kinds, the model reader and mode-as-data: one entry adds a kind everywhere."""
import importlib

import pytest
import timm
import torch

import timm_mpc
from timm_mpc.hub.card import pattern_grid, render_card
from timm_mpc.hub.publish import model_facts
import timm_mpc.layers.attn_kinds as registry
from timm_mpc.layers import searched_tensors
from timm_mpc.secure import SecureSettings, build_secure_plan, calibrate, secure_predict

SMALL = dict(depth=2, img_size=16, embed_dim=64, num_heads=4)


@pytest.fixture
def toy(monkeypatch):
    """The toy kind of tests/toy_kind.py, registered for this test only."""
    monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
    module = importlib.import_module('toy_kind')
    registry.register_attn_kind(module.TOY)
    return module


@pytest.mark.slow
def test_a_registered_kind_runs_in_plain_text_calibration_secure_inference_and_a_card(toy):
    torch.manual_seed(0)
    pattern = [['square_norm', 'scaling', 'square_norm', 'relu_softmax']] * 2
    model = timm.create_model('mpcvit_tiny', attn_pattern=pattern, **SMALL).eval()
    assert timm_mpc.count_head_kinds(model) == {'square_norm': 4, 'relu_softmax': 2, 'scaling': 2}

    # plain text: the heads of the new kind compute its weights
    heads, scores = model.blocks[0].attn.heads, torch.randn(2, 4, 17, 17)
    weights = heads(scores)
    assert torch.allclose(weights[:, [0, 2]], toy.square_norm_weights(scores[:, [0, 2]]))
    assert torch.allclose(weights[:, [1]], scores[:, [1]] / 17)

    # calibration records its denominator, and the plan holds a public schedule for it
    images = timm_mpc.data.calibration_examples(model)
    ranges = calibrate(model, images, SecureSettings())
    assert 0 < ranges['blocks.0.attn.square_norm']['min'] < ranges['blocks.0.attn.square_norm']['max']
    plan = build_secure_plan(model, SecureSettings())
    assert {'blocks.0.attn.square_norm', 'blocks.1.attn.square_norm'} <= set(plan.schedules)

    # two-party secure inference (real processes, which import the kind's module) agrees with plain text
    secure = secure_predict(model, images[:2])
    with torch.no_grad():
        plain = model(images[:2])
    assert (secure - plain).abs().max() < 0.05

    # a card names it by its label and title
    card = render_card(dict(model=model_facts(model)), 'me/mpcvit_tiny.toy')
    assert '| 0 | SN | SC | SN | RS |' in pattern_grid(pattern) and 'SN = Square-Norm' in card
    assert '4 Square-Norm' in card


def test_the_cost_table_probes_every_registered_kind(toy):
    from timm_mpc.cost import layer_cost
    from timm_mpc.cost.table import _probe_pattern
    probed = {kind for block in _probe_pattern(4) for kind in block}
    assert probed == {k.name for k in registry.list_attn_kinds()} and 'square_norm' in probed
    cost = dict(rounds=1, bytes=1, time_s=1)
    table = dict(per_head={'softmax': cost}, per_layer_rest=cost)  # a table measured before the kind
    with pytest.raises(ValueError, match=r"no measured cost for attention kind 'square_norm'.*\['softmax'\]"):
        layer_cost(table, ['square_norm'])


def test_a_kind_whose_name_or_code_is_taken_is_refused(toy):
    clash = toy.TOY.__class__(**{**toy.TOY.__dict__, 'name': 'other'})  # code 90 again
    with pytest.raises(ValueError, match="'other' \\(code 90\\) clashes with the registered 'square_norm'"):
        registry.register_attn_kind(clash)
    assert registry.register_attn_kind(toy.TOY) is toy.TOY  # the same record again: nothing changes


def test_the_reader_finds_every_part_once_and_says_what_runs_securely():
    parts = timm_mpc.read_model(timm.create_model('mpcvit_tiny', attn_pattern='softmax'))
    assert len(parts.attention) == len(parts.heads) == len(parts.mlps) == 7
    assert len(parts.norms) == 15 and parts.family.name == 'MPCViT' and parts.runs_securely
    swin = timm_mpc.convert_to_mpc(timm.create_model('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1)))
    parts = timm_mpc.read_model(swin)
    assert parts.converts and parts.runs_securely and parts.family.name == 'Swin'
    table = {row['family']: row for row in timm_mpc.support_table()}
    assert all(row['converts'] == row['secure'] == 'yes' for row in table.values())  # the same set of families


def test_timm_gelu_and_torch_gelu_are_calibrated_alike():
    """One activation table: calibration used to hook only torch's nn.GELU, skipping timm's GELU (act_layer='gelu')."""
    torch.manual_seed(0)
    ours = timm.create_model('mpcvit_tiny', attn_pattern='softmax', **SMALL).eval()
    timms = timm.create_model('mpcvit_tiny', attn_pattern='softmax', act_layer='gelu', **SMALL).eval()
    timms.load_state_dict(ours.state_dict())
    assert type(timms.blocks[0].mlp.act) is not type(ours.blocks[0].mlp.act)
    images = torch.randn(4, 3, 16, 16)
    got, expected = calibrate(timms, images, SecureSettings()), calibrate(ours, images, SecureSettings())
    assert 'blocks.0.mlp.act' in got and got == expected


def test_an_optimizer_built_before_loading_a_search_checkpoint_trains_what_the_model_uses():
    """Loading fills α in place: an optimizer that holds it (α is a buffer, see PatternState) trains the tensor the
    forward pass reads, and after the load it requires a gradient and is among the model's searched tensors."""
    torch.manual_seed(0)
    source = timm.create_model('mpcvit_tiny', attn_pattern='search', **SMALL)
    with torch.no_grad():
        for blk in source.blocks:
            blk.attn.heads.alpha.uniform_(0.2, 0.8)
    model = timm.create_model('mpcvit_tiny', attn_pattern='softmax', **SMALL)
    alpha = model.blocks[0].attn.heads.alpha
    optimizer = torch.optim.SGD([*model.parameters(), *(blk.attn.heads.alpha for blk in model.blocks)], lr=1.0)
    assert not alpha.requires_grad and not searched_tensors(model)
    model.load_state_dict(source.state_dict())
    assert model.blocks[0].attn.heads.alpha is alpha and torch.equal(alpha, source.blocks[0].attn.heads.alpha)
    assert alpha.requires_grad and any(t is alpha for t in searched_tensors(model))
    assert timm_mpc.count_head_kinds(model) == {'search': 8}
    before = alpha.detach().clone()
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(alpha, before)  # the optimizer's tensor is the one the forward pass reads
    with torch.no_grad():
        changed = model(torch.ones(1, 3, 16, 16))
        alpha.copy_(before)
        assert not torch.equal(model(torch.ones(1, 3, 16, 16)), changed)


def test_every_pattern_travels_with_a_checkpoint():
    from timm_mpc.layers.pattern_state import checkpoint_state
    plain = timm.create_model('mpcvit_tiny', attn_pattern='softmax', **SMALL)
    state = checkpoint_state(plain)
    assert not any(k.endswith(('.alpha', '.beta')) for k in state)  # unused searched tensors are left out
    other = timm.create_model('mpcvit_tiny', attn_pattern='scaling', gelu_pattern='linear', **SMALL)
    other.load_state_dict(state, strict=True)
    assert timm_mpc.count_head_kinds(other) == {'softmax': 8} and timm_mpc.get_gelu_pattern(other) == []


def test_weights_and_model_args_must_agree_on_the_pattern(tmp_path):
    from timm_mpc.layers.pattern_state import checkpoint_state
    from timm_mpc.utils import save_weights
    model = timm.create_model('mpcvit_tiny', attn_pattern='scaling', **SMALL)
    save_weights(checkpoint_state(model), tmp_path / 'w.safetensors')
    file = dict(pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    loaded = timm.create_model('mpcvit_tiny', pretrained=True, **file, **SMALL)  # no pattern asked: the weights'
    assert timm_mpc.count_head_kinds(loaded) == {'scaling': 8}
    with pytest.raises(timm_mpc.PatternError, match=r"weights hold head pattern \[\['scaling'.*attn_pattern='softmax'"):
        timm.create_model('mpcvit_tiny', pretrained=True, attn_pattern='softmax', **file, **SMALL)


@pytest.mark.slow  # a fresh Python process
def test_import_timm_mpc_registers_the_models_and_loads_nothing_else():
    """`import timm_mpc` and building a model leave CrypTen, SPU, JAX, matplotlib, jinja2 and timm-mpc's secure and
    training rooms unloaded, and no import hook installed."""
    import subprocess
    import sys
    code = ('import sys, timm; hooks = list(sys.meta_path); import timm_mpc; timm.create_model("mpcvit_tiny"); '
            'print([m for m in ("crypten", "spu", "jax", "matplotlib", "jinja2", "timm_mpc.training", '
            '"timm_mpc.secure") if m in sys.modules], sys.meta_path == hooks)')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split('\n')[-2] == '[] True', (done.stdout, done.stderr[-1500:])


def test_the_package_alone_needs_no_extra_and_a_missing_extra_names_its_install(monkeypatch):
    """`pip install timm-mpc` pulls neither CrypTen (whose install needs an environment variable) nor SPU, matplotlib
    or jinja2; they come with extras, and code that needs one that is missing says which `pip install` brings it."""
    import importlib.metadata
    import sys

    from timm_mpc.utils import import_extra
    core = [r for r in importlib.metadata.requires('timm-mpc') if 'extra ==' not in r]
    assert core and not [r for r in core if r.split('=')[0].split('>')[0].strip() in
                         ('crypten', 'spu', 'matplotlib', 'jinja2')], core
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as if not installed
    with pytest.raises(ImportError, match=r'plotting needs matplotlib, which is not installed: '
                                          r'pip install "timm-mpc\[train\]"'):
        import_extra('matplotlib', 'plotting')


def test_timms_private_api_is_used_in_the_adapter_module_only():
    """A timm release that moves a private name breaks timm_mpc/timm_adapter.py and nothing else."""
    import re
    from pathlib import Path
    root = Path(timm_mpc.__file__).parent
    private = re.compile(r'timm\.(models|layers)\._|\._model_args|_ACT_LAYER_DEFAULT')
    found = sorted({str(p.relative_to(root)) for p in root.rglob('*.py') if private.search(p.read_text())})
    assert found == ['timm_adapter.py'], found
