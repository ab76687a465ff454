"""`FleetQuota`: the Redis side of fleet quotas (``[pools.<name>.quota]``, ``voicepool[fleet]``).

Many worker processes whose pools name one provider account (``key``) share its ``limit``. Each
pool holds *tokens* in Redis for what it keeps open (spares included) and draws from them on
acquire, so the warm path never waits on Redis (``voicepool._engine.quota``: the local side, in
the core). Everything a pool tells Redis is one call of one Lua script, atomic on the server:

- keys (one hash tag, so a Redis Cluster keeps them on one shard): ``vp:q:{key}:tokens``, a
  sorted set of tokens (``<holder>#<i>``) scored by expiry in ms; ``...:workers``, holders scored
  by expiry; ``...:busy`` and ``...:waiting``, hashes holder -> leases in use plus callers
  waiting / callers waiting (the demand signal); ``...:meta``, the state's epoch;
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

import os
import socket
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from voicepool._engine.quota import QuotaGrant
from voicepool._redact import remember, scrub
from voicepool.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["FleetQuota", "QuotaGrant", "default_worker_id"]


_SCRIPT = """
local tokens, workers, busyk, waitk, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
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
  redis.call('HDEL', busyk, w)
  redis.call('HDEL', waitk, w)
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
-- the caller's tokens are <me>#0 .. <me>#(n-1), refreshed together (one expiry)
local present = 0
while redis.call('ZSCORE', tokens, me .. '#' .. present) do present = present + 1 end
local others_waiting = 0
local wv = redis.call('HGETALL', waitk)
for i = 1, #wv, 2 do
  if wv[i] ~= me then others_waiting = others_waiting + tonumber(wv[i + 1]) end
end
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
for i = 0, g - 1 do redis.call('ZADD', tokens, exp, me .. '#' .. i) end
local i = g
while i < present do
  redis.call('ZREM', tokens, me .. '#' .. i)
  i = i + 1
end
if g > 0 or waiting > 0 or busy > 0 then
  redis.call('ZADD', workers, exp, me)
  redis.call('HSET', busyk, me, busy)
  if waiting > 0 then redis.call('HSET', waitk, me, waiting) else redis.call('HDEL', waitk, me) end
else
  redis.call('ZREM', workers, me)
  redis.call('HDEL', busyk, me)
  redis.call('HDEL', waitk, me)
end
local holding = 0
for _, w in ipairs(redis.call('ZRANGE', workers, 0, -1)) do
  if redis.call('ZSCORE', tokens, w .. '#0') then holding = holding + 1 end
end
local total = 0
local bv = redis.call('HVALS', busyk)
for _, v in ipairs(bv) do total = total + tonumber(v) end
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
    return [f"{base}:tokens", f"{base}:workers", f"{base}:busy", f"{base}:waiting", f"{base}:meta"]


class FleetQuota:
    """One Redis client shared by the quota pools of a worker (one per backend URL).

    ``url``: ``redis://``, ``rediss://`` or ``unix://`` (redis-py's ``from_url``); ``timeout``:
    the socket timeout of a round trip (a slower one is a backend error: the pool keeps serving
    from its reservation). ``worker``: this process's identity (default
    :func:`default_worker_id`); a pool's holder name is ``<worker>/<pool>``.

    Raises ConfigError at construction when redis-py is not installed (``voicepool[fleet]``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        worker: str | None = None,
        client: Redis | None = None,
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
        self._epochs: dict[tuple[str, str], str] = {}  # (key, holder) -> the epoch it last saw
        self.calls = 0  # round trips made (for the fleet benchmark's ops/s)

    def holder(self, pool: str) -> str:
        return f"{self.worker}/{pool}"

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
    ) -> QuotaGrant:
        """Set ``holder``'s tokens under ``key`` to ``want`` (as far as the limit allows),
        refresh their TTL and publish its demand; one round trip, atomic on the server.
        ``step``: tokens are granted in multiples of it (the tokens of one connection).
        ``recover``: after a data loss, how long (s, default ``ttl``) nobody gets new tokens
        while holders re-register; it must cover every live holder's next sync.

        Raises redis-py's errors (``ConnectionError``, ``TimeoutError``, ...) when Redis is down
        or slow; the pool counts them as ``voicepool.quota.backend_errors``.
        """
        self.calls += 1
        known = self._epochs.get((key, holder), "")
        raw = await self._script(
            keys=_keys(key),
            args=[
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
        """Close the client's connections. Idempotent."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"<FleetQuota {scrub(self.url)!r} worker={self.worker!r}>"
