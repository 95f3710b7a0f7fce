"""Measured cost of a secure computation: rounds, bytes and time per layer and operator, and latency
estimated for a network setting as ``compute + rounds × RTT + bytes / bandwidth``.

The dealer's cost (the multiplication triples, an offline phase that CrypTen runs on demand) is kept
apart from the two parties': its traffic is not in the rows, and the time the owner waited for it is
taken out of the compute time of the latency estimates.
"""
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ['NetworkSetting', 'NETWORKS', 'CostRow', 'CostProfile', 'CostMeter']


@dataclass(frozen=True)
class NetworkSetting:
    """A network between the two parties: round-trip time and bandwidth."""
    name: str
    rtt_s: float
    bandwidth_bps: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f'network {self.name}: round-trip time {self.rtt_s * 1e3:g} ms; accepted: 0 ms or more')
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f'network {self.name}: bandwidth {self.bandwidth_bps / 1e6:g} Mbit/s; accepted: more '
                             f'than 0')

    def latency(self, compute_s: float, rounds: int, bytes_sent: float) -> float:
        """``compute + rounds × RTT + bytes / bandwidth`` in seconds."""
        return compute_s + rounds * self.rtt_s + bytes_sent * 8 / self.bandwidth_bps


NETWORKS: Dict[str, NetworkSetting] = {
    # LAN as in Cheetah and BOLT; WAN at the low-bandwidth, high-latency end of the literature's settings
    'lan': NetworkSetting('lan', rtt_s=0.8e-3, bandwidth_bps=3e9),
    'wan': NetworkSetting('wan', rtt_s=80e-3, bandwidth_bps=100e6),
}


@dataclass
class CostRow:
    """Cost of one operator of one layer. ``bytes`` is what both parties sent, together; ``time_s`` the
    parties' time, without ``dealer_s``, the owner's waits for the dealer's triples in this operator."""
    layer: str
    op: str
    rounds: int
    bytes: float
    time_s: float
    dealer_s: float = 0.0


@dataclass
class CostProfile:
    """Cost rows of one secure inference, with totals and latency estimates.

    ``setup`` holds one-off work (sharing the weights) that is not part of an inference. ``dealer`` is the
    dealer's part: ``requests`` for triples, ``bytes`` exchanged with the owner, ``time_s`` the owner waited.
    """
    rows: List[CostRow] = field(default_factory=list)
    setup: List[CostRow] = field(default_factory=list)
    wall_s: float = 0.0
    dealer: Dict[str, float] = field(default_factory=lambda: dict(requests=0, bytes=0.0, time_s=0.0))

    @property
    def compute_s(self) -> float:
        """The parties' own time: the wall time less the owner's waits for the dealer's triples during the
        inference (with the offline phase, the triples were fetched before it, and there are none)."""
        return max(self.wall_s - sum(row.dealer_s for row in self.rows), 0.0)

    @property
    def rounds(self) -> int:
        return sum(r.rounds for r in self.rows)

    @property
    def bytes(self) -> float:
        return sum(r.bytes for r in self.rows)

    def latency(self, network: NetworkSetting) -> float:
        """Estimated latency of the inference's online phase (compute is :attr:`compute_s`)."""
        return network.latency(self.compute_s, self.rounds, self.bytes)

    def by(self, key: str) -> Dict[str, Dict[str, float]]:
        """Rounds, bytes and time summed by ``'layer'`` or ``'op'``, in first-seen order."""
        out: Dict[str, Dict[str, float]] = {}
        for row in self.rows:
            agg = out.setdefault(getattr(row, key), dict(rounds=0, bytes=0.0, time_s=0.0))
            agg['rounds'] += row.rounds
            agg['bytes'] += row.bytes
            agg['time_s'] += row.time_s
        return out

    def to_dict(self, networks: Optional[Dict[str, NetworkSetting]] = None) -> Dict[str, Any]:
        networks = networks or NETWORKS
        return dict(
            rounds=self.rounds, bytes=self.bytes, wall_s=self.wall_s, compute_s=self.compute_s, dealer=dict(self.dealer),
            latency_s={name: self.latency(n) for name, n in networks.items()},
            networks={name: asdict(n) for name, n in networks.items()},
            by_layer=self.by('layer'), by_op=self.by('op'),
            rows=[asdict(r) for r in self.rows], setup=[asdict(r) for r in self.setup])

    @classmethod
    def merge_parties(cls, own: 'CostProfile', other_bytes: List[float], other_setup_bytes: List[float],
                      dealer: Optional[Dict[str, float]] = None,
                      dealer_s: Optional[List[float]] = None) -> 'CostProfile':
        """One profile from this party's measured rows (rounds and times are this party's) and what the other
        sent: its bytes per row, and, from the owner, the dealer's cost and its waits for the dealer per row
        (None: there was no dealer), which are taken out of each row's time."""
        waits = dealer_s or [0.0] * len(own.rows)
        rows = [CostRow(r.layer, r.op, r.rounds, r.bytes + b, max(r.time_s - w, 0.0), w)
                for r, b, w in zip(own.rows, other_bytes, waits)]
        setup = [CostRow(r.layer, r.op, r.rounds, r.bytes + b, r.time_s) for r, b in zip(own.setup, other_setup_bytes)]
        return cls(rows, setup, own.wall_s, **({} if dealer is None else dict(dealer=dict(dealer))))


class CostMeter:
    """Records CrypTen's communication counters around each operator of a secure computation, and, given the
    owner's dealer tally (``requests``, ``bytes``, ``time_s``), its waits for the dealer in each operator."""

    def __init__(self, communicator: Any, dealer: Optional[Dict[str, float]] = None) -> None:
        self.comm = communicator
        self.dealer = dealer
        self.profile = CostProfile()
        self._setup = False

    def _stats(self) -> Tuple[int, float]:
        stats = self.comm.get_communication_stats()
        return int(stats['rounds']), float(stats['bytes'])

    @contextmanager
    def section(self, layer: str, op: str) -> Iterator[None]:
        """Charge everything done inside the block to ``(layer, op)``."""
        rounds0, bytes0 = self._stats()
        waited0 = self.dealer['time_s'] if self.dealer else 0.0
        t0 = time.perf_counter()
        yield
        rounds1, bytes1 = self._stats()  # first: an engine that runs a section's program when asked (SPU) runs it here
        elapsed = time.perf_counter() - t0
        waited = (self.dealer['time_s'] if self.dealer else 0.0) - waited0
        row = CostRow(layer, op, rounds1 - rounds0, bytes1 - bytes0, elapsed, waited)  # wall time until merged
        (self.profile.setup if self._setup else self.profile.rows).append(row)

    @contextmanager
    def setup_phase(self) -> Iterator[None]:
        """Sections inside this block are one-off setup, not inference."""
        self._setup = True
        try:
            yield
        finally:
            self._setup = False

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Time the whole inference (the profile's ``wall_s``)."""
        t0 = time.perf_counter()
        yield
        self.profile.wall_s = time.perf_counter() - t0
