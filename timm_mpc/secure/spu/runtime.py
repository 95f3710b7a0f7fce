"""SPU's runtime for one party: the link to the other party, secret values as :class:`SpuTensor`, and SPU's own
profile of what each program sent.

A :class:`SpuTensor` is a secret value of this party's SPU runtime; its methods are the tensor methods
:class:`~timm_mpc.secure.secure_vit.SecureViT` and the attention kinds use (``matmul``, ``mul``, ``relu``, ``sum``,
``reshape``...). A method does not run at once: it records a JAX function of its inputs (public constants inside).
When the cost meter closes a section of the plan's forward (it reads :meth:`SpuSession.get_communication_stats`),
the session traces everything recorded since into one JAX function of the secret values it starts from, SPU
compiles it (once per structure and shapes: every block after the first reuses the first's programs) and both
parties run it. So the plan's one forward drives SPU as it drives CrypTen, each section is one SPU program, and
its traffic is what SPU's profiler logged for that program.

SPU and JAX are imported when a session starts (``pip install -e ".[spu]"``).
"""
import hashlib
import os
import re
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...utils import end_process, import_extra
from ..links import LinkSecurity

__all__ = ['SpuSession', 'SpuTensor', 'import_spu', 'exit_if_links_abandoned', 'static_key', 'SPU_PROTOCOLS',
           'SPU_FRACTION_BITS']

SPU_PROTOCOLS = ('cheetah', 'semi2k')
SPU_FRACTION_BITS = 18  # SPU's default for its 64-bit ring

_abandoned = 0  # links left open after a failure (see SpuSession.close)
_LINK_DETAILS = re.compile(r'Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+)')
_SEND_RETRY = re.compile(r"send request failed and retry, retry_count=(\d+),.*?message=(?:.*error msg '(.*)'|(.*))")


def import_spu() -> Tuple[Any, Any, Any, Any]:
    """``(libspu, spu.api, spu.utils.frontend, jax.numpy)``, or an ImportError that says how to install them."""
    import_extra('spu', 'the SPU engine')
    import jax
    import jax.numpy as jnp
    import spu.api as spu_api
    import spu.libspu as libspu
    from spu.utils import frontend
    jax.config.update('jax_platforms', 'cpu')
    return libspu, spu_api, frontend, jnp


def _enable_tls(desc: Any, tls: LinkSecurity) -> None:
    """TLS on both sides of SPU's link, a certificate required of the peer (brpc checks its chain to ``tls.ca``).
    pybind's options are copies: each is set and put back."""
    desc.enable_ssl = True
    for side in ('server_ssl_opts', 'client_ssl_opts'):
        options = getattr(desc, side)
        cert, verify = options.cert, options.verify
        cert.certificate_path, cert.private_key_path = str(tls.cert), str(tls.key)
        verify.ca_file_path, verify.verify_depth = str(tls.ca), 1  # a depth of 0 would verify nothing
        options.cert, options.verify = cert, verify
        setattr(desc, side, options)


