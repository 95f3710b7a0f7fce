"""The dealer (rank 2) and the parties' links to it: the dealer serves exactly the requests the client approved.

CrypTen's ``TTPServer`` runs ``getattr(self, function)`` on whatever the owner sends, so a deviating owner could
ask for the client's next generator draws (a private function, a degenerate product, an extra wrap) and open
every value the client shares. Here the dealer serves one fixed sequence per call instead:

1. the owner *commits* the requests of the call (what its dry run recorded for the client's batch sizes);
2. the dealer checks their form and sends their digest to the client, and nothing else;
3. the client derives the same sequence from its own copy of the plan (:func:`~.dry_run.dry_run`) and tells the
   dealer whether the digests match, before its images are shared;
4. only then the dealer serves, in order, the next requests of that sequence and nothing beyond it.

Messages are JSON, framed (a size, then the bytes), and never unpickled: CrypTen's own shutdown message (a pickled
``'terminate'``) is recognised by its bytes. They travel over the run's links (:mod:`.communicator`), uncounted. With ``offline_phase=False`` (an insecure setting that
warns) the owner asks for each request during the inference, after the images are shared: the dealer then checks
each request's form only.
"""
import hashlib
import json
import pickle
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..dcf import coarse, sign_keys
from ..errors import DealerError, PeerError
from ..links import FRAME_LIMIT
from ..protocol import DEALER, decode_json
from ..secure_vit import CLIENT, OWNER
from .compat import random_ring_element
from .offline import batches as offline_batches, result_shape

__all__ = ['DealerError', 'DealerLink', 'DEALER_FUNCTIONS', 'check_requests', 'request_digest', 'serve_dealer',
           'verify_dealer']

DEALER_FUNCTIONS = ('additive', 'square', 'binary', 'wraps', 'B2A',  # CrypTen's TTP_FUNCTIONS, nothing private
                    'mask', 'fixed',  # a weight's session mask, and the triples of its products (weight_masks)
                    'sign')  # the keys of a comparison (fss_comparisons)
PRODUCT_OPS = ('mul', 'matmul', 'conv1d', 'conv2d', 'conv_transpose1d', 'conv_transpose2d')
MAX_DIM = 2 ** 31
_TERMINATE = pickle.dumps('terminate')  # CrypTen's shutdown message from the owner, compared, never unpickled
_ROLE = ('owner', 'client', 'dealer')  # by rank, in messages


def _canonical(requests: Sequence[Any]) -> List[Any]:
    """Requests as JSON values (tuples and sizes as lists), the form the digest and the wire use."""
    return json.loads(json.dumps([list(r) for r in requests]))


def request_digest(requests: Sequence[Any]) -> str:
    """SHA-256 of the requests' canonical JSON: what the dealer tells the client it will serve."""
    data = json.dumps(_canonical(requests), sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(data.encode()).hexdigest()


def _size(value: Any, what: str) -> List[int]:
    if not (isinstance(value, list) and len(value) <= 8 and
            all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in value)):
        raise DealerError(f'{what} is not a size (a list of up to 8 whole numbers from 0 to 2^31): {str(value)[:80]}')
    numel = 1
    for d in value:
        numel *= d
    if numel >= MAX_DIM:
        raise DealerError(f'{what} has {numel} elements; the dealer serves fewer than 2^31 per request')
    return value


