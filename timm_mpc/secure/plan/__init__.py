"""The plan both parties run: its typed, versioned schema (:mod:`.schema`) and its builders (:mod:`.build`)."""
from .build import build_plan, build_secure_plan, logit_bound, normalization, public_schedules
from .schema import (
    MLP_KINDS, PLAN_VERSION, AttentionSpec, BlockSpec, InputRangeError, MergeSpec, MlpSpec, NormSpec, PlanError,
    Schedule, SecurePlan, UnsupportedModelError, WindowSpec, check_image_tensor, check_images, swin_windows,
)

__all__ = [
    'SecurePlan', 'BlockSpec', 'AttentionSpec', 'MlpSpec', 'MLP_KINDS', 'NormSpec', 'Schedule', 'WindowSpec',
    'MergeSpec', 'swin_windows', 'PlanError', 'UnsupportedModelError', 'InputRangeError', 'build_plan',
    'build_secure_plan', 'check_image_tensor', 'check_images', 'normalization', 'public_schedules', 'logit_bound',
    'PLAN_VERSION',
]
