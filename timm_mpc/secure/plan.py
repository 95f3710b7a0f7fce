"""The public side of a secure model: its architecture as a typed, versioned plan (:class:`SecurePlan`).

Both parties must run the same computation. The model owner builds the plan from a timm model and its own
calibration images (:func:`build_secure_plan`) and sends it to the client as JSON; the client reads it back
with :meth:`SecurePlan.from_dict`, which refuses another version, a missing or unknown field, a value of the
wrong type, an attention kind or activation it does not know, and a layer without its schedule. The client
never sees a weight or a calibration statistic, only what both must agree on. The fields, all public:

- ``version``: :data:`PLAN_VERSION`.
- ``input_size`` ``[C, H, W]``, ``input_bounds`` (per channel ``[low, high]``: pixels in [0, 1] normalized
  with the model's mean and std), ``patch_size``, ``embed_dim``, ``cls_token``, ``reg_tokens``,
  ``num_prefix_tokens``, ``pos_embed``, ``no_embed_class``, ``global_pool``, ``num_classes``, ``dist_token``
  (DeiT distilled: a distillation token after the class token, and logits that average ``head`` on the class
  token and ``head_dist`` on the distillation token).
- ``norm_pre``, ``norm``, ``fc_norm``: LayerNorm ``eps`` and whether it has a bias, or None.
- ``patch_norm``: the LayerNorm after the patch embedding (Swin), or None; ``head``: the classifier's module
  (``head``, or ``head.fc`` for timm's ``ClassifierHead``).
- ``blocks``: per block its module path, its style (pre- or post-norm), norms, LayerScale parameters, attention (heads, head
  size, score scale, one kind per head, fused or separate q/k/v projections, biases, q/k norms, the inner norm
  before the projection, the rotary embedding's rotation, the kinds' constants) and MLP (plain, GLU or SwiGLU,
  hidden size, activation, MPCViT+ GeLU tokens, the inner norm). Swin blocks add their windows (the token grid,
  window size and cyclic shift, from which both parties derive the public window partition and the shift mask
  with timm's own code; whether a relative position bias, a secret weight, is added to the scores) and, before
  the first block of a stage, the patch merging (its grid, norm and reduction).
- ``rope``: EVA's rotary position embedding, one row of ``sin`` then ``cos`` per patch token (a function of the
  public architecture), or None.
- ``params``: the name and shape of every weight the owner will share (values stay the owner's).
- ``logit_bound``: a power of 2 above the logits the owner calibrated (at least 2^10); logits beyond it mark a
  failed truncation (see :meth:`SecurePlan.implausible`).
- ``schedules``: the calibrated ranges in their public form: per LayerNorm and per attention kind with a
  reciprocal, an input scale (a power of 4) and a Newton iteration count; per exact GeLU, the squarings of
  its exp. They are derived from ranges the owner measured on its own images, widened by ``range_margin``,
  and reveal the order of magnitude of those ranges, never the ranges themselves (which stay with the owner).

Everything the secure engine does not support is refused by :func:`build_plan`, naming the module, before
any party starts.
"""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GluMlp, LayerScale, Mlp, PatchEmbed, SwiGLU
from timm.models.eva import EvaBlock
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, window_partition
from timm.models.vision_transformer import Block
from torch import nn

from ..layers.activations import ACTIVATIONS, activation_name
from ..layers.attention import MPCAttention
from ..layers.eva_attention import MPCEvaAttention
from ..layers.attn_kinds import SEARCH, PatternError, get_attn_kind
from ..layers.linearizable_mlp import LinearizableMlp
from ..layers.swin_attention import MPCWindowAttention
from ..reader import FAMILIES, read_model
from . import ops
from .settings import SecureSettings

__all__ = ['SecurePlan', 'BlockSpec', 'AttentionSpec', 'MlpSpec', 'MLP_KINDS', 'NormSpec', 'Schedule', 'WindowSpec',
           'MergeSpec', 'swin_windows', 'PlanError',
           'UnsupportedModelError', 'InputRangeError', 'build_plan', 'build_secure_plan', 'check_image_tensor',
           'check_images', 'normalization', 'PLAN_VERSION']

PLAN_VERSION = 5
# what a plan may ask of the client, checked before anything is computed from it (SecurePlan.check)
MAX_INT = 2 ** 31
MAX_CHANNELS, MAX_IMAGE_SIDE, MAX_WIDTH, MAX_BLOCKS = 16, 4096, 2 ** 16, 256
MAX_PARAMETER, MAX_WEIGHTS = 2 ** 28, 2 ** 31  # elements (ViT-L: 3e8 in all)
MAX_ITERATIONS = 32  # Newton and exp iterations (the tables stop at 14; CrypTen's defaults are 3 to 10)
"""5: Swin (windows, patch merging, block paths); 4: DeiT's distillation token and head; 3: typed plan, kind
constants as opts, every schedule."""

_BOUND_TOLERANCE = 1e-3  # float round-off of a normalization, in normalized units


class InputRangeError(ValueError):
    """Images outside the plan's public input bounds: secure inference would not be accurate on them."""


class UnsupportedModelError(ValueError):
    """The model has a part the secure engine cannot compute."""


class PlanError(ValueError):
    """A plan that this timm-mpc cannot run: another version, a missing or unknown field, a bad value."""


@dataclass
class NormSpec:
    eps: float
    bias: bool


@dataclass
class Schedule:
    scale: float
    iters: int


