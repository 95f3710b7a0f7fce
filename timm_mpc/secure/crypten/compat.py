"""The one place where timm-mpc imports CrypTen, with the changes it needs (the dealer's loop is timm-mpc's own:
:mod:`timm_mpc.secure.crypten.dealer`).

1. CrypTen 0.4.1 (its last release) imports ``torch.onnx._internal.registration`` at import time for its
   ONNX converter, and that module no longer exists in current PyTorch, so ``import crypten`` fails.
   timm-mpc never uses the ONNX converter (it builds secure models from modules), so a stand-in module
   with an empty ``registry`` is registered under that name before the import, only when the real one is missing.
2. CrypTen draws every mask, zero share and triple from torch's Mersenne Twister (``torch.randint`` with a
   seeded ``torch.Generator``), which is no cryptographic generator: its state follows from its outputs, and
   torch seeds it from 32 bits of the seed. A party sees masked values ``x - a`` with small ``x``, that is,
   the top bits of the other party's masks ``a``, so it could rebuild the generator and unmask ``x``; and the
   dealer draws the parties' seeds from torch's default generator. Here every random ring element comes
   from SHAKE-128 keyed by the generator's full 64-bit seed and a per-generator call counter (the parties and
   the dealer draw in the same order, as CrypTen already requires), and the dealer's seeds from
   ``os.urandom``.
3. Beaver products with two local products per party instead of three (:func:`use_fused_beaver`), and the
   client's triple sizes from shapes: CrypTen's TTP provider multiplies the client's random ``a`` and ``b``
   in full only to learn the size of ``c``. On a CPU every local product of 64-bit shares is an int64 matmul,
   the largest part of a linear layer's time.

4. Its communicator: torch.distributed's gloo has neither encryption nor authentication in the PyTorch wheels, so
   CrypTen talks over timm-mpc's own links instead (:mod:`.communicator`, :mod:`..links`: TLS with pinned peers, or
   plaintext on loopback), the dealer's seeds to the parties included.

Nothing installed is edited: CrypTen's functions are replaced in its loaded modules.
"""
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ...layers.attn_kinds import import_kind_modules
from ...utils import import_extra
from ..links import Links, connect_links, parse_address
from ..settings import SecureSettings
from .comparison import use_fss_comparisons

__all__ = ['import_crypten', 'apply_settings', 'install_import_hook', 'start_crypten', 'random_ring_element',
           'kbit_random_tensor', 'use_fused_beaver', 'product_shape', 'init_local', 'mask_weights']

_ONNX_REGISTRATION = 'torch.onnx._internal.registration'


def _real_module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def import_crypten() -> Any:
    """Import and return ``crypten`` with the changes above (a plain ``import crypten`` after ``import timm_mpc``
    gets the same: :func:`install_import_hook`)."""
    install_import_hook()
    return import_extra('crypten', 'secure inference (the CrypTen engine)')


class _CryptenLoader(importlib.abc.Loader):
    """CrypTen's own loader, then the changes above, on the module it loaded."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if _ONNX_REGISTRATION not in sys.modules and not _real_module_exists(_ONNX_REGISTRATION):
            stand_in = types.ModuleType(_ONNX_REGISTRATION, 'timm-mpc stand-in: CrypTen\'s ONNX converter is not used')
            stand_in.registry = None
            sys.modules[_ONNX_REGISTRATION] = stand_in
        self.loader.exec_module(module)
        _use_cryptographic_randomness()

    def __getattr__(self, name: str) -> Any:  # resources and the rest: the real loader's
        return getattr(self.loader, name)


class _CryptenFinder(importlib.abc.MetaPathFinder):
    """Finds ``crypten`` where the other finders do and loads it with :class:`_CryptenLoader`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != 'crypten':
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _CryptenLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Make every later ``import crypten`` in this process load it with the changes above; idempotent. A CrypTen
    imported before (without them) is patched now."""
    if not any(isinstance(f, _CryptenFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CryptenFinder())
    if 'crypten' in sys.modules:
        _use_cryptographic_randomness()


_DOMAIN = b'timm-mpc crypten ring elements v1'
_CALLS: Dict[Tuple[int, int], int] = {}  # (generator, its seed) -> calls so far


def _stream(generator: Any, numel: int) -> torch.Tensor:
    """``numel`` uniform int64 values: SHAKE-128 of the generator's seed and how often it was drawn from."""
    if generator is None:  # CrypTen's default: this party's local generator
        generator = sys.modules['crypten'].generators['local'][torch.device('cpu')]
    seed = generator.initial_seed()
    calls = _CALLS.get((id(generator), seed), 0)
    _CALLS[(id(generator), seed)] = calls + 1
    if not numel:
        return torch.zeros(0, dtype=torch.int64)
    data = hashlib.shake_128(_DOMAIN + seed.to_bytes(8, 'little') + calls.to_bytes(8, 'little')).digest(8 * numel)
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


