"""The offline phase: the owner fetches the dealer's correlated randomness before the images arrive.

CrypTen's TTP client asks the dealer for each multiplication triple (and square, wrap and bit pair) at the
moment it is used, one round trip each: about 700 requests for one ``mpcvit_tiny`` image, which the owner
waits for in the middle of the online phase. Which requests an inference makes depends only on the public
plan, the settings and the batch size, never on the data: the owner records the sequence once, by running
the same computation on zeros in two processes of its own (:func:`~.dry_run.dry_run`, cached on disk), commits the
sequence to the dealer, which serves it (once the client approved it, :mod:`.dealer`) in large batches before the
online phase starts (:func:`prefetch`). The dealer computes exactly what it would have computed request by request,
in the same order, so every share is the same; only the round trips are gone.

What each party learns does not change: the dealer sees the same request sizes, now all at once.
"""
from collections import deque
from typing import Any, Deque, List, Optional, Tuple

import torch

from ..errors import DealerError
from ..plan import SecurePlan
from ..protocol import DEALER
from ..secure_vit import SecureViT
from ..settings import SecureSettings
from .comparison import sign_answer_numel, sign_client_numel
from .compat import product_shape

__all__ = ['prefetch', 'prefetch_keys', 'Request', 'request_numel', 'client_numel', 'mask_requests', 'batches', 'result_shape',
           'CHUNK_BYTES']

Request = Tuple[str, Optional[str], tuple, dict]  # (function, device, args, kwargs) of TTPClient.ttp_request
CHUNK_BYTES = 256 * 2 ** 20  # the dealer answers at most this much per batch (memory stays bounded)


def request_numel(request: Request) -> int:
    """The elements of what the dealer answers the owner to ``request`` (each an int64 share)."""
    return result_shape(request[0], request[2], request[3]).numel()


def client_numel(request: Request) -> int:
    """The elements of what the dealer sends the client for ``request``: a comparison's correction words, else
    nothing (the client draws its shares from the generator it shares with the dealer)."""
    return sign_client_numel(*request[2]) if request[0] == 'sign' else 0


def result_shape(function: str, args: tuple, kwargs: dict) -> torch.Size:
    """The shape of the owner's answer to the request ``(function, args, kwargs)``."""
    if function == 'additive':
        return product_shape(*args, **kwargs)
    if function == 'fixed':
        return product_shape(*args[1:])
    if function == 'mask':
        return torch.Size([0])  # the parties draw their shares of a weight's mask: the dealer sends nothing
    if function == 'sign':
        return torch.Size([sign_answer_numel(*args)])
    if function == 'binary':
        return torch.broadcast_shapes(torch.Size(args[0]), torch.Size(args[1]))
    return torch.Size(args[0])  # square, wraps, B2A: the size asked for


def mask_requests(plan: SecurePlan, settings: SecureSettings) -> List[Request]:
    """The requests that mask the owner's weights once per session (``weight_masks``; none without it), in the order
    :meth:`~timm_mpc.secure.secure_vit.SecureViT.mask_weights` makes them: a session's first call commits them before
    its inferences' own."""
    if not settings.weight_masks:
        return []
    return [('mask', None, (key, shape), {}) for key, shape in enumerate(SecureViT.linear_weights(plan).values())]


def batches(requests: List[Request]) -> List[List[Request]]:
    """``requests`` in the batches the owner fetches them in (each at most :data:`CHUNK_BYTES` of answers, or one
    request): the dealer makes the next one ahead, and the client knows from them when its keys come."""
    chunks: List[List[Request]] = [[]]
    size = 0
    for request in requests:
        numel = request_numel(request)
        if chunks[-1] and (size + numel) * 8 > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(request)
        size += numel
    return chunks


def prefetch(client: Any, link: Any, requests: List[Request]) -> None:
    """Serve ``requests`` from the dealer's batched answers: fetch the first batch now (the offline phase) and
    each next one when the previous is used up. ``client`` is CrypTen's TTP client of the owner, ``link`` its
    :class:`~.dealer.DealerLink` (the requests committed there); a request that is not the next recorded one is
    an error (the dealer would not serve it)."""
    pending: Deque[List[Request]] = deque(batches(requests))
    ready: Deque[Tuple[Request, torch.Tensor]] = deque()

    def fetch() -> None:
        chunk = pending.popleft()
        flat = link.serve(len(chunk), sum(request_numel(request) for request in chunk))
        link.tally['bytes'] += 8 * sum(client_numel(request) for request in chunk)  # sent to the client alongside
        offset = 0
        for request in chunk:
            shape = result_shape(request[0], request[2], request[3])
            ready.append((request, flat[offset:offset + shape.numel()].reshape(shape)))
            offset += shape.numel()

    def served(function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not ready and pending:
            fetch()
        asked = (function, None if device is None else str(device), tuple(args), kwargs)
        if ready and _same(ready[0][0], asked):
            return ready.popleft()[1]
        raise RuntimeError(f'the protocol asked the dealer for {function} {args} where the dry run recorded '
                           f'{ready[0][0] if ready else "nothing more"}: the plan and the dry run disagree')

    if pending and pending[0]:
        fetch()
    client.ttp_request = served


def _same(recorded: Request, asked: Request) -> bool:
    def norm(value: Any) -> Any:
        if isinstance(value, (list, tuple, torch.Size)):
            return [norm(v) for v in value]
        return value
    return norm(recorded) == norm(asked)


def prefetch_keys(client: Any, comm: Any, requests: List[Request]) -> None:
    """The client's side of :func:`prefetch` with comparisons by the dealer's keys: the dealer sends the client the
    correction words of the comparisons in each batch it serves the owner (the batches of :func:`prefetch`, which the
    client derives from the same requests); ``client.ttp_request`` then answers each ``sign`` request in order from
    them. A message that is not the next batch's words (count or size) is an error."""
    keyed: Deque[List[Request]] = deque(keys for keys in ([r for r in batch if r[0] == 'sign']
                                                          for batch in batches(requests)) if keys)
    ready: Deque[Tuple[Request, torch.Tensor]] = deque()

    def fetch() -> None:
        expected = keyed.popleft()
        header = comm.recv_tensor(DEALER, torch.zeros(2, dtype=torch.int64))
        numels = [client_numel(r) for r in expected]
        if header.tolist() != [len(expected), sum(numels)]:
            raise DealerError(f'the dealer announced the keys of {int(header[0])} comparisons ({int(header[1])} words); '
                              f'the approved requests make {len(expected)} ({sum(numels)} words) next')
        flat = comm.recv_tensor(DEALER, torch.empty(sum(numels), dtype=torch.int64))
        for request, part in zip(expected, flat.split(numels)):
            ready.append((request, part))

    def served(function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not ready and keyed:
            fetch()
        asked = (function, None if device is None else str(device), tuple(args), kwargs)
        if ready and _same(ready[0][0], asked):
            return ready.popleft()[1]
        raise RuntimeError(f'the protocol asked for the keys of {function} {args} where the approved requests make '
                           f'{ready[0][0] if ready else "no more"}: the plan and the dry run disagree')

    client.ttp_request = served
