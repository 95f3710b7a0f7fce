"""Two-party secure inference of timm ViTs with CrypTen.

Nothing here imports CrypTen until a secure computation runs; importing this package installs timm-mpc's changes
to CrypTen for this process: a later ``import crypten`` gets them, and a CrypTen imported before is patched
(:mod:`.crypten.compat`).
"""
from .calibration import FixedPointRangeError, calibrate
from .crypten.compat import install_import_hook
from .crypten.dry_run import DryRun, dry_run
from .errors import PeerError
from .launch import SecureInferenceError, SecureResult, secure_predict
from .links import LinkSecurity
from .memory import MemoryBoundError, parse_memory
from .own_process import run_client, run_dealer, run_owner
from .plan import (
    InputRangeError, PlanError, SecurePlan, UnsupportedModelError, build_plan, build_secure_plan, check_images,
)
from .protocol import PartyResult
from .serving import connect
from .session import SecureSession
from .settings import InsecureSettingWarning, SecureSettings

install_import_hook()  # before any party, dry run or user code imports CrypTen in this process

__all__ = [
    'secure_predict', 'SecureSession', 'SecureResult', 'SecureSettings', 'SecureInferenceError', 'PeerError',
    'UnsupportedModelError', 'InputRangeError', 'FixedPointRangeError', 'InsecureSettingWarning', 'build_plan',
    'build_secure_plan', 'check_images', 'calibrate', 'SecurePlan', 'PlanError',
    'PartyResult', 'run_owner', 'run_client', 'run_dealer', 'LinkSecurity', 'DryRun', 'dry_run', 'MemoryBoundError',
    'parse_memory', 'connect',
]
