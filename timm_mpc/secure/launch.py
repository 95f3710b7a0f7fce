"""Run both parties and the dealer as local processes over loopback: ``secure_predict``."""
import os
import queue as queue_lib
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import wait as wait_for_pipes
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from ..layers.attn_kinds import import_kind_modules, kind_modules
from ..profile import CostProfile
from ..utils import progress
from .admission import new_secret
from .crypten.dry_run import DryRun, dry_run, predicted_peak
from .crypten.party import run_dealer
from .engines import ENGINES, exit_after_failure, get_engine
from .errors import PeerError
from .memory import MemoryBoundError, available_memory, fit_batch_size, format_bytes, line_peak, parse_memory
from .plan import SecurePlan, build_secure_plan, check_images
from .processes import free_port, free_ports, process_context, start_processes
from .protocol import PartyResult, SessionLink, batch_sizes, check_batch_size
from .secure_vit import SecureViT
from .settings import SecureSettings

__all__ = ['secure_predict', 'prepare_call', 'SecureResult', 'SecureInferenceError', 'free_port', 'free_ports']


class SecureInferenceError(RuntimeError):
    """A party of a local secure inference failed; the message names the party and why."""


@dataclass
class SecureResult:
    """The client's logits from a secure inference, with what it cost (of the first run), how many runs again
    found images whose logits marked a failed truncation, and, where the engine has a dry run, what the dry run of
    the first batch predicted (its cost, and the peak memory of the processes together)."""
    logits: torch.Tensor
    profile: CostProfile
    plan: SecurePlan
    settings: SecureSettings
    retries: int = 0
    estimate: Optional[DryRun] = None
    predicted_peak: Optional[int] = None


class PartyReports:
    """A party's reports to the process that started it, over a pipe of its own: a process killed while it writes
    takes only its own channel down (a queue shared by the parties would keep its write lock, and every other
    party's report would wait on it for ever)."""

    def __init__(self, role: str, pipe: Any) -> None:
        self.role, self.pipe, self.lock = role, pipe, threading.Lock()

    def put(self, status: str, value: Any) -> None:
        with self.lock:  # the watchdog's thread may report while the protocol's thread does
            self.pipe.send((status, value))

    def wait_for_release(self, timeout_s: float) -> None:
        """After the last report, stay until every party has reported (the parent closes the pipe) or ``timeout_s``
        passes: a party that ended at once could leave the other still closing its link to it (SPU's link then
        retries until it gives up, long after a run that succeeded)."""
        self.pipe.poll(timeout_s)


def party_process(role: str, rendezvous: str, settings: Dict[str, Any], payload: Dict[str, Any], pipe: Any,
                   kind_modules: Tuple[str, ...] = (), commands: Any = None) -> None:
    torch.set_num_threads(1)  # two parties share the machine's cores
    import_kind_modules(kind_modules)  # attention kinds registered outside timm-mpc, as in the parent
    reports = PartyReports(role, pipe)

    def report_timeout(message: str) -> None:  # the watchdog ends this process right after
        reports.put('error', message)

    try:
        settings_ = SecureSettings.from_dict(settings)
        engine = get_engine(settings_.engine).load()
        # a session's parties hand over each request's result and wait for the next (:mod:`.session`)
        link = {} if commands is None or role == 'dealer' else dict(session=QueueLink(reports, commands))
        options = payload.get('options', {})  # a party of one's own (:mod:`.own_process`): its further arguments
        if role == 'owner':
            result = engine.run_owner(rendezvous, payload['plan'], payload['state_dict'], settings_, payload['secret'],
                                      on_timeout=report_timeout, requests=payload['requests'], **link, **options)
        elif role == 'client':
            result = engine.run_client(rendezvous, payload['images'], settings_, payload['secret'],
                                       on_timeout=report_timeout,
                                       batch_size=payload['batch_size'],
                                       on_batch=lambda n: reports.put('batch', n),
                                       on_layer=lambda: reports.put('layer', 1),
                                       **({} if payload['requests'] is None else dict(requests=payload['requests'])),
                                       **link, **options)
        else:
            run_dealer(rendezvous, settings_, payload['secret'], on_timeout=report_timeout, **options)
            result = None
        if link:
            reports.put('closed', None)  # its results went out with each request
        else:
            reports.put('ok', by_value(result))
        reports.wait_for_release(settings_.timeout_s)
    except BaseException as e:  # report every failure to the parent, then exit non-zero
        # sent before an engine that cannot be torn down ends the process
        reports.put('error', f'{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}')
        exit_after_failure(1)
        raise SystemExit(1)