def _shape(size: Any) -> torch.Size:
    return torch.Size([size]) if isinstance(size, int) else torch.Size(size)


def random_ring_element(size: Any, ring_size: int = 2 ** 64, generator: Any = None, **kwargs: Any) -> torch.Tensor:
    """CrypTen's ``generate_random_ring_element`` (uniform over the 64-bit ring), from a cryptographic stream."""
    shape = _shape(size)
    if ring_size != 2 ** 64 or kwargs.get('device') not in (None, 'cpu', torch.device('cpu')):
        raise ValueError(f'timm-mpc draws ring elements for the 64-bit ring on the CPU; got ring_size={ring_size}, '
                         f'device={kwargs.get("device")}')
    return _stream(generator, shape.numel()).reshape(shape)


def kbit_random_tensor(size: Any, bitlength: Any = None, generator: Any = None, **kwargs: Any) -> torch.Tensor:
    """CrypTen's ``generate_kbit_random_tensor`` (uniform over ``[0, 2^bitlength)``), from a cryptographic stream."""
    values = random_ring_element(size, generator=generator, **kwargs)
    if bitlength is None or bitlength == 64:
        return values
    return values & ((1 << bitlength) - 1)


def _dealer_seeds(self: Any) -> None:
    """CrypTen's ``TTPServer._setup_generators``, with the parties' seeds from ``os.urandom`` instead of torch's
    default (Mersenne Twister) generator, sent over timm-mpc's links (or CrypTen's own communicator, for a CrypTen
    program of one's own)."""
    from crypten import communicator as comm
    ws = comm.get().get_world_size()
    seeds = [torch.tensor(int.from_bytes(os.urandom(8), 'big') - 2 ** 63) for _ in range(ws)]
    self.generators = [torch.Generator(device='cpu') for _ in range(ws)]
    self.generators_cuda = [None] * ws
    for i in range(ws):
        self.generators[i].manual_seed(seeds[i].item())
    if hasattr(comm.get(), 'send_tensor'):
        for i in range(ws):
            comm.get().send_tensor(i, seeds[i])
        return
    import torch.distributed as dist
    for request in [dist.isend(tensor=seeds[i], dst=i, group=self.ttp_group) for i in range(ws)]:
        request.wait()
    dist.barrier(group=self.ttp_group)


def _party_seed(self: Any) -> None:
    """CrypTen's ``TTPClient._setup_generators``: the generator this party shares with the dealer, from the seed the
    dealer sends it (over the links)."""
    from crypten import communicator as comm
    if not hasattr(comm.get(), 'recv_tensor'):  # a CrypTen program of one's own, on CrypTen's communicator
        return _CRYPTEN_PARTY_SEED[0](self)
    seed = comm.get().recv_tensor(comm.get().get_ttp_rank(), torch.empty(size=(), dtype=torch.long))
    self.generator = torch.Generator(device='cpu')
    self.generator.manual_seed(seed.item())
    self.generator_cuda = None


