"""Modules whose pattern is state: tensors that always exist, so loading a checkpoint only fills them in."""
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

import torch

from .attn_kinds import PatternError

__all__ = ['PatternState', 'check_unit_interval', 'is_pattern_key', 'checkpoint_state', 'searched_tensors']


def check_unit_interval(name: str, value: torch.Tensor) -> None:
    """Raise a PatternError naming ``name`` unless every element of ``value`` lies in [0, 1]."""
    value = value.detach()
    if not torch.isfinite(value).all() or value.min() < 0 or value.max() > 1:
        raise PatternError(
            f'{name} must lie in [0, 1] (1 = keep the non-linear form, 0 = the linear form); '
            f'got values from {value.min().item():.4g} to {value.max().item():.4g}')


class PatternState:
    """A module whose head or GeLU pattern lives in the tensors named by ``pattern_keys`` (a buffer of codes
    and a buffer of searched values), allocated in ``__init__`` whatever the pattern.

    The searched values (α, β) are buffers, not parameters: a fixed pattern does not use them, and a model's
    parameters are the ones its forward pass trains (timm's tests and DDP require a gradient for each). In
    search mode they require a gradient, and the search gives them to its optimizer itself (see
    :func:`searched_tensors`).

    Loading a state dict copies into those tensors in place, like any weight, then calls ``refresh`` so the
    module regroups its forward pass. A checkpoint with neither (a plain timm one) leaves the pattern as it
    is; one that holds only one of the two (written before both always existed) gets the other from
    ``legacy_state``. Values are checked with ``check_state`` first, and a bad one is reported through
    ``load_state_dict``'s error list, naming the module.
    """
    pattern_keys: Tuple[str, str]
    attribute_name: str  # the module's usual name in its parent, e.g. 'heads': how its keys are recognised
    search_value: float  # the buffer's value for a searched head or token

    def check_state(self, state: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def legacy_state(self, present: str, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def refresh(self, codes: Optional[torch.Tensor] = None) -> None:
        """Regroup the forward pass from the codes buffer, or from ``codes``, the value just written to it (a
        buffer on the meta device holds no data to read back)."""
        raise NotImplementedError

    def train_searched(self, searching: bool) -> None:
        """The searched buffer requires a gradient exactly in search mode, and stays a leaf the optimizer holds."""
        getattr(self, self.pattern_keys[1]).detach_().requires_grad_(searching)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # a device or dtype move copies buffers through autograd: the searched one must come out a leaf again
        module = super()._apply(fn, recurse)  # type: ignore[misc]
        searched = getattr(self, self.pattern_keys[1])
        self.train_searched(searched.requires_grad)
        return module

    def unused_state(self) -> Tuple[str, ...]:
        """Pattern tensors the current pattern does not use, which a checkpoint need not hold."""
        raise NotImplementedError

    def enter_search(self, value: Any, per: str) -> None:
        """Search everywhere, starting from ``value`` (one value per ``per``, in [0, 1]), in place."""
        codes, searched = (getattr(self, key) for key in self.pattern_keys)
        value = torch.as_tensor(value, dtype=torch.float32, device='cpu')
        name = self.pattern_keys[1]
        if value.numel() != searched.numel():
            raise PatternError(f'{name} needs one value per {per} ({searched.numel()}); got shape {tuple(value.shape)}')
        check_unit_interval(name, value)
        with torch.no_grad():
            searched.copy_(value.reshape(searched.shape))
            codes.fill_(self.search_value)
        self.refresh(torch.full(codes.shape, self.search_value, dtype=codes.dtype, device='cpu'))

    def _load_from_state_dict(
            self,
            state_dict: Dict[str, Any],
            prefix: str,
            local_metadata: Dict[str, Any],
            strict: bool,
            missing_keys: List[str],
            unexpected_keys: List[str],
            error_msgs: List[str],
    ) -> None:
        keys = {name: prefix + name for name in self.pattern_keys}
        present = [name for name, key in keys.items() if key in state_dict]
        if present:
            state = {name: state_dict[keys[name]] for name in present}
            if len(present) == 1:
                (name,), (other,) = present, [n for n in self.pattern_keys if n not in present]
                state[other] = self.legacy_state(name, state[name])
            try:
                self.check_state(state)
            except (PatternError, RuntimeError) as e:
                where = prefix.rstrip('.') or type(self).__name__
                error_msgs.append(f'{where}: corrupt or mismatched pattern in checkpoint: {e}')
                return
            state_dict = dict(state_dict, **{keys[name]: value for name, value in state.items()})
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not present:
            missing_keys[:] = [k for k in missing_keys if k not in keys.values()]
        self.refresh()


def is_pattern_key(key: str) -> bool:
    """True for a state-dict key that holds a pattern (``...heads.kinds``, ``...mlp.gelu_tokens`` and their
    searched ``alpha`` / ``beta``) rather than a weight."""
    owner, _, name = key.rpartition('.')
    return any(owner.rpartition('.')[2] == cls.attribute_name and name in cls.pattern_keys
               for cls in PatternState.__subclasses__())


def checkpoint_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s state dict without the searched tensors its patterns do not use (α of fixed heads, β of fixed
    MLPs): what a published checkpoint holds, loadable strictly (see :class:`PatternState`)."""
    unused = {f'{name}.{key}' if name else key for name, m in model.named_modules() if isinstance(m, PatternState)
              for key in m.unused_state()}
    return {k: v for k, v in model.state_dict().items() if k not in unused}


def searched_tensors(model: nn.Module) -> List[torch.Tensor]:
    """The α and β buffers of ``model``'s search-mode heads and MLPs: what a search optimizes beside the weights."""
    return [getattr(m, m.pattern_keys[1]) for m in model.modules()
            if isinstance(m, PatternState) and getattr(m, m.pattern_keys[1]).requires_grad]