def by_value(result: Optional[PartyResult]) -> Optional[PartyResult]:
    """A party's result ready for the parent: the logits by value (a shared-memory tensor dies with the process)."""
    if result is not None and result.logits is not None:
        result.logits = result.logits.numpy()
    return result


class QueueLink(SessionLink):
    """A session party's link to the process that started it: results out over its reports, requests in over a
    queue of its own."""

    def __init__(self, reports: PartyReports, commands: Any) -> None:
        self.reports, self.commands = reports, commands
        self.parent = os.getppid()

    def deliver(self, result: PartyResult) -> None:
        self.reports.put('ok', by_value(result))

    def next_request(self, keepalive: Optional[Any], interval_s: float) -> Optional[Dict[str, Any]]:
        while True:
            try:
                return self.commands.get(timeout=interval_s)
            except queue_lib.Empty:
                if os.getppid() != self.parent:  # bounded: no request comes from a process that is gone
                    raise PeerError('the process that started the session is gone') from None
                if keepalive is not None:  # the dealer waits for the owner with the links' timeout
                    keepalive()


@dataclass
class LocalParties:
    """The processes of a local secure run (owner, client, dealer where the engine has one), the read end of each
    one's reports (:class:`PartyReports`), and, for a session, each party's queue of requests."""
    procs: Dict[str, Any]
    reports: Dict[str, Any]
    commands: Dict[str, Any]
    settings: SecureSettings

    @classmethod
    def start(cls, plan: SecurePlan, state_dict: Dict[str, torch.Tensor], images: torch.Tensor,
              settings: SecureSettings, batch_size: Optional[int], session: bool = False) -> 'LocalParties':
        ctx = process_context()
        rendezvous = f'tcp://127.0.0.1:{free_ports(2)[0]}'  # SPU's client listens on the next port
        # the owner's process is a daemon and cannot start the dry run's processes itself: they run here
        # the client's own record of the plan's dealer requests: the same dry runs (one user runs both parties here)
        requests = dealer_requests(plan, settings, images.shape[0], batch_size)
        secret = new_secret()  # the run's, handed to each process over its own pipe
        payloads = {'owner': dict(plan=plan, state_dict=state_dict, requests=requests, secret=secret),
                    'client': dict(images=images, batch_size=batch_size, requests=requests, secret=secret),
                    'dealer': dict(secret=secret)}
        roles = ['owner', 'client'] + (['dealer'] if settings.dealer else [])
        commands = {role: ctx.Queue() for role in ('owner', 'client')} if session else {}
        modules = kind_modules()
        pipes = {role: ctx.Pipe() for role in roles}  # reports in; closed here: every party may end
        procs = {role: ctx.Process(target=party_process, daemon=True, args=(
            role, rendezvous, settings.to_dict(), payloads[role], pipes[role][1], modules, commands.get(role)))
            for role in roles}
        start_processes(list(procs.values()), modules)
        for _, sender in pipes.values():  # a party's pipe ends (EOF here) when its process does
            sender.close()
        return cls(procs, {role: reader for role, (reader, _) in pipes.items()}, commands, settings)

    def collect(self, roles: List[str], plan: Optional[SecurePlan] = None, count: int = 0,
                batch_size: Optional[int] = None) -> Dict[str, Any]:
        """Wait for what ``roles`` report next ('ok' with a result, 'closed'), with a progress bar over the layers of
        every batch of a call of ``count`` images (none without a ``plan``); raise naming every party that failed,
        died or outlived a failure by twice the timeout (the processes are stopped then)."""
        layers = len(batch_sizes(count, batch_size)) * SecureViT.layer_steps(plan) if plan is not None and count else 0
        outcomes: Dict[str, Any] = {}
        errors: List[str] = []
        deadline: Optional[float] = None
        ended = set()
        # the others fail on their next message, at the latest when a wait times out; the client may wait on the
        # dealer while the dealer waits on the owner: two timeouts, and headroom to report
        timeout_s = 2 * self.settings.timeout_s + 5
        # progress over the layers of every batch (a converted ImageNet-size model takes minutes per layer)
        bar = progress(None, bool(layers), total=layers, desc='secure inference', unit='layer')
        bar.set_postfix_str(f'images 0/{count}')
        done = 0
        try:
            while any(role not in outcomes for role in roles):
                waiting = {self.reports[role]: role for role in roles if role not in outcomes}
                ready = wait_for_pipes(list(waiting), timeout=0.5)
                for pipe in ready:
                    role = waiting[pipe]
                    try:
                        status, value = pipe.recv()
                    except EOFError:  # its process ended: its exit code below
                        self.procs[role].join(timeout=5)
                        ended.add(role)
                        continue
                    if status == 'layer':
                        bar.update(value)
                    elif status == 'batch':
                        done += value
                        bar.set_postfix_str(f'images {done}/{count}')
                    else:
                        outcomes[role] = value
                        if status == 'error':
                            errors.append(f'party {role} failed: {value.strip()}')
                            deadline = deadline or time.monotonic() + timeout_s
                # a process that ended with nothing left unread (its pipe may still be open in a process forked
                # beside it, so an end of file need not come)
                dead = [r for r in waiting.values() if r not in outcomes and self.procs[r].exitcode is not None
                        and (r in ended or not self.reports[r].poll())]
                for role in dead:
                    outcomes[role] = None
                    errors.append(f'party {role} exited with code {self.procs[role].exitcode} without a result')
                if dead:
                    deadline = deadline or time.monotonic() + timeout_s
                if deadline is not None and time.monotonic() > deadline:
                    missing = [r for r in roles if r not in outcomes]
                    errors.append(f'parties {missing} still running {timeout_s:.0f} s after the failure; stopped')
                    break
        finally:
            bar.close()
        if errors:
            self.stop()
            raise SecureInferenceError('secure inference failed: ' + ' | '.join(errors))
        return outcomes

    def stop(self) -> None:
        """Release the processes (:meth:`PartyReports.wait_for_release`), wait a little for them to end, then end
        them."""
        for pipe in self.reports.values():
            pipe.close()
        for p in self.procs.values():
            p.join(timeout=5)
        self.terminate(self.procs)

    @staticmethod
    def terminate(procs: Dict[str, Any]) -> None:
        """End the processes that still run."""
        for p in procs.values():
            if p.is_alive():
                p.terminate()
                p.join()