@dataclass
class AttentionSpec:
    num_heads: int
    head_dim: int
    scale: float
    kinds: List[str]
    qkv: str  # 'fused' (one qkv projection) or 'separate' (q_proj, k_proj, v_proj)
    qkv_bias: bool
    qv_bias: bool  # EVA's q_bias and v_bias beside a fused qkv without bias (k has none)
    proj_bias: bool
    q_norm: Optional[NormSpec]
    k_norm: Optional[NormSpec]
    norm: Optional[NormSpec]  # EVA's scale norm before the projection
    rope_half: Optional[bool]  # the rotary embedding's rotation (half or interleaved); None: no rotary embedding
    opts: Dict[str, float]

    def groups(self) -> List[Tuple[str, List[int]]]:
        """``(kind, heads)`` for every kind in the layer, in code order."""
        codes = {kind: get_attn_kind(kind).code for kind in set(self.kinds)}
        return [(kind, [h for h, k in enumerate(self.kinds) if k == kind]) for kind in sorted(codes, key=codes.get)]


MLP_KINDS = ('mlp', 'glu', 'swiglu')
"""``mlp``: fc1, act, fc2 (timm ``Mlp``); ``glu``: one fc1 whose halves are gated (timm ``GluMlp``); ``swiglu``:
``act(fc1_g(x)) * fc1_x(x)`` (timm ``SwiGLU``)."""


@dataclass
class MlpSpec:
    kind: str
    hidden: int
    act: str
    gelu_tokens: Optional[List[int]]
    gate_last: bool  # glu: which half the activation gates
    norm: Optional[NormSpec]  # the norm on the hidden features (EVA's scale_mlp)
    fc1_bias: bool
    fc2_bias: bool


@dataclass
class WindowSpec:
    """Swin's windowed attention: tokens on a ``resolution`` grid attend within ``window_size`` windows after a
    cyclic ``shift`` (zero: none)."""
    resolution: List[int]
    window_size: List[int]
    shift: List[int]
    rel_pos_bias: bool

    @property
    def area(self) -> int:
        return self.window_size[0] * self.window_size[1]


@dataclass
class MergeSpec:
    """Swin's patch merging before a stage: each 2x2 group of tokens on the ``resolution`` grid concatenated,
    normalized and reduced by a linear layer."""
    path: str
    resolution: List[int]
    norm: NormSpec
    reduction_bias: bool


@dataclass
class BlockSpec:
    path: str  # the block's module path: blocks.3 (ViT), layers.1.blocks.0 (Swin)
    style: str
    norm1: NormSpec
    norm2: NormSpec
    attn: AttentionSpec
    mlp: MlpSpec
    ls1: Optional[str]  # the LayerScale parameter after the attention, within the block ('ls1.gamma', 'gamma_1')
    ls2: Optional[str]
    window: Optional[WindowSpec] = None
    merge: Optional[MergeSpec] = None  # the patch merging before this block