def check_requests(requests: Any) -> List[List[Any]]:
    """The form of a list of requests ``[function, device, args, kwargs]``: a function the dealer serves, the CPU,
    sizes of whole numbers, a product op of torch. Raises :class:`DealerError` naming the first that is not."""
    if not isinstance(requests, list):
        raise DealerError(f'the requests are not a list: {type(requests).__name__}')
    for index, request in enumerate(requests):
        where = f'request {index}'
        if not (isinstance(request, list) and len(request) == 4 and isinstance(request[2], list)
                and isinstance(request[3], dict)):
            raise DealerError(f'{where} is not [function, device, args, kwargs]: {str(request)[:80]}')
        function, device, args, kwargs = request
        if function not in DEALER_FUNCTIONS:
            raise DealerError(f'{where} asks for {str(function)[:40]!r}; the dealer serves {list(DEALER_FUNCTIONS)}')
        if device not in (None, 'cpu'):
            raise DealerError(f'{where} names device {str(device)[:40]!r}; the dealer serves the CPU')
        if function == 'sign':
            if not (len(args) == 3 and not kwargs and all(isinstance(a, int) and not isinstance(a, bool)
                                                          for a in args[1:]) and 2 <= args[1] <= 64
                    and 0 <= args[2] <= args[1] - 2):
                raise DealerError(f'{where}: sign takes a size, a bit width from 2 to 64 and the low bits it drops '
                                  f'(at least 2 left)')
            _size(args[0], f'{where}\'s size')
        elif function in ('mask', 'fixed'):
            if not (len(args) == (2 if function == 'mask' else 4) and not kwargs and isinstance(args[0], int)
                    and not isinstance(args[0], bool) and 0 <= args[0] < MAX_DIM):
                raise DealerError(f'{where}: {function} takes a weight\'s number and '
                                  + ('its size' if function == 'mask' else 'two sizes and matmul'))
            if function == 'fixed' and args[3] != 'matmul':
                raise DealerError(f'{where}: a fixed-mask triple is a matmul, not {str(args[3])[:20]!r}')
            for size in args[1:] if function == 'mask' else args[1:3]:
                _size(size, f'{where}\'s size')
        elif function == 'additive':
            if len(args) < 3 or args[2] not in PRODUCT_OPS:
                raise DealerError(f'{where}: an additive triple needs two sizes and one of {list(PRODUCT_OPS)}')
            _size(args[0], f'{where}\'s first size'), _size(args[1], f'{where}\'s second size')
        elif function == 'binary':
            if len(args) != 2 or kwargs:
                raise DealerError(f'{where}: a binary triple takes two sizes')
            _size(args[0], f'{where}\'s first size'), _size(args[1], f'{where}\'s second size')
        elif len(args) != 1 or kwargs:
            raise DealerError(f'{where}: {function} takes one size')
        else:
            _size(args[0], f'{where}\'s size')
    return requests


def _send_json(obj: Any, dst: int, comm: Any) -> int:
    data = json.dumps(obj).encode()
    comm.send_frame(dst, data)
    return len(data) + 8


def _recv_json(src: int, comm: Any) -> Any:
    data = comm.recv_frame(src, FRAME_LIMIT, DealerError)
    if data == _TERMINATE:
        return 'terminate'
    try:
        return decode_json(data, _ROLE[src])
    except PeerError as e:
        raise DealerError(f'{e}; a pickled CrypTen request?') from None


