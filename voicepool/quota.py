"""`FleetQuota`: the Redis side of fleet quotas (``[pools.<name>.quota]``, ``voicepool[fleet]``).

Many worker processes whose pools name one provider account (``key``) share its ``limit``. Each
pool holds *tokens* in Redis for what it keeps open (spares included) and draws from them on
acquire, so the warm path never waits on Redis (``voicepool._engine.quota``: the local side, in
the core). Everything a pool tells Redis is one call of one Lua script, atomic on the server:

- keys (one hash tag, so a Redis Cluster keeps them on one shard): ``vp:q:{key}:tokens``, a
  sorted set of tokens (``<holder>#<i>``) scored by expiry in ms; ``...:workers``, holders scored
  by expiry; ``...:busy`` and ``...:waiting``, hashes holder -> leases in use plus callers
  waiting / callers waiting (the demand signal); ``...:held``, holder -> its token count;
  ``...:meta``, the state's epoch;
- every call first evicts expired tokens and dead holders (a worker killed with -9 stops
  refreshing: its share is free after ``ttl``), then sets the caller's holding to ``want``:
  new tokens only up to ``limit``, none for a holder without waiting callers while others have
  some (spares yield to calls), none while the state recovers from a data loss (below);
  then re-scores all of the caller's tokens at once: the refresh is one call per pool, not one
  per token; a smaller ``want`` gives tokens back;
- Redis's own clock (``TIME``) scores everything, so the workers' clocks never matter;
- a Redis that lost its data (restart without persistence) starts a new epoch: holders that
  knew the old one re-register what they hold open, and for a recovery window (pools use
  ``min(ttl, 2 * refresh)``: every live holder syncs within it) nobody gets new tokens, so a
  worker that asks first cannot take the share of one that has not re-registered yet; the same
  window opens when a holder comes back claiming connections whose tokens expired (Redis was
  unreachable for longer than the TTL).

Cancellation-safe: a cancelled :meth:`FleetQuota.sync` either ran on the server or did not;
the next sync sets the holding again, whatever the last one did.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from voicepool._engine.quota import QuotaGrant
from voicepool._redact import get_logger, remember, scrub
from voicepool.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection

log = get_logger("voicepool.quota")

__all__ = ["FleetQuota", "QuotaGrant", "default_worker_id", "release_shared", "shared"]


_SCRIPT = """
local tokens, workers, busyk, waitk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local meta, heldk = KEYS[5], KEYS[6]
local me = ARGV[1]
local want = tonumber(ARGV[2])
local claimed = tonumber(ARGV[3])
local waiting = tonumber(ARGV[4])
local busy = tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local known = ARGV[8]
local step = tonumber(ARGV[9])
local recover = tonumber(ARGV[10])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- expired tokens first, then the demand of holders that stopped refreshing
local had = redis.call('ZCARD', workers)
redis.call('ZREMRANGEBYSCORE', tokens, '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', workers, '-inf', now)
for _, w in ipairs(dead) do
  -- the fleet's totals are kept in meta (O(1) a call, whatever the number of workers)
  local b = tonumber(redis.call('HGET', busyk, w) or '0')
  local q = tonumber(redis.call('HGET', waitk, w) or '0')
  if b ~= 0 then redis.call('HINCRBY', meta, 'busy', 0 - b) end  -- (never a "-0")
  if q ~= 0 then redis.call('HINCRBY', meta, 'wait', 0 - q) end
  redis.call('HDEL', busyk, w)
  redis.call('HDEL', waitk, w)
  redis.call('HDEL', heldk, w)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', workers, '-inf', now) end
-- the state's epoch: a new one means Redis lost its data (or this key is new)
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = tostring(now) .. '/' .. me
  redis.call('HSET', meta, 'epoch', epoch)
end
if known ~= '' and known ~= epoch then
  local until_ms = tonumber(redis.call('HGET', meta, 'recover') or '0')
  if now + recover > until_ms then redis.call('HSET', meta, 'recover', now + recover) end
end
-- a holder whose tokens expired while it kept its connections open (Redis unreachable for
-- longer than the TTL, to it or to everyone): the same, so it gets its share back first
if claimed > 0 and known == epoch and not redis.call('ZSCORE', workers, me) then
  local until_ms = tonumber(redis.call('HGET', meta, 'recover') or '0')
  if now + recover > until_ms then redis.call('HSET', meta, 'recover', now + recover) end
