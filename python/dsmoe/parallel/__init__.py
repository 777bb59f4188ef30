"""Expert parallelism: dispatch/combine across ranks (EPBuffer) and expert load balancing (eplb)."""
from . import eplb  # noqa: F401
from .buffer import EPBuffer, EPConfig, EPHandle, EPTimeoutError, get_dispatch_layout  # noqa: F401
from .eplb import map_to_physical, rebalance_experts  # noqa: F401

__all__ = ["EPBuffer", "EPConfig", "EPHandle", "EPTimeoutError", "get_dispatch_layout", "rebalance_experts",
           "map_to_physical", "eplb"]