class SpuSession:
    """One party's SPU runtime and link.

    Args:
        rank: 0 for the model owner, 1 for the client.
        addresses: ``HOST:PORT`` where each party listens (owner first).
        protocol: One of :data:`SPU_PROTOCOLS`.
        timeout_s: Bound on meeting the other party, on every wait for a message and on failing to send one.
        log_dir: Where SPU writes this party's log, from which each run's traffic is read.
        on_lost: Reports why the process ends when sending to the other party has failed for ``timeout_s``; the
            process then exits with code 2 (see :class:`_SendWatch`).
        admit: Admits the other party once the link is up, before SPU's runtime exchanges anything over it
            (:func:`~timm_mpc.secure.admission.admit`).
        tls: TLS on the link (brpc's): this party's certificate and key, and the CA whose signature the other party's
            certificate must carry; SPU checks nothing else of it (no identity), so that CA is the pin: one that
            signed the other party's certificate alone. None: plaintext.
    """

    def __init__(self, rank: int, addresses: Sequence[str], protocol: str, timeout_s: float, log_dir: str,
                 on_lost: Callable[[str], None], admit: Callable[['SpuSession'], None],
                 tls: Optional[LinkSecurity] = None) -> None:
        libspu, spu_api, self.frontend, self.jnp = import_spu()
        self.libspu = libspu
        self.rank = rank
        log = libspu.logging.LogOptions()
        log.enable_console_logger = False
        log.system_log_path = os.path.join(log_dir, f'spu_party{rank}.log')
        libspu.logging.setup_logging(log)
        self._log = open(log.system_log_path, 'a+')
        self._log.seek(0, os.SEEK_END)
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(timeout_s * 1000)
        desc.http_timeout_ms = int(timeout_s * 1000)
        desc.connect_retry_interval_ms = 500
        desc.connect_retry_times = max(int(timeout_s * 2), 1)
        retry = desc.retry_opts  # see _SendWatch
        retry.retry_interval_ms = retry.max_retry_interval_ms = 1000
        retry.retry_interval_incr_ms = 0
        retry.max_retry = _SendWatch.retries(timeout_s)
        desc.retry_opts = retry
        if tls is not None:
            _enable_tls(desc, tls)
        for index, address in enumerate(addresses):
            desc.add_party(f'party{index}', address)
        self.link = libspu.link.create_brpc(desc, rank)
        admit(self)
        config = libspu.RuntimeConfig(protocol=getattr(libspu.ProtocolKind, protocol.upper()),
                                      field=libspu.FieldType.FM64, fxp_fraction_bits=SPU_FRACTION_BITS)
        config.enable_pphlo_profile = True  # SPU logs each run's traffic: the cost meter reads it
        if protocol == 'semi2k':
            config.beaver_type = libspu.RuntimeConfig.BeaverType.TrustedFirstParty
        self.config = config
        self.runtime = spu_api.Runtime(self.link, config)
        self.io = spu_api.Io(2, config)
        self._programs: Dict[Tuple, bytes] = {}
        self._shapes: Dict[Tuple, List[Tuple[int, ...]]] = {}
        self._pending: List[weakref.ref] = []
        self.compiled = 0  # programs compiled so far
        self._names = 0
        self._compile_only = False
        self.rounds = 0
        self.bytes = 0.0
        self._watch = _SendWatch(log.system_log_path, timeout_s, on_lost)

    @contextmanager
    def compile_only(self) -> Iterator[None]:
        """Inside, operations are compiled but not run, and nothing is shared: a pass of the forward here compiles
        every program of an inference beforehand, with no traffic, so inferences time the protocol only."""
        self._compile_only = True
        try:
            yield
        finally:
            self._compile_only = False

    # --- messages and shares between the parties
    def send(self, data: bytes) -> None:
        self.link.send(1 - self.rank, data)

    def recv(self) -> bytes:
        return self.link.recv(1 - self.rank)

    def _send_share(self, share: Any) -> None:
        self.send(share.meta)
        self.send(str(len(share.share_chunks)).encode())
        for chunk in share.share_chunks:
            self.send(chunk)

    def _recv_share(self) -> Any:
        share = self.libspu.Share()
        share.meta = self.recv()
        share.share_chunks = [self.recv() for _ in range(int(self.recv()))]
        return share

    def _name(self) -> str:
        self._names += 1
        return f'v{self._names}'

    def share(self, value: Optional[np.ndarray], shape: Sequence[int], src: int) -> 'SpuTensor':
        """Party ``src`` secret-shares ``value`` (float32): it keeps one share and sends the other."""
        name = self._name()
        if self._compile_only:
            return SpuTensor(self, name, tuple(int(s) for s in shape))
        if self.rank == src:
            shares = self.io.make_shares(np.ascontiguousarray(value, dtype=np.float32),
                                         self.libspu.Visibility.VIS_SECRET)
            self.runtime.set_var(name, shares[self.rank])
            self._send_share(shares[1 - self.rank])
        else:
            self.runtime.set_var(name, self._recv_share())
        return SpuTensor(self, name, tuple(int(s) for s in shape))

    def reveal_to(self, x: 'SpuTensor', dst: int) -> Optional[np.ndarray]:
        """Open ``x`` to party ``dst`` only: the other party sends its share."""
        self.flush()
        share = self.runtime.get_var(x.name)
        if self.rank != dst:
            self._send_share(share)
            return None
        return np.asarray(self.io.reconstruct([share, self._recv_share()] if self.rank == 0
                                              else [self._recv_share(), share]))

    # --- recording and running programs
    def run(self, key: Tuple, fn: Callable[..., Any], inputs: Sequence['SpuTensor']) -> List['SpuTensor']:
        """Record ``fn(*inputs)``: a JAX function of the inputs' values, with the public constants inside, all named
        by ``key``. Returns its outputs as secret values, computed at the next :meth:`flush`."""
        inputs = tuple(inputs)
        shape_key = (key, tuple(x.shape for x in inputs))
        if shape_key not in self._shapes:
            import jax
            specs = [jax.ShapeDtypeStruct(x.shape, np.float32) for x in inputs]
            out = jax.eval_shape(lambda *a: _as_tuple(fn(*a)), *specs)
            self._shapes[shape_key] = [tuple(int(d) for d in o.shape) for o in out]
        call = _Call(shape_key, fn, inputs)
        outs = [SpuTensor(self, None, shape, (call, i)) for i, shape in enumerate(self._shapes[shape_key])]
        self._pending.extend(weakref.ref(o) for o in outs)
        return outs

    def flush(self) -> None:
        """Compile (cached) and run, as one SPU program, everything recorded since the last flush that is still
        referenced; those values become secret values of the runtime."""
        outputs = [o for o in (ref() for ref in self._pending) if o is not None and o.name is None]
        self._pending = []
        if not outputs:
            return
        leaf_index: Dict[int, int] = {}
        inputs: List[SpuTensor] = []
        calls: Dict[int, int] = {}
        order: List[_Call] = []
        structure: List[Tuple] = []

        def leaf(x: SpuTensor) -> int:
            if id(x) not in leaf_index:
                leaf_index[id(x)] = len(inputs)
                inputs.append(x)
            return leaf_index[id(x)]

        def visit(call: _Call) -> int:
            if id(call) not in calls:
                refs = tuple(('leaf', leaf(x)) if x.name is not None else ('call', visit(x.pending[0]), x.pending[1])
                             for x in call.inputs)
                calls[id(call)] = len(order)
                order.append(call)
                structure.append((call.key, refs))
            return calls[id(call)]

        out_refs = tuple((visit(o.pending[0]), o.pending[1]) for o in outputs)
        key = (tuple(structure), tuple(x.shape for x in inputs), out_refs)
        if key not in self._programs:
            def program(*values: Any) -> Tuple:
                results: List[Tuple] = []
                for call, (_, refs) in zip(order, structure):
                    args = [values[r[1]] if r[0] == 'leaf' else results[r[1]][r[2]] for r in refs]
                    results.append(_as_tuple(call.fn(*args)))
                return tuple(results[c][i] for c, i in out_refs)
            examples = [np.zeros(x.shape, np.float32) for x in inputs]
            executable, _ = self.frontend.compile(
                self.frontend.Kind.JAX, program, examples, {}, [f'in{i}' for i in range(len(inputs))],
                [self.libspu.Visibility.VIS_SECRET] * len(inputs), lambda flat: [f'out{i}' for i in range(len(flat))])
            self._programs[key] = executable.code
            self.compiled += 1
        for o in outputs:
            o.name, o.pending = self._name(), None
        if not self._compile_only:
            self.runtime.run(self.libspu.Executable(name='section', input_names=[x.name for x in inputs],
                                                    output_names=[o.name for o in outputs], code=self._programs[key]))
            self._read_traffic()

    def _read_traffic(self) -> None:
        """Add the traffic SPU logged for the runs since the last call (send and received bytes: both
        parties' traffic; send actions: this party's rounds)."""
        for line in self._log.read().splitlines():
            found = _LINK_DETAILS.search(line)
            if found:
                self.bytes += int(found.group(1)) + int(found.group(2))
                self.rounds += int(found.group(3))

    def get_communication_stats(self) -> Dict[str, float]:
        """Rounds this party sent and bytes both parties sent, so far: the counters :class:`CostMeter` reads when a
        section opens and closes, after running what was recorded before (so each section is one program)."""
        self.flush()
        return dict(rounds=self.rounds, bytes=self.bytes)

    def delete(self, name: str) -> None:
        if self._compile_only:
            return
        try:
            self.runtime.del_var(name)
        except Exception:  # the runtime may be gone at interpreter exit
            pass

    def close(self, peer_alive: bool = True) -> None:
        """Release the link and the log. After a failure (``peer_alive=False``) the link is left open: SPU 0.9.5
        crashes stopping or freeing a link whose peer is gone, even in the interpreter's teardown, so a process that
        ends after it must end through :func:`exit_if_links_abandoned`."""
        global _abandoned
        try:
            if peer_alive:
                self.link.stop_link()  # sends FIN and waits for the peer's: the watch stays on until it returns
                self._watch.stop()
            else:  # the watch stays on for the abandoned link's retries, which would end the process anyway
                _abandoned += 1
        finally:
            self._log.close()


