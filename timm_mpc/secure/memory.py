"""The memory of a local secure run, predicted before its processes start: a bound (``max_memory``), the batch
size that fits it, and a clear error when none does.

The prediction adds up the processes :func:`~.launch.secure_predict` starts, from the dry runs (:mod:`.dry_run`):
each party's measured peak, the owner's buffer of the dealer's answers and the dealer's own process (a base process
and the answer it is building, at most :data:`~.offline.CHUNK_BYTES`, several times over while it is generated).
``benchmarks/secure_memory.py`` compares it with the measured peak.
"""
import re
from typing import Callable, Optional, Union

from .dry_run import DryRun
from .offline import CHUNK_BYTES

__all__ = ['parse_memory', 'available_memory', 'predicted_peak', 'fit_batch_size', 'MemoryBoundError',
           'format_bytes']

_UNITS = {'': 1, 'b': 1, 'k': 10 ** 3, 'kb': 10 ** 3, 'kib': 2 ** 10, 'm': 10 ** 6, 'mb': 10 ** 6, 'mib': 2 ** 20,
          'g': 10 ** 9, 'gb': 10 ** 9, 'gib': 2 ** 30, 't': 10 ** 12, 'tb': 10 ** 12, 'tib': 2 ** 40}
DEALER_ANSWER_COPIES = 3  # the dealer's answer while it is generated: the pieces, their concatenation, its send buffer
OWNER_ANSWER_COPIES = 2  # the owner's received answer and the shares it is turned into


class MemoryBoundError(ValueError):
    """A secure run would not fit the memory bound; nothing was started."""


def parse_memory(value: Union[int, str]) -> int:
    """Bytes from a whole number of bytes or a string like ``'6GiB'``, ``'6GB'``, ``'6G'`` or ``'512MiB'``.

    Raises:
        ValueError: naming the value and what is accepted.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', value) if isinstance(value, str) else None
    if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f'memory bound {value!r} is not a size; accepted: a positive number of bytes, or a number with '
                     f'a unit such as 6GiB, 6GB, 6G, 512MiB ({", ".join(u for u in _UNITS if u)}, any case)')


def format_bytes(value: float) -> str:
    return f'{value / 2 ** 30:.2f} GiB'


def available_memory() -> Optional[int]:
    """The machine's available memory (``MemAvailable`` of /proc/meminfo), or None where it cannot be read."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predicted_peak(dry: DryRun, dealer: bool) -> int:
    """Predicted peak resident memory of the processes of a local run of ``dry``'s batch together: owner, client
    and, with ``dealer``, the dealer process and the owner's buffer of its answers."""
    peak = dry.peak_rss[0] + dry.peak_rss[1]
    if dealer:
        answer = min(dry.dealer_bytes, CHUNK_BYTES)
        peak += dry.base_rss[1] + DEALER_ANSWER_COPIES * answer + OWNER_ANSWER_COPIES * answer
    return peak


def line_peak(peak_of: Callable[[int], int], batch: int) -> int:
    """The peak at ``batch`` images on the line through ``peak_of(1)`` and ``peak_of(2)`` (two small dry runs), so
    that a batch that cannot fit is refused before a dry run of its own size."""
    one = peak_of(1)
    return one if batch == 1 else one + max(peak_of(2) - one, 0) * (batch - 1)


def fit_batch_size(measure: Callable[[int], DryRun], count: int, max_memory: int, dealer: bool) -> int:
    """The largest batch size, at most ``count``, whose predicted peak fits ``max_memory``.

    ``measure(batch)`` is the dry run of a batch size (cached). The peak grows linearly with the batch: the dry
    runs of 1 and 2 images give the line, and the batch it chooses is dry-run too and checked (smaller, by the line
    through its own figure, until it fits).

    Raises:
        MemoryBoundError: not even one image fits (the message gives the predicted figure).
    """
    one = predicted_peak(measure(1), dealer)
    if one > max_memory:
        raise MemoryBoundError(
            f'one image needs about {format_bytes(one)} of memory (owner, client and dealer processes together), '
            f'more than the bound of {format_bytes(max_memory)}: raise max_memory (--max-memory) or run the parties '
            f'on two hosts (timm-mpc party)')
    if count == 1:
        return 1
    per_image = max(predicted_peak(measure(2), dealer) - one, 1)
    batch = int(min(count, 1 + (max_memory - one) // per_image))
    while batch > 1:
        peak = predicted_peak(measure(batch), dealer)
        if peak <= max_memory:
            break
        per_image = max((peak - one) / (batch - 1), 1)  # the line measured at this batch
        batch = int(min(batch - 1, 1 + (max_memory - one) // per_image))
    return batch
