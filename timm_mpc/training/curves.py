"""Learning curves from runs' ``run.json`` files: test top-1 and training loss per epoch, one line per run, a PNG."""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..utils import import_extra

__all__ = ['load_histories', 'plot_curves']


def load_histories(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """Per run (a ``run.json`` or a folder holding one): its name, mode and per-epoch history.

    Raises:
        ValueError: a file that is not a run's record, or a run without a finished epoch.
    """
    runs = []
    for p in paths:
        path = Path(p) / 'run.json' if Path(p).is_dir() else Path(p)
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'cannot read the run record {path}: {e}') from None
        history = run.get('history') if isinstance(run, dict) else None
        if not history:
            raise ValueError(f'{path}: no finished epoch (a run.json with a non-empty history is accepted)')
        runs.append(dict(name=path.parent.name, mode=run.get('mode'), history=history))
    return runs


def plot_curves(runs: List[Dict[str, Any]], out: str, title: str = 'Learning curves') -> None:
    """Two panels: test top-1 and training loss against the epoch, one line per run."""
    matplotlib = import_extra('matplotlib', 'plotting')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in runs:
        epochs = [h['epoch'] for h in run['history']]
        acc.plot(epochs, [h['test_top1'] for h in run['history']], marker='.', label=f'{run["name"]} ({run["mode"]})')
        loss.plot(epochs, [h['train_loss'] for h in run['history']], marker='.', label=run['name'])
    for ax, label in ((acc, 'test top-1 (%)'), (loss, 'training loss')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
