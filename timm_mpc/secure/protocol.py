"""What the parties of every engine share: their result, the agreement before anything secret is shared (settings,
the owner's plan read back and accepted by the client, the batch sizes within the owner's limits), a session's link to
the process that started it, and the bounds on waiting for a peer.

An engine's parties (:mod:`.crypten.party`, :mod:`.spu.party`) exchange these over their own links."""
import json
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..profile import CostProfile
from ..utils import end_process
from .engines import get_engine
from .errors import PeerError
from .memory import format_bytes, line_peak
from .plan import PlanError, SecurePlan, check_image_tensor, check_images
from .secure_vit import CLIENT, OWNER
from .settings import SecureSettings

__all__ = ['ROLES', 'DEALER', 'PartyResult', 'OwnerLimits', 'SessionLink', 'agree', 'batch_sizes', 'bound_batches',
           'check_batch_size', 'checked_batches', 'client_inputs', 'decode_json', 'lost_peer', 'report_on_stderr',
           'watchdog']

DEALER = 2  # CrypTen's third party, rank 2
ROLES = {OWNER: 'owner', CLIENT: 'client', DEALER: 'dealer'}


@dataclass
class PartyResult:
    """What a party ends with: the client's logits (None for the owner), the cost profile, and (client) the
    images whose logits leave the plan's bound, the mark of a failed truncation: run those again."""
    rank: int
    logits: Optional[torch.Tensor]
    profile: CostProfile
    plan: SecurePlan
    implausible: List[int] = field(default_factory=list)


def report_on_stderr(message: str) -> None:
    print(f'timm-mpc: error: {message}', file=sys.stderr, flush=True)


@contextmanager
def watchdog(seconds: float, message: str, on_expiry: Optional[Callable[[str], None]]) -> Iterator[None]:
    """End this process with ``message`` if the block has not finished after ``seconds``.

    An engine's link in C++ (SPU's) may have no bound of its own against a peer that accepts a connection and
    never answers (a suspended process, a silent listener), and a blocked C++ call cannot be interrupted from
    Python: the only bounded way out is to end the process (after ``on_expiry`` has reported why). CrypTen's links
    are bounded themselves; the timer is their second bound.
    """
    def expire() -> None:
        (on_expiry or report_on_stderr)(message)
        end_process(2)
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def lost_peer(message: str) -> bool:
    """Whether an engine's error message says that the other party is gone or stopped answering."""
    return any(s in message.lower() for s in ('connect', 'timed out', 'timeout', 'closed', 'reset by peer',
                                              'broken pipe', 'eof'))


def check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f'batch_size must be a whole number of images, at least 1, or None; got {batch_size!r}')


def client_inputs(images: torch.Tensor, settings: SecureSettings, batch_size: Optional[int]) -> torch.Tensor:
    """The client's checks before it connects, on any engine: a finite float ``(B, C, H, W)`` tensor, a valid
    batch size, and a warning if the settings are not private. Returns the images as float32, detached."""
    check_image_tensor(images)
    check_batch_size(batch_size)
    settings.warn_if_insecure()
    return images.detach().float()


def batch_sizes(count: int, batch_size: Optional[int]) -> List[int]:
    """The sizes of the batches ``count`` images run in, ``batch_size`` at most each (all at once if None)."""
    size = batch_size or count
    return [min(size, count - start) for start in range(0, count, size)]


def _client_verdict(data: Any, images: torch.Tensor, clamp: bool,
                    batch_size: Optional[int]) -> Tuple[Dict[str, Any], Optional[SecurePlan], Optional[torch.Tensor]]:
    """The client's answer to the owner's plan (accepted with the batch sizes, or refused with a reason that says
    nothing of the images' values or shape), the plan read back, and the images to share."""
    try:
        plan = SecurePlan.from_dict(data)
    except PlanError as e:
        return dict(accepted=False, reason=f'the client cannot run this plan ({e})'), None, None
    try:
        images = check_images(plan, images, clamp=clamp)
    except ValueError as e:  # the details stay with the client: they describe its images
        return dict(accepted=False, reason='the client\'s images do not fit the plan (input size or input bounds)',
                    detail=str(e)), plan, None
    return dict(accepted=True, batches=batch_sizes(int(images.shape[0]), batch_size)), plan, images


