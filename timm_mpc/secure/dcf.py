"""Distributed comparison functions (DCF): the dealer's keys for one-round secure comparisons.

A DCF key pair for a point ``alpha`` and a payload ``beta`` (Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar and
Rathee, "Function Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation", Eurocrypt 2021, Fig. 1) lets
the two parties, each evaluating its own key on the same public ``x``, get additive shares (mod 2^64) of
``beta · [x < alpha]``. Either key alone is pseudorandom: it tells its holder nothing of ``alpha`` or ``beta``.

Keys are made and evaluated for many elements at once (one point per element). The pseudorandom generator is
fixed-key AES-128 in Matyas–Meyer–Oseas form (``AES_k(s ⊕ c) ⊕ s ⊕ c``), from the ``cryptography`` package, over a
whole layer's buffer per tree level; a seed's lowest bit is its control bit, as is usual.

A key holds the holder's 128-bit seed (drawn by the dealer from the generator it shares with that party, so it
never crosses a link) and the correction words, the same for both parties: for each of the ``bits`` levels a 128-bit
seed correction, a 64-bit value correction and two control bits, and one final 64-bit correction:
:func:`correction_words` int64 words per element.
"""
from typing import Tuple

import numpy as np

__all__ = ['dcf_keys', 'dcf_eval', 'correction_words', 'sign_keys', 'sign_eval', 'coarse', 'SEED_WORDS']

SEED_WORDS = 2  # a 128-bit seed as two uint64
_FIXED_KEY = bytes(range(16))  # public: the fixed-key PRG's security rests on AES as a random permutation
_TWEAKS = np.array([0, 1, 2], dtype=np.uint64)  # in a seed's low word: left child, right child, the values
_ONE = np.uint64(1)


def _aes():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    return Cipher(algorithms.AES(_FIXED_KEY), modes.ECB())


def _prg(blocks: np.ndarray) -> np.ndarray:
    """``AES_k(b) ⊕ b`` for every 128-bit block of ``blocks`` (contiguous uint64, last axis 2; the seed ⊕ tweak of
    Matyas–Meyer–Oseas): one AES pass over all of them, into a buffer of its own."""
    out = np.empty(blocks.size + 2, dtype=np.uint64)  # update_into wants a block to spare
    encryptor = _aes().encryptor()
    encryptor.update_into(memoryview(blocks).cast('B'), memoryview(out).cast('B'))
    out = out[:blocks.size].reshape(blocks.shape)
    out ^= blocks
    return out


def _expand(seeds: np.ndarray, tweaks: np.ndarray) -> np.ndarray:
    """The blocks ``seed ⊕ tweak`` ``(k, N, 2)`` for seeds ``(N, 2)`` and low-word tweaks ``(k,)`` or ``(k, N)``."""
    blocks = np.empty((tweaks.shape[0],) + seeds.shape, dtype=np.uint64)
    blocks[...] = seeds
    blocks[:, :, 0] ^= tweaks if tweaks.ndim == 2 else tweaks[:, None]
    return blocks


def _pick(on: np.ndarray, yes: np.ndarray, no: np.ndarray) -> np.ndarray:
    """``yes`` where ``on`` is all ones, ``no`` where it is 0."""
    return no ^ ((no ^ yes) & on)


def _pick_seeds(on: np.ndarray, yes: np.ndarray, no: np.ndarray) -> np.ndarray:
    """:func:`_pick` for seeds ``(..., 2)``, word by word (NumPy broadcasts over a last axis of 2 slowly)."""
    out = np.empty_like(no)
    for word in range(SEED_WORDS):
        out[..., word] = _pick(on, yes[..., word], no[..., word])
    return out


def _flip_seeds(seeds: np.ndarray, correction: np.ndarray, on: np.ndarray) -> None:
    """``seeds ^= correction`` where ``on`` is all ones, in place, word by word."""
    for word in range(SEED_WORDS):
        seeds[..., word] ^= correction[..., word] & on


def correction_words(bits: int) -> int:
    """The int64 words of one element's correction words for a ``bits``-bit domain: per level a seed correction
    (two words) and a value correction (one), both levels' control bits packed into two words, the final one."""
    return 3 * bits + 3