class _SendWatch(threading.Thread):
    """Ends the process with a clear error once SPU's sends to the other party have failed for ``timeout_s``.

    When an asynchronous send runs out of retries, yacl (SPU 0.9.5's link) calls ``exit(-1)`` from its send thread,
    and the process then crashes in its own teardown (SIGSEGV) without a word of why. Every failed attempt is
    logged, so this thread reads SPU's log and ends the process first (reported by ``on_lost``, exit code 2), while
    the link still retries. A failure counts from the first logged retry of a run of them (runs end after
    ``timeout_s + 2`` s without one: an attempt at a silent peer takes ``timeout_s``), and only once one send has
    failed twice, so one lost request in a healthy run ends nothing. Like :func:`~timm_mpc.secure.crypten.party.watchdog`,
    ending the process is the only way out: the blocked call cannot be interrupted from Python.

    SPU logs to one file per process (the last session's), so where one process holds two sessions (both parties
    as threads, in tests) the last one's watch sees both links' retries and the first one's none; one suffices,
    since either failure ends the process.
    """

    def __init__(self, log_path: str, timeout_s: float, on_lost: Callable[[str], None]) -> None:
        super().__init__(name='timm-mpc-spu-send-watch', daemon=True)
        self.timeout_s = timeout_s
        self.on_lost = on_lost
        self._failing_since: Optional[float] = None
        self._last_failure = 0.0
        self._log = open(log_path, errors='replace')
        self._log.seek(0, os.SEEK_END)  # the link is up: earlier retries were the meeting's
        self._stopped = threading.Event()
        self.start()

    @staticmethod
    def retries(timeout_s: float) -> int:
        """How often the link retries a send: once a second, for 10 s more than the watch waits (an attempt at a
        peer that refuses connections fails at once)."""
        return int(timeout_s) + 10

    def failed(self, retry_count: int, now: float) -> Optional[float]:
        """Note a logged retry; the seconds sending has failed for, once that means the other party is lost."""
        if self._failing_since is None or now - self._last_failure > self.timeout_s + 2:
            self._failing_since = now
        self._last_failure = now
        failing = now - self._failing_since
        return failing if retry_count >= 2 and failing >= self.timeout_s else None

    def run(self) -> None:
        partial = ''
        while not self._stopped.wait(0.5):
            try:
                lines = (partial + self._log.read()).split('\n')
            except (OSError, ValueError):  # closed by stop()
                return
            partial = lines.pop()  # a line SPU is still writing
            for line in lines:
                found = _SEND_RETRY.search(line)
                failing = found and self.failed(int(found.group(1)), time.monotonic())
                if failing:
                    self.lost(failing, found.group(2) or found.group(3))

    def lost(self, failing_s: float, why: str) -> None:
        try:
            self.on_lost(f'lost the other party during the protocol (SPU could not send to it for {failing_s:.0f} '
                         f's: {why.strip()})')
        finally:
            end_process(2)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=2)
        self._log.close()