def dealer_requests(plan: SecurePlan, settings: SecureSettings, count: int,
                    batch_size: Optional[int]) -> Optional[Dict[int, List[Any]]]:
    """What the owner asks the dealer for at each batch size of ``count`` images (the offline phase), or None."""
    if not (settings.dealer and settings.offline_phase):
        return None
    return {size: dry_run(plan, settings, size).requests for size in set(batch_sizes(count, batch_size))}


def run_local_parties(plan: SecurePlan, state_dict: Dict[str, torch.Tensor], images: torch.Tensor,
                      settings: SecureSettings, batch_size: Optional[int] = None) -> PartyResult:
    """Start owner, client and, where the engine needs one, the dealer as processes on loopback; return the client's
    result or raise.
    The images run ``batch_size`` at a time in one session, with a progress bar over the layers of every batch."""
    parties = LocalParties.start(plan, state_dict, images, settings, batch_size)
    try:
        outcomes = parties.collect(list(parties.procs), plan, images.shape[0], batch_size)
    finally:
        parties.stop()
    return outcomes['client']


def prepare_call(plan: SecurePlan, settings: SecureSettings, images: torch.Tensor, clamp: bool,
                 batch_size: Optional[int], max_memory: Union[int, str, None], check_available: bool = True,
                 ) -> Tuple[torch.Tensor, Optional[int], Optional[DryRun], Optional[int]]:
    """Before the parties start a call: the images checked against the plan (float32, on the CPU), a warning if the
    settings are not private, the batch size (the largest that fits ``max_memory`` when none is given), the dry
    run of the first batch and the predicted peak memory of a local run, printed as an estimate. A batch of more
    than two images is first checked on the line through the dry runs of one and two, so that a batch that cannot
    fit is refused before its own dry run. Without
    ``max_memory`` the peak is checked against the machine's available memory where ``check_available`` (not when
    the parties are up already: a session's later calls).

    Raises:
        InputRangeError: images outside the plan's input bounds (without ``clamp``).
        MemoryBoundError: the batch would not fit ``max_memory`` or, without one, the machine's available memory.
        ValueError: ``max_memory`` is not a size, or the engine has no dry run to predict memory with.
    """
    images = check_images(plan, images, clamp=clamp).detach().cpu().float()
    settings.warn_if_insecure()
    count = images.shape[0]
    engine = get_engine(settings.engine)
    bound = None if max_memory is None else parse_memory(max_memory)
    if not engine.dry_run:
        if bound is not None:
            raise ValueError(f'max_memory is predicted by a dry run, which the {engine.title} engine has not; choose '
                             f'batch_size instead (engines with one: {[e for e, r in ENGINES.items() if r.dry_run]})')
        return images, batch_size, None, None
    measure = partial(dry_run, plan, settings)

    def peak_of(batch: int) -> int:
        return predicted_peak(measure(batch), settings.dealer)
    if bound is not None and batch_size is None:
        batch_size = fit_batch_size(peak_of, count, bound)
    first = batch_sizes(count, batch_size)[0]
    limit = bound if bound is not None else available_memory() if check_available else None
    peak = None
    if limit is not None and first > 2:  # the line through 1 and 2 images, before a dry run of the whole batch
        peak = line_peak(peak_of, first)
    if peak is None or peak <= limit:
        estimate = measure(first)
        peak = predicted_peak(estimate, settings.dealer)
    if limit is not None and peak > limit:
        what = 'the bound (max_memory)' if bound is not None else "this machine's available memory"
        how = ('leave batch_size out to let max_memory choose the largest that fits' if bound is not None else
               'give max_memory (--max-memory) to choose the largest that fits')
        raise MemoryBoundError(
            f'a batch of {first} images needs about {format_bytes(peak)} of memory (owner, client and dealer processes '
            f'together), more than {what} of {format_bytes(limit)}: choose a smaller batch_size (--batch-size), or '
            f'{how}')
    tqdm.write(f'secure inference of {count} images, batches of {first}: {estimate.summary(settings.dealer)}; peak memory about '
               f'{format_bytes(peak)} (dry run)', file=sys.stderr)
    return images, batch_size, estimate, peak


