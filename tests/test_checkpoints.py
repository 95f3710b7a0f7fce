"""Checkpoints: the MPCViT authors' layout, our own, and broken ones."""
import pytest
import safetensors.torch
import timm
import torch

import timm_mpc
from timm_mpc import PretrainedWeightsError

from authors_mpcvit import AuthorsViTLite, randomize_

MIXED_ALPHA = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]]
ALPHA_KINDS = {1: 'relu_softmax', 0: 'scaling'}


def _authors_checkpoint(tmp_path, seed=0, name='mpcvit_cifar10-0.5-kd.pth.tar', alpha=MIXED_ALPHA, beta=None, **kw):
    model = randomize_(AuthorsViTLite(with_alpha=alpha is not None, with_beta=beta is not None, **kw), seed).eval()
    with torch.no_grad():
        for i, blk in enumerate(model.classifier.blocks):
            if alpha is not None:
                blk.self_attn.alpha.copy_(torch.tensor(alpha[i], dtype=torch.float32).view(1, -1, 1, 1))
            if beta is not None:
                blk.beta.copy_(beta[i].view(1, -1, 1))
    path = tmp_path / name
    torch.save({'epoch': 600, 'state_dict': model.state_dict(), 'optimizer': {}}, path)
    return model, path


def _images(n=4, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_authors_checkpoint_with_mixed_heads_gives_authors_logits(tmp_path):
    reference, path = _authors_checkpoint(tmp_path)
    assert sum(sum(a) for a in MIXED_ALPHA) == 14  # mu = 0.5: 14 of 28 heads keep ReLU-Softmax
    model = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert timm_mpc.get_attn_pattern(model) == [[ALPHA_KINDS[a] for a in layer] for layer in MIXED_ALPHA]
    images = _images()
    with torch.no_grad():
        expected, (tokens,) = reference(images)
        got = model(images)
        got_tokens = model.forward_features(images)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()
    assert torch.allclose(got_tokens, tokens, rtol=0, atol=1e-5)
    timm_mpc.set_attn_pattern(model, 'relu_softmax')  # the loaded pattern matters: another gives other logits
    with torch.no_grad():
        assert (model(images) - expected).abs().max() > 0.1


def test_authors_mpcvit_plus_checkpoint_with_beta(tmp_path):
    gen = torch.Generator().manual_seed(3)
    beta = [(torch.rand(65, generator=gen) > 0.5).float() for _ in range(7)]
    reference, path = _authors_checkpoint(tmp_path, beta=beta, name='mpcvit_plus.pth.tar')
    model = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert timm_mpc.get_gelu_pattern(model) == [b.int().tolist() for b in beta]
    images = _images()
    with torch.no_grad():
        assert torch.allclose(model(images), reference(images)[0], rtol=0, atol=1e-5)


def test_authors_softmax_baseline_without_alpha(tmp_path):
    reference, path = _authors_checkpoint(tmp_path, alpha=None, name='vit_baseline.pth.tar')
    model = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert timm_mpc.count_head_kinds(model) == {'softmax': 28}
    with torch.no_grad():
        assert torch.allclose(model(_images()), reference(_images())[0], rtol=0, atol=1e-5)


def test_authors_search_checkpoint_loads_in_search_mode(tmp_path):
    alpha = [[0.9, 0.1, 0.5, 1.0]] * 7
    _, path = _authors_checkpoint(tmp_path, alpha=alpha, name='search.pth.tar')
    model = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert timm_mpc.count_head_kinds(model) == {'search': 28}
    assert torch.allclose(model.blocks[3].attn.heads.alpha.flatten(), torch.tensor(alpha[3]))


def test_authors_tiny_imagenet_checkpoint_loads_into_mpcvit_small(tmp_path):
    alpha = [[1] * 6 + [0] * 6] * 9
    reference, path = _authors_checkpoint(tmp_path, alpha=alpha, name='tiny.pth.tar', img_size=64, dim=192,
                                          depth=9, num_heads=12, num_classes=200)
    model = timm.create_model('mpcvit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    images = _images(2, 64)
    with torch.no_grad():
        assert torch.allclose(model(images), reference(images)[0], rtol=0, atol=1e-5)


def test_own_safetensors_round_trip_keeps_pattern(tmp_path):
    pattern = [['relu_softmax', 'scaling', '2quad', 'softmax']] * 7
    source = timm.create_model('mpcvit_tiny', attn_pattern=pattern, gelu_pattern=[[1, 0] * 32 + [1]] * 7).eval()
    path = tmp_path / 'model.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(path))
    loaded = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert timm_mpc.get_attn_pattern(loaded) == pattern
    assert timm_mpc.get_gelu_pattern(loaded) == timm_mpc.get_gelu_pattern(source)
    with torch.no_grad():
        assert torch.equal(loaded(_images()), source(_images()))


def test_mismatched_checkpoint_is_refused_with_shapes(tmp_path):
    _, path = _authors_checkpoint(tmp_path, alpha=[[1] * 12] * 9, name='tiny.pth.tar', img_size=64, dim=192,
                                  depth=9, num_heads=12, num_classes=200)
    with pytest.raises(PretrainedWeightsError, match=r'does not fit this model \(depth 7, dim 256.*shape mismatches'):
        timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_unknown_authors_keys_are_named(tmp_path):
    model = AuthorsViTLite()
    state = dict(model.state_dict(), **{'classifier.attention_pool.weight': torch.zeros(1, 256)})
    path = tmp_path / 'odd.pth.tar'
    torch.save({'state_dict': state}, path)
    with pytest.raises(PretrainedWeightsError, match=r"does not know: \['classifier.attention_pool.weight'\]"):
        timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_corrupt_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / 'broken.pth.tar'
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(PretrainedWeightsError, match=r'could not load pretrained weights for mpcvit_tiny from file=.*broken.pth.tar.*may be corrupt'):
        timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_corrupt_head_pattern_in_checkpoint_is_refused(tmp_path):
    state = timm.create_model('mpcvit_tiny', attn_pattern='softmax').state_dict()
    state['blocks.2.attn.heads.kinds'] = torch.tensor([0, 1, 9, 2])
    path = tmp_path / 'bad_kinds.safetensors'
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(PretrainedWeightsError, match=r'blocks.2.attn.heads: corrupt .*unknown attention kind code 9'):
        timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match='checkpoint file for mpcvit_tiny not found: .*nope.pth.tar'):
        timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.pth.tar')))


@pytest.mark.parametrize('num_classes, in_chans', [(0, 3), (5, 1)])
def test_pretrained_weights_load_for_another_head_or_input_as_timms_do(tmp_path, num_classes, in_chans):
    """timm's idioms: num_classes=0 gives the feature extractor (the head dropped), another class count a fresh
    head, in_chans=1 the first convolution summed over its input channels; every other weight as published."""
    source = timm.create_model('mpcvit_tiny', attn_pattern='scaling').eval()
    path = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(path))
    model = timm.create_model('mpcvit_tiny', pretrained=True, num_classes=num_classes, in_chans=in_chans,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert model.num_classes == num_classes and model.patch_embed.proj.in_channels == in_chans
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True)
                               if in_chans == 1 else source.patch_embed.proj.weight)
    assert model(torch.randn(2, in_chans, 32, 32)).shape == ((2, model.embed_dim) if num_classes == 0 else (2, 5))
