"""The mpcvit_* models in timm's registry."""
import json
import sys

import huggingface_hub
import pytest
import timm
import torch

import timm_mpc
from timm_mpc import MPCViT, PretrainedWeightsError


def test_models_are_registered_in_timm():
    assert timm.list_models('mpcvit_*') == ['mpcvit_small', 'mpcvit_tiny']
    assert 'mpcvit_tiny.fmnist_mu50_kd' in timm.list_pretrained('mpcvit_tiny*')
    cfg = timm.models.get_pretrained_cfg('mpcvit_tiny.fmnist_mu50_kd')
    assert cfg.hf_hub_id == 'timm-mpc/mpcvit_tiny.fmnist_mu50_kd'


def test_mpcvit_tiny_is_the_papers_vit_7_4_32():
    model = timm.create_model('mpcvit_tiny')
    assert timm_mpc.reader.num_weights(model) == 3_716_874  # the paper's 3.72M
    assert len(model.blocks) == 7 and model.blocks[0].attn.num_heads == 4 and model.embed_dim == 256
    assert model.num_tokens == 65 and model.blocks[0].mlp.fc1.out_features == 512
    assert model.blocks[0].norm1.eps == 1e-5 and model.norm.eps == 1e-5
    assert model.blocks[0].attn.qkv.bias is None
    # starts where the search starts: every head searching with alpha = 1
    assert timm_mpc.count_head_kinds(model) == {'search': 28}
    assert all(torch.equal(b.attn.heads.alpha, torch.ones(1, 4, 1, 1)) for b in model.blocks)


def test_mpcvit_small_is_the_papers_vit_9_12_64():
    model = timm.create_model('mpcvit_small', attn_pattern='softmax')
    assert len(model.blocks) == 9 and model.blocks[0].attn.num_heads == 12 and model.embed_dim == 192
    assert model.num_tokens == 257 and model.num_classes == 200
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_block_puts_layernorm_after_attention_residual():
    torch.manual_seed(0)
    model = timm.create_model('mpcvit_tiny', attn_pattern='softmax').eval()
    blk = model.blocks[0]
    x = torch.randn(2, 65, 256)
    y = blk.norm2(x + blk.attn(blk.norm1(x)))
    expected = y + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(y)))
    assert torch.allclose(blk(x), expected, atol=1e-5)


@pytest.mark.parametrize('pattern', ['softmax', 'relu_softmax', 'scaling', '2quad', 'search',
                                     [['softmax', 'scaling', 'relu_softmax', '2quad']] * 7])
def test_forward_backward_for_every_pattern(pattern):
    model = timm.create_model('mpcvit_tiny', attn_pattern=pattern, gelu_pattern='search')
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    # every parameter gets a gradient, as timm's backward test requires; α and β are buffers, and have one
    # exactly where the pattern searches them
    assert all(p.grad is not None for p in model.parameters())
    searched = {n: b.grad is not None for n, b in model.named_buffers() if n.endswith(('.alpha', '.beta'))}
    assert all(has_grad == (n.endswith('.beta') or pattern == 'search') for n, has_grad in searched.items())


def test_patterns_are_json_model_args():
    pattern = [['relu_softmax', 'scaling', 'scaling', 'relu_softmax']] * 7
    gelu = [[1] * 33 + [0] * 32] * 7
    args = json.loads(json.dumps(dict(attn_pattern=pattern, gelu_pattern=gelu)))
    model = timm.create_model('mpcvit_tiny', **args)
    assert timm_mpc.get_attn_pattern(model) == pattern
    assert timm_mpc.get_gelu_pattern(model) == gelu


@pytest.mark.parametrize('kwargs, match', [
    (dict(attn_pattern='exp'), "unknown attention kind 'exp'"),
    (dict(attn_pattern=['softmax'] * 6), 'list of 7 layer patterns'),
    (dict(attn_pattern=[['softmax'] * 3] * 7), 'must be a kind or a list of 4 kinds'),
    (dict(gelu_pattern='quad'), "unknown gelu_pattern 'quad'"),
    (dict(gelu_pattern=[[1] * 64] * 7), r'one value per token, shape \(65,\)'),
])
def test_bad_model_patterns(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('mpcvit_tiny', **kwargs)


def test_teacher_is_the_same_model_with_softmax_heads():
    student = timm.create_model('mpcvit_tiny')
    teacher = timm.create_model('mpcvit_tiny', attn_pattern='softmax')
    assert isinstance(teacher, MPCViT)
    assert set(student.state_dict()) == set(teacher.state_dict())  # a pattern is values, not structure
    teacher.load_state_dict(student.state_dict())  # the pattern travels: teacher becomes the searched student
    assert timm_mpc.count_head_kinds(teacher) == {'search': 28}


def test_pretrained_without_reachable_weights_fails_clearly(tmp_path, monkeypatch):
    """Offline, with nothing cached and no checkout's copy (an installed package): an error saying what to do."""
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(sys.modules['timm_mpc.models.mpcvit'], 'SHIPPED_CHECKPOINTS', tmp_path / 'no checkout')
    with pytest.raises(PretrainedWeightsError, match=r'mpcvit_tiny\.fmnist_mu50_kd.*hf download timm-mpc/.*seed-cache'):
        timm.create_model('mpcvit_tiny', pretrained=True)


def test_pretrained_without_any_weights_fails_clearly():
    with pytest.raises(PretrainedWeightsError, match='mpcvit_small.tinyimagenet has no published weights.*file=PATH'):
        timm.create_model('mpcvit_small', pretrained=True)
