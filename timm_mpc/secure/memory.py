"""The memory of a local secure run, predicted before its processes start: a bound (``max_memory``), the batch
size that fits it, and a clear error when none does.

The prediction of a batch comes from the engine's dry runs (CrypTen's: :func:`~.crypten.dry_run.predicted_peak`);
here, the bound, the line through two small batches and the search for the batch that fits, and the measured
memory of a process tree (:func:`tree_rss`, what a service's bound holds). ``benchmarks/secure_memory.py`` compares
the prediction with the measured peak.
"""
import os
import re
import threading
from pathlib import Path
from typing import Callable, Optional, Union


__all__ = ['parse_memory', 'available_memory', 'line_peak', 'fit_batch_size', 'MemoryBoundError', 'format_bytes',
           'tree_rss', 'PeakMemory']

_UNITS = {'': 1, 'b': 1, 'k': 10 ** 3, 'kb': 10 ** 3, 'kib': 2 ** 10, 'm': 10 ** 6, 'mb': 10 ** 6, 'mib': 2 ** 20,
          'g': 10 ** 9, 'gb': 10 ** 9, 'gib': 2 ** 30, 't': 10 ** 12, 'tb': 10 ** 12, 'tib': 2 ** 40}


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


def line_peak(peak_of: Callable[[int], int], batch: int) -> int:
    """The peak at ``batch`` images on the line through ``peak_of(1)`` and ``peak_of(2)`` (two small dry runs), so
    that a batch that cannot fit is refused before a dry run of its own size."""
    one = peak_of(1)
    return one if batch == 1 else one + max(peak_of(2) - one, 0) * (batch - 1)


def fit_batch_size(peak_of: Callable[[int], int], count: int, max_memory: int) -> int:
    """The largest batch size, at most ``count``, whose predicted peak fits ``max_memory``.

    ``peak_of(batch)`` is the predicted peak of a batch size, from its dry run (cached). The peak grows linearly with the batch: the dry
    runs of 1 and 2 images give the line, and the batch it chooses is dry-run too and checked (smaller, by the line
    through its own figure, until it fits).

    Raises:
        MemoryBoundError: not even one image fits (the message gives the predicted figure).
    """
    one = peak_of(1)
    if one > max_memory:
        raise MemoryBoundError(
            f'one image needs about {format_bytes(one)} of memory (owner, client and dealer processes together), '
            f'more than the bound of {format_bytes(max_memory)}: raise max_memory (--max-memory) or run the parties '
            f'on two hosts (timm-mpc party)')
    if count == 1:
        return 1
    per_image = max(peak_of(2) - one, 1)
    batch = int(min(count, 1 + (max_memory - one) // per_image))
    while batch > 1:
        peak = peak_of(batch)
        if peak <= max_memory:
            break
        per_image = max((peak - one) / (batch - 1), 1)  # the line measured at this batch
        batch = int(min(batch - 1, 1 + (max_memory - one) // per_image))
    return batch


def tree_rss(root: int, include_root: bool = True) -> int:
    """Resident bytes of ``root`` (unless ``include_root`` is False) and every process below it."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path(f'/proc/{entry}/stat').read_text()
                parents[int(entry)] = int(stat.rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    if not include_root:
        tree.discard(root)
    total = 0
    for pid in tree:
        try:
            for line in Path(f'/proc/{pid}/status').read_text().splitlines():
                if line.startswith('VmRSS:'):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """The largest resident memory of process ``root`` (default: this one; itself unless ``include_self`` is False)
    and every process below it while the block runs, sampled every 0.2 s: ``peak`` (bytes)."""

    def __init__(self, include_self: bool = True, root: Optional[int] = None) -> None:
        self.include_self, self.root = include_self, root

    def __enter__(self) -> 'PeakMemory':
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(self.root or os.getpid(), self.include_self))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
