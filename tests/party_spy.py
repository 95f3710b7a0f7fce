"""A semi-honest party's view, recorded from inside its own process, and what an attacker makes of it.

:func:`record_view` instruments the process it runs in before the party starts. The party runs
unchanged and sends every message as it would; the instrumentation only keeps a copy of every value the
process holds: every tensor it sends or receives and every collective buffer after the collective
(``torch.distributed``), every random ring element it draws (its masks, its pseudo-random zero shares
and the triples a dealer's seed lets it draw, or the triples it deals itself) and every share it assigns
to a secret-shared tensor. :func:`best_reconstruction` and :func:`recovered_values` are the attacks.
"""
import sys
from typing import Callable, Iterable, List, Sequence

import torch
import torch.distributed as dist

SCALE = 2.0 ** 16  # CrypTen's fixed-point scale with 16 fractional bits

_DIST_OPS = ('send', 'recv', 'isend', 'irecv', 'broadcast', 'all_reduce', 'reduce', 'all_gather', 'gather',
             'scatter', 'reduce_scatter')
_RNG = ('generate_random_ring_element', 'generate_kbit_random_tensor')


class View:
    """Every int64 value a party's process held (as flat copies), for the attacker to search."""

    def __init__(self) -> None:
        self.records: List[torch.Tensor] = []

    def add(self, value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.int64 and value.numel():
                self.records.append(value.detach().flatten().clone())
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.add(v)


class _RecordOnWait:
    """A non-blocking operation's handle: the buffers are recorded once the operation has completed."""

    def __init__(self, work, view: View, buffers: list) -> None:
        self._work, self._view, self._buffers = work, view, buffers

    def wait(self, *args, **kwargs):
        done = self._work.wait(*args, **kwargs)
        self._view.add(self._buffers)
        return done

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def _wrap_dist(view: View, name: str) -> None:
    original = getattr(dist, name)

    def spied(*args, **kwargs):
        result = original(*args, **kwargs)
        buffers = list(args) + list(kwargs.values())
        if result is not None and hasattr(result, 'wait'):  # isend, irecv, async_op=True
            return _RecordOnWait(result, view, buffers)
        view.add(buffers)
        return result
    setattr(dist, name, spied)


def _wrap_rng(view: View, name: str) -> None:
    import crypten.common.rng as rng
    original = getattr(rng, name)

    def spied(*args, **kwargs):
        value = original(*args, **kwargs)
        view.add(value)
        return value
    for module in list(sys.modules.values()):  # crypten's modules import the functions by name
        if getattr(module, '__name__', '').startswith('crypten') and getattr(module, name, None) is original:
            setattr(module, name, spied)


def _wrap_share(view: View, cls: type) -> None:
    prop = cls.share

    def setter(self, value):
        view.add(value)
        prop.fset(self, value)
    cls.share = property(prop.fget, setter)


def record_view() -> View:
    """Instrument this process (before its party starts) and return the view that fills as it runs."""
    from timm_mpc.secure.crypten_compat import import_crypten
    import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
    view = View()
    for name in _DIST_OPS:
        _wrap_dist(view, name)
    for name in _RNG:
        _wrap_rng(view, name)
    for cls in (ArithmeticSharedTensor, BinarySharedTensor):
        _wrap_share(view, cls)
    return view


def _decode(values: torch.Tensor) -> torch.Tensor:
    return values.double() / SCALE


def _combinations(candidates: Sequence[torch.Tensor], chunk: int = 256) -> Iterable[torch.Tensor]:
    """Each candidate, and the sum and difference (in the ring, mod 2^64) of every pair, in chunks."""
    stack = torch.stack(list(candidates))
    yield stack
    for i in range(len(candidates)):
        rest = stack[i + 1:]
        for j in range(0, rest.shape[0], chunk):
            part = rest[j:j + chunk]
            yield torch.cat([part + stack[i], part - stack[i], stack[i] - part])


def _candidates(view: Sequence[torch.Tensor], numel: int) -> List[torch.Tensor]:
    unique = {}
    for t in view:
        if t.numel() == numel:
            unique.setdefault(hash(t.numpy().tobytes()), t)
    return list(unique.values())


def best_reconstruction(view: Sequence[torch.Tensor], secret: torch.Tensor,
                        transform: Callable[[torch.Tensor], torch.Tensor] = None, source_numel: int = None) -> float:
    """The best |correlation| (the square root of an affine fit's R²) between ``secret`` and what the view
    gives: any recorded tensor, or the sum or difference of any two, decoded as fixed point and, with
    ``transform``, mapped by the attacker's own computation (e.g. its own weights)."""
    target = secret.flatten().double()
    target = (target - target.mean()) / target.std()
    numel = source_numel or target.numel()
    candidates = _candidates(view, numel)
    best = 0.0
    if not candidates:
        return best
    for combo in _combinations(candidates):
        x = _decode(combo)
        if transform is not None:
            x = transform(x)
        x = x - x.mean(1, keepdim=True)
        norm = x.norm(dim=1)
        corr = (x @ target) / (norm * (target.numel() - 1) ** 0.5)
        corr = torch.nan_to_num(corr.abs(), nan=0.0)  # a constant combination says nothing
        best = max(best, float(corr.max()))
    return best


def recovered_values(view: Sequence[torch.Tensor], secret: torch.Tensor, tolerance: float,
                     transform: Callable[[torch.Tensor], torch.Tensor] = None, source_numel: int = None) -> float:
    """The largest fraction of ``secret``'s values that one reconstruction (as in :func:`best_reconstruction`)
    gives within ``tolerance``."""
    target = secret.flatten().double()
    best = 0.0
    candidates = _candidates(view, source_numel or target.numel())
    for combo in (_combinations(candidates) if candidates else []):
        x = _decode(combo)
        if transform is not None:
            x = transform(x)
        best = max(best, float(((x - target).abs() < tolerance).double().mean(1).max()))
    return best


def held_values(view: Sequence[torch.Tensor], secret: torch.Tensor) -> float:
    """The fraction of ``secret``'s values (as decoded by the receiving party, so exactly encodable) that the
    view holds, encoded, in their own layout: two or more of them in one recorded tensor at positions as far
    apart as in ``secret`` (a collective's buffer left with revealed values holds a slice of the tensor).

    A single encoded value found somewhere proves nothing: the owner's own random draws include small
    integers (e.g. CrypTen's random tie-breaking in ``max`` draws 16-bit values) that equal a small
    encoded logit by chance."""
    encoded = torch.round(secret.flatten().double() * SCALE).long()
    held = torch.zeros(encoded.numel(), dtype=torch.bool)
    for t in view:
        if int(torch.isin(t, encoded).sum()) < 2:
            continue
        where, which = (t.unsqueeze(1) == encoded.unsqueeze(0)).nonzero(as_tuple=True)
        offsets, counts = torch.unique(where - which, return_counts=True)
        for offset in offsets[counts >= 2]:
            held[which[(where - which) == offset]] = True
    return float(held.double().mean())


def run_spied_parties(plan: dict, state_dict: dict, images: torch.Tensor, settings: dict, out_dir: str,
                      timeout: float = 180) -> None:
    """Run the real owner (recording its view), client and, for TTP, dealer as three processes; the owner's view
    goes to ``out_dir/owner_view.pt``, the client's logits to ``out_dir/client_logits.pt``."""
    procs = [(_spied_owner, (plan, state_dict, settings, out_dir)), (_client, (images, settings, out_dir))]
    if settings['provider'] == 'TTP':
        procs.append((_dealer, (settings,)))
    codes = run_processes(procs, timeout)
    assert codes == [0] * len(procs), codes


def run_processes(targets, timeout: float = 180) -> List[int]:
    """``(function, args)`` each in a process of its own, started as the parties start (forked from a server with
    everything imported) and called with a fresh loopback rendezvous first; their exit codes once all ended (a
    process still running after ``timeout`` is killed)."""
    from timm_mpc.secure.launch import free_port
    from timm_mpc.secure.local_run import process_context
    rendezvous = f'tcp://127.0.0.1:{free_port()}'
    ctx = process_context()
    procs = [ctx.Process(target=target, args=(rendezvous, *args)) for target, args in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _spied_owner(rendezvous, plan, state_dict, settings, out_dir):
    from timm_mpc.secure import SecureSettings, run_owner
    torch.set_num_threads(1)
    view = record_view()
    run_owner(rendezvous, plan, state_dict, SecureSettings.from_dict(settings))
    torch.save(view.records, f'{out_dir}/owner_view.pt')


def _client(rendezvous, images, settings, out_dir):
    from timm_mpc.secure import SecureSettings, run_client
    torch.set_num_threads(1)
    result = run_client(rendezvous, images, SecureSettings.from_dict(settings))
    torch.save(result.logits, f'{out_dir}/client_logits.pt')


def _dealer(rendezvous, settings):
    from timm_mpc.secure import SecureSettings, run_dealer
    torch.set_num_threads(1)
    run_dealer(rendezvous, SecureSettings.from_dict(settings))


DEVIATIONS = {
    # CrypTen's own request for the client's next draws (what its TTPServer would answer), pickled as CrypTen sends it
    'private_function': None,
    # allowed names, off the plan: each returns the client's next draws (exactly, or to within 1) or moves its stream
    'empty_product': ['additive', None, [[1, 0], [0, 4096], 'matmul'], {}],
    'extra_wraps': ['wraps', None, [[4096]], {}],
    'extra_B2A': ['B2A', None, [[4096]], {}],
    'zero_size': ['square', None, [[0]], {}],
    'reordered': 'swap',  # the plan's requests, two of them swapped
    'oversized': ['square', None, [[2 ** 40]], {}],
}


def run_deviating_owner(plan, state_dict: dict, images: torch.Tensor, settings: dict, requests: dict, out_dir: str,
                        deviation: str, timeout: float = 180) -> List[int]:
    """The real client and dealer with an owner that records its view and commits ``DEVIATIONS[deviation]`` to the
    dealer (a request before the plan's, or instead of them). Each process writes the error it ended with to
    ``out_dir/<role>_error.txt``; returns the exit codes (owner, client, dealer)."""
    return run_processes([(_deviating_owner, (plan, state_dict, settings, requests, out_dir, deviation)),
                          (_failing_party, ('client', _client_run, out_dir, images, settings, requests)),
                          (_failing_party, ('dealer', _dealer, out_dir, settings))], timeout)


def _failing_party(rendezvous, role, run, out_dir, *args):
    """Run a party (``run(rendezvous, *args)``); the error it ends with goes to ``out_dir/<role>_error.txt``."""
    try:
        run(rendezvous, *args)
    except BaseException as e:
        with open(f'{out_dir}/{role}_error.txt', 'w') as f:
            f.write(f'{type(e).__name__}: {e}')
        raise SystemExit(2)


def _client_run(rendezvous, images, settings, requests):
    from timm_mpc.secure import SecureSettings, run_client
    torch.set_num_threads(1)
    run_client(rendezvous, images, SecureSettings.from_dict(settings), requests=requests)


def _deviating_owner(rendezvous, plan, state_dict, settings, requests, out_dir, deviation):
    from timm_mpc.secure import SecureSettings, run_owner
    from timm_mpc.secure import dealer
    torch.set_num_threads(1)
    view = record_view()
    honest = dealer.DealerLink.commit

    def commit(self, call):
        call = dealer._canonical(call)
        extra = DEVIATIONS[deviation]
        if deviation == 'private_function':
            import crypten
            comm = crypten.communicator.get()
            comm.send_obj(dict(function='_get_additive_PRSS', device=None, args=((4096,),),
                               kwargs=dict(remove_rank=True)), 2, self.group)
            return
        if extra == 'swap':
            i = next(i for i in range(1, len(call)) if call[i] != call[0])
            call[0], call[i] = call[i], call[0]
        else:
            call = [extra] + call
        honest(self, call)
    dealer.DealerLink.commit = commit
    try:
        _failing_party(rendezvous, 'owner', run_owner, out_dir, plan, state_dict, SecureSettings.from_dict(settings),
                       None, None, requests)
    finally:
        torch.save(view.records, f'{out_dir}/owner_view.pt')


def run_parties_with_limits(plan, state_dict: dict, images: torch.Tensor, settings: dict, limits: dict, out_dir: str,
                            batch_size=None, timeout: float = 180) -> List[int]:
    """The real owner (with ``OwnerLimits(**limits)``), client and dealer; each writes the error it ended with to
    ``out_dir/<role>_error.txt``; returns the exit codes (owner, client, dealer)."""
    return run_processes([(_failing_party, ('owner', _limited_owner, out_dir, plan, state_dict, settings, limits)),
                          (_failing_party, ('client', _client_batches, out_dir, images, settings, batch_size)),
                          (_failing_party, ('dealer', _dealer, out_dir, settings))], timeout)


def _limited_owner(rendezvous, plan, state_dict, settings, limits):
    from timm_mpc.secure import SecureSettings, run_owner
    from timm_mpc.secure.party import OwnerLimits
    torch.set_num_threads(1)
    run_owner(rendezvous, plan, state_dict, SecureSettings.from_dict(settings), limits=OwnerLimits(**limits))


def _client_batches(rendezvous, images, settings, batch_size):
    from timm_mpc.secure import SecureSettings, run_client
    torch.set_num_threads(1)
    run_client(rendezvous, images, SecureSettings.from_dict(settings), batch_size=batch_size)