class DealerLink:
    """The owner's link to the dealer: commit a call's requests, then fetch their answers in order.

    ``tally`` counts the exchanges apart from the parties' own traffic (requests, bytes, seconds waited), for the
    cost profile's dealer row."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.tally: Dict[str, float] = dict(requests=0, bytes=0.0, time_s=0.0)

    def _exchange(self, message: Dict[str, Any], expected: int, counted: bool = True) -> torch.Tensor:
        """Send ``message``; the dealer's answer, ``expected`` int64 values (a different count announced is refused
        before anything is allocated)."""
        t0 = time.perf_counter()
        try:
            sent = _send_json(message, DEALER, self.comm)
            size = int(self.comm.recv_tensor(DEALER, torch.tensor(0, dtype=torch.int64)))
        except RuntimeError as e:
            raise _lost_dealer(e) from e
        if size != expected:
            raise DealerError(f'the dealer announced {size} answers where the committed requests make {expected}')
        try:
            flat = self.comm.recv_tensor(DEALER, torch.empty(size, dtype=torch.int64))
        except RuntimeError as e:
            raise _lost_dealer(e) from e
        if not counted:
            return flat
        self.tally['requests'] += 1
        self.tally['bytes'] += sent + 8 * (flat.numel() + 1)
        self.tally['time_s'] += time.perf_counter() - t0
        return flat

    def commit(self, requests: Sequence[Any]) -> None:
        """The requests of the next call, which the dealer shows the client (as a digest) before serving any."""
        try:
            _send_json(dict(commit=_canonical(requests)), DEALER, self.comm)
        except RuntimeError as e:
            raise _lost_dealer(e) from e

    def serve(self, count: int, numel: int) -> torch.Tensor:
        """The owner's shares for the next ``count`` committed requests (``numel`` values in all), flat, in order."""
        return self._exchange(dict(serve=count), numel)

    def keepalive(self) -> None:
        """An empty request while a session waits: the dealer waits for the owner with a bounded timeout."""
        self._exchange(dict(serve=0), 0, counted=False)

    def abort(self, reason: str) -> None:
        """Tell the dealer that the owner stops after a failure (best effort: the dealer may be gone)."""
        try:
            _send_json(dict(abort=reason[:300]), DEALER, self.comm)
        except RuntimeError:
            pass

    def live(self, function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One request during the inference (``offline_phase=False``, insecure): CrypTen's ``ttp_request``."""
        request = [function, None if device is None else str(device), list(args), kwargs]
        shape = result_shape(function, args, kwargs)
        return self._exchange(dict(live=_canonical([request])[0]), shape.numel()).reshape(shape)


def verify_dealer(comm: Any, expected: Sequence[Any]) -> None:
    """The client's check, before it shares its images: the dealer is about to serve exactly ``expected`` (the
    requests its own copy of the plan makes). Tells the dealer the verdict; raises :class:`DealerError` on a
    difference or a refusal by the dealer."""
    try:
        told = _recv_json(DEALER, comm)
    except DealerError:
        raise
    except RuntimeError as e:
        raise _lost_dealer(e) from e
    if not isinstance(told, dict):
        raise DealerError(f'the dealer sent {str(told)[:80]} instead of the digest of the owner\'s requests')
    if 'refused' in told:
        raise DealerError(f'the dealer refused the owner\'s requests before serving any: {str(told["refused"])[:300]}')
    ok = told.get('digest') == request_digest(expected) and told.get('count') == len(expected)
    _send_json(dict(accepted=ok), DEALER, comm)
    if not ok:
        raise DealerError(f'the owner asked the dealer for requests that this plan does not make ({told.get("count")} '
                          f'requests against the {len(expected)} of the plan, or the same number with other '
                          f'functions or sizes): stopped before sharing the images')


def serve_dealer(server: Any, settings: Any, comm: Any) -> None:
    """The dealer's loop: serve the owner's committed calls, each once the client approved its digest, until the
    owner ends the protocol. ``server`` is CrypTen's ``TTPServer`` state (generators seeded); its public functions
    compute the answers. ``comm``: the dealer's links (:class:`.communicator.LinkCommunicator`). Raises :class:`DealerError` on anything else the owner or the client sends."""
    pending: Deque[List[Any]] = deque()
    server.masks = {}  # the session masks of the owner's weights (weight_masks), by weight
    awaiting = [True]  # the client waits for the digest of the next call: a refusal goes to it first
    try:
        _serve(server, settings, comm, pending, awaiting)
    except DealerError as e:
        if awaiting[0]:
            try:
                _send_json(dict(refused=str(e)), CLIENT, comm)
            except RuntimeError:  # the client is gone too
                pass
        raise


def _serve(server: Any, settings: Any, comm: Any, pending: Deque[List[Any]], awaiting: List[bool]) -> None:
    ready: Deque[Answer] = deque()  # the answers of the first pending requests, made ahead
    while True:
        message = _recv_from(OWNER, comm)
        if message == 'terminate':
            return
        if not (isinstance(message, dict) and len(message) == 1):
            raise DealerError(f'the owner sent {str(message)[:80]}; the dealer serves commit, serve and live messages')
        (kind, value), = message.items()
        if kind == 'commit':
            if pending:
                raise DealerError(f'the owner committed new requests with {len(pending)} of the last call unserved')
            requests = check_requests(value)
            try:
                _send_json(dict(digest=request_digest(requests), count=len(requests)), CLIENT, comm)
            except RuntimeError as e:
                raise _lost(CLIENT, e) from e
            awaiting[0] = False
            verdict = _recv_from(CLIENT, comm)
            if not (isinstance(verdict, dict) and verdict.get('accepted') is True):
                raise DealerError('the client found that the owner\'s requests differ from its plan: nothing served')
            pending.extend(requests)
        elif kind == 'serve':
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= len(pending)):
                raise DealerError(f'the owner asked for {str(value)[:40]} requests; {len(pending)} are committed')
            answers = []
            for _ in range(value):
                request = pending.popleft()
                answers.append(ready.popleft() if ready else _answer(server, request))
            _send_answers(answers, comm)
            awaiting[0] = awaiting[0] or (value > 0 and not pending)
            if pending and not ready:  # the owner's next batch, made while the parties compute with this one
                ready.extend(_answer(server, request) for request in offline_batches(list(pending))[0])
        elif kind == 'abort':
            raise DealerError(f'the owner stopped the protocol after a failure: {str(value)[:300]}')
        elif kind == 'live' and not settings.offline_phase:
            _send_answers([_answer(server, check_requests([value])[0])], comm)
        else:
            raise DealerError(f'the owner sent a {str(kind)[:40]!r} message; the dealer serves commit and serve'
                              + ('' if settings.offline_phase else ' and live') + ' messages')


def _lost_dealer(error: RuntimeError) -> DealerError:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DealerError(f'lost the dealer during the protocol ({detail[:200]})')


