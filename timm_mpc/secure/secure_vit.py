"""`SecureViT`: runs a plan on secret-shared weights and images, operator by operator, with costs.

The same forward runs on every engine: a :class:`Backend` gives it the engine's secret tensors (sharing, concatenation)
and its operators (:mod:`.crypten.ops`, :mod:`.spu.ops`); everything else is tensor methods that both
engines' tensors have.
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.layers.pos_embed_sincos import rope_rotate_half, rot
from timm.models.swin_transformer import get_relative_position_index

from ..layers.attn_kinds import KindContext, get_attn_kind
from ..profile import CostMeter
from .plan import AttentionSpec, BlockSpec, MergeSpec, MlpSpec, NormSpec, Schedule, SecurePlan, WindowSpec, swin_windows
from .settings import SecureSettings

__all__ = ['SecureViT', 'Backend', 'patchify', 'OWNER', 'CLIENT']

OWNER, CLIENT = 0, 1


def patchify(images: torch.Tensor, patch_size: List[int]) -> torch.Tensor:
    """``(B, C, H, W)`` images to ``(B, N, C·p·p)`` patch rows, in the order of a stride-p convolution."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    x = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // ph) * (W // pw), C * ph * pw)


class Backend:
    """What :class:`SecureViT` needs from an engine beyond tensor methods: its operators (``ops``: ``linear``,
    ``layer_norm``, ``reciprocal``, ``softmax`` and the activations, as in :mod:`.crypten.ops`), secret-sharing a
    party's value, and concatenation."""
    ops: Any

    def share(self, value: torch.Tensor, src: int) -> Any:
        """``value`` secret-shared by party ``src`` (the other party passes zeros of the same shape)."""
        raise NotImplementedError

    def cat(self, tensors: Sequence[Any], dim: int) -> Any:
        raise NotImplementedError

    def mask_weights(self, weights: Sequence[Any]) -> None:
        """Mask ``weights`` (shared by the owner, each the second factor of its products) once for the session."""
        raise NotImplementedError(f'{type(self).__name__} does not mask weights once per session')


