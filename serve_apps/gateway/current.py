"""The gateway object of this process, set by the Serve ingress replica's constructor.

Serve freezes (pickles) the FastAPI app when the ingress class is declared, so state set on the
module-level app later is not seen by the served copy; routes look here instead.
"""

from typing import Any

_gateway: Any = None
_max_body_bytes: int | None = None


def set_current(gateway: Any, max_body_bytes: int | None = None) -> None:
    global _gateway, _max_body_bytes
    _gateway, _max_body_bytes = gateway, max_body_bytes


def current_gateway() -> Any:
    return _gateway


def current_max_body_bytes() -> int | None:
    return _max_body_bytes
