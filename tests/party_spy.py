"""A semi-honest party's view, recorded from inside its own process, and what an attacker makes of it.

:func:`record_view` instruments the process it runs in before the party starts. The party runs
unchanged and sends every message as it would; the instrumentation only keeps a copy of every value the
process holds: every tensor and message it sends or receives over its links (timm-mpc's communicator, which every
collective of CrypTen and every message of timm-mpc goes through), every random ring element it draws (its masks, its pseudo-random zero shares
and the triples a dealer's seed lets it draw, or the triples it deals itself) and every share it assigns
to a secret-shared tensor. :func:`best_reconstruction` and :func:`recovered_values` are the attacks.
"""
import functools
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

SCALE = 2.0 ** 16  # CrypTen's fixed-point scale with 16 fractional bits

_RNG = ('generate_random_ring_element', 'generate_kbit_random_tensor')
_COLLECTIVES = ('all_reduce', 'reduce', 'broadcast', 'gather', 'all_gather', 'scatter')


class View:
    """Every int64 value a party's process held (as flat copies), for the attacker to search; and every buffer it
    received, of any type, as (dtype, bytes) in order: what the other processes sent it."""

    def __init__(self) -> None:
        self.records: List[torch.Tensor] = []
        self.received: List[Tuple[str, bytes]] = []
        self.listening: List[str] = []
        self.seeds: List[int] = []  # single int64 values over the links: the client's are its generators' seeds

    def add_received(self, buffer: object) -> None:
        if isinstance(buffer, torch.Tensor):
            self.received.append((str(buffer.dtype), buffer.detach().contiguous().view(-1).numpy().tobytes()))
        elif isinstance(buffer, bytes):  # a framed message (JSON, a pickled CrypTen object)
            self.received.append(('frame', buffer))

    def add(self, value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.int64 and value.numel():
                self.records.append(value.detach().flatten().clone())
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.add(v)


def _wrap_links(view: View) -> None:
    """Record every tensor and framed message this process sends or receives over its links."""
    from timm_mpc.secure.crypten.communicator import LinkCommunicator
    send_tensor, recv_tensor = LinkCommunicator.send_tensor, LinkCommunicator.recv_tensor
    recv_frame = LinkCommunicator.recv_frame

    def seed(tensor):
        if tensor.dtype == torch.int64 and tensor.numel() == 1:
            view.seeds.append(int(tensor))

    def spied_send_tensor(self, dst, tensor):
        view.add(tensor)
        seed(tensor)
        return send_tensor(self, dst, tensor)

    def spied_recv_tensor(self, src, tensor):
        result = recv_tensor(self, src, tensor)
        view.add(result)
        view.add_received(result)
        seed(result)
        return result

    def spied_recv_frame(self, src, *args, **kwargs):
        data = recv_frame(self, src, *args, **kwargs)
        view.add_received(data)
        return data
    LinkCommunicator.send_tensor, LinkCommunicator.recv_tensor = spied_send_tensor, spied_recv_tensor
    LinkCommunicator.recv_frame = spied_recv_frame
    for name in _COLLECTIVES:  # what a collective leaves this process (an opened value, a gathered list)
        _keep_result(view, LinkCommunicator, name)


def _keep_result(view: View, cls: type, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def spied(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        view.add(result)
        return result
    setattr(cls, name, spied)


def _wrap_rng(view: View, name: str) -> None:
    import crypten.common.rng as rng
    original = getattr(rng, name)

    def spied(*args, **kwargs):
        value = original(*args, **kwargs)
        view.add(value)
        return value
    # crypten's modules and timm-mpc's own (its owner-dealt triples) import the functions by name, some under another
    for module in list(sys.modules.values()):
        if getattr(module, '__name__', '').startswith(('crypten', 'timm_mpc')):
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, spied)


def _wrap_share(view: View, cls: type) -> None:
    prop = cls.share

    def setter(self, value):
        view.add(value)
        prop.fset(self, value)
    cls.share = property(prop.fget, setter)


def listening_sockets() -> List[str]:
    """``address:port`` of every TCP socket of this process that listens (read from /proc, as ``ss -ltp`` does)."""
    inodes = set()
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            continue
        if target.startswith('socket:['):
            inodes.add(target[8:-1])
    found = []
    for table, family in (('/proc/self/net/tcp', socket.AF_INET), ('/proc/self/net/tcp6', socket.AF_INET6)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == '0A' and fields[9] in inodes:  # LISTEN
                    address, port = fields[1].split(':')
                    raw = bytes.fromhex(address)
                    if family == socket.AF_INET6:  # four little-endian 32-bit words
                        raw = b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    else:
                        raw = raw[::-1]
                    found.append(f'{socket.inet_ntop(family, raw)}:{int(port, 16)}')
    return found


def record_view() -> View:
    """Instrument this process (before its party starts) and return the view that fills as it runs, with the
    sockets the process listens on once its links are up."""
    from timm_mpc.secure import links
    from timm_mpc.secure.crypten.compat import import_crypten
    import_crypten()
    accept = links._accept

    def spied_accept(*args, **kwargs):  # the process waits for its peers: every listener it opened exists
        view.listening.extend(listening_sockets())
        return accept(*args, **kwargs)
    links._accept = spied_accept
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
    view = View()
    _wrap_links(view)
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
    """Run the real owner, client and, for TTP, dealer as three processes, each recording its view; each view goes
    to ``out_dir/<role>_view.pt`` (:func:`load_view`), the client's logits to ``out_dir/client_logits.pt``."""
    procs = [(_spied_owner, (plan, state_dict, settings, out_dir)), (_client, (images, settings, out_dir))]
    if settings['provider'] == 'TTP':
        procs.append((_spied_dealer, (settings, out_dir)))
    codes = run_processes(procs, timeout)
    assert codes == [0] * len(procs), codes


def save_view(view: View, path: str) -> None:
    torch.save(dict(records=view.records, received=view.received, listening=view.listening, seeds=view.seeds), path)


def load_view(path) -> View:
    view = View()
    with torch.serialization.safe_globals([bytes]):  # an empty message (a weight mask's answer) pickles as bytes()
        saved = torch.load(path)
    for name, value in saved.items():
        setattr(view, name, value)
    return view


@functools.lru_cache(None)
def secret_file() -> str:
    """A secret file for the `timm-mpc party` processes of this test process (``--secret-file``)."""
    from timm_mpc.secure.admission import write_secret
    return str(write_secret(Path(tempfile.mkdtemp(prefix='timm-mpc-test-')) / 'run.secret'))


def run_processes(targets, timeout: float = 180, secrets: Optional[Sequence[bytes]] = None) -> List[int]:
    """``(function, args)`` each in a process of its own, started as the parties start (forked from a server with
    everything imported) and called with a fresh loopback rendezvous and the run's secret first (a new one, or
    ``secrets[i]`` for process ``i``); their exit codes once all ended (a process still running after ``timeout`` is
    killed)."""
    from timm_mpc.secure.admission import new_secret
    from timm_mpc.secure.launch import free_port
    from timm_mpc.secure.processes import process_context
    rendezvous = f'tcp://127.0.0.1:{free_port()}'
    secrets = secrets or [new_secret()] * len(targets)
    ctx = process_context()
    procs = [ctx.Process(target=target, args=(rendezvous, secret, *args))
             for (target, args), secret in zip(targets, secrets)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _spied_owner(rendezvous, secret, plan, state_dict, settings, out_dir):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_owner
    torch.set_num_threads(1)
    view = record_view()
    run_owner(rendezvous, plan, state_dict, SecureSettings.from_dict(settings), secret)
    save_view(view, f'{out_dir}/owner_view.pt')


def _client(rendezvous, secret, images, settings, out_dir):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_client
    torch.set_num_threads(1)
    view = record_view()
    result = run_client(rendezvous, images, SecureSettings.from_dict(settings), secret)
    torch.save(result.logits, f'{out_dir}/client_logits.pt')
    save_view(view, f'{out_dir}/client_view.pt')


def _spied_dealer(rendezvous, secret, settings, out_dir):
    view = record_view()
    _dealer(rendezvous, secret, settings)
    save_view(view, f'{out_dir}/dealer_view.pt')


def _dealer(rendezvous, secret, settings):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_dealer
    torch.set_num_threads(1)
    run_dealer(rendezvous, SecureSettings.from_dict(settings), secret)


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


def _failing_party(rendezvous, secret, role, run, out_dir, *args):
    """Run a party (``run(rendezvous, secret, *args)``); the error it ends with goes to ``out_dir/<role>_error.txt``,
    also when its watchdog ends it (a peer not met in time)."""
    from timm_mpc.secure import protocol

    def write(message):
        with open(f'{out_dir}/{role}_error.txt', 'w') as f:
            f.write(message)
    protocol.report_on_stderr = lambda message: write(f'watchdog: {message}')  # the watchdog's default report
    try:
        run(rendezvous, secret, *args)
    except BaseException as e:
        write(f'{type(e).__name__}: {e}')
        raise SystemExit(2)


def _client_run(rendezvous, secret, images, settings, requests):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_client
    torch.set_num_threads(1)
    run_client(rendezvous, images, SecureSettings.from_dict(settings), secret, requests=requests)


def _deviating_owner(rendezvous, secret, plan, state_dict, settings, requests, out_dir, deviation):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_owner
    from timm_mpc.secure.crypten import dealer
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
                               kwargs=dict(remove_rank=True)), 2)
            return
        if extra == 'swap':
            i = next(i for i in range(1, len(call)) if call[i] != call[0])
            call[0], call[i] = call[i], call[0]
        else:
            call = [extra] + call
        honest(self, call)
    dealer.DealerLink.commit = commit
    try:
        _failing_party(rendezvous, secret, 'owner', lambda rendezvous, secret: run_owner(
            rendezvous, plan, state_dict, SecureSettings.from_dict(settings), secret, requests=requests), out_dir)
    finally:
        save_view(view, f'{out_dir}/owner_view.pt')


def run_parties_with_limits(plan, state_dict: dict, images: torch.Tensor, settings: dict, limits: dict, out_dir: str,
                            batch_size=None, timeout: float = 180) -> List[int]:
    """The real owner (with ``OwnerLimits(**limits)``), client and dealer; each writes the error it ended with to
    ``out_dir/<role>_error.txt``; returns the exit codes (owner, client, dealer)."""
    return run_processes([(_failing_party, ('owner', _limited_owner, out_dir, plan, state_dict, settings, limits)),
                          (_failing_party, ('client', _client_batches, out_dir, images, settings, batch_size)),
                          (_failing_party, ('dealer', _dealer, out_dir, settings))], timeout)


def _limited_owner(rendezvous, secret, plan, state_dict, settings, limits):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_owner
    from timm_mpc.secure.protocol import OwnerLimits
    torch.set_num_threads(1)
    run_owner(rendezvous, plan, state_dict, SecureSettings.from_dict(settings), secret, limits=OwnerLimits(**limits))


def _client_batches(rendezvous, secret, images, settings, batch_size):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_client
    torch.set_num_threads(1)
    run_client(rendezvous, images, SecureSettings.from_dict(settings), secret, batch_size=batch_size)


def run_with_secrets(plan, state_dict: dict, images: torch.Tensor, settings: dict, out_dir: str,
                     secrets: Sequence[bytes], client_host: Optional[str] = None, timeout: float = 180) -> List[int]:
    """The real owner, client and dealer, given ``secrets`` (owner, client, dealer); with ``client_host`` the client
    dials the owner's port at that address instead. Each writes the error it ended with to
    ``out_dir/<role>_error.txt``; returns the exit codes (owner, client, dealer)."""
    return run_processes([(_failing_party, ('owner', _limited_owner, out_dir, plan, state_dict, settings, {})),
                          (_failing_party, ('client', _client_at, out_dir, images, settings, client_host)),
                          (_failing_party, ('dealer', _dealer, out_dir, settings))], timeout, secrets)


def _client_at(rendezvous, secret, images, settings, host):
    from timm_mpc.secure import SecureSettings
    from timm_mpc.secure.crypten.party import run_client
    torch.set_num_threads(1)
    if host is not None:
        rendezvous = f'tcp://{host}:{rendezvous.rsplit(":", 1)[1]}'
    run_client(rendezvous, images, SecureSettings.from_dict(settings), secret)


# imported by a session's party processes (as an attention-kind module is): the spy in each, its view saved as the
# party hands a call's result over, so the record of each call is complete before the session goes on
SESSION_SPY = '''
from timm_mpc.secure import launch
from party_spy import record_view, save_view
_view = record_view()
_deliver = launch.QueueLink.deliver


def _spied_deliver(self, result):
    save_view(_view, {out!r} + f'/{{self.reports.role}}_view.pt')
    _deliver(self, result)


launch.QueueLink.deliver = _spied_deliver
'''
