"""A toy attention kind, defined the way a user adds one: one record, no other module touched.

``square_norm``: ``s² / (Σ s² + 1)``. It divides by a data-dependent denominator, so it exercises every
part of the registry: plain text, calibration of its denominator, a public reciprocal schedule, the secure
computation and a card label. Importing this module registers it (a party process imports it the same way).
"""
from timm_mpc.layers import AttnKind, register_attn_kind


def square_norm_weights(scores, keep=None, **_):
    weights = scores.square()
    if keep is not None:
        weights = weights * keep
    return weights / (weights.sum(dim=-1, keepdim=True) + 1.0)


def square_norm_secure(q, k, v, scale, ctx):
    numer = q.mul(scale).matmul(k.transpose(-2, -1)).square()
    return (numer * ctx.reciprocal(numer.sum(-1, keepdim=True) + 1.0)).matmul(v)


TOY = AttnKind(
    name='square_norm', code=90, title='Square-Norm', label='SN', paper='a test of the kind registry',
    weights=square_norm_weights, secure=square_norm_secure,
    denominator=lambda s, **_: s.square().sum(-1) + 1.0,
    reciprocal_range=lambda calibrated, num_keys: (calibrated['min'], calibrated['max'], True))
register_attn_kind(TOY)
