"""Re-class a module without copying its weights, for in-place conversion."""
from typing import Type, TypeVar

from torch import nn

__all__ = ['rebase_module']

_M = TypeVar('_M', bound=nn.Module)


def rebase_module(module: nn.Module, cls: Type[_M]) -> _M:
    """A new instance of ``cls`` (a subclass of ``type(module)``) sharing all of ``module``'s state.

    Parameters, buffers and children are the same objects, so no weight is copied or changed;
    the registries that hold them are copied, so adding to the new module leaves the old one as it was.
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f'cannot rebase {type(module).__name__} as {cls.__name__}: not a subclass of it')
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in module.__dict__.items():
        if key.startswith('_') and isinstance(value, (dict, set)):
            value = type(value)(value)
        new.__dict__[key] = value
    return new
