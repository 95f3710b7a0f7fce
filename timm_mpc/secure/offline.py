"""The offline phase: the owner fetches the dealer's correlated randomness before the images arrive.

CrypTen's TTP client asks the dealer for each multiplication triple (and square, wrap and bit pair) at the
moment it is used, one round trip each: about 700 requests for one ``mpcvit_tiny`` image, which the owner
waits for in the middle of the online phase. Which requests an inference makes depends only on the public
plan, the settings and the batch size, never on the data: the owner records the sequence once, by running
the same computation on zeros in two processes of its own (:func:`record_requests`, cached on disk), and asks
the dealer for all of it in large batches (``TTPServer.batch``, see :mod:`.crypten_compat`) before the online phase starts
(:func:`prefetch`). The dealer computes exactly what it would have computed request by request, in the same
order, so every share is the same; only the round trips are gone.

What each party learns does not change: the dealer sees the same request sizes, now all at once.
"""
import hashlib
import json
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch

from ..cost.profile import CostMeter
from ..utils import cache_root
from .crypten_compat import product_shape
from .local_run import init_local, run_local
from .plan import SecurePlan
from .secure_vit import SecureViT, patchify
from .settings import SecureSettings

__all__ = ['record_requests', 'prefetch', 'default_cache_dir']

Request = Tuple[str, Optional[str], tuple, dict]  # (function, device, args, kwargs) of TTPClient.ttp_request
CACHE_VERSION = 2
CHUNK_BYTES = 256 * 2 ** 20  # the dealer answers at most this much per batch (memory stays bounded)
RECORD_S_PER_IMAGE = 10.0  # the recording's time bound per image of mpcvit_tiny's size, beyond the settings' timeout
_MPCVIT_TINY_WORK = 65 * 7 * 256  # its tokens x blocks x width: the bound grows with a plan's


def default_cache_dir() -> Path:
    """``$TIMM_MPC_CACHE`` or ``~/.cache/timm_mpc``, plus ``offline``."""
    return cache_root() / 'offline'


def _result_shape(function: str, args: tuple, kwargs: dict) -> torch.Size:
    if function == 'additive':
        return product_shape(*args, **kwargs)
    if function == 'binary':
        return torch.broadcast_shapes(torch.Size(args[0]), torch.Size(args[1]))
    return torch.Size(args[0])  # square, wraps, B2A: the size asked for


# CrypTen's provider methods and the dealer functions the TTP provider asks for in their place
_PROVIDER_TO_DEALER = {'generate_additive_triple': 'additive', 'square': 'square', 'generate_binary_triple': 'binary',
                       'wrap_rng': 'wraps', 'B2A_rng': 'B2A'}


def _recording(method: Any, function: str, requests: List[Request]) -> Any:
    def recorded(self: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        requests.append((function, None if device is None else str(device),
                         tuple(tuple(a) if isinstance(a, torch.Size) else a for a in args), kwargs))
        return method(self, *args, device=device, **kwargs)
    return recorded


def _record(rank: int, world_size: int, rendezvous: str, results: Any, modules: Tuple[str, ...],
            plan: Dict[str, Any], settings: Dict[str, Any], batch: int) -> None:
    """One of two processes that run an inference on zeros (the owner-as-dealer provider: no third process),
    the first noting each request its provider gets, in order: the same sequence as with the real dealer,
    since no step of CrypTen's algorithms depends on the data."""
    try:
        crypten, settings_ = init_local(rank, world_size, rendezvous, settings, modules)
        from crypten.mpc.provider.tfp_provider import TrustedFirstParty
        requests: List[Request] = []
        if rank == 0:
            for method, function in _PROVIDER_TO_DEALER.items():
                setattr(TrustedFirstParty, method, _recording(getattr(TrustedFirstParty, method), function, requests))
        plan_ = SecurePlan.from_dict(plan)
        program = SecureViT(plan_, settings_, CostMeter(crypten.communicator.get()), None)
        c, h, w = plan_.input_size
        patches = crypten.cryptensor(patchify(torch.zeros(batch, c, h, w), plan_.patch_size), src=1)
        requests.clear()  # only what an inference asks for
        program.forward(patches)
        crypten.uninit()
        if rank == 0:
            results.put(('ok', requests))
    except BaseException as e:  # report to the parent, which raises
        results.put(('error', f'{type(e).__name__}: {e}'))


def _cache_key(plan: SecurePlan, settings: SecureSettings, batch: int) -> str:
    public = {k: v for k, v in settings.to_dict().items() if k not in ('timeout_s', 'truncation_retries')}
    data = json.dumps(dict(version=CACHE_VERSION, plan=plan.to_dict(), settings=public, batch=batch), sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:20]


def record_requests(plan: SecurePlan, settings: SecureSettings, batch: int,
                    cache_dir: Optional[Path] = None) -> List[Request]:
    """The dealer requests one inference of ``plan`` at ``batch`` images makes, in order (cached on disk)."""
    path = Path(cache_dir or default_cache_dir()) / f'{_cache_key(plan, settings, batch)}.json'
    if path.is_file():
        return [(f, d, tuple(tuple(a) if isinstance(a, list) else a for a in args), kw)
                for f, d, args, kw in json.loads(path.read_text())]
    # a local computation as long as an inference: bounded by the batch and the plan's size
    work = max(1.0, plan.tokens * len(plan.blocks) * plan.embed_dim / _MPCVIT_TINY_WORK)
    requests = run_local(_record, [(plan.to_dict(), settings.to_dict(), batch)] * 2,
                         settings.timeout_s + RECORD_S_PER_IMAGE * work * batch, 'recording the dealer requests of the plan')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.part')
    tmp.write_text(json.dumps(requests))
    tmp.replace(path)
    return requests


def _chunks(requests: List[Request]) -> List[List[Request]]:
    chunks: List[List[Request]] = [[]]
    size = 0
    for request in requests:
        numel = _result_shape(request[0], request[2], request[3]).numel()
        if chunks[-1] and (size + numel) * 8 > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(request)
        size += numel
    return chunks


def prefetch(client: Any, requests: List[Request]) -> None:
    """Serve ``requests`` from the dealer's batched answers: fetch the first batch now (the offline phase) and
    each next one when the previous is used up. ``client`` is CrypTen's TTP client of the owner; a request
    that is not the next recorded one (it never should be) goes to the dealer on its own."""
    live = client.ttp_request
    pending: Deque[List[Request]] = deque(_chunks(requests))
    ready: Deque[Tuple[Request, torch.Tensor]] = deque()

    def fetch() -> None:
        chunk = pending.popleft()
        flat = live('batch', None, chunk)
        offset = 0
        for request in chunk:
            shape = _result_shape(request[0], request[2], request[3])
            ready.append((request, flat[offset:offset + shape.numel()].reshape(shape)))
            offset += shape.numel()

    def served(function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not ready and pending:
            fetch()
        asked = (function, None if device is None else str(device), tuple(args), kwargs)
        if ready and _same(ready[0][0], asked):
            return ready.popleft()[1]
        ready.clear()  # off the recorded path: the dealer's order no longer matches the batches
        pending.clear()
        return live(function, device, *args, **kwargs)

    if pending and pending[0]:
        fetch()
    client.ttp_request = served


def _same(recorded: Request, asked: Request) -> bool:
    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple, torch.Size)):
            return [norm(v) for v in value]
        return value
    return norm(recorded) == norm(asked)