class SecureViT:
    """A ViT plan evaluated under two-party MPC on an engine's ``backend``.

    The owner (party 0) passes its model's state dict; the client (party 1) passes None and
    contributes only the images. Weights are secret-shared once (setup); each inference shares the
    images, runs every operator on shares and reveals the logits to the client alone.
    """

    def __init__(self, plan: SecurePlan, settings: SecureSettings, meter: CostMeter,
                 state_dict: Optional[Dict[str, torch.Tensor]], backend: Backend) -> None:
        self.plan = plan
        self.settings = settings
        self.meter = meter
        self.backend = backend
        self.ops = self.backend.ops
        self.weights: Dict[str, Any] = {}
        self.on_layer: Optional[Callable[[], None]] = None  # called as each block (and the head) is done
        self._rope_tables: Optional[Tuple[torch.Tensor, torch.Tensor, Dict[bool, torch.Tensor]]] = None
        if plan.rope is not None:  # sin, cos and the rotation as a matrix (R = rot(I)), for either rotation
            sin, cos = torch.tensor(plan.rope).chunk(2, -1)
            eye = torch.eye(sin.shape[-1])
            self._rope_tables = sin, cos, {False: rot(eye), True: rope_rotate_half(eye)}
        # Swin: each windowed block's public window partition and shift mask, derived once from the plan
        self._windows = {blk.path: swin_windows(blk.window) for blk in plan.blocks if blk.window is not None}
        linear = self.linear_weights(plan)
        with meter.setup_phase(), meter.section('weights', 'share'):
            for name, shape in plan.params.items():
                value = state_dict[name].detach().float() if state_dict is not None else torch.zeros(shape)
                if name in linear:
                    value = value.reshape(shape[0], -1).t()  # used as (in, out)
                self.weights[name] = self.backend.share(value.contiguous(), OWNER)

    @staticmethod
    def linear_weights(plan: SecurePlan) -> Dict[str, List[int]]:
        """The weights that are the second factor of a product (the linear layers and the patch embedding), with the
        shape they are shared in, ``[in, out]``, in the plan's order."""
        linear = {}
        for name, shape in plan.params.items():
            if (name.endswith('.weight') and len(shape) == 2) or name == 'patch_embed.proj.weight':
                linear[name] = [math.prod(shape[1:]), shape[0]]
        return linear

    def mask_weights(self) -> None:
        """Mask the linear weights once for the session (``SecureSettings.weight_masks``): each later product with
        one of them opens only its activations. Part of the setup, as sharing the weights is."""
        with self.meter.setup_phase(), self.meter.section('weights', 'mask'):
            self.backend.mask_weights([self.weights[name] for name in self.linear_weights(self.plan)])

    def w(self, name: str) -> Optional[Any]:
        return self.weights.get(name)

    def _layer_norm(self, x, name: str, spec: Optional[NormSpec]):
        if spec is None:
            return x
        schedule = self.plan.schedules[name]
        return self.ops.layer_norm(x, self.w(f'{name}.weight'), self.w(f'{name}.bias'), spec.eps, self.settings,
                                   schedule.scale, schedule.iters)

    def share_images(self, images: Optional[torch.Tensor], batch: int):
        """Secret-share the client's images as patch rows (the owner passes None and the batch size)."""
        c, h, w = self.plan.input_size
        p = self.plan.patch_size
        rows = patchify(images, p) if images is not None else torch.zeros(batch, (h // p[0]) * (w // p[1]), c * p[0] * p[1])
        with self.meter.section('input', 'share'):
            return self.backend.share(rows, CLIENT)

    @staticmethod
    def layer_steps(plan: SecurePlan) -> int:
        """The steps :attr:`on_layer` counts in one forward of ``plan``: its blocks and the head."""
        return len(plan.blocks) + 1

    def _layer_done(self) -> None:
        if self.on_layer is not None:
            self.on_layer()

    def forward(self, patches) -> Any:
        """Logits (secret-shared) for secret-shared patch rows."""
        logits = self._forward(patches)
        self._layer_done()
        return logits

    def _forward(self, patches) -> Any:
        plan, m, ops = self.plan, self.meter, self.ops
        with m.section('patch_embed', 'linear'):
            x = ops.linear(patches, self.w('patch_embed.proj.weight'), self.w('patch_embed.proj.bias'))
        if plan.patch_norm is not None:
            with m.section('patch_embed', 'layernorm'):
                x = self._layer_norm(x, 'patch_embed.norm', plan.patch_norm)
        with m.section('embed', 'add'):
            B = x.size(0)
            prefix = []
            if plan.cls_token:
                prefix.append(self.w('cls_token').expand(B, -1, -1))
            if plan.dist_token:
                prefix.append(self.w('dist_token').expand(B, -1, -1))
            if plan.reg_tokens:
                prefix.append(self.w('reg_token').expand(B, -1, -1))
            if plan.no_embed_class:
                if plan.pos_embed:
                    x = x + self.w('pos_embed')
                x = self.backend.cat(prefix + [x], dim=1) if prefix else x
            else:
                x = self.backend.cat(prefix + [x], dim=1) if prefix else x
                if plan.pos_embed:
                    x = x + self.w('pos_embed')
        with m.section('norm_pre', 'layernorm'):
            x = self._layer_norm(x, 'norm_pre', plan.norm_pre)
        for spec in plan.blocks:
            if spec.merge is not None:
                x = self._merge(x, spec.merge)
            x = self._block(x, spec.path, spec)
            self._layer_done()
        with m.section('norm', 'layernorm'):
            x = self._layer_norm(x, 'norm', plan.norm)
        if plan.dist_token:
            return self._distilled_head(x)
        with m.section('head', 'pool'):
            npt = plan.num_prefix_tokens
            x = x[:, 0] if plan.global_pool == 'token' else x[:, npt:].mean(1)
        with m.section('fc_norm', 'layernorm'):
            x = self._layer_norm(x, 'fc_norm', plan.fc_norm)
        if plan.num_classes:
            with m.section('head', 'linear'):
                x = ops.linear(x, self.w(f'{plan.head}.weight'), self.w(f'{plan.head}.bias'))
        return x

    def _distilled_head(self, x):
        """DeiT distilled at inference: the mean of ``head`` on the class token and ``head_dist`` on the
        distillation token (of the two tokens themselves without a classifier)."""
        cls, dist = x[:, 0], x[:, 1]
        if self.plan.num_classes:
            with self.meter.section('head', 'linear'):
                cls = self.ops.linear(cls, self.w('head.weight'), self.w('head.bias'))
                dist = self.ops.linear(dist, self.w('head_dist.weight'), self.w('head_dist.bias'))
        with self.meter.section('head', 'pool'):
            return (cls + dist) * 0.5

    def _block(self, x, name: str, spec: BlockSpec):
        m = self.meter
        with m.section(name, 'layernorm'):
            h = self._layer_norm(x, f'{name}.norm1', spec.norm1)
        if spec.window is not None:
            h = self._window_attention(h, name, spec.window, spec.attn)
        else:
            h = self._attention(h, f'{name}.attn', spec.attn)
        x = x + (h * self.w(f'{name}.{spec.ls1}') if spec.ls1 else h)
        with m.section(name, 'layernorm'):
            normed = self._layer_norm(x, f'{name}.norm2', spec.norm2)
        if spec.style == 'post':  # ViT-Lite: the norm after the attention residual is on the residual stream
            x = normed
        h = self._mlp(normed, f'{name}.mlp', spec.mlp)
        return x + (h * self.w(f'{name}.{spec.ls2}') if spec.ls2 else h)

    def _merge(self, x, spec: MergeSpec):
        """Swin's patch merging: each 2x2 group of tokens concatenated in timm's order (a public reshaping of
        shares), normalized and reduced."""
        B, _, C = x.size()
        h, w = spec.resolution
        with self.meter.section(spec.path, 'linear'):
            x = x.reshape(B, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, (h // 2) * (w // 2), 4 * C)
        with self.meter.section(spec.path, 'layernorm'):
            x = self._layer_norm(x, f'{spec.path}.norm', spec.norm)
        with self.meter.section(spec.path, 'linear'):
            return self.ops.linear(x, self.w(f'{spec.path}.reduction.weight'), self.w(f'{spec.path}.reduction.bias'))

    def _window_attention(self, x, name: str, window: WindowSpec, spec: AttentionSpec):
        """Swin's (shifted) window attention on tokens ``(B, H·W, C)``: the cyclic shift and the window partition
        are one public reordering of the tokens and its inverse; the shift mask is public, the relative position
        bias the owner's secret (gathered from the shared table by the public index: local on shares)."""
        index, inverse, keep = self._windows[name]
        B, L, C = x.size()
        N = window.area
        with self.meter.section(name, 'linear'):
            windows = x.index_select(1, index).reshape(B * (L // N), N, C)
        bias = None
        if window.rel_pos_bias:
            table = self.w(f'{name}.attn.relative_position_bias_table')
            bias = table.index_select(0, get_relative_position_index(*window.window_size).flatten())
            bias = bias.reshape(N, N, spec.num_heads).permute(2, 0, 1)
        mask = None if keep is None else keep.float().repeat(B, 1, 1).unsqueeze(1)  # windows are batch-major
        out = self._attention(windows, f'{name}.attn', spec, bias, mask)
        with self.meter.section(name, 'linear'):
            return out.reshape(B, L, C).index_select(1, inverse)

    def _attention(self, x, name: str, spec: AttentionSpec, bias=None, keep: Optional[torch.Tensor] = None):
        m, ops = self.meter, self.ops
        B, N, _ = x.size()
        H, hd = spec.num_heads, spec.head_dim
        layer = name.rsplit('.', 1)[0]
        with m.section(layer, 'linear'):
            if spec.qkv == 'fused':
                qkv = ops.linear(x, self.w(f'{name}.qkv.weight'), self.w(f'{name}.qkv.bias'))
                q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
                if spec.qv_bias:  # EVA: biases of q and v only
                    q = q + self.w(f'{name}.q_bias').reshape(1, H, 1, hd)
                    v = v + self.w(f'{name}.v_bias').reshape(1, H, 1, hd)
            else:
                q, k, v = (ops.linear(x, self.w(f'{name}.{p}_proj.weight'), self.w(f'{name}.{p}_proj.bias'))
                           .reshape(B, N, H, hd).transpose(1, 2) for p in 'qkv')
        if spec.q_norm is not None:
            with m.section(layer, 'layernorm'):
                q = self._layer_norm(q, f'{name}.q_norm', spec.q_norm)
                k = self._layer_norm(k, f'{name}.k_norm', spec.k_norm)
        if self.plan.rope is not None and spec.rope_half is not None:
            with m.section(layer, 'rope'):
                q, k = self._rope(q, spec.rope_half), self._rope(k, spec.rope_half)
        outputs, order = [], []
        for kind, heads in spec.groups():
            index = torch.tensor(heads)
            qh, kh, vh = (t if len(heads) == H else t.index_select(1, index) for t in (q, k, v))
            bh = bias if bias is None or len(heads) == H else bias.index_select(0, index)
            with m.section(layer, kind):
                outputs.append(get_attn_kind(kind).secure(qh, kh, vh, spec.scale, self._context(
                    N, spec, self.plan.schedules.get(f'{name}.{kind}'), bh, keep)))
            order += heads
        with m.section(layer, 'linear'):
            out = outputs[0] if len(outputs) == 1 else self.backend.cat(outputs, dim=1)
            if order != list(range(H)):
                out = out.index_select(1, torch.tensor(order).argsort())
            out = out.transpose(1, 2).reshape(B, N, H * hd)
        if spec.norm is not None:
            with m.section(layer, 'layernorm'):
                out = self._layer_norm(out, f'{name}.norm', spec.norm)
        with m.section(layer, 'linear'):
            return ops.linear(out, self.w(f'{name}.proj.weight'), self.w(f'{name}.proj.bias'))

    def _rope(self, x, half: bool):
        """EVA's rotary embedding on the patch tokens of ``(B, H, N, head_dim)`` queries or keys, as timm's
        ``apply_rot_embed``: ``x * cos + rot(x) * sin``, with the public tables and ``rot`` a public signed
        permutation (``x @ R``, R = ``rot`` of the identity). Local on shares, but for truncations."""
        sin, cos, rotation = self._rope_tables
        npt = self.plan.num_prefix_tokens
        body = x[:, :, npt:] if npt else x
        body = body * cos + body.matmul(rotation[half]) * sin
        return self.backend.cat([x[:, :, :npt], body], dim=2) if npt else body

    def _context(self, num_keys: int, spec: AttentionSpec, schedule: Optional[Schedule], bias=None,
                 keep: Optional[torch.Tensor] = None) -> KindContext:
        """What a kind's secure computation gets: the engine's reciprocal and softmax with this layer's schedule
        for the kind (the plan holds one for every kind with a reciprocal; others get CrypTen's fixed choice), and
        for windowed attention the heads' secret bias and the public keep mask."""
        schedule = schedule or Schedule(scale=1.0, iters=self.settings.reciprocal_nr_iters)
        softmax = partial(self.ops.softmax, iters=schedule.iters, scale=schedule.scale)
        if keep is not None:
            softmax = partial(softmax, keep=keep)
        return KindContext(num_keys, spec.opts, partial(self.ops.reciprocal, iters=schedule.iters, scale=schedule.scale),
                           softmax, bias, keep)

    def _mlp(self, x, name: str, spec: MlpSpec):
        m, ops = self.meter, self.ops
        layer = name.rsplit('.', 1)[0]
        act = getattr(ops, spec.act) if spec.act != 'identity' else None
        if f'{name}.act' in self.plan.schedules:  # exact GeLU: its exp's squarings cover the calibrated inputs
            act = partial(act, exp_iterations=self.plan.schedules[f'{name}.act'].iters)
        if spec.kind != 'mlp':
            return self._gated_mlp(x, name, spec, act)
        with m.section(layer, 'linear'):
            h = ops.linear(x, self.w(f'{name}.fc1.weight'), self.w(f'{name}.fc1.bias'))
        tokens = spec.gelu_tokens
        if tokens is None or all(tokens):
            if act is not None:
                with m.section(layer, spec.act):
                    h = act(h, self.settings)
            return self._mlp_out(h, name, spec)
        # MPCViT+: the activation runs on the GeLU tokens only; the others get a ReLU after fc2
        if len(tokens) == 1:
            tokens = tokens * h.size(1)
        keep = torch.tensor([t for t, on in enumerate(tokens) if on])
        linear = torch.tensor([t for t, on in enumerate(tokens) if not on])
        if act is not None and len(keep):
            with m.section(layer, spec.act):
                h = self._scatter_tokens(h, keep, act(h.index_select(1, keep), self.settings), linear)
        y = self._mlp_out(h, name, spec)
        with m.section(layer, 'relu'):
            return self._scatter_tokens(y, linear, y.index_select(1, linear).relu(), keep)

    def _gated_mlp(self, x, name: str, spec: MlpSpec, act):
        """GLU (one fc1, its halves gated: ``act(x1) * x2``, or ``x1 * act(x2)`` with ``gate_last``) and SwiGLU
        (``act(fc1_g(x)) * fc1_x(x)``)."""
        m, ops = self.meter, self.ops
        layer = name.rsplit('.', 1)[0]
        with m.section(layer, 'linear'):
            if spec.kind == 'glu':
                h = ops.linear(x, self.w(f'{name}.fc1.weight'), self.w(f'{name}.fc1.bias'))
                first, second = h[:, :, :spec.hidden], h[:, :, spec.hidden:]
                gate, value = (second, first) if spec.gate_last else (first, second)
            else:
                gate = ops.linear(x, self.w(f'{name}.fc1_g.weight'), self.w(f'{name}.fc1_g.bias'))
                value = ops.linear(x, self.w(f'{name}.fc1_x.weight'), self.w(f'{name}.fc1_x.bias'))
        with m.section(layer, spec.act):
            h = (act(gate, self.settings) if act is not None else gate) * value
        return self._mlp_out(h, name, spec)

    def _mlp_out(self, h, name: str, spec: MlpSpec):
        """The MLP's norm on the hidden features (if any) and fc2."""
        layer = name.rsplit('.', 1)[0]
        if spec.norm is not None:
            with self.meter.section(layer, 'layernorm'):
                h = self._layer_norm(h, f'{name}.norm', spec.norm)
        with self.meter.section(layer, 'linear'):
            return self.ops.linear(h, self.w(f'{name}.fc2.weight'), self.w(f'{name}.fc2.bias'))

    def _scatter_tokens(self, x, index: torch.Tensor, values, others: torch.Tensor):
        """``x`` with the token rows in ``index`` replaced by ``values`` (a local reordering of shares)."""
        if not len(others):
            return values
        merged = self.backend.cat([values, x.index_select(1, others)], dim=1)
        return merged.index_select(1, torch.cat([index, others]).argsort())
