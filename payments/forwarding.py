"""`PaymentsAPI` calls forwarded by name (vLLM's worker-wrapper pattern), so no class restates them.

The Protocol in `payments.protocol` is the one list of calls (`PAYMENTS_METHODS`). The actor gets a real
method per call (Ray serves only methods defined on the class) from `forward_missing`; a proxy in the same
process (the client over the actor's handles, the CLI's and the tests' in-process service) forwards in
`__getattr__`; `ServiceForwarder` is that proxy over an in-process `PaymentsService`.
"""

import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from payments.protocol import PAYMENTS_METHODS, PaymentsAPI

if TYPE_CHECKING:
    from payments.service import PaymentsService

T = TypeVar("T")
AsyncCall = Callable[..., Coroutine[Any, Any, Any]]


def forward_missing(make: Callable[[str], AsyncCall]) -> Callable[[type[T]], type[T]]:
    """Class decorator: a method `make(name)` for every PaymentsAPI call the class does not define itself."""

    def decorate(cls: type[T]) -> type[T]:
        for name in sorted(PAYMENTS_METHODS - set(vars(cls))):
            method = make(name)
            method.__name__ = name
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            method.__doc__ = getattr(PaymentsAPI, name).__doc__
            setattr(cls, name, method)
        return cls

    return decorate


def service_call(service: object, name: str) -> AsyncCall:
    """The PaymentsAPI call `name` of an in-process service as a coroutine function: a synchronous service
    method is called, an asynchronous one awaited."""
    method = getattr(service, name)

    async def call(*args: Any) -> Any:
        result = method(*args)
        return await result if inspect.isawaitable(result) else result

    return call


class ServiceForwarder:
    """PaymentsAPI without Ray: every call the class does not define, forwarded by name to an in-process
    service (the CLI's local commands subclass it; so does the tests' LocalPaymentsClient)."""

    def __init__(self, service: "PaymentsService") -> None:
        self.service = service

    def __getattr__(self, name: str) -> AsyncCall:
        if name not in PAYMENTS_METHODS:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        return service_call(self.service, name)
