"""Secure inference as services: the model owner serving many clients (:class:`OwnerService`, ``timm-mpc serve``),
the dealer of their sessions (:class:`DealerService`, ``timm-mpc dealer``) and their client (:func:`connect`,
``timm-mpc query``), every link over TLS 1.3 with each peer pinned (docs/deployment.md)."""
from .dealer import DealerService
from .owner import OwnerService, ServiceLimits, SessionRecord
from .query import SessionOffer, connect, request_session

__all__ = ['OwnerService', 'ServiceLimits', 'SessionRecord', 'DealerService', 'connect', 'request_session',
           'SessionOffer']
