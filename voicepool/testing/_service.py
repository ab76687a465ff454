"""`LocalService`: the lifecycle every local server in voicepool.testing shares.

``async with Server(...) as server`` is ``await server.start()`` then ``await server.aclose()``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class LocalService:
    """Base of the local servers and proxies: subclasses implement ``start`` and ``aclose``."""

    async def start(self) -> object:
        """Bind (port 0 by default) and serve; return when connections are accepted."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop serving and release every socket or process; idempotent."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
