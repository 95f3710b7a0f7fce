"""How often two-party truncation fails, measured on real images.

After each fixed-point multiplication CrypTen divides the product by the scale ``2^f``, and with two parties
each divides its own share (local, probabilistic truncation). That is correct to the last bit unless the two
shares wrap around the 64-bit ring together, which for a ring value ``x`` (the product, ``2^2f`` times the
real value) happens with probability ``|x| / 2^64`` over the parties' random shares; the decoded result is
then off by about ``2^(64 - 2f)`` (``2^32`` with 16 fractional bits): one garbage logit.

:func:`truncation_failures` runs the secure computation of a plan once in a single process (CrypTen with one
party: the same operators on the same values, each share being the value itself) and sums ``|x| / 2^64`` over
every element of every truncation: the expected number of failures per image, per operator and in total. It can
also put failures in, where they fall, to show what one does to the logits: almost always a logit off by about
``2^32``, which the plan's public logit bound catches (:meth:`SecurePlan.implausible`).
"""
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ...profile import CostMeter
from ..plan import SecurePlan, build_secure_plan, check_images
from ..processes import run_local
from ..secure_vit import SecureViT, patchify
from ..settings import SecureSettings
from .backend import CryptenBackend
from .compat import init_local

__all__ = ['truncation_failures']

_RING = 2.0 ** 64


class _Tally(CostMeter):
    """A cost meter that also charges each truncation's failure probability to the operator running it."""

    def __init__(self, communicator: Any) -> None:
        super().__init__(communicator)
        self.where = ('setup', 'share')
        self.expected: Dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, layer: str, op: str) -> Iterator[None]:
        outer, self.where = self.where, (layer, op)
        try:
            with super().section(layer, op):
                yield
        finally:
            self.where = outer


def _measure(rank: int, world_size: int, rendezvous: str, results: Any, modules: Tuple[str, ...],
             plan: Dict[str, Any], state_dict: Dict[str, torch.Tensor], images: torch.Tensor,
             settings: Dict[str, Any], injections: int) -> None:
    try:
        crypten, settings_ = init_local(rank, world_size, rendezvous, settings, modules)  # one party: shares = values
        from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
        meter = _Tally(crypten.communicator.get())
        divide = ArithmeticSharedTensor.div_
        masses: List[float] = []  # failure mass of each truncation call, in order
        inject: List[int] = []  # the call to fail in this pass (empty: none)
        generator = torch.Generator().manual_seed(0)
        failure = 2 ** (64 - crypten.cfg.encoder.precision_bits)  # what a failed local truncation adds

        def tallied(self: Any, y: Any) -> Any:
            if not (isinstance(y, int) or (torch.is_tensor(y) and not y.is_floating_point())):
                return divide(self, y)
            call = len(masses)
            mass = float(self.share.double().abs().sum()) / _RING
            masses.append(mass)
            meter.expected[meter.where[1]] += mass
            out = divide(self, y)
            if inject and inject[0] == call:  # fail one element, drawn as failures are: by magnitude
                weights = self.share.double().abs().flatten() * y  # |x| before this truncation
                element = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
                sign = 1 if torch.rand(1, generator=generator) < 0.5 else -1
                out.share.view(-1)[element] += sign * failure
            return out

        ArithmeticSharedTensor.div_ = tallied
        program = SecureViT(SecurePlan.from_dict(plan), settings_, meter, state_dict, CryptenBackend())
        with meter.section('input', 'share'):
            patches = crypten.cryptensor(patchify(images, plan['patch_size']), src=0)
        meter.expected.clear()  # sharing the weights and images is not part of an inference
        masses.clear()
        clean = program.forward(patches).get_plain_text()
        expected, calls = dict(meter.expected), torch.tensor(masses)
        injected = []
        for _ in range(injections):  # a failure in the call chosen as failures fall: by the calls' mass
            masses.clear()
            inject[:] = [int(torch.multinomial(calls / calls.sum(), 1, generator=generator))]
            logits = program.forward(patches).get_plain_text()
            injected.append(float((logits - clean).abs().max()))
        results.put(('ok', dict(expected=expected, injected=injected, clean_max=float(clean.abs().max()))))
    except BaseException as e:  # report to the parent, which raises
        results.put(('error', f'{type(e).__name__}: {e}'))


def truncation_failures(model: nn.Module, images: torch.Tensor, settings: Optional[SecureSettings] = None,
                        calibration_images: Optional[torch.Tensor] = None, injections: int = 0,
                        timeout_s: float = 1800.0) -> Dict[str, Any]:
    """The expected number of truncation failures per image of ``model``'s secure inference on ``images``, and
    what a failure does to the logits.

    With ``injections``, the inference runs that many times more, each time with one failure put where failures
    fall (a truncation call drawn by its failure mass, an element by its magnitude), and reports how far the
    logits moved and whether the plan's logit bound catches it.

    Returns:
        ``per_image`` (the expected failures of one image, averaged over ``images``), ``by_op`` (the same per
        operator kind, largest first), ``images``; with injections ``injected`` (per injection, the largest
        logit change), ``caught`` (how many left the logit bound), ``harmless`` (changed no logit by more than
        0.05) and ``logit_bound``. With independent failures, ``per_image`` is about the probability that an
        image meets one.
    """
    settings = settings or SecureSettings()
    plan = build_secure_plan(model, settings, calibration_images)
    images = check_images(plan, images).detach().cpu().float()
    value = run_local(_measure, [(plan.to_dict(), plan.owner_weights(model), images, settings.to_dict(), injections)],
                      timeout_s, 'the truncation measurement')
    batch = images.shape[0]
    by_op = {op: p / batch for op, p in sorted(value['expected'].items(), key=lambda kv: -kv[1])}
    out: Dict[str, Any] = dict(per_image=sum(by_op.values()), by_op=by_op, images=batch)
    if injections:
        changes = value['injected']
        out.update(injected=changes, logit_bound=plan.logit_bound,
                   caught=sum(c + value['clean_max'] > plan.logit_bound for c in changes),
                   harmless=sum(c <= 0.05 for c in changes))
    return out
