"""The one place where timm-mpc imports CrypTen, and the one shim it needs on current PyTorch.

CrypTen 0.4.1 (its last release) imports ``torch.onnx._internal.registration`` at import time for its
ONNX converter, and that module no longer exists in current PyTorch, so ``import crypten`` fails.
timm-mpc never uses the ONNX converter (it builds secure models from modules), so a stand-in module
with an empty ``registry`` is registered under that name before the import. Nothing installed is edited,
and the stand-in is only added when the real module is missing.
"""
import importlib
import importlib.util
import sys
import types
from datetime import timedelta
from typing import Any

__all__ = ['import_crypten', 'set_process_group_timeout']

_ONNX_REGISTRATION = 'torch.onnx._internal.registration'


def _real_module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def import_crypten() -> Any:
    """Import and return ``crypten``, first adding the ONNX stand-in if this PyTorch lacks the module."""
    if 'crypten' in sys.modules:
        return sys.modules['crypten']
    if _ONNX_REGISTRATION not in sys.modules and not _real_module_exists(_ONNX_REGISTRATION):
        stand_in = types.ModuleType(_ONNX_REGISTRATION, 'timm-mpc stand-in: CrypTen\'s ONNX converter is not used')
        stand_in.registry = None
        sys.modules[_ONNX_REGISTRATION] = stand_in
    return importlib.import_module('crypten')


def set_process_group_timeout(seconds: float) -> None:
    """Bound every torch.distributed wait (rendezvous and collectives) of this process to ``seconds``.

    CrypTen creates its process groups without a timeout argument, so they take torch's default (30
    minutes for gloo); the default is read when a group is created, so setting it before
    ``crypten.init()`` makes a dead or absent peer an error after ``seconds`` rather than a hang.
    """
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timedelta(seconds=seconds)