def _layout(words: np.ndarray, n: int, bits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Views of a flat key buffer, level by level so that each level's words are contiguous: the seed corrections
    ``(bits, N, 2)``, the value corrections ``(bits, N)``, the packed control bits ``(2, N)``, the final ``(N,)``."""
    seed_cw = words[:2 * bits * n].reshape(bits, n, 2)
    v_cw = words[2 * bits * n:3 * bits * n].reshape(bits, n)
    t_cw = words[3 * bits * n:(3 * bits + 2) * n].reshape(2, n)
    return seed_cw, v_cw, t_cw, words[(3 * bits + 2) * n:]


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 64):
        raise ValueError(f'a DCF domain has 1 to 64 bits, got {bits!r}')


def dcf_keys(alpha: np.ndarray, beta: np.ndarray, seed0: np.ndarray, seed1: np.ndarray, bits: int) -> np.ndarray:
    """Correction words of the DCF keys for ``beta · [x < alpha]`` on ``bits``-bit inputs, one point per element.

    ``alpha`` (uint64 below ``2^bits``) and ``beta`` (uint64, the payload mod 2^64) have shape ``(N,)``; ``seed0`` and
    ``seed1``, ``(N, 2)`` uint64, are the parties' root seeds (uniform). Returns ``N * correction_words(bits)`` uint64
    words, flat, the same for both parties: party ``b``'s key is ``(seed_b, words)``."""
    _check_bits(bits)
    alpha, beta = np.asarray(alpha, dtype=np.uint64), np.asarray(beta, dtype=np.uint64)
    n = alpha.shape[0]
    if bits < 64 and np.any(alpha >> np.uint64(bits)):
        raise ValueError(f'a DCF point must be below 2^{bits}')
    words = np.zeros(n * correction_words(bits), dtype=np.uint64)
    seed_cws, v_cws, t_cws, final = _layout(words, n, bits)
    seeds = np.concatenate([seed0, seed1])  # both parties' seeds: one AES pass per level
    seeds[:, 0] &= ~_ONE
    t = np.concatenate([np.zeros(n, dtype=np.uint64), np.ones(n, dtype=np.uint64)])
    v_alpha = np.zeros(n, dtype=np.uint64)
    for level in range(bits):
        a = (alpha >> np.uint64(bits - 1 - level)) & _ONE
        right = np.uint64(0) - a  # all ones where alpha goes right
        left, right_child, values = _prg(_expand(seeds, _TWEAKS))  # each (2N, 2)
        left_t, right_t = left[:, 0] & _ONE, right_child[:, 0] & _ONE  # the children's control bits, then cleared
        left[:, 0] ^= left_t
        right_child[:, 0] ^= right_t
        right2 = np.concatenate([right, right])
        keep, lose = _pick_seeds(right2, right_child, left), _pick_seeds(right2, left, right_child)
        keep_v, lose_v = _pick(right2, values[:, 1], values[:, 0]), _pick(right2, values[:, 0], values[:, 1])
        sign = np.uint64(0) - t[n:] | _ONE  # (-1)^t1 mod 2^64
        seed_cw = lose[:n] ^ lose[n:]
        v_cw = sign * (lose_v[n:] - lose_v[:n] - v_alpha) + (sign * beta & right)
        v_alpha = v_alpha - keep_v[n:] + keep_v[:n] + sign * v_cw
        t_left_cw = left_t[:n] ^ left_t[n:] ^ a ^ _ONE
        t_right_cw = right_t[:n] ^ right_t[n:] ^ a
        seed_cws[level], v_cws[level] = seed_cw, v_cw
        t_cws[0] |= t_left_cw << np.uint64(bits - 1 - level)  # level by level as x's bits are, highest first
        t_cws[1] |= t_right_cw << np.uint64(bits - 1 - level)
        keep_t_cw = _pick(right, t_right_cw, t_left_cw)
        keep_t = _pick(right2, right_t, left_t)
        on = np.uint64(0) - t
        _flip_seeds(keep, np.concatenate([seed_cw, seed_cw]), on)
        seeds = keep
        t = keep_t ^ (t & np.concatenate([keep_t_cw, keep_t_cw]))
    sign = np.uint64(0) - t[n:] | _ONE
    final[:] = sign * (seeds[n:, 1] - seeds[:n, 1] - v_alpha)
    return words


def dcf_eval(party: int, seed: np.ndarray, words: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """Party ``party``'s share (uint64, mod 2^64) of ``beta · [x < alpha]`` for public ``x`` ``(N,)`` below ``2^bits``,
    from its key: its root ``seed`` ``(N, 2)`` and the correction ``words`` of :func:`dcf_keys`. ``x`` of shape
    ``(k, N)`` evaluates each element's key at ``k`` points, in one pass."""
    _check_bits(bits)
    x = np.asarray(x, dtype=np.uint64)
    n = x.shape[-1]
    if words.shape != (n * correction_words(bits),) or seed.shape != (n, SEED_WORDS):
        raise ValueError(f'a DCF key for {n} elements of {bits} bits has seeds ({n}, {SEED_WORDS}) and '
                         f'{n * correction_words(bits)} words; got {seed.shape} and {words.shape}')
    shape = x.shape
    x = x.reshape(-1, n)  # (points, N): the keys broadcast over the points
    seed_cws, v_cws, t_cws, final = _layout(words, n, bits)
    t_path = (t_cws[1] & x) | (t_cws[0] & ~x)  # the control-bit corrections along x's path
    blocks = np.empty((2,) + x.shape + (SEED_WORDS,), dtype=np.uint64)  # the child on x's path, and the values
    blocks[0] = seed
    blocks[0, ..., 0] &= ~_ONE
    t = np.full(x.shape, party, dtype=np.uint64)
    value = np.zeros(x.shape, dtype=np.uint64)
    for level in range(bits):
        shift = np.uint64(bits - 1 - level)
        go_right = (x >> shift) & _ONE
        blocks[1] = blocks[0]
        blocks[1, ..., 0] ^= _TWEAKS[2]
        blocks[0, ..., 0] ^= go_right
        child, values = _prg(blocks)
        on = np.uint64(0) - t  # all ones where the control bit is set: corrections apply there
        value += _pick(np.uint64(0) - go_right, values[..., 1], values[..., 0])  # the value on x's path
        value += v_cws[level] & on
        child_t = child[..., 0] & _ONE
        child[..., 0] ^= child_t
        _flip_seeds(child, seed_cws[level], on)
        blocks[0] = child
        t = child_t ^ (t & (t_path >> shift) & _ONE)
    value += blocks[0, ..., 1] + (final & (np.uint64(0) - t))
    value = value.reshape(shape)
    return value if party == 0 else np.uint64(0) - value


def sign_keys(mask: np.ndarray, seed0: np.ndarray, seed1: np.ndarray, bits: int = 64) -> np.ndarray:
    """Correction words of the keys that give shares of ``[x < 0]`` (``x`` a signed ``bits``-bit value: the ring
    element's low ``bits`` bits) once ``x + mask`` is opened: a DCF on ``bits - 1`` bits at the mask's low bits, whose
    payload ``1 - 2 · msb(mask)`` folds the mask's top bit in (the dealer also shares ``msb(mask)``: :func:`sign_eval`
    adds it). ``mask`` is below ``2^bits``."""
    mask = np.asarray(mask, dtype=np.uint64)
    top = _top_bit(mask, bits)
    return dcf_keys(mask & _low_bits(bits), _ONE - np.uint64(2) * top, seed0, seed1, bits - 1)


def coarse(value: np.ndarray, bits: int, dropped: int) -> np.ndarray:
    """``value``'s low ``bits`` bits without their lowest ``dropped``: what a comparison on ``bits - dropped`` bits
    sees. For an opened ``x + mask`` and the mask both taken so, the sign of their difference (``bits - dropped`` bits)
    is ``[x < 0]`` for every ``x`` but those in ``[-2^dropped, 0)``, which may compare as 0 (the carry of the dropped
    bits): a threshold blurred by ``2^dropped`` units below it, for less work and smaller keys."""
    low = np.uint64(2 ** bits - 1) if bits < 64 else np.uint64(2 ** 64 - 1)
    return (np.asarray(value, dtype=np.uint64) & low) >> np.uint64(dropped)


def _low_bits(bits: int) -> np.uint64:
    return np.uint64(2 ** (bits - 1) - 1)


def _top_bit(value: np.ndarray, bits: int) -> np.ndarray:
    return (value >> np.uint64(bits - 1)) & _ONE


def sign_eval(party: int, seed: np.ndarray, words: np.ndarray, top_share: np.ndarray, opened: np.ndarray,
              bits: int = 64) -> np.ndarray:
    """Party ``party``'s share of ``[x < 0]`` from the opened ``x + mask`` (uint64; only its low ``bits`` bits count),
    its key, and its share of the mask's top bit. With ``x + mask = 2^(bits-1)·h + l`` (mod ``2^bits``), ``x < 0``
    exactly when ``h ⊕ msb(mask) ⊕ [l < mask mod 2^(bits-1)]`` (the borrow of the low bits): ``msb(mask) ⊕ [l < ·]`` is
    what the payload and the top bit's share give, and the public ``h`` flips it linearly. Exact wherever ``x`` is a
    ``bits``-bit signed value (on the whole ring at 64). ``opened`` of shape ``(k, N)``: each element's key at ``k``
    opened values (``x + mask - t`` gives ``[x < t]``)."""
    opened = np.asarray(opened, dtype=np.uint64)
    high = _top_bit(opened, bits)
    flipped = top_share + dcf_eval(party, seed, words, opened & _low_bits(bits), bits - 1)
    return (_ONE - np.uint64(2) * high) * flipped + (high if party == 0 else np.uint64(0))
