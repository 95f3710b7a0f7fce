"""A dry run of a secure inference: the plan's computation on zeros in two processes of the owner's own (the
owner-as-dealer provider: no dealer, no client, nothing secret), cached on disk by plan, settings and batch size.

No step of CrypTen's algorithms depends on the data, so the dry run asks for the same dealer requests, in the same
order, as the real inference (the offline phase fetches them ahead, :mod:`.offline`), sends the same rounds and
bytes between the parties, and holds tensors of the same shapes. It tells, before the parties start, what a batch
will cost (:meth:`DryRun.latency`) and how much memory each party's process will take (:mod:`.memory`).
"""
import hashlib
import json
import os
import resource
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ...profile import NETWORKS, CostMeter, NetworkSetting
from ...utils import cache_root
from ..plan import SecurePlan
from ..processes import run_local
from ..secure_vit import CLIENT, SecureViT
from ..settings import SecureSettings
from .backend import CryptenBackend
from .compat import init_local
from .offline import CHUNK_BYTES, Request, client_numel, request_numel
from .ops import reveal_to

__all__ = ['DryRun', 'dry_run', 'default_cache_dir', 'predicted_peak']

CACHE_VERSION = 5  # 3: cost and memory beside the requests; 4: comparison keys (fss_comparisons); 5: two reciprocal steps
RUN_S_PER_IMAGE = 10.0  # the dry run's time bound per image of mpcvit_tiny's size, beyond the settings' timeout
_MPCVIT_TINY_WORK = 65 * 7 * 256  # its tokens x blocks x width: the bound grows with a plan's


def default_cache_dir() -> Path:
    """``$TIMM_MPC_CACHE`` or ``~/.cache/timm_mpc``, plus ``dry_runs``."""
    return cache_root() / 'dry_runs'


@dataclass
class DryRun:
    """What one inference of a plan on ``batch`` images asks for and costs, measured on zeros.

    Attributes:
        batch: Images in the batch.
        requests: The dealer requests, in order.
        rounds: Communication rounds between the parties (sharing the images and revealing the logits included).
        bytes: Bytes the two parties send each other, together.
        compute_s: The two processes' wall time, one thread each, as the parties run.
        base_rss: Resident bytes of each process (owner, client) with the plan's weights shared, before the images.
        peak_rss: Peak resident bytes of each process (owner, client) over the inference.
    """
    batch: int
    requests: List[Request]
    rounds: int
    bytes: float
    compute_s: float
    base_rss: Tuple[int, int]
    peak_rss: Tuple[int, int]

    @property
    def dealer_bytes(self) -> int:
        """Bytes the dealer sends the parties for the batch (int64 shares and comparison keys)."""
        return 8 * sum(request_numel(r) + client_numel(r) for r in self.requests)

    def latency(self, network: NetworkSetting) -> float:
        """Estimated seconds of the batch's online phase, ``compute + rounds × RTT + bytes / bandwidth``."""
        return network.latency(self.compute_s, self.rounds, self.bytes)

    def summary(self, dealer: bool = True, networks: Optional[Dict[str, NetworkSetting]] = None) -> str:
        """One line per image: rounds, traffic, the dealer's traffic (with one) and latency on each network."""
        per = self.batch
        latency = ', '.join(f'{name.upper()} {self.latency(n) / per:.1f} s' for name, n in (networks or NETWORKS).items())
        offline = f' and {self.dealer_bytes / per / 1e6:,.0f} MB from the dealer (offline)' if dealer else ''
        return (f'{self.rounds:,} rounds per batch of {per}; per image {self.bytes / per / 1e6:,.0f} MB between the '
                f'parties{offline}, {latency}')


def _rss() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# CrypTen's provider methods and the dealer functions the TTP provider asks for in their place
_PROVIDER_TO_DEALER = {'generate_additive_triple': 'additive', 'square': 'square', 'generate_binary_triple': 'binary',
                       'wrap_rng': 'wraps', 'B2A_rng': 'B2A', 'generate_weight_mask': 'mask',
                       'generate_fixed_triple': 'fixed', 'generate_sign_keys': 'sign'}