def _use_links() -> None:
    """CrypTen's communicator class is :class:`.communicator.LinkCommunicator` (its ``comm.get()`` and ``uninit()``
    look the class up by name), and the dealer's seeds travel over it."""
    import crypten.communicator as comm_module
    from crypten.mpc.provider.ttp_provider import TTPClient, TTPServer
    from .communicator import LinkCommunicator
    comm_module.DistributedCommunicator = LinkCommunicator
    party = TTPClient._TTPClient__TTPClient
    _CRYPTEN_PARTY_SEED.append(party._setup_generators)
    TTPServer._setup_generators = _dealer_seeds
    party._setup_generators = _party_seed


_CRYPTEN_PARTY_SEED: List[Callable[[Any], None]] = []  # CrypTen's own, for its own communicator


def _use_cryptographic_randomness() -> None:
    """Replace CrypTen's random ring elements and the dealer's seeds (see the module's docstring), once per process:
    a second pass would undo what was layered on top since (an instrumented party's recording wrappers)."""
    import crypten.common.rng as rng
    if getattr(rng, '_timm_mpc_randomness', False):
        return
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty
    replacements = {'generate_random_ring_element': random_ring_element,
                    'generate_kbit_random_tensor': kbit_random_tensor}
    originals = {name: getattr(rng, name) for name in replacements}
    for module in list(sys.modules.values()):  # CrypTen's modules import the functions by name
        if getattr(module, '__name__', '').startswith('crypten'):
            for name, original in originals.items():
                if getattr(module, name, None) is original:
                    setattr(module, name, replacements[name])
    _use_links()
    TrustedThirdParty.generate_additive_triple = _additive_triple
    from crypten.mpc.provider.tfp_provider import TrustedFirstParty
    TrustedThirdParty.generate_weight_mask, TrustedThirdParty.generate_fixed_triple = _dealt_mask, _dealt_fixed_triple
    TrustedFirstParty.generate_weight_mask, TrustedFirstParty.generate_fixed_triple = _owner_mask, _owner_fixed_triple
    rng._timm_mpc_randomness = True


def product_shape(size0: Any, size1: Any, op: str, *args: Any, **kwargs: Any) -> torch.Size:
    """The shape of ``torch.<op>`` of operands of these sizes (``mul``, ``matmul``, convolutions), from meta tensors."""
    return getattr(torch, op)(torch.empty(size0, device='meta'), torch.empty(size1, device='meta'), *args, **kwargs).shape


def _additive_triple(self: Any, size0: Any, size1: Any, op: str, device: Any = None, *args: Any, **kwargs: Any) -> Any:
    """CrypTen's ``TrustedThirdParty.generate_additive_triple`` with the size of ``c`` found on meta tensors: the same
    draws in the same order, without the client's full product of its ``a`` and ``b``."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient
    from crypten import communicator as comm
    generator = TTPClient.get().get_generator(device=device)
    a = random_ring_element(size0, generator=generator, device=device)
    b = random_ring_element(size1, generator=generator, device=device)
    if comm.get().get_rank() == 0:
        c = TTPClient.get().ttp_request('additive', device, size0, size1, op, *args, **kwargs)
    else:
        c = random_ring_element(product_shape(size0, size1, op, *args, **kwargs), generator=generator, device=device)
    return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))


def _dealt_mask(self: Any, key: int, size: Any, device: Any = None) -> Any:
    """A party's share of the session mask ``B`` of weight ``key`` (the dealer draws the same and keeps ``B`` for that
    weight alone; it answers nothing)."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient
    from crypten import communicator as comm
    b = random_ring_element(size, generator=TTPClient.get().get_generator(device=device), device=device)
    if comm.get().get_rank() == 0:
        TTPClient.get().ttp_request('mask', device, key, size)
    return ArithmeticSharedTensor.from_shares(b, precision=0)


