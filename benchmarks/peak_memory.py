"""The peak resident memory of a process tree, sampled from Linux's /proc (shared by the benchmarks)."""
import os
import threading
from pathlib import Path

__all__ = ['tree_rss', 'PeakMemory']


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
    """The largest resident memory of this process (unless ``include_self`` is False) and its descendants while
    the block runs, sampled every 0.2 s."""

    def __init__(self, include_self: bool = True) -> None:
        self.include_self = include_self

    def __enter__(self) -> 'PeakMemory':
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(os.getpid(), self.include_self))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
