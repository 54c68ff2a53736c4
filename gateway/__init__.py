"""Plugway: an API gateway with a pluggy plugin pipeline and a SO_REUSEPORT worker cluster.

What plugin authors import from here: ``hookimpl`` to mark hook
implementations, ``PluginDeclaration`` and ``setting`` to declare settings,
the messages (``Response``, ``UpstreamResponse``, ``OutgoingRequest``), the
request context and ``Consumer``, and the errors to raise.
"""

from .config.schema import setting
from .config.units import Duration, Rate, Secret, Size
from .context import Consumer, RequestContext
from .errors import GatewayError
from .hookspecs import hookimpl
from .messages import DROP, OutgoingRequest, Response, Upgraded, UpstreamResponse, WebSocketMessage
from .plugins import PluginDeclaration

__version__ = "0.1.0"

__all__ = [
    "DROP", "Consumer", "Duration", "GatewayError", "OutgoingRequest", "PluginDeclaration", "Rate", "RequestContext",
    "Response", "Secret", "Size", "Upgraded", "UpstreamResponse", "WebSocketMessage", "hookimpl",
    "setting",
]