def secure_predict(
        model: nn.Module,
        images: torch.Tensor,
        settings: Optional[SecureSettings] = None,
        calibration_images: Optional[torch.Tensor] = None,
        clamp_images: bool = False,
        return_result: bool = False,
        batch_size: Optional[int] = None,
        engine: Optional[str] = None,
        protocol: Optional[str] = None,
        max_memory: Union[int, str, None] = None,
) -> Any:
    """Two-party secure inference of ``model`` on ``images``, with the parties as local processes.

    Party 0 (the owner) gets the weights, party 1 (the client) the images. With CrypTen (the default engine) a
    third process deals the multiplication triples (``provider='TTP'``) and they talk over timm-mpc's links on
    loopback (plaintext: nothing leaves the machine); with SPU (``engine='spu'``) the two parties run CHEETAH (no dealer) or, for cost only, SEMI2K over
    SPU's link. Only the client learns the logits, which are returned. Before any process starts, the model is checked
    (unsupported modules are named), a plain-text calibration pass on the owner's ``calibration_images``
    (default: the shipped Fashion-MNIST examples at the model's input size) sets the approximations' public
    schedules and refuses values that would overflow the fixed-point encoding, and the images are checked
    against the model's input bounds. ``model`` itself is not changed.

    Two-party truncation fails now and then (about one image in a thousand, see
    :mod:`timm_mpc.secure.crypten.truncation`) and leaves a logit off by about 2^32. The client finds such images by the
    plan's public logit bound, and they are run again with fresh randomness (``settings.truncation_retries``
    times at most); logits still beyond the bound are an error, never returned.

    Args:
        model: An ``mpcvit_*`` model or a timm ViT after ``convert_to_mpc`` (fixed head pattern).
        images: ``(B, C, H, W)`` images: pixels in [0, 1] normalized with the model's mean and std.
        settings: Approximation and protocol settings; timm-mpc's tuned defaults if None.
        calibration_images: The owner's images for the plain-text range pass.
        clamp_images: Clamp image values outside the input bounds to them instead of refusing the images.
        return_result: Return a :class:`SecureResult` (logits, cost profile, plan) instead of the logits.
        batch_size: Run the images this many at a time, one batch after another in one session of the parties
            (processes, weights and calibration once; a progress bar); default: all at once. The cost profile is
            the first batch's.
        engine: The MPC engine (:data:`~timm_mpc.secure.engines.ENGINES`); default: ``settings.engine``.
        protocol: The engine's protocol; default: ``settings.protocol`` (or the engine's default).
        max_memory: A bound on the peak memory of the processes together (bytes, or a size such as ``'6GiB'``):
            without ``batch_size``, the images run in the largest batches that fit it. Predicted by a dry run
            (:mod:`~timm_mpc.secure.crypten.dry_run`, CrypTen only), which also prints what one image will cost before the
            parties start. Without a bound, a batch predicted to need more than the machine's available memory
            is refused.

    Raises:
        UnsupportedModelError: a module the secure engine cannot compute.
        InputRangeError: images outside the model's input bounds (without ``clamp_images``).
        FixedPointRangeError: a value the fixed-point encoding cannot hold.
        MemoryBoundError: the batch would not fit ``max_memory`` (or the machine's available memory).
        SecureInferenceError: a party failed (the message says which and why).
    """
    settings = resolve_settings(settings, engine, protocol)
    check_batch_size(batch_size)
    plan = build_secure_plan(model, settings, calibration_images)
    images, batch_size, estimate, peak = prepare_call(plan, settings, images, clamp_images, batch_size, max_memory)
    state_dict = plan.owner_weights(model)
    logits, profile, retries = run_with_retries(
        lambda x: run_local_parties(plan, state_dict, x, settings, batch_size), plan, images, settings)
    out = SecureResult(logits, profile, plan, settings, retries, estimate, peak)
    return out if return_result else out.logits


