"""Local processes: starting them from a fork server (:func:`start_processes`, for the parties of
:func:`~.launch.secure_predict`), and computations the owner runs on its own in processes of its own, with no dealer
and no other party (:func:`run_local`: CrypTen's dry run of an inference and its truncation measurement)."""
import queue
import random
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing

from ..layers.attn_kinds import kind_modules

__all__ = ['run_local', 'process_context', 'start_processes', 'free_port', 'free_ports']

# what every local process needs, imported once by the fork server instead of again by each process (seconds each)
_PRELOAD = ('timm_mpc.secure.launch', 'timm_mpc.secure.crypten.dry_run', 'timm_mpc.secure.crypten.truncation', 'crypten')


_PORTS_RANDOM = random.SystemRandom()


def _listen_ports() -> range:
    """Ports a local run listens on: below the kernel's range for outgoing connections, which hands its ports to
    every socket that connects and so could give the port chosen here to another process's connection before the
    run binds it (a rare 'address in use' when several runs start at once)."""
    try:
        low = int(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; elsewhere the OS's range may differ, and a bind still checks the port
    return range(max(1024, low - 12288), low) if low > 2048 else range(49152, 65536)


def free_ports(count: int, host: str = '127.0.0.1', ports: Optional[range] = None) -> List[int]:
    """``count`` consecutive ports of ``host`` (loopback by default), chosen at random in ``ports`` (default: below
    the range of outgoing connections), that nothing listens on now."""
    ports = ports or _listen_ports()
    for _ in range(200):
        first = _PORTS_RANDOM.randrange(ports.start, ports.stop - count + 1)  # apart from a seeded random state
        try:
            with ExitStack() as stack:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind((host, port))
            return list(range(first, first + count))
        except OSError:
            continue
    raise OSError(f'found no {count} consecutive free ports on {host} in {ports.start}-{ports.stop - 1}')


def free_port(host: str = '127.0.0.1', ports: Optional[range] = None) -> int:
    """A port of ``host`` (loopback by default) that nothing listens on now (:func:`free_ports`)."""
    return free_ports(1, host, ports)[0]


def process_context() -> Any:
    """The context local processes start from: a fork server that imported torch, timm, timm-mpc and CrypTen once
    and forks each process from that state. A spawned process would import them again (5 s or more of a
    2-core machine each, five processes per :func:`~.launch.secure_predict`). The server forks before any
    thread starts, so the processes are as clean as spawned ones; like those, they do not run the caller's
    script."""
    ctx = torch.multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(list(_PRELOAD))  # read when the server starts: a running one is used as it is
    return ctx


@contextmanager
def _main_module_hidden(modules: Tuple[str, ...]) -> Iterator[None]:
    """Processes started here do not import the caller's ``__main__``: they need nothing from it, and re-running a
    script that calls :func:`secure_predict` unguarded (no ``if __name__ == '__main__':``) would start parties from
    parties (multiprocessing's bootstrapping error), and import its own imports again in every party. Unless an
    attention kind was registered there: the parties must know it, so they import it."""
    main = sys.modules.get('__main__')
    if main is None or '__main__' in modules:
        yield
        return
    saved = {name: getattr(main, name) for name in ('__file__', '__spec__') if hasattr(main, name)}
    main.__spec__ = None  # multiprocessing.spawn imports __main__ by its spec's name, else by its __file__
    main.__dict__.pop('__file__', None)
    try:
        yield
    finally:
        main.__dict__.pop('__spec__', None)
        main.__dict__.update(saved)


_STARTING = threading.Lock()  # __main__ is changed while processes start: one thread at a time (a service's sessions)


def start_processes(procs: Sequence[Any], modules: Sequence[str]) -> None:
    """Start spawned processes that import the attention-kind ``modules`` (:func:`kind_modules`) but not the
    caller's script."""
    with _STARTING, _main_module_hidden(tuple(modules)):
        for proc in procs:
            proc.start()


def run_local(target: Callable[..., None], args: Sequence[tuple], timeout_s: float, what: str) -> Any:
    """Run ``target(rank, world_size, rendezvous, results, modules, *args[rank])`` in one spawned process per
    entry of ``args`` and return the value the first ``('ok', value)`` put on ``results``, within ``timeout_s``.

    Raises:
        RuntimeError: naming ``what``, when a process reports an error or none answers in time.
    """
    ctx = process_context()
    results = ctx.Queue()
    modules = kind_modules()
    rendezvous = f'tcp://127.0.0.1:{free_port()}'  # plaintext loopback links: nothing secret moves
    procs = [ctx.Process(target=target, daemon=True, args=(rank, len(args), rendezvous, results, modules, *extra))
             for rank, extra in enumerate(args)]
    start_processes(procs, modules)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, value = results.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # killed (the OOM killer) or crashed without a report
                    status, value = 'error', f'a process exited with code {dead[0]} without an answer'
                    break
                if time.monotonic() > deadline:
                    status, value = 'error', f'no answer within {timeout_s:.0f} s'
                    break
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    if status != 'ok':
        raise RuntimeError(f'{what} failed: {value}')
    return value