@dataclass
class SecurePlan:
    """Everything both parties must agree on to run a model securely (see the module docstring)."""
    input_size: List[int]
    input_bounds: List[List[float]]
    patch_size: List[int]
    embed_dim: int
    cls_token: bool
    reg_tokens: int
    num_prefix_tokens: int
    pos_embed: bool
    no_embed_class: bool
    norm_pre: Optional[NormSpec]
    blocks: List[BlockSpec]
    norm: Optional[NormSpec]
    fc_norm: Optional[NormSpec]
    global_pool: str
    num_classes: int
    params: Dict[str, List[int]]
    dist_token: bool = False
    rope: Optional[List[List[float]]] = None
    patch_norm: Optional[NormSpec] = None
    head: str = 'head'
    schedules: Dict[str, Schedule] = field(default_factory=dict)
    logit_bound: float = 0.0
    version: int = PLAN_VERSION

    @property
    def tokens(self) -> int:
        """Tokens per image: patches plus prefix tokens."""
        _, h, w = self.input_size
        return (h // self.patch_size[0]) * (w // self.patch_size[1]) + self.num_prefix_tokens

    def num_keys(self, blk: BlockSpec) -> int:
        """The keys each query of ``blk`` attends to: its window, or every token."""
        return blk.window.area if blk.window is not None else self.tokens

    def layer_norm_names(self) -> List[str]:
        """The qualified name of every LayerNorm the plan computes, in order."""
        names = [name for name in ('patch_embed.norm', 'norm_pre', 'norm', 'fc_norm')
                 if getattr(self, 'patch_norm' if name == 'patch_embed.norm' else name) is not None]
        for blk in self.blocks:
            b = blk.path
            if blk.merge is not None:
                names.append(f'{blk.merge.path}.norm')
            names += [f'{b}.norm1', f'{b}.norm2']
            if blk.attn.q_norm is not None:
                names += [f'{b}.attn.q_norm', f'{b}.attn.k_norm']
            names += [f'{b}.{part}.norm' for part, spec in (('attn', blk.attn), ('mlp', blk.mlp))
                      if spec.norm is not None]
        return names

    def reciprocal_names(self) -> List[Tuple[str, str, BlockSpec]]:
        """``(schedule name, kind, block)`` for every attention kind in a layer that needs a reciprocal schedule."""
        return [(f'{blk.path}.attn.{kind}', kind, blk) for blk in self.blocks
                for kind, _ in blk.attn.groups() if get_attn_kind(kind).reciprocal_range is not None]

    def implausible(self, logits: torch.Tensor) -> List[int]:
        """Images whose logits leave ``logit_bound``: a failed two-party truncation puts a logit off by about
        ``2^32`` (:mod:`timm_mpc.secure.truncation`), far beyond any the calibrated model gives."""
        return [int(i) for i in (logits.abs() > self.logit_bound).flatten(1).any(-1).nonzero().flatten()]

    def owner_weights(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The weights the owner shares: the plan's ``params`` of ``model``, detached float32 on the CPU."""
        state = model.state_dict()
        return {name: state[name].detach().cpu().float() for name in self.params}

    def to_dict(self) -> Dict[str, Any]:
        """The plan as JSON-ready data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> 'SecurePlan':
        """Read a plan sent as JSON data, refusing what this timm-mpc cannot run.

        Raises:
            PlanError: another version, a missing or unknown field, a value of the wrong type, an attention
                kind or activation not known here, inconsistent input bounds, or a layer without its schedule.
        """
        if not isinstance(data, dict):
            raise PlanError(f'a plan is a JSON object, got {type(data).__name__}')
        if data.get('version') != PLAN_VERSION:
            raise PlanError(f'plan version {data.get("version")!r}; this timm-mpc reads version {PLAN_VERSION}')
        for name, bound in (('blocks', MAX_BLOCKS), ('params', 16 * MAX_BLOCKS)):  # before reading each one
            if isinstance(data.get(name), (list, dict)) and len(data[name]) > bound:
                raise PlanError(f'plan {name} (their number) must be whole numbers from 1 to {bound}, got '
                                f'{len(data[name])}')
        plan = _decode(cls, data, 'plan')
        plan.check()
        return plan

    def check(self) -> None:
        """Consistency checks beyond types (see :meth:`from_dict`)."""
        _check_sizes(self)
        c = self.input_size[0]
        if len(self.input_bounds) != c or any(len(b) != 2 or not b[0] < b[1] for b in self.input_bounds):
            raise PlanError(f'plan input_bounds must be one [low, high] pair per channel ({c}), '
                            f'got {self.input_bounds}')
        acts = [name for name, _ in ACTIVATIONS]
        _check_window_chain(self)
        for blk in self.blocks:
            try:
                blk.attn.groups()
            except PatternError as e:
                raise PlanError(f'plan {blk.path}.attn: {e}') from None
            if len(blk.attn.kinds) != blk.attn.num_heads:
                raise PlanError(f'plan {blk.path}.attn has {len(blk.attn.kinds)} kinds for {blk.attn.num_heads} heads')
            if blk.mlp.act not in acts:
                raise PlanError(f'plan {blk.path}.mlp.act {blk.mlp.act!r}; accepted: {acts}')
            if blk.style not in ('pre', 'post'):
                raise PlanError(f'plan {blk.path}.style {blk.style!r}; accepted: pre, post')
            if blk.mlp.kind not in MLP_KINDS or (blk.mlp.kind != 'mlp' and blk.mlp.gelu_tokens is not None):
                raise PlanError(f'plan {blk.path}.mlp.kind {blk.mlp.kind!r}; accepted: {list(MLP_KINDS)} (GeLU tokens '
                                f'with mlp only)')
            if blk.attn.qkv not in ('fused', 'separate'):
                raise PlanError(f'plan {blk.path}.attn.qkv {blk.attn.qkv!r}; accepted: fused, separate')
            if self.rope is not None and blk.attn.rope_half is not None and any(
                    len(row) != 2 * blk.attn.head_dim for row in self.rope):
                raise PlanError(f'plan rope rows must hold sin and cos of {blk.path}.attn\'s head size '
                                f'({2 * blk.attn.head_dim} values)')
        if self.rope is not None and len(self.rope) != self.tokens - self.num_prefix_tokens:
            raise PlanError(f'plan rope has {len(self.rope)} rows for {self.tokens - self.num_prefix_tokens} patches')
        if not self.logit_bound > 0:
            raise PlanError(f'plan logit_bound must be positive, got {self.logit_bound}')
        if self.global_pool not in ('token', 'avg'):
            raise PlanError(f'plan global_pool {self.global_pool!r}; accepted: token, avg')
        needed = self.layer_norm_names() + [name for name, _, _ in self.reciprocal_names()]
        missing = [name for name in needed if name not in self.schedules]
        if missing:
            raise PlanError(f'plan schedules miss {missing[:4]}{" ..." if len(missing) > 4 else ""}: every LayerNorm '
                            f'and every attention kind with a reciprocal needs one')


def _check_sizes(plan: 'SecurePlan') -> None:
    """Values in range before anything is computed from them: sizes at least 1 and bounded, parameters of
    bounded size, positive scales and norms' epsilons, iteration counts within :data:`MAX_ITERATIONS`."""
    def positive(path: str, values: Any, bound: int) -> None:
        for value in (values if isinstance(values, list) else [values]):
            if not 1 <= value <= bound:
                raise PlanError(f'plan {path} must be whole numbers from 1 to {bound}, got {values}')
    def scale(path: str, value: float) -> None:
        if not 2.0 ** -64 <= value <= 2.0 ** 64:
            raise PlanError(f'plan {path} must be a positive scale from 2^-64 to 2^64, got {value}')
    def eps(path: str, norm: Optional[NormSpec]) -> None:
        if norm is not None and not 0 < norm.eps < 1:
            raise PlanError(f'plan {path}.eps must be in (0, 1), got {norm.eps}')
    if len(plan.input_size) != 3 or len(plan.patch_size) != 2:
        raise PlanError(f'plan input_size is (channels, height, width) and patch_size (height, width); got '
                        f'{plan.input_size} and {plan.patch_size}')
    positive('input_size', plan.input_size[:1], MAX_CHANNELS)
    positive('input_size', plan.input_size[1:], MAX_IMAGE_SIDE)
    positive('patch_size', plan.patch_size, MAX_IMAGE_SIDE)
    if any(side < patch for side, patch in zip(plan.input_size[1:], plan.patch_size)):
        raise PlanError(f'plan patch_size {plan.patch_size} is larger than the image {plan.input_size[1:]}')
    positive('embed_dim', plan.embed_dim, MAX_WIDTH)
    positive('num_classes', plan.num_classes, MAX_WIDTH)
    positive('blocks (their number)', len(plan.blocks), MAX_BLOCKS)
    if plan.num_prefix_tokens != int(plan.cls_token) + int(plan.dist_token) + plan.reg_tokens:
        raise PlanError(f'plan num_prefix_tokens {plan.num_prefix_tokens} is not cls_token + dist_token + reg_tokens')
    for name, shape in plan.params.items():
        positive(f'params.{name}', shape or [1], MAX_WIDTH * MAX_WIDTH)
    sizes = [math.prod(shape) for shape in plan.params.values()]
    if any(size > MAX_PARAMETER for size in sizes) or sum(sizes) > MAX_WEIGHTS:
        raise PlanError(f'plan params hold {sum(sizes)} weights, the largest {max(sizes, default=0)}; accepted: '
                        f'{MAX_PARAMETER} per parameter, {MAX_WEIGHTS} in all')
    for name in ('norm_pre', 'norm', 'fc_norm', 'patch_norm'):
        eps(name, getattr(plan, name))
    for blk in plan.blocks:
        a, m = blk.attn, blk.mlp
        positive(f'{blk.path}.attn.num_heads', a.num_heads, MAX_WIDTH)
        positive(f'{blk.path}.attn.head_dim', a.head_dim, MAX_WIDTH)
        positive(f'{blk.path}.mlp.hidden', m.hidden, 8 * MAX_WIDTH)
        scale(f'{blk.path}.attn.scale', a.scale)
        for part, norm in (('norm1', blk.norm1), ('norm2', blk.norm2), ('attn.q_norm', a.q_norm),
                           ('attn.k_norm', a.k_norm), ('attn.norm', a.norm), ('mlp.norm', m.norm)):
            eps(f'{blk.path}.{part}', norm)
        if blk.merge is not None:
            eps(f'{blk.merge.path}.norm', blk.merge.norm)
        if m.gelu_tokens is not None and (len(m.gelu_tokens) != plan.tokens or set(m.gelu_tokens) - {0, 1}):
            raise PlanError(f'plan {blk.path}.mlp.gelu_tokens must be 0 or 1 for each of the {plan.tokens} tokens')
    for name, schedule in plan.schedules.items():
        scale(f'schedules.{name}.scale', schedule.scale)
        if schedule.iters > MAX_ITERATIONS:
            raise PlanError(f'plan schedules.{name}.iters {schedule.iters}; accepted: 0 to {MAX_ITERATIONS}')
    if plan.rope is not None and any(abs(v) > 1 for row in plan.rope for v in row):
        raise PlanError('plan rope holds sines and cosines: values in [-1, 1]')
    if any(abs(v) > 2.0 ** 16 for bounds in plan.input_bounds for v in bounds):
        raise PlanError(f'plan input_bounds must lie in [-2^16, 2^16], got {plan.input_bounds}')


def _check_window_chain(plan: 'SecurePlan') -> None:
    """Swin's grids must follow from the input: the patch grid, halved by each patch merging; windows that tile
    them, shifts smaller than a window."""
    windowed = [blk for blk in plan.blocks if blk.window is not None]
    if not windowed:
        return
    if len(windowed) != len(plan.blocks) or plan.num_prefix_tokens:
        raise PlanError('plan blocks: windowed attention in every block and no prefix tokens, or none')
    grid = [plan.input_size[1] // plan.patch_size[0], plan.input_size[2] // plan.patch_size[1]]
    for blk in plan.blocks:
        w = blk.window
        if blk.merge is not None:
            if blk.merge.resolution != grid or any(r % 2 for r in grid):
                raise PlanError(f'plan {blk.merge.path}.resolution {blk.merge.resolution}; the grid there is {grid} '
                                f'(and patch merging needs it even)')
            grid = [r // 2 for r in grid]
        if not all(len(v) == 2 for v in (w.resolution, w.window_size, w.shift)) or w.resolution != grid \
                or not all(size > 0 and r % size == 0 and 0 <= s < size
                           for r, size, s in zip(w.resolution, w.window_size, w.shift)):
            raise PlanError(f'plan {blk.path}.window: a grid of {w.resolution} in windows of {w.window_size} shifted '
                            f'by {w.shift}; accepted: the grid there ({grid}), windows that tile it, shifts smaller '
                            f'than a window')


def _decode(tp: Any, value: Any, path: str) -> Any:
    """``value`` (JSON data) as type ``tp``, or a PlanError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PlanError(f'{path} must be an object, got {type(value).__name__}')
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        missing, unknown = set(names) - set(value), set(value) - set(names)
        if missing or unknown:
            raise PlanError(f'{path} fields: missing {sorted(missing)}, unknown {sorted(unknown)}; '
                            f'version {PLAN_VERSION} has {names}')
        return tp(**{name: _decode(hints[name], value[name], f'{path}.{name}') for name in names})
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _decode(args[0], value, path)
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f'{path} must be a list, got {type(value).__name__}')
        return [_decode(args[0], v, f'{path}[{i}]') for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise PlanError(f'{path} must be an object, got {type(value).__name__}')
        return {k: _decode(args[1], v, f'{path}.{k}') for k, v in value.items()}
    accepted = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}[tp]
    if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
        raise PlanError(f'{path} must be {tp.__name__}, got {str(value)[:80]!r}')
    if tp is int and not 0 <= value <= MAX_INT:  # sizes, counts, iterations: none is negative
        raise PlanError(f'{path} must be a whole number from 0 to {MAX_INT}, got {value}')
    if tp is float and not math.isfinite(value):
        raise PlanError(f'{path} must be a finite number, got {value}')
    return tp(value)


def _fail(path: str, module: Any, accepted: str) -> None:
    raise UnsupportedModelError(
        f'secure inference does not support {path or "the model"} ({type(module).__name__}); accepted: {accepted}')


def _layer_norm(path: str, module: nn.Module, optional: bool = True) -> Optional[NormSpec]:
    if isinstance(module, nn.Identity) and optional:
        return None
    if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine or len(module.normalized_shape) != 1:
        _fail(path, module, 'nn.LayerNorm over the last dimension with affine weights, or nn.Identity')
    return NormSpec(eps=float(module.eps), bias=module.bias is not None)


def _attention(path: str, attn: nn.Module) -> AttentionSpec:
    if not isinstance(attn, (MPCAttention, MPCEvaAttention, MPCWindowAttention)):
        _fail(path, attn, 'timm_mpc MPCAttention, MPCEvaAttention or MPCWindowAttention (convert the model with '
                          'timm_mpc.convert_to_mpc first)')
    if any(kind == SEARCH for kind, _ in attn.heads.groups):
        raise UnsupportedModelError(
            f'{path} has heads in search mode (learnable alpha); binarize it to one kind per head before secure '
            f'inference')
    if getattr(attn, 'gate', None) is not None:
        _fail(path, attn, 'attention without an output gate')
    eva = isinstance(attn, MPCEvaAttention)
    fused = getattr(attn, 'qkv', None) is not None
    # separate projections: EVA's k_proj has no bias; the forward reads each bias from the shared weights
    qkv_bias = (attn.qkv if fused else attn.q_proj).bias is not None
    qv_bias = eva and fused and attn.q_bias is not None
    return AttentionSpec(
        num_heads=attn.num_heads, head_dim=getattr(attn, 'head_dim', None) or attn.proj.in_features // attn.num_heads,
        scale=float(attn.scale), kinds=attn.heads.pattern,
        qkv='fused' if fused else 'separate', qkv_bias=qkv_bias, qv_bias=qv_bias, proj_bias=attn.proj.bias is not None,
        # Swin's window attention has no q/k norms and no inner norm
        **{norm: _layer_norm(f'{path}.{norm}', getattr(attn, norm, nn.Identity()))
           for norm in ('q_norm', 'k_norm', 'norm')},
        rope_half=bool(getattr(attn, 'rotate_half', False)) if eva else None,
        opts={k: float(v) for k, v in attn.heads.opts.items()})


def _mlp(path: str, mlp: nn.Module) -> MlpSpec:
    kinds = {Mlp: 'mlp', LinearizableMlp: 'mlp', GluMlp: 'glu', SwiGLU: 'swiglu'}
    kind = kinds.get(type(mlp))
    if kind is None:
        _fail(path, mlp, 'timm Mlp, GluMlp or SwiGLU, or timm_mpc LinearizableMlp')
    if kind == 'glu' and mlp.chunk_dim != -1:
        _fail(path, mlp, 'a GluMlp that splits the last dimension')
    for fc in ('fc1', 'fc1_g', 'fc1_x', 'fc2'):
        if hasattr(mlp, fc) and not isinstance(getattr(mlp, fc), nn.Linear):
            _fail(f'{path}.{fc}', getattr(mlp, fc), 'nn.Linear')
    gelu_tokens = None
    if isinstance(mlp, LinearizableMlp) and mlp.mode != 'gelu':
        if mlp.searching:
            raise UnsupportedModelError(f'{path} is in search mode (learnable beta); fix its GeLU pattern first')
        if mlp.token_shape and len(mlp.token_shape) != 1:
            _fail(path, mlp, 'a per-token or per-layer GeLU pattern over a token sequence')
        gelu_tokens = mlp.gelu_tokens.flatten().int().tolist()
    act = activation_name(mlp.act)
    if act is None:
        _fail(f'{path}.act', mlp.act, f'one of {[name for name, _ in ACTIVATIONS]} (GeLU exact, not tanh)')
    first = mlp.fc1_g if kind == 'swiglu' else mlp.fc1
    return MlpSpec(kind=kind, hidden=mlp.fc2.in_features, act=act, gelu_tokens=gelu_tokens,
                   gate_last=bool(getattr(mlp, 'gate_last', False)), norm=_layer_norm(f'{path}.norm', mlp.norm),
                   fc1_bias=first.bias is not None, fc2_bias=mlp.fc2.bias is not None)


def _layer_scale(path: str, blk: nn.Module, module: str, parameter: str) -> Optional[str]:
    """The block's LayerScale parameter after a branch: a timm ``LayerScale`` module's gamma (ViT), or EVA's
    ``gamma_1``/``gamma_2``; None without one."""
    ls = getattr(blk, module, None)
    if ls is None:
        return parameter if getattr(blk, parameter, None) is not None else None
    if isinstance(ls, nn.Identity):
        return None
    if not isinstance(ls, LayerScale):
        _fail(f'{path}.{module}', ls, 'LayerScale or Identity')
    return f'{module}.gamma'


def _block(path: str, blk: nn.Module) -> BlockSpec:
    style = getattr(blk, 'norm_style', 'pre' if type(blk) in (Block, EvaBlock) else None)
    if style is None:
        _fail(path, blk, 'timm Block or EvaBlock (pre-norm), or timm_mpc MPCViTBlock (LayerNorm after the attention '
                         'residual)')
    return BlockSpec(
        path=path, style=style, norm1=_layer_norm(f'{path}.norm1', blk.norm1, optional=False),
        norm2=_layer_norm(f'{path}.norm2', blk.norm2, optional=False),
        attn=_attention(f'{path}.attn', blk.attn), mlp=_mlp(f'{path}.mlp', blk.mlp),
        ls1=_layer_scale(path, blk, 'ls1', 'gamma_1'), ls2=_layer_scale(path, blk, 'ls2', 'gamma_2'))


def swin_windows(window: WindowSpec) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The public side of a Swin block's windowed attention, derived from its spec with timm's own code.

    Returns:
        ``(index, inverse, keep)``: the grid position of every window slot after the cyclic shift (windows in
        timm's order, so tokens ``(B, H·W, C)`` become windows ``x.index_select(1, index)``), the slot of every
        grid position (back from windows, the shift undone), and the shift mask as keys each query may see
        ``(num_windows, area, area)`` (None without a shift).
    """
    (h, w), size, shift = window.resolution, tuple(window.window_size), tuple(window.shift)
    grid = torch.arange(h * w).reshape(1, h, w, 1)
    if any(shift):
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    index = window_partition(grid, size).flatten()
    mask = None
    if any(shift):  # timm's mask, from the block's own method on the block's public attributes
        block = SimpleNamespace(shift_size=shift, window_size=size, window_area=window.area, input_resolution=(h, w))
        mask = SwinTransformerBlock.get_attn_mask(block) == 0
    return index, index.argsort(), mask


def _swin_blocks(model: SwinTransformer) -> List[BlockSpec]:
    """Every Swin block with its windows, and the patch merging before the first block of a stage."""
    blocks = []
    for s, stage in enumerate(model.layers):
        merge = None
        if not len(stage.blocks):
            _fail(f'layers.{s}', stage, 'stages with at least one block')
        if isinstance(stage.downsample, PatchMerging):
            path = f'layers.{s}.downsample'
            if not isinstance(stage.downsample.reduction, nn.Linear):
                _fail(f'{path}.reduction', stage.downsample.reduction, 'nn.Linear')
            if any(r % 2 for r in stage.input_resolution):
                _fail(path, stage.downsample, f'patch merging of an even token grid (timm pads the '
                                              f'{list(stage.input_resolution)} grid)')
            merge = MergeSpec(path=path, resolution=list(stage.input_resolution),
                              norm=_layer_norm(f'{path}.norm', stage.downsample.norm, optional=False),
                              reduction_bias=stage.downsample.reduction.bias is not None)
        elif not isinstance(stage.downsample, nn.Identity):
            _fail(f'layers.{s}.downsample', stage.downsample, 'timm PatchMerging or Identity')
        for j, blk in enumerate(stage.blocks):
            path = f'layers.{s}.blocks.{j}'
            if type(blk) is not SwinTransformerBlock or getattr(blk, 'dynamic_mask', False):
                _fail(path, blk, 'timm SwinTransformerBlock with a fixed input resolution')
            window = WindowSpec(resolution=list(blk.input_resolution), window_size=list(blk.window_size),
                                shift=list(blk.shift_size), rel_pos_bias=hasattr(blk.attn, 'relative_position_bias_table'))
            if any(r % w for r, w in zip(window.resolution, window.window_size)):
                _fail(path, blk, f'windows that tile the token grid (a {window.resolution} grid in windows of '
                                 f'{window.window_size} would be padded)')
            keep = swin_windows(window)[2]
            if (keep is None) != (blk.attn_mask is None) or (keep is not None and not torch.equal(keep, blk.attn_mask == 0)):
                _fail(f'{path}.attn_mask', blk, 'the shift mask timm derives from the window size and shift')
            spec = BlockSpec(path=path, style='pre', norm1=_layer_norm(f'{path}.norm1', blk.norm1, optional=False),
                             norm2=_layer_norm(f'{path}.norm2', blk.norm2, optional=False),
                             attn=_attention(f'{path}.attn', blk.attn), mlp=_mlp(f'{path}.mlp', blk.mlp),
                             ls1=None, ls2=None, window=window, merge=merge if j == 0 else None)
            blocks.append(spec)
    return blocks


def _rope_table(model: nn.Module) -> Optional[List[List[float]]]:
    """EVA's rotary embedding of the patch tokens (sin then cos per row), or None for a model without one."""
    rope = getattr(model, 'rope', None)
    if rope is None:
        return None
    if getattr(model, 'rope_mixed', False) or not hasattr(rope, 'feat_shape'):
        _fail('rope', rope, 'a rotary embedding with one fixed table for every block (RotaryEmbeddingCat)')
    return rope.get_embed().detach().float().tolist()


def build_plan(model: nn.Module) -> SecurePlan:
    """The public plan of ``model`` (a ViT-family timm model whose attention was made MPC-friendly), without
    schedules.

    Raises:
        UnsupportedModelError: naming the family that does not run securely yet, or the first module the
            secure engine cannot compute.
    """
    parts = read_model(model)
    if parts.unsupported:  # a family timm-mpc does not know: name its first attention module
        path, cls = parts.unsupported[0]
        raise UnsupportedModelError(
            f'secure inference does not support {path} ({cls}): timm-mpc does not know this family; accepted: '
            f'{", ".join(f.models for f in FAMILIES if f.secure)}')
    if not parts.runs_securely:
        secure = ', '.join(f'{f.models}' for f in FAMILIES if f.secure)
        family = f'the {parts.family.name} family ({parts.family.secure_note})' if parts.family else 'this model'
        _fail('', model, f'{secure}; {family} does not run securely yet'
              + ('' if parts.converts else '; convert it with timm_mpc.convert_to_mpc first'))
    if isinstance(model, SwinTransformer):
        return _swin_plan(model)
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or not pe.flatten \
            or pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0) or model.dynamic_img_size:
        _fail('patch_embed', pe, 'timm PatchEmbed with kernel = stride, no norm, fixed image size')
    if getattr(model, 'attn_pool', None) is not None or model.global_pool not in ('token', 'avg'):
        _fail('attn_pool', getattr(model, 'attn_pool', None) or model, "global_pool 'token' or 'avg'")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        _fail('head', model.head, 'nn.Linear or nn.Identity')
    dist_token = getattr(model, 'dist_token', None) is not None
    if dist_token:  # VisionTransformerDistilled's head reads tokens 0 and 1, with neither fc_norm nor register tokens
        if model.reg_token is not None or not isinstance(model.fc_norm, nn.Identity):
            _fail('dist_token', model, 'a distillation token without register tokens or fc_norm')
        if not isinstance(model.head_dist, type(model.head)):
            _fail('head_dist', model.head_dist, f'{type(model.head).__name__}, as head')
    return SecurePlan(
        **_input_fields(model),
        embed_dim=model.embed_dim,
        cls_token=model.cls_token is not None,
        reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        num_prefix_tokens=model.num_prefix_tokens,
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        norm_pre=_layer_norm('norm_pre', model.norm_pre),
        blocks=[_block(f'blocks.{i}', blk) for i, blk in enumerate(model.blocks)],
        norm=_layer_norm('norm', model.norm),
        fc_norm=_layer_norm('fc_norm', model.fc_norm),
        global_pool=model.global_pool,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        params=_params(model),
        dist_token=dist_token,
        rope=_rope_table(model),
    )


def _input_fields(model: nn.Module) -> Dict[str, Any]:
    pe = model.patch_embed
    return dict(input_size=[pe.proj.in_channels, *pe.img_size], patch_size=list(pe.patch_size),
                input_bounds=[[(0.0 - m) / s, (1.0 - m) / s] for m, s in zip(*normalization(model, pe.proj.in_channels))])


def _params(model: nn.Module) -> Dict[str, List[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _swin_plan(model: SwinTransformer) -> SecurePlan:
    """The plan of a Swin Transformer: windows, shifts and patch merging on a token grid with no prefix tokens."""
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or pe.flatten or pe.output_fmt.value != 'NHWC' or pe.proj.kernel_size != pe.proj.stride \
            or pe.proj.padding != (0, 0) or getattr(pe, 'dynamic_img_pad', False) or not pe.strict_img_size:
        _fail('patch_embed', pe, 'timm PatchEmbed with kernel = stride, NHWC output, fixed image size')
    if getattr(model, 'absolute_pos_embed', None) is not None:
        _fail('absolute_pos_embed', model, 'a Swin without an absolute position embedding')
    head = model.head
    if type(head).__name__ != 'ClassifierHead' or getattr(head.global_pool, 'pool_type', None) != 'avg' \
            or not isinstance(head.fc, (nn.Linear, nn.Identity)):
        _fail('head', head, "timm ClassifierHead with global_pool 'avg' and a linear fc")
    return SecurePlan(
        **_input_fields(model), embed_dim=pe.proj.out_channels,
        cls_token=False, reg_tokens=0, num_prefix_tokens=0, pos_embed=False, no_embed_class=False, norm_pre=None,
        blocks=_swin_blocks(model), norm=_layer_norm('norm', model.norm), fc_norm=None, global_pool='avg',
        num_classes=head.fc.out_features if isinstance(head.fc, nn.Linear) else 0, params=_params(model),
        patch_norm=_layer_norm('patch_embed.norm', pe.norm), head='head.fc')


def normalization(model: nn.Module, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The model's input mean and std, one per channel, from its ``pretrained_cfg`` (timm's ImageNet defaults
    where it has none). The plan's input bounds are pixels in [0, 1] normalized with them."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = cfg.get('mean', IMAGENET_DEFAULT_MEAN), cfg.get('std', IMAGENET_DEFAULT_STD)
    if len(mean) != channels or len(std) != channels:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    return tuple(map(float, mean)), tuple(map(float, std))


def _schedule(low: Optional[float], high: Optional[float], domain: Dict[int, Tuple[float, float]],
              default_iters: int, settings: SecureSettings, margin: float) -> Schedule:
    """Public input scale and Newton iterations for values in ``[low, high]`` (with ``high`` widened by
    ``margin``: only values above the covered range make the iterations diverge; values below it come out
    too small, never unbounded). CrypTen's fixed choice when range scaling is off or nothing was measured."""
    if not settings.range_scaling or high is None:
        return Schedule(scale=1.0, iters=default_iters)
    scale, iters = ops.newton_schedule(low, high * margin, domain, min(domain))
    return Schedule(scale=float(scale), iters=iters)  # a float as read back: the client's plan is the owner's, byte for byte


def public_schedules(plan: SecurePlan, ranges: Dict[str, Dict[str, float]],
                     settings: SecureSettings) -> Dict[str, Schedule]:
    """The plan's ``schedules`` from the owner's calibrated ``ranges`` (which stay with the owner)."""
    out = {}
    for name in plan.layer_norm_names():
        r = ranges.get(name, {})
        out[name] = _schedule(r.get('min'), r.get('max'), ops.inv_sqrt_domain(settings.inv_sqrt), settings.sqrt_nr_iters,
                              settings, settings.range_margin)
    for name, kind, blk in plan.reciprocal_names():
        calibrated = ranges.get(name)
        spec = get_attn_kind(kind)
        if spec.denominator is not None and calibrated is None:  # nothing measured: CrypTen's fixed choice
            out[name] = _schedule(None, None, ops.RECIPROCAL_DOMAIN, settings.reciprocal_nr_iters, settings, 1.0)
            continue
        low, high, widen = spec.reciprocal_range(calibrated or {}, plan.num_keys(blk))
        out[name] = _schedule(low, high, ops.RECIPROCAL_DOMAIN, settings.reciprocal_nr_iters, settings,
                              settings.range_margin if widen else 1.0)
    for blk in plan.blocks:
        if blk.mlp.act == 'gelu' and settings.gelu == 'exp_fit':
            abs_max = ranges.get(f'{blk.path}.mlp.act', {}).get('max')
            iters = settings.gelu_exp_iterations
            if settings.range_scaling and abs_max is not None:
                iters = ops.gelu_exp_iterations(abs_max * settings.range_margin, iters) or ops.GELU_MAX_EXP_ITERATIONS
            out[f'{blk.path}.mlp.act'] = Schedule(scale=1.0, iters=iters)
    return out


def logit_bound(calibrated_max: float, settings: SecureSettings) -> float:
    """The plan's public bound on the logits: a power of 2 at least ``range_margin`` times the largest logit
    magnitude the owner calibrated (and at least 2^10), so it reveals only an order of magnitude."""
    return 2.0 ** max(10, math.ceil(math.log2(max(calibrated_max, 1e-12) * settings.range_margin)))


def build_secure_plan(model: nn.Module, settings: SecureSettings,
                      calibration_images: Optional[torch.Tensor] = None) -> SecurePlan:
    """The plan the owner sends: :func:`build_plan`, calibrated on the owner's images (default: the shipped
    Fashion-MNIST examples as the model's input), with only the public schedules kept.

    Raises:
        UnsupportedModelError: a module the secure engine cannot compute.
        InputRangeError: calibration images outside the model's input bounds.
        FixedPointRangeError: a value the fixed-point encoding cannot hold on the calibration images.
    """
    from ..data import calibration_examples
    from .calibration import calibrate
    plan = build_plan(model)
    if calibration_images is None:
        calibration_images = calibration_examples(model)
    check_images(plan, calibration_images, what='calibration images')
    ranges = calibrate(model, calibration_images, settings)
    plan.schedules = public_schedules(plan, ranges, settings)
    plan.logit_bound = logit_bound(ranges['logits']['max'], settings)
    plan.check()
    return plan


def check_image_tensor(images: Any, what: str = 'images') -> None:
    """What can be checked of images without the plan: a finite, floating-point ``(B, C, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'{what} must be a torch.Tensor, got {type(images).__name__}')
    if not images.is_floating_point():
        raise ValueError(f'{what} must be a floating-point tensor (normalized pixels), got dtype {images.dtype}')
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f'{what} must have shape (batch, channels, height, width) with batch >= 1; '
                         f'got {tuple(images.shape)}')
    if not torch.isfinite(images).all():
        raise ValueError(f'{what} contain NaN or infinite values')


def check_images(plan: SecurePlan, images: torch.Tensor, clamp: bool = False,
                 what: str = 'images') -> torch.Tensor:
    """Refuse images the plan cannot take, before anything is shared; return the images to share.

    Values must lie within the plan's public ``input_bounds`` (with a tolerance of 1e-3 for the round-off of
    a normalization): secure inference is calibrated, and its fixed-point encoding sized, for those. With
    ``clamp``, values outside are clamped to the bounds instead (the result is then that of the clamped images).

    Raises:
        InputRangeError: values outside the bounds, without ``clamp``.
    """
    check_image_tensor(images, what)
    expected = tuple(plan.input_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f'{what} must have shape (batch, {", ".join(map(str, expected))}); got {tuple(images.shape)}')
    low = torch.tensor([b[0] for b in plan.input_bounds]).view(1, -1, 1, 1)
    high = torch.tensor([b[1] for b in plan.input_bounds]).view(1, -1, 1, 1)
    if clamp:
        return torch.maximum(torch.minimum(images, high), low)
    found = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    bad = [c for c in range(expected[0]) if found[0][c] < low.flatten()[c] - _BOUND_TOLERANCE
           or found[1][c] > high.flatten()[c] + _BOUND_TOLERANCE]
    if bad:
        c = bad[0]
        raise InputRangeError(
            f'{what} leave the model\'s input range: channel {c} has values in [{found[0][c]:.4g}, {found[1][c]:.4g}], '
            f'accepted [{low.flatten()[c]:.4g}, {high.flatten()[c]:.4g}] (pixels in [0, 1] normalized with the '
            f'model\'s mean and std); normalize them that way, or clamp them (clamp_images=True, --clamp-images)')
    return images