@dataclass
class OwnerLimits:
    """What the owner accepts of the batches a client announces, checked before any dry run or share: images per
    batch and per run, and the predicted peak memory of the largest batch's dry run (bytes; from the dry runs of
    one and two images, for engines with dry runs). None: no bound."""
    max_batch_size: Optional[int] = None
    max_images: Optional[int] = None
    max_memory: Optional[int] = None

    def refusal(self, batches: List[int], plan: SecurePlan, settings: SecureSettings) -> Optional[str]:
        """Why ``batches`` exceed these limits, or None."""
        largest, total = max(batches), sum(batches)
        if self.max_batch_size is not None and largest > self.max_batch_size:
            return f'a batch of {largest} images; the owner accepts at most {self.max_batch_size} per batch'
        if self.max_images is not None and total > self.max_images:
            return f'{total} images; the owner accepts at most {self.max_images} per run'
        engine = get_engine(settings.engine)
        if self.max_memory is not None and engine.dry_run:
            peak = line_peak(lambda n: engine.run_dry(plan, settings, n).peak_rss[OWNER], largest)
            if peak > self.max_memory:
                return (f'a batch of {largest} images would need about {format_bytes(peak)} of the owner\'s memory; '
                        f'its bound is {format_bytes(self.max_memory)}')
        return None


def agree(exchange: Callable[[Any, int], Any], rank: int, settings: SecureSettings, plan: Optional[SecurePlan],
          images: Optional[torch.Tensor], clamp: bool, batch_size: Optional[int],
          limits: Optional[OwnerLimits] = None) -> Tuple[SecurePlan, Optional[torch.Tensor], List[int]]:
    """What the parties agree on before anything secret is shared, over any engine's link (``exchange(obj, src)``
    sends a JSON value from party ``src`` to the other and returns it on both): the same settings, the owner's plan
    read back and accepted by the client with its images checked against it, and the client's batch sizes.
    Returns the plan, the client's checked images (None for the owner) and the batch sizes."""
    owner_settings = exchange(settings.to_dict() if rank == OWNER else None, OWNER)
    if not isinstance(owner_settings, dict):
        raise PeerError(f'the owner sent {str(owner_settings)[:80]} where its secure settings belong')
    own = settings.to_dict()
    differ = {k: (owner_settings.get(k), own[k]) for k in own if k != 'timeout_s' and owner_settings.get(k) != own[k]}
    if differ:
        raise PeerError(f'the parties use different secure settings (owner, client): {differ}')
    sent = exchange(plan.to_dict() if rank == OWNER else None, OWNER)
    verdict = None
    if rank == CLIENT:
        verdict, plan, images = _client_verdict(sent, images, clamp, batch_size)
    answer = exchange(None if verdict is None else {k: v for k, v in verdict.items() if k != 'detail'}, CLIENT)
    if not (isinstance(answer, dict) and isinstance(answer.get('accepted'), bool)):
        raise PeerError(f'the client sent {str(answer)[:80]} where its verdict on the plan belongs')
    if not answer['accepted']:
        if rank == CLIENT:
            raise ValueError(f'the client refused the owner\'s plan before sharing anything: '
                             f'{verdict.get("detail", verdict["reason"])}')
        raise PeerError(f'the client refused the plan before sharing anything: {answer["reason"]}')
    batches = checked_batches(answer.get('batches'), 'answer')
    bound_batches(exchange, rank, batches, plan, settings, limits)
    return plan, images, batches


def bound_batches(exchange: Callable[[Any, int], Any], rank: int, batches: List[int], plan: SecurePlan,
                   settings: SecureSettings, limits: Optional[OwnerLimits]) -> None:
    """The owner's verdict on the client's batches (:class:`OwnerLimits`), told to the client before any dry run or
    share; raises at both parties on a refusal."""
    refusal = limits.refusal(batches, plan, settings) if rank == OWNER and limits is not None else None
    refusal = exchange(refusal, OWNER)
    if refusal is not None:
        if rank == CLIENT:
            raise PeerError(f'the owner refused the client\'s batches before any work: {str(refusal)[:300]}')
        raise ValueError(f'refused the client\'s batches before any dry run: {refusal}')


class SessionLink:
    """How a party of a session (:class:`~.session.SecureSession`) talks to the process that started it: it hands
    over each request's result and waits for the next request (None: the session ends), keeping the dealer's
    connection alive while it waits (``keepalive``, called about every ``interval_s`` seconds)."""

    def deliver(self, result: PartyResult) -> None:
        raise NotImplementedError

    def next_request(self, keepalive: Optional[Callable[[], None]], interval_s: float) -> Optional[Dict[str, Any]]:
        raise NotImplementedError


def checked_batches(batches: Any, what: str) -> List[int]:
    """The client's batch sizes as the owner received them in its ``what`` (answer, request), or PeerError."""
    if not (isinstance(batches, list) and batches and all(isinstance(b, int) and b >= 1 for b in batches)):
        raise PeerError(f'the client\'s {what} names no batch sizes (a list of whole numbers of at least 1): '
                        f'{str(batches)[:80]}')
    return batches


def decode_json(data: bytes, peer: str) -> Any:
    """A JSON message from ``peer`` (over any engine's link), or PeerError: it is never run as code."""
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise PeerError(f'the {peer} sent a message that is not JSON ({len(data)} bytes)') from None
