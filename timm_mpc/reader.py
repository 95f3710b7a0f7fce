"""One way to read a model: its attention layers, heads, MLPs, activations and norms, and whether it converts
and runs securely.

Every part of timm-mpc that walks a model (conversion, patterns, the secure plan, calibration, binarization,
the losses, publishing) does it through :func:`read_model`, so they all see the same modules. What each model
family supports is one :class:`Family` entry in :data:`FAMILIES`.
"""
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple, Type

from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models.eva import Eva, EvaAttention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .layers.activations import activation_name
from .layers.attention import MPCAttention
from .layers.eva_attention import MPCEvaAttention
from .layers.head_kinds import HeadKinds
from .layers.mpc_attention import MPCAttentionMixin
from .layers.swin_attention import MPCWindowAttention

__all__ = ['Family', 'FAMILIES', 'register_family', 'ModelParts', 'read_model', 'support_table', 'MLP_TYPES',
           'num_weights', 'SUPPORTED_ATTENTION']

MLP_TYPES = (Mlp, GluMlp, SwiGLU)
"""timm MLPs whose activation ``convert_to_mpc`` can replace (``LinearizableMlp`` is an ``Mlp``)."""


@dataclass(frozen=True)
class Family:
    """A model family: the timm model class, its attention class and what that converts to, and whether the
    secure engine computes it."""
    name: str
    models: str
    model_class: type
    attention: Type[nn.Module]
    mpc_attention: Type[MPCAttentionMixin]
    secure: bool
    secure_note: str = ''


FAMILIES: List[Family] = [
    Family('ViT', 'vit_*, deit_* (not distilled)', VisionTransformer, Attention, MPCAttention, True),
    Family('DeiT distilled', 'deit_*_distilled_*', VisionTransformerDistilled, Attention, MPCAttention, True),
    Family('EVA-02', 'eva02_*, eva_*', Eva, EvaAttention, MPCEvaAttention, True),
    Family('Swin', 'swin_*', SwinTransformer, WindowAttention, MPCWindowAttention, True),
]
"""Every family timm-mpc knows, in the order the support table shows them."""


def register_family(family: Family) -> Family:
    """Add a family (a timm model class timm-mpc can read); idempotent for the same entry."""
    if family not in FAMILIES:
        if any(f.model_class is family.model_class for f in FAMILIES):
            raise ValueError(f'a family for {family.model_class.__name__} is already registered')
        FAMILIES.append(family)
    return family


class _SupportedAttention(Mapping):
    """timm attention class -> its MPC-friendly class, read from :data:`FAMILIES` each time."""

    def _table(self) -> Dict[type, type]:
        return {f.attention: f.mpc_attention for f in FAMILIES}

    def __getitem__(self, cls: type) -> type:
        return self._table()[cls]

    def __iter__(self) -> Iterator[type]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


SUPPORTED_ATTENTION: Mapping = _SupportedAttention()
"""timm attention classes that convert, and what they become (a live view of :data:`FAMILIES`)."""


def _family_of(model: nn.Module) -> Optional[Family]:
    return next((f for f in FAMILIES if type(model) is f.model_class), None)


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return 'attention' in name or 'attn' in name


@dataclass
class ModelParts:
    """What :func:`read_model` finds, each as ``(qualified name, module)`` in model order."""
    family: Optional[Family]
    attention: List[Tuple[str, nn.Module]] = field(default_factory=list)
    unsupported: List[Tuple[str, str]] = field(default_factory=list)
    heads: List[Tuple[str, HeadKinds]] = field(default_factory=list)
    mlps: List[Tuple[str, nn.Module]] = field(default_factory=list)
    activations: List[Tuple[str, nn.Module]] = field(default_factory=list)
    norms: List[Tuple[str, nn.LayerNorm]] = field(default_factory=list)
    linears: List[Tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def converts(self) -> bool:
        """Every attention module is of a known family (and there is at least one)."""
        return bool(self.attention) and not self.unsupported

    @property
    def runs_securely(self) -> bool:
        """The model's family is one the secure engine computes."""
        return self.converts and self.family is not None and self.family.secure

    def activation_names(self) -> Dict[str, Optional[str]]:
        """Each MLP activation's name in :data:`timm_mpc.layers.ACTIVATIONS` (None: not known)."""
        return {name: activation_name(act) for name, act in self.activations}


def read_model(model: nn.Module) -> ModelParts:
    """Walk ``model`` once and sort its modules into :class:`ModelParts`."""
    parts = ModelParts(_family_of(model))
    for name, module in model.named_modules():
        if isinstance(module, MPCAttentionMixin) or type(module) in SUPPORTED_ATTENTION:
            parts.attention.append((name, module))
        elif _looks_like_attention(module) and not any(name.startswith(f'{n}.') for n, _ in parts.attention):
            parts.unsupported.append((name, f'{type(module).__module__}.{type(module).__name__}'))
        if isinstance(module, HeadKinds):
            parts.heads.append((name, module))
        elif isinstance(module, MLP_TYPES):
            parts.mlps.append((name, module))
            parts.activations.append((f'{name}.act', module.act))
        elif isinstance(module, nn.LayerNorm):
            parts.norms.append((name, module))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            parts.linears.append((name, module))
    return parts


def support_table() -> List[Dict[str, str]]:
    """One row per family: its models, and whether it converts and runs securely (and why not)."""
    return [dict(family=f.name, models=f.models, attention=f.attention.__name__, converts='yes',
                 secure='yes' if f.secure else f'not yet ({f.secure_note})') for f in FAMILIES]


def num_weights(model: nn.Module) -> int:
    """The model's parameter count (the searched α and β are buffers, not weights)."""
    return sum(p.numel() for p in model.parameters())