def static_key(value: Any) -> Any:
    """A hashable, printable form of a public constant for a program's key."""
    if isinstance(value, torch.Tensor):
        if value.numel() > 64:  # a mask or an index: its digest, not every value, keys the program cache
            data = value.detach().cpu().contiguous().numpy().tobytes()
            return ('tensor', tuple(value.shape), str(value.dtype), hashlib.sha256(data).hexdigest())
        return ('tensor', tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, slice):
        return ('slice', value.start, value.stop, value.step)
    if isinstance(value, tuple):
        return tuple(static_key(v) for v in value)
    return value


def _normalize_key(key: Any) -> Any:
    return key if isinstance(key, tuple) else (key,)


def exit_if_links_abandoned(code: int) -> None:
    """End the process now with ``code`` (output flushed, no teardown) if a failed SPU session left its link open:
    tearing it down would crash the process after its error was reported."""
    if _abandoned:
        end_process(code)


class _Call:
    """A recorded JAX function and the secret values it takes."""
    __slots__ = ('key', 'fn', 'inputs')

    def __init__(self, key: Tuple, fn: Callable[..., Any], inputs: Tuple['SpuTensor', ...]) -> None:
        self.key, self.fn, self.inputs = key, fn, inputs


def _as_tuple(out: Any) -> Tuple:
    return out if isinstance(out, tuple) else (out,)