def _dealt_fixed_triple(self: Any, key: int, size0: Any, size1: Any, op: str, device: Any = None) -> Any:
    """Shares of a fresh ``A`` and of ``A·B`` for the session mask ``B`` of weight ``key`` (``size1``, its size, is what
    the dealer checks against the mask it keeps)."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient
    from crypten import communicator as comm
    generator = TTPClient.get().get_generator(device=device)
    a = random_ring_element(size0, generator=generator, device=device)
    if comm.get().get_rank() == 0:
        c = TTPClient.get().ttp_request('fixed', device, key, size0, size1, op)
    else:
        c = random_ring_element(product_shape(size0, size1, op), generator=generator, device=device)
    return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, c))


_OWNER_MASKS: Dict[int, torch.Tensor] = {}  # the owner-as-dealer's masks (TFP_INSECURE, and the dry run's processes)


def _owner_mask(self: Any, key: int, size: Any, device: Any = None) -> Any:
    """:func:`_dealt_mask` with the model owner as the dealer (CrypTen's trusted first party: cost only)."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    _OWNER_MASKS[key] = random_ring_element(size, device=device)
    return ArithmeticSharedTensor(_OWNER_MASKS[key], precision=0, src=0)


def _owner_fixed_triple(self: Any, key: int, size0: Any, size1: Any, op: str, device: Any = None) -> Any:
    """:func:`_dealt_fixed_triple` with the model owner as the dealer."""
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    a = random_ring_element(size0, device=device)
    c = getattr(torch, op)(a, _OWNER_MASKS[key])
    return tuple(ArithmeticSharedTensor(t, precision=0, src=0) for t in (a, c))


def mask_weights(weights: Sequence[Any]) -> None:
    """Mask each weight (a CrypTen tensor, the second factor of its products) once for the session: the dealer's
    mask ``B`` for it alone, and ``δ = W − B`` opened for all in one round. Its later products open only their
    activations (:func:`_fused_beaver`)."""
    import crypten
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.primitives.beaver import IgnoreEncodings
    provider = crypten.mpc.get_default_provider()
    shares = [w._tensor for w in weights]
    masks = [provider.generate_weight_mask(key, w.size()) for key, w in enumerate(shares)]  # the CPU, as the plan says
    with IgnoreEncodings(masks + shares):
        deltas = ArithmeticSharedTensor.reveal_batch([w - b for w, b in zip(shares, masks)])
    for key, (w, b, delta) in enumerate(zip(shares, masks, deltas)):
        w.session_mask = (key, b.share, delta)


def _fused_beaver(op: str, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
    """CrypTen's Beaver protocol with two local products: with ``ε = x - a`` and ``δ = y - b`` opened, a party's
    share of ``x·y`` is ``c + ε·(b + δ) + a·δ`` for party 0 and ``c + ε·b + a·δ`` for the others, the same ring
    elements as CrypTen's ``c + ε·b + a·δ (+ ε·δ)`` with one product fewer."""
    import crypten
    from crypten import communicator as comm
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor
    from crypten.mpc.primitives.beaver import IgnoreEncodings
    if crypten.cfg.mpc.active_security:  # CrypTen's triple check is part of its own protocol
        return _CRYPTEN_BEAVER['__beaver_protocol'](op, x, y, *args, **kwargs)
    if x.device != y.device:
        raise ValueError(f'x lives on device {x.device} but y on device {y.device}')
    provider = crypten.mpc.get_default_provider()
    product = getattr(torch, op)
    session_mask = getattr(y, 'session_mask', None)
    if session_mask is not None and op == 'matmul' and not args and not kwargs:  # a weight masked once (mask_weights)
        key, b_tensor, delta = session_mask
        a, c = provider.generate_fixed_triple(key, x.size(), y.size(), op, device=x.device)
        with IgnoreEncodings([a, x]):
            epsilon = (x - a).reveal()
    else:
        a, b, c = provider.generate_additive_triple(x.size(), y.size(), op, device=x.device, *args, **kwargs)
        with IgnoreEncodings([a, b, x, y]):
            epsilon, delta = ArithmeticSharedTensor.reveal_batch([x - a, y - b])
        b_tensor = b._tensor
    b_share = b_tensor + delta if comm.get().get_rank() == 0 else b_tensor
    c._tensor += product(epsilon, b_share, *args, **kwargs)
    c._tensor += product(a._tensor, delta, *args, **kwargs)
    return c


_CRYPTEN_BEAVER: Dict[str, Any] = {}


def use_fused_beaver(on: bool) -> None:
    """Run Beaver products with two local products (:func:`_fused_beaver`) or CrypTen's own three."""
    import crypten.mpc.primitives.beaver as beaver
    name = '__beaver_protocol'  # a module-level function: CrypTen's mul, matmul and convolutions look it up by name
    _CRYPTEN_BEAVER.setdefault(name, getattr(beaver, name))
    setattr(beaver, name, _fused_beaver if on else _CRYPTEN_BEAVER[name])


def start_crypten(crypten: Any, links: Links, world_size: int, on_links: Callable[[], None]) -> None:
    """``crypten.init()`` for ``world_size`` parties (the dealer, where CrypTen's provider needs one, is the next
    rank) on ``links`` (:class:`.communicator.LinkCommunicator`), with ``on_links()`` run once the
    communicator is up and before the parties' generator seeds cross it (each party's to the next, and the dealer's
    to each party): CrypTen's own init has no such point."""
    from .communicator import LinkCommunicator
    comm = LinkCommunicator.start(links, world_size, init_ttp=crypten.mpc.ttp_required())
    on_links()
    if comm.get_rank() < comm.get_world_size():  # the dealer's seeds come to it
        crypten._setup_prng()
        if crypten.mpc.ttp_required():
            crypten.mpc.provider.ttp_provider.TTPClient._init()


def apply_settings(settings: Any, crypten: Any) -> None:
    """Write ``settings`` (a :class:`~timm_mpc.secure.settings.SecureSettings`) into ``crypten.cfg``, before
    ``crypten.init()`` for the provider."""
    cfg = crypten.cfg
    cfg.encoder.precision_bits = settings.precision_bits
    cfg.functions.exp_iterations = settings.exp_iterations
    cfg.functions.reciprocal_nr_iters = settings.reciprocal_nr_iters
    cfg.functions.sqrt_nr_iters = settings.sqrt_nr_iters
    cfg.functions.max_method = settings.max_method
    cfg.functions.erf_iterations = settings.erf_iterations
    cfg.mpc.provider = 'TTP' if settings.dealer else 'TFP'
    cfg.communicator.verbose = True  # count rounds and bytes
    use_fused_beaver(settings.fused_beaver)
    use_fss_comparisons(settings.fss_comparisons)


def init_local(rank: int, world_size: int, rendezvous: str, settings: Any,
               modules: Sequence[str]) -> Tuple[Any, SecureSettings]:
    """In a process of :func:`~timm_mpc.secure.processes.run_local`: CrypTen initialized as party ``rank`` of ``world_size`` with the
    settings, the owner-as-dealer provider (no third process: these runs compute nothing secret), and the
    parent's attention kinds; they meet at ``rendezvous`` (``tcp://127.0.0.1:PORT``) over plaintext loopback links."""
    torch.set_num_threads(1)
    import_kind_modules(modules)
    crypten = import_crypten()
    settings_ = SecureSettings.from_dict(settings)
    apply_settings(settings_, crypten)
    crypten.cfg.mpc.provider = 'TFP'
    owner = parse_address(rendezvous.split('://', 1)[-1], 'the rendezvous')
    links = connect_links(rank, world_size, owner, None, None, settings_.timeout_s)
    start_crypten(crypten, links, world_size, lambda: None)
    return crypten, settings_
