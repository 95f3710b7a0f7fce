"""Comparisons by function secret sharing (``SecureSettings.fss_comparisons``): ``[x < 0]`` in one round.

CrypTen compares by converting the shares of ``x`` to binary shares and running a 64-bit adder on them: about a
dozen rounds and 930 bytes per element. Here the dealer deals, per element, a random mask ``r`` (additively shared),
shares of its top bit and the two keys of a distributed comparison function at ``r``'s low 63 bits
(:func:`~timm_mpc.secure.dcf.sign_keys`); the parties open ``x + r`` (one round, 8 bytes per element from each) and
each evaluates its key on it locally (:func:`~timm_mpc.secure.dcf.sign_eval`), which gives additive shares of
``[x < 0]``, exact on the whole 64-bit ring. Every comparison of CrypTen's (ReLU, ``ge``, ``max``, ``sign``,
``abs``, the sigmoid's) goes through ``MPCTensor._ltz``, which this replaces.

The keys are correlated randomness like a Beaver triple: the dealer draws each party's mask share and root seed from
the generator it shares with that party, sends the owner its share of the top bit, and sends both parties the
correction words (the same for both; the client's come to it directly, :func:`~.offline.prefetch_keys`). A party's
key alone is pseudorandom, so what it opens and holds tells it nothing new; the opened ``x + r`` is uniform.
"""
from typing import Any, List, Sequence

import numpy as np
import torch

from ..dcf import SEED_WORDS, coarse, correction_words, dcf_eval, sign_eval

__all__ = ['key_words', 'sign_answer_numel', 'sign_client_numel', 'use_fss_comparisons', 'fss_comparisons_in_use',
           'less_than', 'dealt_sign_keys', 'owner_sign_keys']


def key_words(bits: int) -> int:
    """Int64 words of correction per compared ``bits``-bit element, the same for both parties (a DCF on the low
    ``bits - 1`` bits: the top bit of the opened value is public and flips the result)."""
    return correction_words(bits - 1)


def sign_answer_numel(size: Any, bits: int, dropped: int = 0) -> int:
    """What the dealer sends the owner for a comparison of ``size`` elements of ``bits`` bits (the lowest ``dropped``
    not compared): its share of each mask's top bit, and the correction words (int64 each)."""
    return torch.Size(size).numel() * (1 + key_words(bits - dropped))


def sign_client_numel(size: Any, bits: int, dropped: int = 0) -> int:
    """What the dealer sends the client for it: the correction words."""
    return torch.Size(size).numel() * key_words(bits - dropped)


def _ring(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).numpy().view(np.uint64)


class SignKeys:
    """A party's part of the comparison keys for one tensor of ``bits``-bit values: its share of the masks (an int64
    tensor of the tensor's size) and what turns the opened ``x + mask`` into its share of ``[x < 0]``."""

    def __init__(self, bits: int, dropped: int, mask: torch.Tensor, top: torch.Tensor, seed: torch.Tensor,
                 words: torch.Tensor) -> None:
        self.bits, self.dropped, self.mask, self.top, self.seed, self.words = bits, dropped, mask, top, seed, words

    def _points(self, points: torch.Tensor) -> np.ndarray:
        return coarse(_ring(points).reshape(points.shape[0], -1), self.bits, self.dropped)

    def evaluate(self, party: int, points: torch.Tensor) -> torch.Tensor:
        """This party's shares of ``[point - mask < 0]`` for ``points`` of shape ``(k, *size)``: each element's key
        at ``k`` opened points, in one pass."""
        share = sign_eval(party, _ring(self.seed).reshape(-1, SEED_WORDS), _ring(self.words), _ring(self.top),
                          self._points(points), self.bits - self.dropped)
        return torch.from_numpy(share.view(np.int64)).reshape(points.shape)


class OwnerDealtSignKeys(SignKeys):
    """The owner as its own dealer (CrypTen's trusted first party: cost measurements and the dry run's processes,
    never private): both parties draw the masks from their shared generator (the owner's share is the mask, the
    client's zero), so the owner's share of ``[x < 0]`` is computed in the clear and the client's is zero. Each still
    evaluates a key of the real size (all-zero words), so that a dry run's compute time and memory are a real
    party's."""

    def __init__(self, bits: int, dropped: int, mask: torch.Tensor, share: torch.Tensor) -> None:
        empty = torch.zeros(0, dtype=torch.int64)
        super().__init__(bits, dropped, share, empty, empty, empty)
        self.full_mask = mask

    def evaluate(self, party: int, points: torch.Tensor) -> torch.Tensor:
        numel, bits = self.full_mask.numel(), self.bits - self.dropped
        zeros = np.zeros(numel * key_words(bits), dtype=np.uint64)
        dcf_eval(party, np.zeros((numel, SEED_WORDS), dtype=np.uint64), zeros,
                 np.zeros((points.shape[0], numel), dtype=np.uint64), bits - 1)
        # what the keys give: the sign of the compared bits' difference, as a bits-bit value
        difference = self._points(points) - coarse(_ring(self.full_mask), self.bits, self.dropped)
        negative = torch.from_numpy(((difference >> np.uint64(bits - 1)) & np.uint64(1)).view(np.int64))
        negative = negative.reshape(points.shape)
        return negative if party == 0 else torch.zeros_like(negative)


