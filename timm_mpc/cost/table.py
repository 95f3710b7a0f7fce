"""Per-kind secure cost for given shapes, measured once and cached: what each registered attention kind and
each activation costs in one layer of a model. The MPC-aware search reads its per-head costs from here."""
import hashlib
import math
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import timm
import torch
from torch import nn

from ..data import calibration_examples
from ..layers.activations import ACTIVATIONS
from ..layers.attn_kinds import list_attn_kinds
from ..utils import cache_root

if TYPE_CHECKING:
    from ..secure.settings import SecureSettings

__all__ = ['kind_cost_table', 'default_cache_dir']

ACT_KINDS = tuple(name for name, _ in ACTIVATIONS if name != 'identity')  # identity costs nothing
TABLE_VERSION = 6  # 6: two reciprocal steps; 5: SiLU; 4: every registered kind, and the activations, from their tables


def default_cache_dir() -> Path:
    """``$TIMM_MPC_CACHE`` or ``~/.cache/timm_mpc``, plus ``cost_tables``."""
    return cache_root() / 'cost_tables'


def _probe_pattern(num_heads: int) -> List[List[str]]:
    """One block per activation kind (more where the kinds outnumber the heads); the heads cycle through every
    registered attention kind, so each is measured."""
    kinds = [k.name for k in list_attn_kinds()]
    depth = max(len(ACT_KINDS), math.ceil(len(kinds) / num_heads))
    return [[kinds[(b * num_heads + h) % len(kinds)] for h in range(num_heads)] for b in range(depth)]


def _probe_model(img_size: int, patch_size: int, embed_dim: int, num_heads: int, mlp_ratio: float) -> nn.Module:
    pattern = _probe_pattern(num_heads)
    model = timm.create_model('mpcvit_tiny', img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                              num_heads=num_heads, mlp_ratio=mlp_ratio, depth=len(pattern), attn_pattern=pattern)
    classes = dict(ACTIVATIONS)
    for blk, act in zip(model.blocks, ACT_KINDS):  # blocks beyond the activation kinds keep exact GeLU
        blk.mlp.act = classes[act][0]()
    return model.eval()


def _zero() -> Dict[str, float]:
    return dict(rounds=0.0, bytes=0.0, time_s=0.0)


def kind_cost_table(
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 256,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        batch: int = 1,
        settings: Optional['SecureSettings'] = None,
        cache_dir: Optional[Path] = None,
) -> Dict[str, Any]:
    """Rounds, bytes (both parties) and seconds per head of each attention kind and per MLP activation
    kind, for one layer of the given shape (defaults: ``mpcvit_tiny``), measured by a real two-party run.

    Heads of one kind in one layer share their rounds (they run together), so ``per_head`` divides
    bytes and time by the heads of that kind and reports the layer's rounds as they are.
    ``per_layer_rest`` is the rest of a block (linear layers, LayerNorms) and ``outside`` everything
    outside the blocks (input sharing, patch embedding, final norm, head), so that
    :func:`timm_mpc.cost.estimate_latency` can price a whole model of any depth and pattern. Results are
    cached as JSON under ``cache_dir`` (see :func:`default_cache_dir`), keyed by shapes and settings.
    """
    from ..secure.launch import secure_predict  # measuring runs the engine, which reports into timm_mpc.profile
    from ..secure.settings import SecureSettings
    settings = settings or SecureSettings()
    key_data = dict(version=TABLE_VERSION, kinds=[k.name for k in list_attn_kinds()], img_size=img_size,
                    patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, batch=batch,
                    settings={k: v for k, v in settings.to_dict().items() if k != 'timeout_s'})
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f'{key}.json'
    if path.exists():
        return dict(json.loads(path.read_text()), cached=True)

    torch.manual_seed(0)
    model = _probe_model(img_size, patch_size, embed_dim, num_heads, mlp_ratio)
    images = calibration_examples(model)
    images = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    result = secure_predict(model, images, settings=settings, return_result=True)
    pattern = _probe_pattern(num_heads)
    heads_of = Counter(kind for block in pattern for kind in block)  # heads of each kind over all blocks
    blocks_of = Counter(kind for block in pattern for kind in set(block))
    attention: Dict[str, Dict[str, float]] = {}
    activation: Dict[str, Dict[str, float]] = {}
    rest, outside = _zero(), _zero()
    for row in result.profile.rows:
        if not row.layer.startswith('blocks.'):
            for key in outside:
                outside[key] += getattr(row, key)
            continue
        block = int(row.layer.split('.')[1])
        if row.op in heads_of:  # a layer's heads of one kind share their rounds; bytes and time are per head
            agg = attention.setdefault(row.op, _zero())
            agg['rounds'] += row.rounds / blocks_of[row.op]
            agg['bytes'] += row.bytes / heads_of[row.op]
            agg['time_s'] += row.time_s / heads_of[row.op]
        elif row.op in ACT_KINDS:
            if block < len(ACT_KINDS) and row.op == ACT_KINDS[block]:
                activation[row.op] = dict(rounds=row.rounds, bytes=row.bytes, time_s=row.time_s)
        else:  # linear layers and LayerNorms: the same whatever the kinds
            for key in rest:
                rest[key] += getattr(row, key) / len(pattern)
    activation['identity'] = dict(rounds=0, bytes=0.0, time_s=0.0)
    table = dict(shape=key_data, per_head=attention, per_layer_activation=activation, per_layer_rest=rest,
                 outside=outside, num_tokens=(img_size // patch_size) ** 2 + 1,
                 hidden_features=int(embed_dim * mlp_ratio))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return dict(table, cached=False)
