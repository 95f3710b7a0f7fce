"""A secure session: the parties of one model stay up across calls.

``secure_predict`` starts the processes, imports the engine, calibrates and shares the weights on every call; a
:class:`SecureSession` calibrates once and starts the parties at its first call, and every later ``predict`` only
runs its images (the client tells the owner its batch sizes; the owner fetches the dealer's triples for them). The
parties run exactly the protocol of ``secure_predict``; what each learns is the same, and the owner also learns how
many calls there were, as it learns the batch sizes of one call.
"""
import weakref
from typing import Any, Optional, Union

import torch
from torch import nn

from .engines import get_engine
from .launch import LocalParties, SecureResult, dealer_requests, prepare_call, resolve_settings, run_with_retries
from .plan import build_secure_plan
from .protocol import PartyResult, check_batch_size
from .settings import SecureSettings

__all__ = ['SecureSession']


class SecureSession:
    """Secure inference of one model over many calls, with the parties as local processes that outlive each call.

    Use it as a context manager (or call :meth:`close`)::

        with SecureSession(model) as session:
            for images in batches:
                logits = session.predict(images)

    The plan is built and calibrated when the session is made (nothing starts yet); the first :meth:`predict`
    starts the owner, client and dealer processes and shares the weights; later calls reuse them. While the
    session waits between calls, the owner keeps the dealer's connection alive. A call whose parties fail (or that is
    interrupted) ends the session: its processes are stopped, and :meth:`predict` then refuses. Images refused
    before the parties run (input bounds, memory) leave it open.

    Args: as :func:`~timm_mpc.secure.secure_predict` (``model``, ``settings``, ``calibration_images``,
    ``clamp_images``, ``engine``, ``protocol``).

    Raises:
        ValueError: an engine without sessions (SPU: use ``secure_predict`` with ``batch_size``).
        UnsupportedModelError, FixedPointRangeError: as ``secure_predict``, when the session is made.
    """

    def __init__(self, model: nn.Module, settings: Optional[SecureSettings] = None,
                 calibration_images: Optional[torch.Tensor] = None, clamp_images: bool = False,
                 engine: Optional[str] = None, protocol: Optional[str] = None) -> None:
        self.settings = resolve_settings(settings, engine, protocol)
        engine_ = get_engine(self.settings.engine)
        if not engine_.sessions:
            raise ValueError(f'the {engine_.title} engine runs no sessions; use secure_predict(..., batch_size=N), '
                             f'which runs many images in one session of the parties')
        self.plan = build_secure_plan(model, self.settings, calibration_images)
        self.state_dict = self.plan.owner_weights(model)
        self.clamp_images = clamp_images
        self.calls = 0
        self._parties: Optional[LocalParties] = None
        self._state = 'open'

    def predict(self, images: torch.Tensor, batch_size: Optional[int] = None,
                max_memory: Union[int, str, None] = None, return_result: bool = False) -> Any:
        """The client's logits for ``images`` (arguments as :func:`~timm_mpc.secure.secure_predict`).

        Raises:
            RuntimeError: the session is closed, or ended by a failed call.
            InputRangeError, MemoryBoundError, SecureInferenceError: as ``secure_predict``.
        """
        if self._state != 'open':
            raise RuntimeError(f'this secure session is {self._state}; make a new SecureSession')
        check_batch_size(batch_size)
        # the machine's available memory no longer counts the parties once they are up: only max_memory bounds then
        images, batch_size, estimate, peak = prepare_call(self.plan, self.settings, images, self.clamp_images,
                                                          batch_size, max_memory, check_available=self._parties is None)
        logits, profile, retries = run_with_retries(lambda x: self._run(x, batch_size), self.plan, images,
                                                    self.settings)
        self.calls += 1
        out = SecureResult(logits, profile, self.plan, self.settings, retries, estimate, peak)
        return out if return_result else out.logits

    def _run(self, images: torch.Tensor, batch_size: Optional[int]) -> PartyResult:
        count = images.shape[0]
        if self._parties is None:
            self._parties = LocalParties.start(self.plan, self.state_dict, images, self.settings, batch_size,
                                               session=True)
            # a session dropped unclosed does not leave its processes running
            self._finalizer = weakref.finalize(self, LocalParties.terminate, self._parties.procs)
        else:
            requests = dealer_requests(self.plan, self.settings, count, batch_size)
            self._parties.commands['owner'].put(dict(requests=requests))
            self._parties.commands['client'].put(dict(images=images, batch_size=batch_size, requests=requests))
        try:
            outcomes = self._parties.collect(['owner', 'client'], self.plan, count, batch_size)
        except BaseException:  # a failed or interrupted call: the parties' state is unknown, so they end
            LocalParties.terminate(self._parties.procs)
            self._parties, self._state = None, 'ended by a failed call'
            raise
        return outcomes['client']

    def close(self) -> None:
        """End the parties (they end the protocol as one call of ``secure_predict`` does) and wait for them."""
        parties, self._parties = self._parties, None
        if self._state == 'open':
            self._state = 'closed'
            if parties is not None:
                for queue in parties.commands.values():
                    queue.put(None)
                try:
                    parties.collect(list(parties.procs))
                finally:
                    parties.stop()

    def __enter__(self) -> 'SecureSession':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