def _recording(method: Any, function: str, requests: List[Request]) -> Any:
    def recorded(self: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        requests.append((function, None if device is None else str(device),
                         tuple(tuple(a) if isinstance(a, torch.Size) else a for a in args), kwargs))
        return method(self, *args, device=device, **kwargs)
    return recorded


def _dry_run_process(rank: int, world_size: int, rendezvous: str, results: Any, modules: Tuple[str, ...],
                     plan: Dict[str, Any], settings: Dict[str, Any], batch: int) -> None:
    """One of the two processes; the first notes each request its provider gets, in order, and reports."""
    try:
        crypten, settings_ = init_local(rank, world_size, rendezvous, settings, modules)
        from crypten.mpc.provider.tfp_provider import TrustedFirstParty
        requests: List[Request] = []
        if rank == 0:
            for method, function in _PROVIDER_TO_DEALER.items():
                setattr(TrustedFirstParty, method, _recording(getattr(TrustedFirstParty, method), function, requests))
        comm = crypten.communicator.get()
        plan_ = SecurePlan.from_dict(plan)
        meter = CostMeter(comm)
        program = SecureViT(plan_, settings_, meter, None, CryptenBackend())
        if settings_.weight_masks:
            program.mask_weights()  # the session's setup (its requests: offline.mask_requests)
        base = _rss()
        requests.clear()  # only what an inference asks for
        stats = comm.get_communication_stats()
        t0 = time.perf_counter()
        patches = program.share_images(torch.zeros(batch, *plan_.input_size) if rank == CLIENT else None, batch)
        reveal_to(program.forward(patches), CLIENT, comm)
        compute_s = time.perf_counter() - t0
        after = comm.get_communication_stats()
        mine = dict(bytes=after['bytes'] - stats['bytes'], base=base, peak=_peak_rss())
        client = comm.broadcast_obj(mine if rank == CLIENT else None, CLIENT)
        crypten.uninit()
        if rank == 0:
            results.put(('ok', dict(requests=requests, rounds=int(after['rounds'] - stats['rounds']),
                                    bytes=float(mine['bytes'] + client['bytes']), compute_s=compute_s,
                                    base_rss=(base, client['base']), peak_rss=(mine['peak'], client['peak']))))
    except BaseException as e:  # report to the parent, which raises
        results.put(('error', f'{type(e).__name__}: {e}'))


def _cache_key(plan: SecurePlan, settings: SecureSettings, batch: int) -> str:
    public = {k: v for k, v in settings.to_dict().items() if k not in ('timeout_s', 'truncation_retries')}
    data = json.dumps(dict(version=CACHE_VERSION, plan=plan.to_dict(), settings=public, batch=batch), sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:20]


def _from_json(values: Dict[str, Any]) -> DryRun:
    requests = [(f, d, tuple(tuple(a) if isinstance(a, list) else a for a in args), kw)
                for f, d, args, kw in values.pop('requests')]
    return DryRun(requests=requests, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def dry_run(plan: SecurePlan, settings: SecureSettings, batch: int, cache_dir: Optional[Path] = None) -> DryRun:
    """The dry run of ``plan`` at ``batch`` images with CrypTen and ``settings`` (cached on disk).

    Raises:
        RuntimeError: the dry run failed or did not finish in its time bound (the settings' timeout plus a bound
            that grows with the batch and the plan's size).
    """
    path = Path(cache_dir or default_cache_dir()) / f'{_cache_key(plan, settings, batch)}.json'
    if path.is_file():
        return _from_json(json.loads(path.read_text()))
    work = max(1.0, plan.tokens * len(plan.blocks) * plan.embed_dim / _MPCVIT_TINY_WORK)
    values = run_local(_dry_run_process, [(plan.to_dict(), settings.to_dict(), batch)] * 2,
                       settings.timeout_s + RUN_S_PER_IMAGE * work * batch, 'the dry run of the plan')
    result = DryRun(batch=batch, **values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{os.getpid()}.{threading.get_ident()}.part')  # processes (and a service's threads) apart
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(path)
    return result


DEALER_ANSWER_COPIES = 3  # the dealer's answer while it is generated: the pieces, their concatenation, its send buffer
OWNER_ANSWER_COPIES = 2  # the owner's received answer and the shares it is turned into


def predicted_peak(dry: DryRun, dealer: bool) -> int:
    """Predicted peak resident memory of the processes of a local run of ``dry``'s batch together: owner, client
    and, with ``dealer``, the dealer process and the owner's buffer of its answers (the dealer's own process: a base
    process and the answer it is building, at most :data:`~.offline.CHUNK_BYTES`, several times over while it is
    generated)."""
    peak = dry.peak_rss[0] + dry.peak_rss[1]
    if dealer:
        largest = 8 * max((request_numel(r) + client_numel(r) for r in dry.requests), default=0)
        answer = max(min(dry.dealer_bytes, CHUNK_BYTES), largest)  # a request is never split across batches
        # the parties hold the received answer (the client its comparison keys) and what they turn it into
        peak += dry.base_rss[1] + DEALER_ANSWER_COPIES * answer + OWNER_ANSWER_COPIES * answer
    return peak