def resolve_settings(settings: Optional[SecureSettings], engine: Optional[str],
                     protocol: Optional[str]) -> SecureSettings:
    """The settings with ``engine`` and ``protocol`` where given (checked), the engine's package installed."""
    settings = settings or SecureSettings()
    if engine is not None or protocol is not None:
        settings = settings.with_engine(engine, protocol)
    get_engine(settings.engine).check_installed()
    return settings


def run_with_retries(run: Callable[[torch.Tensor], PartyResult], plan: SecurePlan, images: torch.Tensor,
                     settings: SecureSettings) -> Tuple[torch.Tensor, CostProfile, int]:
    """``run(images)``, and again on the images whose logits leave the plan's bound (a failed truncation: fresh
    randomness, fresh odds), ``settings.truncation_retries`` times at most. Returns the logits, the first run's
    cost profile and the number of runs again.

    Raises:
        SecureInferenceError: logits still beyond the bound after the retries.
    """
    result = run(images)
    logits, redo, retries = torch.from_numpy(result.logits), result.implausible, 0
    while redo and retries < settings.truncation_retries:
        retries += 1
        again = run(images[redo])
        logits[redo] = torch.from_numpy(again.logits)
        redo = [redo[i] for i in again.implausible]
    if redo:
        raise SecureInferenceError(
            f'images {redo} gave logits beyond the plan\'s bound ({plan.logit_bound:g}) in {retries + 1} runs: not a '
            f'truncation failure (about 1 image in 1000 meets one) but values outside what the owner calibrated; '
            f'calibrate on images like these (calibration_images)')
    return logits, result.profile, retries