def dealt_sign_keys(self: Any, size: Any, bits: int, dropped: int, device: Any = None) -> SignKeys:
    """``TrustedThirdParty.generate_sign_keys``: this party's part of the dealer's comparison keys for ``size``
    elements of ``bits`` bits, their lowest ``dropped`` not compared. Its mask share and root seeds (and the client's
    top-bit share) come from the generator it shares with the dealer, in the order the dealer draws them
    (:mod:`.dealer`); the rest from the dealer."""
    from crypten import communicator as comm
    from crypten.common.rng import generate_random_ring_element as random_ring_element  # timm-mpc's (compat)
    from crypten.mpc.provider.ttp_provider import TTPClient
    ttp = TTPClient.get()
    generator = ttp.get_generator(device=device)
    size = torch.Size(size)
    mask = random_ring_element(size, generator=generator)
    seed = random_ring_element((size.numel(), SEED_WORDS), generator=generator)
    answer = ttp.ttp_request('sign', device, size, bits, dropped)
    if comm.get().get_rank() == 0:
        top, words = answer[:size.numel()], answer[size.numel():]
    else:
        top, words = random_ring_element(size, generator=generator), answer
    return SignKeys(bits, dropped, mask, top, seed, words)


def owner_sign_keys(self: Any, size: Any, bits: int, dropped: int, device: Any = None) -> SignKeys:
    """``TrustedFirstParty.generate_sign_keys``: see :class:`OwnerDealtSignKeys`."""
    import crypten
    from crypten import communicator as comm
    from crypten.common.rng import generate_random_ring_element as random_ring_element  # timm-mpc's (compat)
    mask = random_ring_element(size, generator=crypten.generators['global'][torch.device('cpu')])
    return OwnerDealtSignKeys(bits, dropped, mask, mask if comm.get().get_rank() == 0 else torch.zeros_like(mask))


def less_than(x: Any, thresholds: Sequence[float], bits: int = 64, dropped: int = 0) -> List[torch.Tensor]:
    """This party's arithmetic shares (int64, scale 1) of ``[x < t]`` for each public ``t``, from one opening of
    ``x + mask`` and one key per element of ``x``: a DCF key evaluates at any number of points (here ``x + mask - t``),
    so every threshold after the first costs local work only. With ``bits`` below 64 the keys are for ``bits``-bit
    values (smaller keys, less work): the caller guarantees ``|x - t| < 2^(bits-1)`` in fixed point (a public bound
    of the plan), where the result is exact; with ``dropped`` low bits not compared, a threshold is blurred by
    ``2^dropped`` fixed-point units below it (:func:`~timm_mpc.secure.dcf.coarse`)."""
    import crypten
    from crypten import communicator as comm
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    keys = crypten.mpc.get_default_provider().generate_sign_keys(x.size(), bits, dropped, device=x.device)
    opened = ArithmeticSharedTensor.from_shares(x._tensor.share + keys.mask, precision=0).reveal()
    points = torch.stack([opened - int(round(t * x.encoder.scale)) for t in thresholds])
    return list(keys.evaluate(comm.get().get_rank(), points))


def _fss_ltz(self: Any) -> Any:
    """``MPCTensor._ltz`` by the dealer's keys: open ``x + mask`` (one round), evaluate the keys locally. The result
    is what CrypTen's gives: arithmetic shares of 0 or 1, at scale 1."""
    from crypten.mpc import MPCTensor
    result = MPCTensor.from_shares(less_than(self, [0])[0], precision=0 if self.encoder.scale == 1 else None)
    result.encoder._scale = 1
    return result


_CRYPTEN_LTZ: dict = {}


def use_fss_comparisons(on: bool) -> None:
    """Compare by the dealer's keys (:func:`_fss_ltz`) or by CrypTen's own conversion to binary shares. The providers'
    ``generate_sign_keys`` are there either way: the dealer's (TTP) and the owner-as-dealer's (TFP)."""
    from crypten.mpc import MPCTensor
    from crypten.mpc.provider.tfp_provider import TrustedFirstParty
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty
    TrustedThirdParty.generate_sign_keys, TrustedFirstParty.generate_sign_keys = dealt_sign_keys, owner_sign_keys
    _CRYPTEN_LTZ.setdefault('_ltz', MPCTensor._ltz)
    MPCTensor._ltz = _fss_ltz if on else _CRYPTEN_LTZ['_ltz']


def fss_comparisons_in_use() -> bool:
    """Whether this process compares by the dealer's keys (the settings it applied)."""
    from crypten.mpc import MPCTensor
    return MPCTensor._ltz is _fss_ltz
