"""The table of MPC engines that run a secure plan: one :class:`Engine` record each.

Adding an engine is one record and one module with ``run_owner(rendezvous, plan, state_dict, settings, ...)`` and
``run_client(rendezvous, images, settings, ...)`` (the signatures of :mod:`.crypten.party`), in a subpackage of its
own beside :mod:`.crypten` and :mod:`.spu`: ``secure_predict``, the CLI and
the benchmarks choose it by name. Its tensors need the methods the plan's forward uses (see
:class:`~timm_mpc.secure.secure_vit.Backend`).

| engine  | protocols        | multiplication triples / correlations                               |
|---------|------------------|----------------------------------------------------------------------|
| crypten | beaver           | a dealer process that is neither party (``provider='TTP'``)          |
| spu     | cheetah, semi2k  | cheetah: OT and HE between the two parties (no dealer); semi2k: the  |
|         |                  | owner deals (SPU 0.9.5 ships no third-party dealer): cost only       |
"""
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, Tuple

__all__ = ['Engine', 'ENGINES', 'get_engine', 'exit_after_failure', 'DEFAULT_ENGINE']

DEFAULT_ENGINE = 'crypten'


@dataclass(frozen=True)
class Engine:
    """One MPC engine.

    Attributes:
        name: What ``engine=`` and ``--engine`` take.
        title: Its name in tables.
        module: The module with its ``run_owner`` and ``run_client``.
        protocols: Its protocols, the default (and recommended) first.
        insecure_protocols: Protocols in which one party deals the other's correlations, so it can open the other's
            data: they measure cost only (runs warn, ``timm-mpc party`` refuses them).
        dealer: Whether the secure protocol needs a dealer process besides the two parties.
        dry_run: The module whose ``dry_run(plan, settings, batch)`` predicts its cost and memory (CrypTen's
            computation on zeros, :mod:`.crypten.dry_run`), or '' for none.
        sessions: Whether its parties serve a :class:`~.session.SecureSession`'s calls (``run_owner`` and
            ``run_client`` take a ``session`` link).
        requires: The module it imports and how to install it: ``(module, install line)``.
    """
    name: str
    title: str
    module: str
    protocols: Tuple[str, ...]
    insecure_protocols: Tuple[str, ...] = ()
    dealer: bool = False
    dry_run: str = ''
    sessions: bool = False
    requires: Tuple[str, str] = ()

    def check_installed(self) -> None:
        """Raise ImportError, saying how to install it, when the engine's package is missing."""
        if self.requires and importlib.util.find_spec(self.requires[0]) is None:
            raise ImportError(f'the {self.title} engine needs the {self.requires[0]!r} package: {self.requires[1]}')

    def load(self) -> ModuleType:
        """The module with the engine's ``run_owner`` and ``run_client`` (ImportError naming the install line when
        the engine's package is missing)."""
        self.check_installed()
        return importlib.import_module(self.module)

    def run_dry(self, plan: Any, settings: Any, batch: int) -> Any:
        """The engine's dry run of ``batch`` images (cached): its rounds, bytes and each process's peak memory."""
        return importlib.import_module(self.dry_run).dry_run(plan, settings, batch)


ENGINES: Dict[str, Engine] = {e.name: e for e in (
    Engine('crypten', 'CrypTen', 'timm_mpc.secure.crypten.party', ('beaver',), dealer=True,
           dry_run='timm_mpc.secure.crypten.dry_run', sessions=True),
    Engine('spu', 'SPU', 'timm_mpc.secure.spu.party', ('cheetah', 'semi2k'), insecure_protocols=('semi2k',),
           requires=('spu', 'pip install -e ".[spu]" (spu 0.9.5, jax 0.4.34)')),
)}


def exit_after_failure(code: int) -> None:
    """End the process now, with ``code``, if a loaded engine left state that tearing the process down would crash
    on (an engine module's ``exit_if_links_abandoned``: SPU 0.9.5's links to a dead peer)."""
    for engine in ENGINES.values():
        hook = getattr(sys.modules.get(engine.module), 'exit_if_links_abandoned', None)
        if hook is not None:
            hook(code)


def get_engine(name: str) -> Engine:
    """The engine called ``name``.

    Raises:
        ValueError: no such engine.
    """
    if name not in ENGINES:
        raise ValueError(f'unknown MPC engine {name!r}; accepted: {list(ENGINES)}')
    return ENGINES[name]
