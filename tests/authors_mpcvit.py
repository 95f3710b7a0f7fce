"""An independent re-implementation of the MPCViT authors' evaluation model, in their checkpoint layout.

Written from the paper and the layout in REFERENCE.md, with plain torch ops and the authors' names
(tokenizer / classifier, pre_norm, self_attn, linear1, norm1, linear2), so that the conversion in
``timm_mpc.models.mpcvit.checkpoint_filter_fn`` is checked against something it does not share code with.
"""
import torch
import torch.nn.functional as F
from torch import nn


class AuthorsAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, with_alpha: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(1, num_heads, 1, 1)) if with_alpha else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.alpha is None:
            attn = attn.softmax(dim=-1)
        else:
            relu = F.relu(attn)
            relu_softmax = relu / (relu.sum(dim=-1, keepdim=True) + 1e-5)
            scaling = attn / N
            attn = torch.where(self.alpha == 1, relu_softmax, torch.where(self.alpha == 0, scaling, attn))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class AuthorsBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, tokens: int, with_alpha: bool, with_beta: bool) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = AuthorsAttention(dim, num_heads, with_alpha)
        self.linear1 = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(hidden, dim)
        self.beta = nn.Parameter(torch.ones(1, tokens, 1)) if with_beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.pre_norm(x))
        x = self.norm1(x)
        h = self.linear1(x)
        if self.beta is None:
            return x + self.linear2(F.gelu(h))
        h = self.beta * F.gelu(h) + (1 - self.beta) * h
        y = self.linear2(h)
        return x + (1 - self.beta) * F.relu(y) + self.beta * y


class AuthorsClassifier(nn.Module):
    def __init__(self, dim, depth, num_heads, hidden, tokens, num_classes, with_alpha, with_beta) -> None:
        super().__init__()
        self.class_emb = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.positional_emb = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [AuthorsBlock(dim, num_heads, hidden, tokens, with_alpha, with_beta) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)


class AuthorsTokenizer(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch, bias=True)))


class AuthorsViTLite(nn.Module):
    """vit_7_4_32-style model; ``forward`` returns ``(logits, [final-norm tokens])`` like the original."""

    def __init__(self, img_size=32, patch=4, dim=256, depth=7, num_heads=4, mlp_ratio=2, num_classes=10,
                 with_alpha=True, with_beta=False) -> None:
        super().__init__()
        tokens = (img_size // patch) ** 2 + 1
        self.tokenizer = AuthorsTokenizer(dim, patch)
        self.classifier = AuthorsClassifier(
            dim, depth, num_heads, dim * mlp_ratio, tokens, num_classes, with_alpha, with_beta)

    def forward(self, images: torch.Tensor):
        x = self.tokenizer.conv_layers(images).flatten(2).transpose(1, 2)
        c = self.classifier
        x = torch.cat([c.class_emb.expand(x.shape[0], -1, -1), x], dim=1) + c.positional_emb
        for blk in c.blocks:
            x = blk(x)
        x = c.norm(x)
        return c.fc(x[:, 0]), [x]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight a distinct random value (LayerNorms included) so no mapping error can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('alpha') or name.endswith('beta'):
                continue
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model
