"""Every metric, span, span-event and attribute name voicepool's telemetry emits.

Metric names follow the OpenTelemetry connection-pool conventions (``db.client.connection.*``)
under the ``voicepool.`` prefix; durations are in seconds. A Prometheus exporter translates them
(``voicepool.connection.wait_time`` in ``s`` becomes ``voicepool_connection_wait_time_seconds``,
counters gain ``_total``, the attribute ``voicepool.pool.name`` becomes the label
``voicepool_pool_name``).
"""

from __future__ import annotations

from typing import Final

# -- instrumentation scope ----------------------------------------------------------------------
SCOPE: Final = "voicepool"

# -- metrics (observable: read from pool.stats() at collection time) ----------------------------
CONNECTION_COUNT: Final = "voicepool.connection.count"  # {connection}, attr state
CONNECTION_MAX: Final = "voicepool.connection.max"  # {connection}
CONNECTION_IDLE_MIN: Final = "voicepool.connection.idle.min"  # {connection}
PENDING_REQUESTS: Final = "voicepool.connection.pending_requests"  # {request}
TIMEOUTS: Final = "voicepool.connection.timeouts"  # {timeout}, counter
EXHAUSTED: Final = "voicepool.connection.exhausted"  # {acquire}, counter
UNAVAILABLE: Final = "voicepool.connection.unavailable"  # {acquire}, counter (circuit fail-fast)
ACQUIRES: Final = "voicepool.connection.acquires"  # {acquire}, counter (exact, unsampled)
CLOSED: Final = "voicepool.connection.closed"  # {connection}, counter, attr reason
WAIT_P95: Final = "voicepool.connection.wait_time.p95"  # s, gauge: the alarm's rolling p95
POOL_STATE: Final = "voicepool.pool.state"  # {state}, 1 for the current state, attr state
IDLE_TIME: Final = "voicepool.connection.idle_time"  # s, counter: socket-seconds open and idle
WARM_TARGET: Final = "voicepool.pool.warm_target"  # {connection}: the warm floor last computed
# {acquire}, counter: acquires that queued; the share served warm is 1 - waited / acquires
ACQUIRES_WAITED: Final = "voicepool.connection.acquires.waited"

# -- metrics of fleet quotas (observable; attrs voicepool.pool.name, voicepool.quota.key) ---------
QUOTA_RESERVED: Final = "voicepool.quota.reserved"  # {token}: held in the backend by this pool
QUOTA_USED: Final = "voicepool.quota.used"  # {token}: backing this pool's open connections
QUOTA_LIMIT: Final = "voicepool.quota.limit"  # {token}: the account's limit
QUOTA_FLEET_USED: Final = "voicepool.quota.fleet_used"  # {token}: held fleet-wide (last sync)
QUOTA_BACKEND_ERRORS: Final = "voicepool.quota.backend_errors"  # {error}, counter

# -- metrics (histograms, recorded off the fast path; counter recorded per alarm window) --------
CREATE_TIME: Final = "voicepool.connection.create_time"  # s, attr error.type on failure
WAIT_TIME: Final = "voicepool.connection.wait_time"  # s
USE_TIME: Final = "voicepool.connection.use_time"  # s
PING_DURATION: Final = "voicepool.ping.duration"  # s, attr error.type on failure
ALARM: Final = "voicepool.alarm"  # {alarm}, counter: one per window whose wait p95 is too high

# -- metrics of pool groups (attr voicepool.group.name) -------------------------------------------
GROUP_FAILOVERS: Final = "voicepool.group.failovers"  # {switch}, counter, attrs from, to, reason
GROUP_FAILBACKS: Final = "voicepool.group.failbacks"  # {switch}, counter, attrs from, to, reason
GROUP_WAIT_TIME: Final = "voicepool.group.wait_time"  # s, attr voicepool.group.member (who served)

# -- spans ----------------------------------------------------------------------------------------
SPAN_CONNECT: Final = "voicepool.connect"
SPAN_PING: Final = "voicepool.ping"  # failed pings only
SPAN_RETIRE: Final = "voicepool.retire"
SPAN_ALARM: Final = "voicepool.alarm"
SPAN_ACQUIRE: Final = "voicepool.acquire"  # only with PoolSettings.trace_acquire

# -- span events (on the caller's current span, only when it is recording) -----------------------
EVENT_EXHAUSTED: Final = "voicepool.pool.exhausted"
EVENT_TIMEOUT: Final = "voicepool.pool.timeout"
EVENT_UNAVAILABLE: Final = "voicepool.pool.unavailable"
EVENT_ALARM: Final = "voicepool.pool.alarm"
EVENT_ALARM_CLEARED: Final = "voicepool.pool.alarm_cleared"
EVENT_FAILOVER: Final = "voicepool.group.failover"  # first caller served after a switch

# -- attributes -----------------------------------------------------------------------------------
ATTR_POOL_NAME: Final = "voicepool.pool.name"
ATTR_STATE: Final = "state"
ATTR_REASON: Final = "reason"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_POOL_STATE: Final = "voicepool.pool.state"
ATTR_SIZE: Final = "voicepool.pool.size"
ATTR_MAX_SIZE: Final = "voicepool.pool.max_size"
ATTR_IN_USE: Final = "voicepool.pool.in_use"
ATTR_IDLE: Final = "voicepool.pool.idle"
ATTR_OPENING: Final = "voicepool.pool.opening"
ATTR_WAITERS: Final = "voicepool.pool.waiters"
ATTR_WAIT_TIME: Final = "voicepool.acquire.wait_time"  # seconds
ATTR_ADAPTER: Final = "voicepool.adapter"  # the adapter's class name (never its options)
ATTR_LEASE_MODE: Final = "voicepool.lease_mode"
ATTR_STREAM_ID: Final = "voicepool.stream_id"
ATTR_CONNECT_DURATION: Final = "voicepool.connect.duration"  # seconds
ATTR_CONNECT_CANCELLED: Final = "voicepool.connect.cancelled"
ATTR_PING_DURATION: Final = "voicepool.ping.duration"  # seconds
ATTR_CLOSE_REASON: Final = "voicepool.connection.close_reason"
ATTR_ALARM_P95: Final = "voicepool.alarm.wait_p95"  # seconds
ATTR_ALARM_THRESHOLD: Final = "voicepool.alarm.threshold"  # seconds
ATTR_ALARM_WINDOW: Final = "voicepool.alarm.window"  # seconds
ATTR_ALARM_FIRING: Final = "voicepool.alarm.firing"
ATTR_QUOTA_KEY: Final = "voicepool.quota.key"
ATTR_QUOTA_LIMIT: Final = "voicepool.quota.limit"
ATTR_EXHAUSTED_BY: Final = "voicepool.exhausted.by"  # "fleet_quota" when the quota held it back
ATTR_GROUP_NAME: Final = "voicepool.group.name"
ATTR_GROUP_MEMBER: Final = "voicepool.group.member"  # the member pool that served the lease
ATTR_GROUP_FROM: Final = "voicepool.group.from"  # member that served before a switch
ATTR_GROUP_TO: Final = "voicepool.group.to"  # member that serves after it
ATTR_GROUP_WHY: Final = "voicepool.group.why"  # "<member> unavailable", failback, lower_rtt

CONNECTION_STATES: Final = ("idle", "used", "opening")
