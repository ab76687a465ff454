"""Framework integrations: voicepool pools under Pipecat, LiveKit Agents and the LLM SDKs.

* :mod:`voicepool.integrations.lookup`: :class:`PoolIndex`, pools found by the URL a framework
  was about to open; a URL no pool serves is opened fresh, logged and counted
  (``voicepool.pool.miss``), never silently.
* :mod:`voicepool.integrations.openai` / :mod:`~voicepool.integrations.anthropic`: the official
  SDK client on a pooled HTTP/2 transport (``client(pool)``).
* :mod:`voicepool.integrations.pipecat` (extra ``voicepool[pipecat]``): pooled drop-in services.
* :mod:`voicepool.integrations.livekit` (extra ``voicepool[livekit]``): ``PooledSession`` for the
  plugins' ``http_session=``, the LLM client and the job entrypoint helper.

This layer sits above :class:`~voicepool.PoolManager` (DESIGN.md, layers) and may import
``voicepool.adapters``; nothing below it imports a framework.
"""

from voicepool.integrations.lookup import MISS_METRIC, PoolIndex, pool_url, url_key

__all__ = ["MISS_METRIC", "PoolIndex", "pool_url", "url_key"]
