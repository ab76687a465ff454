"""`PoolManager`: the named pools of one worker, booted, reported and drained together.

::

    manager = PoolManager.from_settings()          # VoicePoolSettings(): env, .env, TOML
    async with manager:                            # boots every pool concurrently
        async with manager.acquire("asr") as lease:
            ...
    # leaving the block drains every pool within its drain_timeout

Boot policy, per pool (``required`` in the settings): a *required* pool that cannot open a single
connection fails the boot with :class:`~voicepool.PoolUnavailable` naming it, and every other pool
is closed; an *optional* pool starts degraded or unavailable and recovers in the background (the
pool's own refill and circuit probe), and ``health()`` says so.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from voicepool._redact import get_logger, remember_from, scrub
from voicepool.adapter import Adapter
from voicepool.errors import ConfigError, PoolError, PoolUnavailable
from voicepool.group import PoolGroup
from voicepool.pool import Pool, PoolState, PoolStats
from voicepool.pool_settings import PoolSettings
from voicepool.settings import VoicePoolSettings

if TYPE_CHECKING:
    from voicepool.group import _GroupAcquire
    from voicepool.lease import Lease

__all__ = ["ManagerState", "PoolManager"]

log = get_logger("voicepool.manager")

_REASON_MAX = 300  # health reasons are for humans and probes, not for full tracebacks


class ManagerState(enum.Enum):
    """Lifecycle of a :class:`PoolManager`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class PoolManager:
    """Named :class:`~voicepool.Pool` objects of one worker.

    Build it from settings (:meth:`from_settings`) or in code (:meth:`add`, :meth:`add_adapter`,
    or ``PoolManager([pool, ...], optional={"tts"})``), then ``async with manager:``. Pools are
    looked up with ``manager["asr"]``; ``manager.acquire("asr")`` is ``manager["asr"].acquire()``.
    """

    def __init__(self, pools: Iterable[Pool[Any]] = (), *, optional: Iterable[str] = ()) -> None:
        self._pools: dict[str, Pool[Any]] = {}
        self._groups: dict[str, PoolGroup[Any]] = {}
        self._group_required: dict[str, bool] = {}
        self._grouped: dict[str, str] = {}  # member pool name -> its group
        self._required: dict[str, bool] = {}
        self._adapter_names: dict[str, str] = {}
        self._boot_errors: dict[str, str] = {}
        self._state = ManagerState.NEW
        self._close_task: asyncio.Task[None] | None = None
        self.settings: VoicePoolSettings | None = None
        """The settings this manager was built from (None when built in code)."""
        optional = set(optional)
        for pool in pools:
            self.add(pool, required=pool.name not in optional)
        unknown = optional - set(self._pools)
        if unknown:
            raise ConfigError(
                f"optional= names pools this manager does not have: {sorted(unknown)}"
            )

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: VoicePoolSettings | None = None) -> PoolManager:
        """Build one pool per ``settings.pools`` entry (``None``: ``VoicePoolSettings()``).

        Builds adapters and pools but opens nothing. Raises :class:`~voicepool.ConfigError` for
        invalid settings, an adapter that rejects its options, or pools above an adapter's
        per-process connection limit; the message names the pool (``pools.asr``).
        """
        if settings is None:
            settings = VoicePoolSettings()
        manager = cls()
        manager.settings = settings
        for name, cfg in settings.pools.items():
            remember_from(cfg.options)
            try:
                adapter = cfg.adapter_class.from_options(cfg.options)
            except Exception as exc:
                reason = scrub(f"{type(exc).__name__}: {exc}")
                raise ConfigError(
                    f"pools.{name}.options: adapter {cfg.adapter!r} rejected its options: {reason}"
                ) from None
            manager._add(name, adapter, cfg.settings, cfg.required, cfg.adapter)
        for name, gcfg in settings.groups.items():
            group: PoolGroup[Any] = PoolGroup(
                [manager._pools[m] for m in gcfg.members],
                name=name,
                policy=gcfg.policy,
                standby_min=gcfg.standby_min,
                standby=gcfg.standby,
                failback_after=gcfg.failback_after,
            )
            manager.add_group(group, required=gcfg.required)
        return manager

    def add_group(self, group: PoolGroup[Any], *, required: bool = True) -> PoolGroup[Any]:
        """Add a group whose members are pools of this manager (before :meth:`start`).

        The manager boots the group (ready when one member is) instead of its members, and
        :meth:`acquire` resolves the group's name. Raises ConfigError when the name is taken, a
        member is not in the manager, or a member is already in another group.
        """
        name = group.name
        if self._state is not ManagerState.NEW:
            raise PoolError(f"cannot add group {name!r}: the manager has already started")
        if name in self._pools or name in self._groups:
            raise ConfigError(f"groups.{name}: a pool or group with this name is already here")
        for pool in group.members:
            if self._pools.get(pool.name) is not pool:
                raise ConfigError(
                    f"groups.{name}.members: pool {pool.name!r} is not in the manager"
                )
            if pool.name in self._grouped:
                raise ConfigError(
                    f"groups.{name}.members: pool {pool.name!r} is already a member of group"
                    f" {self._grouped[pool.name]!r}"
                )
        for pool in group.members:
            self._grouped[pool.name] = name
        self._groups[name] = group
        self._group_required[name] = required
        return group

    def add_adapter(
        self,
        name: str,
        adapter: Adapter[Any],
        settings: PoolSettings | None = None,
        *,
        required: bool = True,
    ) -> Pool[Any]:
        """Create a pool named ``name`` for ``adapter`` and add it (before :meth:`start`).

        Raises ConfigError when the name is taken, the sizing is impossible, or an adapter's
        per-process limit would be exceeded.
        """
        return self._add(name, adapter, settings, required, type(adapter).__name__)

    def add(self, pool: Pool[Any], *, required: bool = True) -> Pool[Any]:
        """Add an already constructed pool (before :meth:`start`); returns it.

        Raises ConfigError when its name is taken or an adapter's per-process limit would be
        exceeded; PoolError once the manager has started.
        """
        self._check_can_add(pool.name)
        self._pools[pool.name] = pool
        self._required[pool.name] = required
        self._adapter_names.setdefault(pool.name, type(pool.adapter).__name__)
        remember_from(pool.adapter)
        try:
            self._check_process_limit(type(pool.adapter))
        except ConfigError:
            del self._pools[pool.name]
            del self._required[pool.name]
            del self._adapter_names[pool.name]
            raise
        return pool

    def _add(
        self,
        name: str,
        adapter: Adapter[Any],
        settings: PoolSettings | None,
        required: bool,
        adapter_name: str,
    ) -> Pool[Any]:
        self._check_can_add(name)
        try:
            pool: Pool[Any] = Pool(adapter, settings, name=name)
        except ValueError as exc:  # the sizing rule: min_size above max_size
            raise ConfigError(f"pools.{name}: {exc}") from None
        self._adapter_names[name] = adapter_name
        return self.add(pool, required=required)

    def _check_can_add(self, name: str) -> None:
        if self._state is not ManagerState.NEW:
            raise PoolError(f"cannot add pool {name!r}: the manager has already started", pool=name)
        if name in self._pools:
            raise ConfigError(f"pools.{name}: a pool with this name is already in the manager")

    def _check_process_limit(self, cls: type[Adapter[Any]]) -> None:
        limit = cls.max_connections_per_process
        if limit is None:
            return
        users = [(n, p.max_size) for n, p in self._pools.items() if type(p.adapter) is cls]
        total = sum(size for _, size in users)
        if total > limit:
            parts = " + ".join(f"{size} ({n})" for n, size in users)
            raise ConfigError(
                f"pools {', '.join(n for n, _ in users)}: adapter {cls.__name__} allows at most"
                f" {limit} connections per process, but these pools need max_size {parts} ="
                f" {total}; lower max_size (or concurrency / headroom), or run another worker"
            )

    # -- lookup ---------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Pool[Any]:
        """The pool named ``name``. Raises KeyError listing the pool names."""
        try:
            return self._pools[name]
        except KeyError:
            known = ", ".join(self._pools) or "none"
            raise KeyError(f"no pool named {name!r}; pools: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._pools

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    @property
    def pools(self) -> Mapping[str, Pool[Any]]:
        """Read-only view of the pools by name."""
        return MappingProxyType(self._pools)

    @property
    def state(self) -> ManagerState:
        return self._state

    def is_required(self, name: str) -> bool:
        """The boot policy of pool ``name`` (KeyError if unknown)."""
        return self._required[self[name].name]

    @property
    def groups(self) -> Mapping[str, PoolGroup[Any]]:
        """Read-only view of the groups by name."""
        return MappingProxyType(self._groups)

    def acquire(self, name: str, timeout: float | None = None) -> Lease[Any] | _GroupAcquire[Any]:
        """``group.acquire(timeout)`` for a group's name, else ``manager[name].acquire(timeout)``.

        Raises KeyError for an unknown name (at once); the lease raises on entry as the pool's
        (or group's) acquire does (PoolExhausted, PoolUnavailable, PoolClosed). Cancellation-safe.
        """
        group = self._groups.get(name)
        if group is not None:
            return group.acquire(timeout)
        return self[name].acquire(timeout)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every pool concurrently: boot costs about the slowest pool, not the sum.

        Required pools start with ``require_ready``: if one cannot open a single connection, the
        pools still starting are cancelled, every pool is closed, and :class:`~voicepool.
        PoolUnavailable` is raised naming the failing pool(s) and chaining the pool's error.
        Optional pools never fail the boot. Cancelling start closes everything, then re-raises.
        Raises PoolError if the manager was already started.
        """
        if self._state is not ManagerState.NEW:
            raise PoolError(f"the pool manager was already started ({self._state.value})")
        self._state = ManagerState.STARTING
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(self._start_one(name), name=f"voicepool:boot:{name}"): name
            for name in self._pools
            if name not in self._grouped
        }
        for name in self._groups:
            task = loop.create_task(self._start_group(name), name=f"voicepool:boot:{name}")
            tasks[task] = name
        failed: list[tuple[str, BaseException]] = []
        try:
            pending = set(tasks)
            while pending and not failed:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        failed.append((tasks[task], exc))
        except BaseException:
            await asyncio.shield(self._abort(tasks))
            raise
        if failed:
            await asyncio.shield(self._abort(tasks))
            names = ", ".join(repr(name) for name, _ in failed)
            reasons = "; ".join(f"{name}: {self._reason(exc)}" for name, exc in failed)
            plural = "s" if len(failed) > 1 else ""
            raise PoolUnavailable(
                f"voicepool boot failed: required pool{plural} {names} could not start"
                f" ({reasons}); all pools were closed",
                pool=failed[0][0],
            ) from failed[0][1]
        self._state = ManagerState.RUNNING
        summary = ", ".join(
            f"{name} {st.state.value} {st.size}/{st.min_size}" for name, st in self.stats().items()
        )
        log.info(
            "voicepool: %d pools up in %.0f ms (%s)",
            len(self._pools),
            (time.monotonic() - t0) * 1e3,
            summary or "none",
        )

    async def _start_one(self, name: str) -> None:
        pool = self._pools[name]
        required = self._required[name]
        try:
            await pool.start(require_ready=required)
        except Exception as exc:
            if required:
                raise
            # The pool closed itself; it stays in the manager, reported unavailable.
            self._boot_errors[name] = self._reason(exc)
            log.warning(
                "voicepool: optional pool %s failed to start: %s", name, self._boot_errors[name]
            )
            return
        if pool.state is not PoolState.READY:
            log.warning(
                "voicepool: optional pool %s started %s (%s); recovering in the background",
                name,
                pool.state.value,
                self._reason(pool.last_error),
            )

    async def _start_group(self, name: str) -> None:
        group = self._groups[name]
        required = self._group_required[name]
        try:
            await group.start(require_ready=required)
        except Exception as exc:
            if required:
                raise
            self._boot_errors[name] = self._reason(exc)
            log.warning("voicepool: optional group %s failed to start: %s", name, exc)

    async def _abort(self, tasks: Mapping[asyncio.Task[None], str]) -> None:
        """Cancel boots still running and close every pool at once (no drain: nothing is lent)."""
        self._state = ManagerState.CLOSING
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(pool.aclose(0) for pool in self._pools.values()), return_exceptions=True
        )
        self._state = ManagerState.CLOSED

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop lending and close every pool concurrently.

        Each pool waits for its leases up to ``timeout`` (default: its own ``drain_timeout``),
        then closes its connections politely; ``timeout=0`` closes at once, leases included.
        Idempotent: a later call awaits the close under way, and a later ``timeout`` cuts the
        drain under way short (``aclose(0)`` during a drain closes at once). Safe to cancel: the
        close goes on in the background. Never raises for a pool's close failure (it is logged).
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(timeout), name="voicepool:manager:close"
            )
        elif timeout is not None and not self._close_task.done():
            # A later, shorter deadline (a second SIGTERM: close hard) reaches the drain under
            # way: each pool's aclose cuts its own drain short, as Pool.aclose does.
            await asyncio.gather(
                *(pool.aclose(timeout) for pool in self._pools.values()), return_exceptions=True
            )
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        if self._state is ManagerState.CLOSED:
            return
        self._state = ManagerState.CLOSING
        t0 = time.monotonic()
        names = list(self._pools)
        # Groups first (they stop choosing), then every pool; a pool's aclose is idempotent.
        await asyncio.gather(
            *(group.aclose(timeout) for group in self._groups.values()), return_exceptions=True
        )
        results = await asyncio.gather(
            *(self._pools[name].aclose(timeout) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Exception):
                log.error("voicepool: closing pool %s failed: %s", name, self._reason(result))
        self._state = ManagerState.CLOSED
        log.info("voicepool: %d pools closed in %.0f ms", len(names), (time.monotonic() - t0) * 1e3)

    async def __aenter__(self) -> PoolManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Cancelled (a second SIGTERM through GracefulShutdown, asyncio.run's Ctrl-C): close hard,
        # since whoever cancelled us is not going to wait for a drain. Otherwise drain.
        hard = exc_type is not None and not issubclass(exc_type, Exception)
        try:
            await self.aclose(0 if hard else None)
        except asyncio.CancelledError:
            # Cancelled while draining (the second SIGTERM arrived after the block was left):
            # close at once, and finish that close here, so nothing is left pending when the
            # event loop stops; then let the cancellation go on.
            await self.aclose(0)
            raise

    # -- reporting ------------------------------------------------------------------------------

    def stats(self) -> dict[str, PoolStats]:
        """``pool.stats()`` of every pool, by name (cheap, no I/O)."""
        return {name: pool.stats() for name, pool in self._pools.items()}

    def health(self) -> dict[str, Any]:
        """A JSON-ready readiness report; never contains a credential.

        ``{"status": "ready"|"degraded"|"unavailable", "ready": bool, "manager": state,
        "pools": {name: {"status", "state", "required", "adapter", "reason", "size", "idle",
        "in_use", "opening", "waiters", "min_size", "max_size"}}}``. A pool is *ready*,
        *degraded* (serving, below its warm floor after connect errors) or *unavailable* (circuit
        open, not started, failed to start, closed), with a human reason unless ready. Overall:
        unavailable if the manager is not running or a required pool is unavailable; degraded if
        any pool is degraded or an optional pool is unavailable; else ready. ``ready`` is false
        only when unavailable (a degraded worker still takes calls).
        """
        pools: dict[str, Any] = {}
        worst = "ready"
        for name, pool in self._pools.items():
            st = pool.stats()
            status, reason = self._classify(name, pool, st)
            required = self._required[name]
            if status == "unavailable" and required:
                worst = "unavailable"
            elif status != "ready" and worst == "ready":
                worst = "degraded"
            pools[name] = {
                "status": status,
                "state": st.state.value,
                "required": required,
                "adapter": self._adapter_names.get(name, type(pool.adapter).__name__),
                "reason": reason,
                "size": st.size,
                "idle": st.idle,
                "in_use": st.in_use,
                "opening": st.opening,
                "waiters": st.waiters,
                "min_size": st.min_size,
                "max_size": st.max_size,
            }
        if self._state is not ManagerState.RUNNING:
            worst = "unavailable"
        return {
            "status": worst,
            "ready": worst != "unavailable",
            "manager": self._state.value,
            "pools": pools,
        }

    def _classify(self, name: str, pool: Pool[Any], st: PoolStats) -> tuple[str, str | None]:
        state = st.state
        last = self._reason(pool.last_error) if pool.last_error is not None else None
        if state is PoolState.READY:
            return "ready", None
        if state is PoolState.DEGRADED:
            return "degraded", (
                f"{st.size} of {st.min_size} connections open; refilling after connect errors"
                + (f": {last}" if last else "")
            )
        if state is PoolState.UNAVAILABLE:
            return "unavailable", "circuit open: " + (last or "connect failures")
        if name in self._boot_errors:
            return "unavailable", f"failed to start: {self._boot_errors[name]}"
        return "unavailable", {
            PoolState.NEW: "not started",
            PoolState.STARTING: "starting",
            PoolState.CLOSING: "closing",
            PoolState.CLOSED: "closed",
        }.get(state, state.value)

    def _reason(self, exc: BaseException | None) -> str:
        """A short, secret-free description of an error, for health, logs and boot errors."""
        if exc is None:
            return "no error recorded"
        text = str(exc) or type(exc).__name__
        text = scrub(text)
        if len(text) > _REASON_MAX:
            text = text[: _REASON_MAX - 3] + "..."
        return text

    def __repr__(self) -> str:
        pools = ", ".join(f"{n}={p.state.value}" for n, p in self._pools.items())
        return f"<PoolManager {self._state.value} {pools}>"
