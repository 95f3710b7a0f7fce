"""Modules whose fixed or search form is part of their state, so the form travels with a checkpoint."""
from typing import Any, Dict, List

import torch

__all__ = ['StateModeMixin']


class StateModeMixin:
    """A module with a fixed form (a buffer named ``fixed_key``) and a search form (a parameter named
    ``search_key``): loading a state dict switches to the form the state holds, and a state with
    neither key (a plain timm one) leaves the module as it is.

    Subclasses implement ``_load_fixed`` and ``_load_search``, which validate and raise ValueError.
    """
    fixed_key: str
    search_key: str
    state_name: str

    def _load_fixed(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def _load_search(self, value: torch.Tensor) -> None:
        raise NotImplementedError

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
        keys = (prefix + self.fixed_key, prefix + self.search_key)
        fixed, search = (state_dict.get(k) for k in keys)
        try:
            if fixed is not None:
                self._load_fixed(fixed)
            elif search is not None:
                self._load_search(search)
        except (ValueError, RuntimeError) as e:
            where = prefix.rstrip('.') or type(self).__name__
            error_msgs.append(f'{where}: corrupt or mismatched {self.state_name} in checkpoint: {e}')
            return
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in keys:
            if key in missing_keys and key not in state_dict:
                missing_keys.remove(key)
