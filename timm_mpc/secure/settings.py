"""The engine, protocol, fixed-point and approximation settings of the secure computation (CrypTen's applied to its
config)."""
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional

from .engines import DEFAULT_ENGINE, get_engine

__all__ = ['SecureSettings', 'PROVIDERS', 'GELU_METHODS', 'INV_SQRT_METHODS', 'InsecureSettingWarning', 'INSECURE_PROVIDER']

INSECURE_PROVIDER = 'TFP_INSECURE'
PROVIDERS = ('TTP', INSECURE_PROVIDER)
"""Where Beaver multiplication triples come from: ``TTP``, a dealer process that is neither party (the
default), or ``TFP_INSECURE``, CrypTen's trusted first party: the model owner deals its own triples and so
can open every value the client shares (benchmarks of the protocol's cost only)."""


class InsecureSettingWarning(UserWarning):
    """A secure computation runs in a setting that gives the model owner the client's data."""


warnings.simplefilter('always', InsecureSettingWarning)  # on every run, not once per session

GELU_METHODS = ('exp_fit', 'erf', 'spline')
"""Secure exact-GeLU algorithms: ``exp_fit`` (ReLU minus a fitted Gaussian tail), CrypTen's Taylor ``erf``, or
``spline`` (a piecewise cubic whose interval comes from comparisons by the dealer's keys: needs ``fss_comparisons``)."""

INV_SQRT_METHODS = ('cubic', 'crypten')
"""First guess of LayerNorm's inverse square root: a fitted cubic (2 rounds, and Newton iterations of 2 rounds) or
CrypTen's exp-based one (8 rounds, and iterations of 3)."""