def _lost(party: int, error: RuntimeError) -> DealerError:
    """A link's error when a peer closed it or its timeout passed, as the dealer reports it."""
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DealerError(f'the dealer lost the {_ROLE[party]} before the protocol ended ({detail[:200]})')


def _recv_from(party: int, comm: Any) -> Any:
    try:
        return _recv_json(party, comm)
    except DealerError:
        raise
    except RuntimeError as e:
        raise _lost(party, e) from e


def _mask(server: Any, key: int, size: List[int]) -> torch.Tensor:
    """Draw the session mask ``B`` of weight ``key`` as the parties do, and keep it for that weight alone: a mask is
    made once per session, and only products with a matrix of its size use it."""
    if key in server.masks:
        raise DealerError(f'the owner asked for the mask of weight {key} again; a weight is masked once per session')
    server.masks[key] = server._get_additive_PRSS(size)
    return torch.zeros(0, dtype=torch.int64)  # the parties draw their shares: nothing to send


def _fixed(server: Any, key: int, size0: List[int], size1: List[int], op: str) -> torch.Tensor:
    """Party 0's share of ``A·B`` for a fresh ``A`` and the session mask ``B`` of weight ``key``."""
    mask = server.masks.get(key)
    if mask is None or list(mask.shape) != list(size1):
        raise DealerError(f'the owner asked for a product with the mask of weight {key} for a matrix of size '
                          f'{size1}, which ' + ('no weight has' if mask is None else f'is not its {list(mask.shape)}'))
    c = getattr(torch, op)(server._get_additive_PRSS(size0), mask)
    return c - server._get_additive_PRSS(c.size(), remove_rank=True)


_OWN_FUNCTIONS = dict(mask=_mask, fixed=_fixed)


def _sign(server: Any, size: List[int], bits: int, dropped: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The keys of a comparison of ``size`` elements of ``bits`` bits, the lowest ``dropped`` not compared
    (:mod:`.comparison`): each party's mask share and root seeds drawn from the generator the dealer shares with it, as
    the party draws them, then the client's share of the masks' top bits; the owner gets its share of those top bits
    and the correction words, the client the words."""
    size = torch.Size(size)
    owner, client = server.generators[OWNER], server.generators[CLIENT]
    mask0, seed0 = random_ring_element(size, generator=owner), random_ring_element((size.numel(), 2), generator=owner)
    mask1, seed1 = random_ring_element(size, generator=client), random_ring_element((size.numel(), 2), generator=client)
    top1 = random_ring_element(size, generator=client)
    mask = coarse((mask0 + mask1).reshape(-1).numpy().view(np.uint64), bits, dropped)  # as the parties compare it
    bits -= dropped
    words = sign_keys(mask, seed0.numpy().view(np.uint64), seed1.numpy().view(np.uint64), bits)
    top0 = torch.from_numpy((mask >> np.uint64(bits - 1)).view(np.int64)) - top1.reshape(-1)
    words = torch.from_numpy(words.view(np.int64))
    return torch.cat([top0, words]), words


Answer = Tuple[torch.Tensor, Optional[torch.Tensor]]  # a request's answer: the owner's part, the client's (or None)


def _answer(server: Any, request: List[Any]) -> Answer:
    function, device, args, kwargs = request
    server.device = device or 'cpu'
    if function == 'sign':
        return _sign(server, *args)
    if function in _OWN_FUNCTIONS:
        return _OWN_FUNCTIONS[function](server, *args).reshape(-1), None
    return getattr(server, function)(*args, **kwargs).reshape(-1), None


def _send_answers(answers: List[Answer], comm: Any) -> None:
    """Send the owner its parts of ``answers``, then the client its parts (of comparisons), if any."""
    _send_flat(torch.cat([owner for owner, _ in answers]) if answers else torch.zeros(0, dtype=torch.int64), OWNER,
               comm)
    client_parts = [client for _, client in answers if client is not None]
    if client_parts:  # the client knows from the requests which batches hold comparisons: it waits for these
        _send_flat(torch.cat(client_parts), CLIENT, comm, count=len(client_parts))


def _send_flat(flat: torch.Tensor, party: int, comm: Any, count: Optional[int] = None) -> None:
    """Int64 answers after their number: to the owner that number alone, to the client also how many requests they
    answer (it checks both against the requests it approved)."""
    header = flat.numel() if count is None else [count, flat.numel()]
    try:
        comm.send_tensor(party, torch.tensor(header, dtype=torch.int64))
        comm.send_tensor(party, flat)
    except RuntimeError as e:
        raise _lost(party, e) from e