class SpuTensor:
    """A secret value of a party's SPU runtime (``name``) or one still to compute (``pending``: a recorded call and
    which of its outputs), with the tensor methods of a CrypTen tensor that the plan's forward uses. Public operands
    (Python numbers, torch tensors) are compiled in as constants."""

    def __init__(self, session: SpuSession, name: Optional[str], shape: Tuple[int, ...],
                 pending: Optional[Tuple[_Call, int]] = None) -> None:
        self.session = session
        self.name = name
        self.shape = shape
        self.pending = pending

    def __del__(self) -> None:
        if self.name is not None:
            self.session.delete(self.name)

    def __repr__(self) -> str:
        return f'SpuTensor({self.name}, shape={self.shape})'

    # --- shape
    def size(self, dim: Optional[int] = None) -> Any:
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def _apply(self, key: Tuple, fn: Callable[..., Any], *others: 'SpuTensor') -> Any:
        outs = self.session.run(key, fn, (self, *others))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def reshape(self, *shape: Any) -> 'SpuTensor':
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return self._apply(('reshape', shape), lambda x: x.reshape(shape))

    def permute(self, *dims: int) -> 'SpuTensor':
        return self._apply(('permute', dims), lambda x: x.transpose(dims))

    def transpose(self, a: int, b: int) -> 'SpuTensor':
        return self._apply(('transpose', a, b), lambda x: self.session.jnp.swapaxes(x, a, b))

    def unbind(self, dim: int = 0) -> Tuple['SpuTensor', ...]:
        jnp = self.session.jnp
        n = self.shape[dim]
        out = self._apply(('unbind', dim), lambda x: tuple(jnp.take(x, i, axis=dim) for i in range(n)))
        return out if isinstance(out, tuple) else (out,)

    def index_select(self, dim: int, index: torch.Tensor) -> 'SpuTensor':
        idx = np.asarray(index.tolist(), dtype=np.int64)
        return self._apply(('index_select', dim, static_key(index)), lambda x: self.session.jnp.take(x, idx, axis=dim))

    def expand(self, *sizes: int) -> 'SpuTensor':
        shape = tuple(s if s != -1 else self.shape[i - (len(sizes) - len(self.shape))] for i, s in enumerate(sizes))
        return self._apply(('expand', shape), lambda x: self.session.jnp.broadcast_to(x, shape))

    def __getitem__(self, key: Any) -> 'SpuTensor':
        return self._apply(('getitem', static_key(_normalize_key(key))), lambda x: x[key])

    # --- arithmetic
    def _binary(self, op: str, other: Any, fn: Callable[[Any, Any], Any]) -> 'SpuTensor':
        if isinstance(other, SpuTensor):
            return self._apply((op,), fn, other)
        const = np.asarray(other.detach().numpy() if isinstance(other, torch.Tensor) else other, dtype=np.float32)
        return self._apply((op, static_key(other)), lambda x: fn(x, const))

    def add(self, other: Any) -> 'SpuTensor':
        return self._binary('add', other, lambda a, b: a + b)

    def sub(self, other: Any) -> 'SpuTensor':
        return self._binary('sub', other, lambda a, b: a - b)

    def mul(self, other: Any) -> 'SpuTensor':
        return self._binary('mul', other, lambda a, b: a * b)

    def matmul(self, other: Any) -> 'SpuTensor':
        return self._binary('matmul', other, lambda a, b: a @ b)

    __add__ = __radd__ = add
    __sub__ = sub
    __mul__ = __rmul__ = mul
    __matmul__ = matmul

    def __rsub__(self, other: Any) -> 'SpuTensor':
        return self._binary('rsub', other, lambda a, b: b - a)

    def __neg__(self) -> 'SpuTensor':
        return self._apply(('neg',), lambda x: -x)

    def square(self) -> 'SpuTensor':
        return self._apply(('square',), lambda x: x * x)

    def relu(self) -> 'SpuTensor':
        return self._apply(('relu',), lambda x: self.session.jnp.maximum(x, 0))

    def exp(self) -> 'SpuTensor':
        return self._apply(('exp',), lambda x: self.session.jnp.exp(x))

    def reciprocal(self) -> 'SpuTensor':
        return self._apply(('reciprocal',), lambda x: 1 / x)

    def sum(self, dim: Optional[int] = None, keepdim: bool = False) -> 'SpuTensor':
        return self._apply(('sum', dim, keepdim), lambda x: x.sum(axis=dim, keepdims=keepdim))

    def mean(self, dim: Optional[int] = None, keepdim: bool = False) -> 'SpuTensor':
        return self._apply(('mean', dim, keepdim), lambda x: x.mean(axis=dim, keepdims=keepdim))
