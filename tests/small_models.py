"""Small models and images the secure tests share: two blocks at 16x16 keep real parties fast."""
import timm
import torch

MIXED = [['softmax', 'relu_softmax', 'scaling', '2quad'], ['relu_softmax', 'scaling', 'scaling', 'relu_softmax']]


def small_mpcvit(**kwargs) -> torch.nn.Module:
    """A two-block ``mpcvit_tiny`` (overrides in ``kwargs``) with trained-like magnitudes: embeddings of order one,
    not timm's tiny init."""
    torch.manual_seed(0)
    model = timm.create_model('mpcvit_tiny', **{**dict(depth=2, embed_dim=64, num_heads=4, img_size=16), **kwargs}).eval()
    with torch.no_grad():
        model.cls_token.normal_(0, 1)
        model.pos_embed.normal_(0, 0.5)
    return model


def random_images(n: int = 3, size: int = 16, mean: float = 0.286, std: float = 0.353) -> torch.Tensor:
    """Random pixels in [0, 1], normalized (mpcvit_tiny's Fashion-MNIST mean and std by default)."""
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) - mean) / std