end
-- nobody reached Redis for a recovery window while holders were registered (an outage): they may
-- hold connections whose tokens expired or were never refreshed; let them all re-register
-- before anyone grows
local last = tonumber(redis.call('HGET', meta, 'last') or '0')
if had > 0 and last > 0 and now - last > recover then
  local until_ms = tonumber(redis.call('HGET', meta, 'recover') or '0')
  if now + recover > until_ms then redis.call('HSET', meta, 'recover', now + recover) end
end
redis.call('HSET', meta, 'last', now)
local recovering = tonumber(redis.call('HGET', meta, 'recover') or '0') > now
-- the caller's tokens are <me>#0 .. <me>#(n-1), refreshed together (one expiry as its entry in
-- workers: they are evicted together), and counted in held
local present = tonumber(redis.call('HGET', heldk, me) or '0')
local old_busy = tonumber(redis.call('HGET', busyk, me) or '0')
local old_wait = tonumber(redis.call('HGET', waitk, me) or '0')
local others_waiting = math.max(0, tonumber(redis.call('HGET', meta, 'wait') or '0') - old_wait)
local room = limit - redis.call('ZCARD', tokens)
local g = math.min(want, present)
-- re-register what the caller holds open (lost with an expiry or a data loss), room permitting
local back = math.min(want, claimed) - g
if back > 0 and room > 0 then
  back = math.min(back, room)
  g = g + back
  room = room - back
end
-- new tokens: not while recovering; a holder with nobody waiting yields to one with callers
if want > g and room > 0 and not recovering and not (waiting == 0 and others_waiting > 0) then
  g = g + math.min(want - g, room)
