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

Its builders are in :mod:`.build`.
"""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.models.swin_transformer import SwinTransformerBlock, window_partition
from torch import nn

from ...layers.activations import ACTIVATIONS
from ...layers.attn_kinds import PatternError, get_attn_kind

__all__ = ['SecurePlan', 'BlockSpec', 'AttentionSpec', 'MlpSpec', 'MLP_KINDS', 'NormSpec', 'Schedule', 'WindowSpec',
           'MergeSpec', 'swin_windows', 'PlanError', 'UnsupportedModelError', 'InputRangeError', 'check_image_tensor',
           'check_images', 'PLAN_VERSION']

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
        ``2^32`` (:mod:`timm_mpc.secure.crypten.truncation`), far beyond any the calibrated model gives."""
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
