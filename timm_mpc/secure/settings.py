"""Fixed-point and approximation settings of the secure computation, applied to CrypTen's config."""
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict

__all__ = ['SecureSettings', 'PROVIDERS', 'GELU_METHODS']

PROVIDERS = ('TFP', 'TTP')
"""Where Beaver multiplication triples come from: CrypTen's trusted first party, or a third process."""

GELU_METHODS = ('exp_fit', 'erf')
"""Secure exact-GeLU algorithms: ``exp_fit`` (ReLU minus a fitted Gaussian tail) or CrypTen's Taylor ``erf``."""


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
        gelu: Secure exact-GeLU algorithm, one of :data:`GELU_METHODS`.
        gelu_exp_iterations: Squarings of the exp inside ``exp_fit`` GeLU.
        erf_iterations: Taylor terms of ``erf`` GeLU (CrypTen default 8).
        range_scaling: Scale the inputs of inverse square root and reciprocal by public powers of 4 chosen
            from the plan's calibrated ranges, and run only the Newton iterations that range needs; off, every
            call runs ``sqrt_nr_iters`` / ``reciprocal_nr_iters`` iterations on unscaled inputs (CrypTen).
        batch_independent: Merge independent multiplications into one round where the algorithm allows.
        provider: Source of multiplication triples, one of :data:`PROVIDERS`.
        timeout_s: Bound on any wait for the other party (rendezvous included), in seconds.
    """
    precision_bits: int = 16
    exp_iterations: int = 8
    reciprocal_nr_iters: int = 10
    sqrt_nr_iters: int = 3
    max_method: str = 'log_reduction'
    gelu: str = 'exp_fit'
    gelu_exp_iterations: int = 8
    erf_iterations: int = 8
    range_scaling: bool = True
    batch_independent: bool = True
    provider: str = 'TFP'
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f'unknown provider {self.provider!r}; accepted: {list(PROVIDERS)}')
        if self.gelu not in GELU_METHODS:
            raise ValueError(f'unknown gelu method {self.gelu!r}; accepted: {list(GELU_METHODS)}')
        if self.timeout_s <= 0:
            raise ValueError(f'timeout_s must be positive, got {self.timeout_s}')

    @classmethod
    def crypten_defaults(cls, **overrides: Any) -> 'SecureSettings':
        """CrypTen's default approximations (erf GeLU, no merged rounds)."""
        return cls(**{**dict(gelu='erf', range_scaling=False, batch_independent=False), **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> 'SecureSettings':
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f'unknown secure settings {sorted(unknown)}; accepted: {sorted(known)}')
        return cls(**values)

    def apply(self, crypten: Any) -> None:
        """Write these settings into ``crypten.cfg`` (before ``crypten.init()`` for the provider)."""
        cfg = crypten.cfg
        cfg.encoder.precision_bits = self.precision_bits
        cfg.functions.exp_iterations = self.exp_iterations
        cfg.functions.reciprocal_nr_iters = self.reciprocal_nr_iters
        cfg.functions.sqrt_nr_iters = self.sqrt_nr_iters
        cfg.functions.max_method = self.max_method
        cfg.functions.erf_iterations = self.erf_iterations
        cfg.mpc.provider = self.provider
        cfg.communicator.verbose = True  # count rounds and bytes