@dataclass
class SecureSettings:
    """How the secure computation approximates what it cannot compute exactly.

    The defaults are timm-mpc's tuned settings; :meth:`crypten_defaults` gives CrypTen's own, for
    comparison. Every party must use the same settings.

    Attributes:
        precision_bits: Fractional bits of the fixed-point encoding (CrypTen default 16).
        exp_iterations: Squarings in the limit approximation of exp (CrypTen default 8).
        reciprocal_nr_iters: Newton iterations of the reciprocal (CrypTen default 10).
        sqrt_nr_iters: Newton iterations of the inverse square root in LayerNorm (CrypTen default 3).
        max_method: CrypTen's algorithm for the Softmax row maximum.
        inv_sqrt: LayerNorm's inverse square root, one of :data:`INV_SQRT_METHODS`.
        gelu: Secure exact-GeLU algorithm, one of :data:`GELU_METHODS` (None: ``spline`` with ``fss_comparisons``,
            else ``exp_fit``).
        gelu_exp_iterations: Squarings of the exp inside ``exp_fit`` GeLU.
        erf_iterations: Taylor terms of ``erf`` GeLU (CrypTen default 8).
        range_scaling: Scale the inputs of inverse square root and reciprocal by public powers of 4 chosen
            from the plan's calibrated ranges, and run only the Newton iterations that range needs; off, every
            call runs ``sqrt_nr_iters`` / ``reciprocal_nr_iters`` iterations on unscaled inputs (CrypTen).
        batch_independent: Merge independent multiplications into one round where the algorithm allows.
        range_margin: Headroom of the Newton schedules beyond the ranges calibrated on the owner's images:
            they cover ``[low / margin, high * margin]``, since the client's images are not the owner's.
        provider: Source of multiplication triples, one of :data:`PROVIDERS`.
        timeout_s: Bound on any wait for the other party (rendezvous included), in seconds.
        offline_phase: The owner fetches the dealer's triples for a whole inference before the images are
            shared, in a few large batches, and the client checks first that they are the ones its plan makes;
            False (cost comparisons only, insecure: it warns) asks for one triple at a time during the inference.
        fused_beaver: Beaver products with two local products per party instead of CrypTen's three (the same
            shares; see :func:`timm_mpc.secure.crypten.compat.use_fused_beaver`).
        weight_masks: The owner's weights are masked once per session (CrypTen): when they are shared, the dealer
            deals a mask ``B`` for each linear layer's weight ``W`` alone and ``δ = W − B`` is opened once; every
            product with ``W`` then opens only its activations (``ε = X − A`` with a fresh ``A``, the dealer dealing
            ``A·B``). The same shares of the product; what a call sends shrinks by the weights' size. None (the
            default): on with CrypTen.
        fss_comparisons: Comparisons (CrypTen) by the dealer's keys of a distributed comparison function: each opens
            one masked value and costs one round, instead of CrypTen's conversion to binary shares and 64-bit adder
            (about a dozen rounds and 930 bytes per element); exact on the whole ring, the same results
            (:mod:`timm_mpc.secure.crypten.comparison`). The dealer then sends both parties about 1.5 kB of keys per
            compared element, before the images are shared. None (the default): on with CrypTen and its offline
            phase.
        truncation_retries: How often ``secure_predict`` runs an image again whose logits leave the plan's
            public bound, the mark of a failed two-party truncation (see :mod:`timm_mpc.secure.crypten.truncation`).
        engine: The MPC engine, a name in :data:`~timm_mpc.secure.engines.ENGINES`. The approximation settings
            above are CrypTen's; SPU uses its own (exp, reciprocal, inverse square root, erf GeLU) at its default
            18 fractional bits, with the plan's calibrated LayerNorm scales.
        protocol: The engine's protocol (None: its default, the first of its ``protocols``).
    """
    precision_bits: int = 16
    exp_iterations: int = 8
    reciprocal_nr_iters: int = 10
    sqrt_nr_iters: int = 3
    max_method: str = 'log_reduction'
    inv_sqrt: str = 'cubic'
    gelu: Optional[str] = None
    gelu_exp_iterations: int = 8
    erf_iterations: int = 8
    range_scaling: bool = True
    batch_independent: bool = True
    range_margin: float = 4.0
    provider: str = 'TTP'
    timeout_s: float = 120.0
    offline_phase: bool = True
    fused_beaver: bool = True
    weight_masks: Optional[bool] = None
    fss_comparisons: Optional[bool] = None
    truncation_retries: int = 2
    engine: str = DEFAULT_ENGINE
    protocol: Optional[str] = None

    def __post_init__(self) -> None:
        engine = get_engine(self.engine)
        # the new online protocol wherever it applies (a setting given explicitly is kept, and checked below)
        for name, value in self._protocol_defaults().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.protocol is None:
            self.protocol = engine.protocols[0]
        if self.protocol not in engine.protocols:
            raise ValueError(f'engine {self.engine!r} has no protocol {self.protocol!r}; accepted: {list(engine.protocols)}')
        if not engine.dealer and self.provider != 'TTP':
            raise ValueError(f'provider {self.provider!r} is CrypTen\'s; engine {self.engine!r} chooses by its protocol')
        if self.provider == 'TFP':
            raise ValueError(f"provider 'TFP' makes the model owner the dealer of its own multiplication triples, "
                             f"which lets it open the client's image; use 'TTP' (a dealer process outside both "
                             f"parties), or {INSECURE_PROVIDER!r} to measure the protocol's cost only")
        if self.provider not in PROVIDERS:
            raise ValueError(f'unknown provider {self.provider!r}; accepted: {list(PROVIDERS)}')
        if not self.range_margin >= 1:
            raise ValueError(f'range_margin must be at least 1, got {self.range_margin}')
        if self.inv_sqrt not in INV_SQRT_METHODS:
            raise ValueError(f'unknown inv_sqrt method {self.inv_sqrt!r}; accepted: {list(INV_SQRT_METHODS)}')
        if self.gelu not in GELU_METHODS:
            raise ValueError(f'unknown gelu method {self.gelu!r}; accepted: {list(GELU_METHODS)}')
        if not (isinstance(self.truncation_retries, int) and 0 <= self.truncation_retries <= 10):
            raise ValueError(f'truncation_retries must be a whole number from 0 to 10, got {self.truncation_retries!r}')
        if self.weight_masks and self.engine != 'crypten':
            raise ValueError(f'weight_masks is a setting of the CrypTen engine; engine {self.engine!r} shares its '
                             f'weights its own way')
        if self.gelu == 'spline' and not self.fss_comparisons:
            raise ValueError("gelu='spline' finds each input's interval by comparisons with the dealer's keys: it needs "
                             "fss_comparisons=True (CrypTen)")
        if self.fss_comparisons and (self.engine != 'crypten' or not self.offline_phase):
            raise ValueError('fss_comparisons is a setting of the CrypTen engine with its offline phase (the dealer '
                             f'deals the keys before the images are shared); got engine {self.engine!r}, '
                             f'offline_phase={self.offline_phase}')
        if not 0 < self.timeout_s <= 86400:
            raise ValueError(f'timeout_s must be a number of seconds in (0, 86400], got {self.timeout_s}')

    def _protocol_defaults(self) -> Dict[str, Any]:
        """What ``weight_masks``, ``fss_comparisons`` and ``gelu`` of None mean for this engine and offline phase."""
        crypten = self.engine == 'crypten'
        fss = self.fss_comparisons if self.fss_comparisons is not None else crypten and self.offline_phase
        return dict(weight_masks=crypten, fss_comparisons=fss, gelu='spline' if fss else 'exp_fit')

    def with_engine(self, engine: Optional[str] = None, protocol: Optional[str] = None) -> 'SecureSettings':
        """These settings on ``engine`` with ``protocol`` (None: the same engine and protocol, or the new engine's
        default protocol); settings that had their default for this engine get the new engine's."""
        if engine in (None, self.engine):
            return replace(self, protocol=protocol or self.protocol)
        defaults = {name: None for name, value in self._protocol_defaults().items() if getattr(self, name) == value}
        return replace(self, engine=engine, protocol=protocol, **defaults)

    @property
    def _owner_deals(self) -> bool:
        return self.provider == INSECURE_PROVIDER or self.protocol in get_engine(self.engine).insecure_protocols

    @property
    def secure(self) -> bool:
        """False for the settings that give the owner the client's data: the owner as dealer, or a dealer asked
        during the inference (``offline_phase=False``), whose requests the client cannot check in time."""
        return not self._owner_deals and not (self.dealer and not self.offline_phase)

    @property
    def dealer(self) -> bool:
        """Whether a dealer process outside both parties deals the multiplication triples."""
        return not self._owner_deals and get_engine(self.engine).dealer

    def describe_insecurity(self) -> str:
        if not self._owner_deals:
            return ('offline_phase=False: the owner asks the dealer for each triple after the client\'s images are '
                    'shared, so the client cannot check those requests first, and a deviating owner can ask for the '
                    'client\'s random draws and open its image and logits; use it to measure cost only, never on real '
                    'data')
        what = f'provider {INSECURE_PROVIDER}' if self.provider == INSECURE_PROVIDER else \
            f'{get_engine(self.engine).title} {self.protocol}'
        return (f'{what}: the model owner deals its own multiplication triples and can open the client\'s image and '
                f'logits; use it to measure cost only, never on real data')

    def warn_if_insecure(self) -> None:
        """Warn (on every run) that the settings are not private."""
        if not self.secure:
            warnings.warn(self.describe_insecurity(), InsecureSettingWarning, stacklevel=3)

    @classmethod
    def crypten_defaults(cls, **overrides: Any) -> 'SecureSettings':
        """CrypTen's default approximations and protocol (erf GeLU, no merged rounds, comparisons by binary
        shares, weights opened in every product)."""
        return cls(**{**dict(gelu='erf', inv_sqrt='crypten', range_scaling=False, batch_independent=False,
                               fused_beaver=False, weight_masks=False, fss_comparisons=False), **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> 'SecureSettings':
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f'unknown secure settings {sorted(unknown)}; accepted: {sorted(known)}')
        return cls(**values)