end
g = g - (g % step)  -- whole connections only (a multiplexed one may hold several tokens)
local exp = now + ttl
-- one ZADD / ZREM per 200 tokens, not one call per token
local i = 0
while i < g do
  local args = {}
  for j = i, math.min(g, i + 200) - 1 do
    args[#args + 1] = exp
    args[#args + 1] = me .. '#' .. j
  end
  redis.call('ZADD', tokens, unpack(args))
  i = i + 200
end
i = g
while i < present do
  local args = {}
  for j = i, math.min(present, i + 200) - 1 do args[#args + 1] = me .. '#' .. j end
  redis.call('ZREM', tokens, unpack(args))
  i = i + 200
end
if g > 0 then redis.call('HSET', heldk, me, g) else redis.call('HDEL', heldk, me) end
if g > 0 or waiting > 0 or busy > 0 then
  redis.call('ZADD', workers, exp, me)
  redis.call('HSET', busyk, me, busy)
  if waiting > 0 then redis.call('HSET', waitk, me, waiting) else redis.call('HDEL', waitk, me) end
else
  redis.call('ZREM', workers, me)
  redis.call('HDEL', busyk, me)
  redis.call('HDEL', waitk, me)
  busy, waiting = 0, 0
end
if busy ~= old_busy then redis.call('HINCRBY', meta, 'busy', busy - old_busy) end
if waiting ~= old_wait then redis.call('HINCRBY', meta, 'wait', waiting - old_wait) end
local holding = redis.call('HLEN', heldk)
local total = math.max(0, tonumber(redis.call('HGET', meta, 'busy') or '0'))
-- abandoned keys go away by themselves (every live holder renews them)
local keep = ttl * 4
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, keep) end
return {g, redis.call('ZCARD', tokens), holding, others_waiting, total,
        epoch, recovering and 1 or 0, redis.call('ZCARD', workers)}
"""


def default_worker_id() -> str:
    """``host:pid:random``: unique per process, and readable in ``redis-cli`` listings."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _keys(key: str) -> list[str]:
    base = f"vp:q:{{{key}}}"
    return [
        f"{base}:tokens",
        f"{base}:workers",
        f"{base}:busy",
        f"{base}:waiting",
        f"{base}:meta",
        f"{base}:held",
    ]


class FleetQuota:
    """One Redis client shared by the quota pools of a worker (one per backend URL).

    ``url``: ``redis://``, ``rediss://`` or ``unix://`` (redis-py's ``from_url``); ``timeout``:
    the socket timeout of a round trip (a slower one is a backend error: the pool keeps serving
    from its reservation). ``worker``: this process's identity (default
    :func:`default_worker_id`); a pool's holder name is ``<worker>/<pool>``. ``direct``: send
    urgent asks (callers wait for them) on a redis-py connection of their own, outside its
    client's connection pool, without the client's per-command checkout, timeouts and hooks
    (``redis://`` and ``unix://`` only; False: through redis-py's client like every other
    call).

    Raises ConfigError at construction when redis-py is not installed (``voicepool[fleet]``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        worker: str | None = None,
        client: Redis | None = None,
        direct: bool = True,
    ) -> None:
        try:
            from redis.asyncio import Redis
        except ImportError:  # pragma: no cover - the extra is installed in CI
            raise ConfigError(
                "fleet quotas need redis-py: pip install 'voicepool[fleet]'"
            ) from None
        self.url = url
        password = urlsplit(url).password
        if password:
            remember([password])  # masked in every log and error from now on
        self.worker = worker or default_worker_id()
        self.timeout = timeout
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self._client: Any = client or Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            # One immediate retry on a fresh connection: the first command after a Redis
            # restart meets the connection the old server closed. Never on a timeout.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            retry_on_timeout=False,
        )
        self._script = self._client.register_script(_SCRIPT)
        # Urgent asks (callers wait) go on a direct connection while one is open: a
        # redis.asyncio.Connection of the client's own settings (its parser: hiredis), kept
        # outside the client's pool; only for a client made here, on TCP or a Unix socket.
        self._direct_kwargs: dict[str, Any] | None = (
            _direct_settings(self._client) if direct and client is None else None
        )
        self._direct: AbstractConnection | None = None
        # The last urgent ask's turn on it: done once that ask has read its reply (or given
        # up). Replies come in the order the asks were written, so each ask reads after the
        # one before it: several can be in flight, and only one reads the socket at a time.
        self._turn: asyncio.Future[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._open_after = 0.0  # loop time: no new open before it
        self._epochs: dict[tuple[str, str], str] = {}  # (key, holder) -> the epoch it last saw
        self.calls = 0  # script calls made (for the fleet benchmark's ops/s)
        self.round_trips = 0  # ... and the round trips they took (pipelined together)
        self.direct_calls = 0  # ... of which urgent asks answered on the direct connection
        self._batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._runs: set[asyncio.Task[None]] = set()
        self._names: dict[str, int] = {}

    @property
    def direct_open(self) -> bool:
        """Whether urgent asks go on the direct connection now (it is open)."""
        return self._direct is not None and self._direct.is_connected

    def holder(self, pool: str) -> str:
        """A holder name for one pool: ``<worker>/<pool>``, with ``.2``, ``.3``... for more
        pools of that name on this client (each pool is its own holder)."""
        n = self._names.get(pool, 0) + 1
        self._names[pool] = n
        return f"{self.worker}/{pool}" if n == 1 else f"{self.worker}/{pool}.{n}"

    async def sync(
        self,
        key: str,
        holder: str,
        *,
        want: int,
        claimed: int,
        waiting: int,
        busy: int,
        limit: int,
        ttl: float,
        step: int = 1,
        recover: float | None = None,
        urgent: bool = False,
    ) -> QuotaGrant:
        """Set ``holder``'s tokens under ``key`` to ``want`` (as far as the limit allows),
        refresh their TTL and publish its demand; one round trip, atomic on the server.
        ``step``: tokens are granted in multiples of it (the tokens of one connection).
        ``recover``: after a data loss, how long (s, default ``ttl``) nobody gets new tokens
        while holders re-register; it must cover every live holder's next sync.
        ``urgent`` (callers wait for it): sent at once, not batched with this loop iteration's
        other syncs; on the direct connection the request is written before the coroutine
        first suspends, and that first step needs no task (see ``QuotaBackend.sync``).

        Raises redis-py's errors (``ConnectionError``, ``TimeoutError``, ...) when Redis is down
        or slow; the pool counts them as ``voicepool.quota.backend_errors``.
        """
        self.calls += 1
        direct = self._direct
        if direct is None or not direct.is_connected:
            self._open_direct_soon()
        known = self._epochs.get((key, holder), "")
        raw = await self._submit(
            urgent,
            _keys(key),
            [
                holder,
                want,
                claimed,
                waiting,
                busy,
                limit,
                max(1, round(ttl * 1000)),
                known,
                step,
                max(1, round((ttl if recover is None else recover) * 1000)),
            ],
        )
        granted, used, holders, others, total, epoch, recovering, workers = raw
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        self._epochs[key, holder] = epoch
        return QuotaGrant(
            int(granted),
            int(used),
            int(holders),
            int(others),
            int(total),
            epoch,
            bool(recovering),
            int(workers),
        )

    async def _submit(self, urgent: bool, keys: list[str], args: list[Any]) -> Any:
        """Run the script once; the syncs submitted in one loop iteration (the pools of this
        worker refreshing together: their refreshes share a time grid) go in one pipelined
        round trip. Cancelling the caller stops its wait, not the batch."""
        if urgent:
            self.round_trips += 1
            return await self._urgent(keys, args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((keys, args, fut))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return await fut

    async def _urgent(self, keys: list[str], args: list[Any]) -> Any:
        """One script call now: on the direct connection when it is open (written before this
        first suspends), else (or when that connection ends before the reply, or Redis lost the
        script) through redis-py's client, which reconnects and loads the script. A call that
        stops waiting (timeout, cancelled) closes the direct connection, as redis-py does with
        its own: the replies still due on it would be read by the wrong asks, and a Redis too
        slow to answer in time is dialled afresh."""
        if asyncio.current_task() is None:
            # (a pool's timer asked: into the task first; redis-py before 8.0 closes a failed
            # connection under asyncio.timeout, which raises outside a task)
            await asyncio.sleep(0)
        conn = self._direct
        if conn is not None and conn.is_connected:
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import NoScriptError, ResponseError

            prev = self._turn
            mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._turn = mine
            try:
                # This connection has no socket timeout and no health checks: send_command
                # writes at once and does not suspend (redis-py would otherwise put the write
                # in a task of its own, and a read under a timeout needs the current task).
                await conn.send_command(
                    "EVALSHA", self._script.sha, len(keys), *keys, *args, check_health=False
                )
                if prev is not None and not prev.done():
                    await prev  # (the ask before this one reads its reply first)
                reply = await conn.read_response()
            except (RedisConnectionError, NoScriptError):
                # lost (a Redis restart, seen when this ask read its EOF; an ask before this
                # one gave up): dialled again now, this ask through the client; or no script
                if self._direct is conn and not conn.is_connected:
                    self._open_direct_soon()
            except ResponseError:
                raise  # (the script's error: its reply read, the connection still in step)
            except BaseException:
                await self._drop(conn)
                raise
            else:
                self.direct_calls += 1
                return reply
            finally:
                if not mine.done():  # (a successor that stopped waiting cancelled it)
                    mine.set_result(None)
        # Through redis-py: first into the task that awaits this (the pool runs an urgent sync
        # up to its first suspension in the step that asked it; redis-py's timeouts need the
        # task they cancel).
        await asyncio.sleep(0)
        return await self._script(keys=keys, args=args)

    async def _drop(self, conn: AbstractConnection) -> None:
        """Close ``conn`` (idempotent; the asks still due on it get ConnectionError and go
        through the client). Never raises: a socket that fails to close is dropped anyway."""
        try:
            await conn.disconnect(nowait=True)
        except Exception:  # pragma: no cover - a broken socket at close
            pass

    def _open_direct_soon(self) -> None:
        """Open the direct connection in the background (one open at a time; after a failed
        one, none for a second, or ``timeout`` if longer); asks go through the client
        meanwhile."""
        if self._opening is not None or self._direct_kwargs is None:
            return
        self._direct = None
        loop = asyncio.get_running_loop()
        if loop.time() < self._open_after:
            return
        self._opening = loop.create_task(self._open_direct(self._direct_kwargs))

    async def _open_direct(self, kwargs: dict[str, Any]) -> None:
        """Connect one redis-py connection (AUTH, SELECT, CLIENT SETINFO: redis-py's handshake)
        under ``timeout``; a failed or cancelled open closes what it opened."""
        loop = asyncio.get_running_loop()
        settings = dict(kwargs)
        conn: AbstractConnection = settings.pop("connection_class")(**settings)
        try:
            async with asyncio.timeout(self.timeout):
                await conn.connect()  # type: ignore[no-untyped-call]  # (redis-py: untyped)
        except BaseException as err:
            await self._drop(conn)
            if not isinstance(err, Exception):
                raise
            # Redis down: not at every ask (its client redials at every call already)
            self._open_after = loop.time() + max(1.0, self.timeout)
            log.debug("fleet quota %s: direct connection failed: %r", scrub(self.url), err)
        else:
            self._direct, self._turn = conn, None
        finally:
            self._opening = None

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _run(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        self.round_trips += 1
        if len(batch) == 1:
            keys, args, fut = batch[0]
            try:
                result: Any = await self._script(keys=keys, args=args)
            except Exception as err:
                if not fut.done():
                    fut.set_exception(err)
            else:
                if not fut.done():
                    fut.set_result(result)
            return
        from redis.exceptions import NoScriptError

        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as err:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (keys, args, fut), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):  # a Redis that restarted: load it, once each
                try:
                    result = await self._script(keys=keys, args=args)
                except Exception as err:
                    result = err
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def held(self, key: str) -> dict[str, int]:
        """Live tokens per holder under ``key`` (for tests, ``voicepool probe``, dashboards)."""
        sec, usec = await self._client.time()  # Redis's clock scores the tokens
        now_ms = int(sec) * 1000 + int(usec) // 1000
        members = await self._client.zrangebyscore(_keys(key)[0], now_ms, "+inf")
        out: dict[str, int] = {}
        for m in members:
            name = (m.decode() if isinstance(m, bytes) else str(m)).rpartition("#")[0]
            out[name] = out.get(name, 0) + 1
        return out

    async def aclose(self) -> None:
        """Close the client's connections (after the round trips in flight). Idempotent."""
        if self._runs:
            await asyncio.wait(list(self._runs), timeout=self.timeout + 1)
        self._direct_kwargs = None  # no more opens
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._direct is not None:
            await self._drop(self._direct)
            self._direct = None
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"<FleetQuota {scrub(self.url)!r} worker={self.worker!r}>"


def _direct_settings(client: Any) -> dict[str, Any] | None:
    """The settings of a direct connection like ``client``'s (its class under
    ``connection_class``, the rest for its constructor), or None where it makes none: TLS
    (``rediss://``) or a connection class of the caller's."""
    from redis.asyncio.connection import Connection, UnixDomainSocketConnection

    pool = client.connection_pool
    if pool.connection_class not in (Connection, UnixDomainSocketConnection):
        return None
    kwargs = dict(pool.connection_kwargs)
    # Its own connection, not one of the pool's (the pool's maintenance handler moves those).
    kwargs.pop("maint_notifications_pool_handler", None)
    # No socket timeout (the caller bounds an ask: the pool runs it under the quota's
    # timeout) and no retries: a write that never suspends, a read with no timer of its own;
    # a lost connection is the client's to retry, and the open's to pace.
    kwargs.update(socket_timeout=None, retry=None, retry_on_error=[], retry_on_timeout=False)
    kwargs["connection_class"] = pool.connection_class
    return kwargs


# One client per event loop and backend: the pools of a worker share its Redis connection.
_shared: dict[tuple[str, float], list[tuple[object, FleetQuota, int]]] = {}


def shared(url: str, timeout: float) -> FleetQuota:
    """The running loop's :class:`FleetQuota` for ``url`` (made on first use); pair each call
    with :func:`release_shared`. Raises ConfigError without redis-py. Call it from the loop."""
    import asyncio

    loop = asyncio.get_running_loop()
    entries = _shared.setdefault((url, timeout), [])
    for n, (owner, client, users) in enumerate(entries):
        if owner is loop:
            entries[n] = (owner, client, users + 1)
            return client
    client = FleetQuota(url, timeout=timeout)
    entries.append((loop, client, 1))
    return client


async def release_shared(client: FleetQuota) -> None:
    """One user of a :func:`shared` client is done; the last one closes it. Never raises (a
    close that fails only loses a socket its loop drops anyway)."""
    for key, entries in list(_shared.items()):
        for n, (owner, c, users) in enumerate(entries):
            if c is not client:
                continue
            if users > 1:
                entries[n] = (owner, c, users - 1)
                return
            del entries[n]
            if not entries:
                del _shared[key]
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - a broken socket at close
                pass
            return
