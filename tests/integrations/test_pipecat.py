"""Pipecat pipelines on pools, against the TLS emulators behind a 40 ms round trip (the demo's
relay): audio frames in -> Deepgram STT -> OpenAI LLM -> ElevenLabs or Cartesia TTS -> audio out.
Strict figures (start <= 10 ms, first turn within 10%) come from benchmarks/frameworks.py; on a
shared CI machine these tests assert the same facts with margins that do not flake."""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
from typing import Any

import pytest

pytest.importorskip("pipecat")

from voicepool.integrations import pipecat as pooled

from .conftest import load_example

bot = load_example("pipecat_bot")
# deepgram-sdk and Pipecat use deprecated websockets and Pipecat names (as tests/conformance).
pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _first_and_later(results: list[Any]) -> tuple[float, float]:
    first = statistics.median(r.turn_ms[0] for r in results)
    later = statistics.median(t for r in results for t in r.turn_ms[1:])
    return first, later


@pytest.mark.parametrize("tts", ["elevenlabs", "cartesia"])
async def test_ten_concurrent_calls_pooled_vs_per_call(tts: str) -> None:
    # As a worker does at boot (README): the frameworks leave ~400k import-time objects, and a
    # full collection over them stalls this process for up to ~250 ms inside whichever turns
    # are running: the likeliest cause of the one CI run in which a bound below failed (pytest
    # did not say which; benchmarks/frameworks.py measured a 164 ms pause inside one ramp).
    gc.freeze()
    try:
        async with bot.emulated_services() as stack:
            warm = await bot.measure(stack, pooled_run=True, tts=tts)
            cold = await bot.measure(stack, pooled_run=False, tts=tts)
    finally:
        gc.unfreeze()
    assert warm.misses == 0
    assert warm.opened_in_calls == 0
    assert cold.opened_in_calls == 30  # three connections per call without pools
    assert all(r.audio_bytes > 0 for r in warm.results + cold.results)
    warm_start = statistics.median(r.start_ms for r in warm.results)
    cold_start = statistics.median(r.start_ms for r in cold.results)
    assert cold_start > 3 * stack.rtt * 1e3 * 0.9  # handshakes: TCP + TLS + upgrade
    # No handshake inside a pooled call is proven above (opened_in_calls == 0); the start time
    # adds CPU, which a loaded 2-core machine stretches: half the cold start is a safe bound,
    # benchmarks/frameworks.py measures the figure itself.
    assert warm_start < cold_start / 2
    # A stall of the whole process (a loaded machine; measured up to ~500 ms) lands on whichever
    # turns are running, first or later: the pooled bound has room for it (the benchmark gives
    # the figure, 1.03-1.09), the per-call one asserts the LLM connection its first turn opens.
    first_warm, later_warm = _first_and_later(warm.results)
    first_cold, later_cold = _first_and_later(cold.results)
    assert first_warm < later_warm * 1.5
    assert first_cold > later_cold + stack.rtt * 1e3  # TCP + TLS: two round trips


async def test_peak_arrivals_on_emulators_in_a_child_process() -> None:
    """The benchmark's setup: the emulators in a child (spawned_services: endpoints, the CA,
    the relays' handshake count over its stdin), and newcomers arriving while the other calls
    are in progress (run_steady): answered, no miss, no connection opened inside a call."""
    async with bot.spawned_services() as stack:
        assert not stack.emulators  # nothing of theirs in this process
        before = await stack.handshakes()
        run = await bot.measure(stack, pooled_run=True, calls=3, turns=1, steady=2)
        assert await stack.handshakes() > before  # the pools' sockets, counted by the child
    assert len(run.results) == 2
    assert all(r.audio_bytes > 0 and len(r.turn_ms) == 1 for r in run.results)
    assert run.misses == 0
    assert run.opened_in_calls == 0


async def test_pools_follow_the_service_settings_and_sample_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each service's pool URL is the one the service opens (0 misses in the test above); a
    pipeline at another sample rate than the pools were built for is a logged, counted miss."""
    async with bot.emulated_services() as stack:
        pools = pooled.PipecatPools(concurrency=1, audio_in_sample_rate=8000)
        stt = pooled.DeepgramSTTService(api_key=bot.KEY, base_url=stack.deepgram)
        pools.declare(stt)
        [url] = [str(pooled.pool_url(p)) for p in pools.manager.pools.values()]
        assert "sample_rate=8000" in url
        assert "encoding=linear16" in url
        async with pools:
            with caplog.at_level(logging.WARNING, "voicepool.integrations"):
                result = await bot.run_call(bot.make_services(stack), turns=1)
        assert result.turn_ms  # the call still works: on its own connections
        assert pools.index.misses["pipecat"] >= 1
        assert any("voicepool.pool.miss" in r.message for r in caplog.records)


def test_each_service_pool_url_is_the_one_it_opens() -> None:
    """The pool each service declares is filed under the URL it will open: its own settings, and
    the pipeline's sample rate when it has none of its own (no I/O: declare only)."""
    pools = pooled.PipecatPools(
        concurrency=1, audio_in_sample_rate=8000, audio_out_sample_rate=22050
    )
    services: list[Any] = [
        pooled.DeepgramSTTService(api_key="k", base_url="wss://dg.test"),
        pooled.DeepgramSTTService(api_key="k", base_url="wss://dg.test", sample_rate=16000),
        pooled.ElevenLabsTTSService(
            api_key="k",
            url="wss://el.test",
            settings=pooled.ElevenLabsTTSService.Settings(voice="v"),
        ),
        pooled.CartesiaTTSService(
            api_key="k",
            url="wss://ca.test/tts/websocket",
            settings=pooled.CartesiaTTSService.Settings(voice="v"),
        ),
        pooled.OpenAILLMService(api_key="k", base_url="https://oa.test/v1/"),
        pooled.AnthropicLLMService(api_key="k", base_url="https://an.test"),
    ]
    pools.declare(*services)
    by_host: dict[str, list[str]] = {}
    for pool in pools.manager.pools.values():
        url = str(pooled.pool_url(pool))
        by_host.setdefault(url.split("/")[2], []).append(url)
    dg8, dg16 = sorted(by_host["dg.test"], key=lambda u: "16000" in u)
    [elevenlabs], [cartesia] = by_host["el.test"], by_host["ca.test"]
    [openai], [anthropic] = by_host["oa.test"], by_host["an.test"]
    assert "sample_rate=8000" in dg8
    assert "sample_rate=16000" in dg16  # the service's own rate wins
    assert elevenlabs.startswith("wss://el.test/v1/text-to-speech/v/multi-stream-input?")
    assert "output_format=pcm_22050" in elevenlabs  # from the pipeline's output rate
    assert cartesia == "wss://ca.test/tts/websocket"
    assert openai == "https://oa.test/v1"
    assert anthropic == "https://an.test"
    for service in services:  # each service finds its own pool by the URL it opens
        _kind, url, _adapter = service._voicepool_pool(pools)
        assert pools.index.find(url) is not None, url


def test_pooled_deepgram_builds_no_http_client_per_call() -> None:
    """The pooled STT's deepgram-sdk client is built on one shared HTTP client (a new one loads
    the trust store: ~25 ms per call with the system's CA bundle); Pipecat's own service, built
    after it, still gets its own; the URL of each connect's kwargs is derived once."""
    from pipecat.services.deepgram.stt import DeepgramSTTService

    a = pooled.DeepgramSTTService(api_key="k", base_url="wss://dg.test")
    b = pooled.DeepgramSTTService(api_key="k", base_url="wss://dg.test")
    own = DeepgramSTTService(api_key="k", base_url="wss://dg.test")

    def http(service: Any) -> Any:
        sdk = getattr(service, "_voicepool_sdk", service._client)
        return sdk._client_wrapper.httpx_client.httpx_client

    assert http(a) is http(b)
    assert http(own) is not http(a)
    listen: Any = a._client
    kwargs = {"model": "nova-3", "sample_rate": "16000"}
    url = listen._url(kwargs)
    assert url == "wss://dg.test/v1/listen?model=nova-3&sample_rate=16000"
    assert listen._url(dict(kwargs)) is url  # derived once per kwargs
    keyterms = {**kwargs, "keyterm": ["a", "b"]}  # unhashable: derived every time, same URL
    assert listen._url(keyterms) == listen._url(keyterms)
    assert "keyterm=a&keyterm=b" in listen._url(keyterms)


async def test_anthropic_llm_in_a_pooled_pipeline() -> None:
    """The pooled AnthropicLLMService in the pipeline (Messages API over the pooled HTTP/2
    connection): the call is answered, no miss, no connection opened inside the call."""
    async with bot.emulated_services() as stack:
        base = stack.llm.removesuffix("/v1")

        def services() -> list[Any]:
            stt = pooled.DeepgramSTTService(api_key=bot.KEY, base_url=stack.deepgram)
            voice = pooled.ElevenLabsTTSService.Settings(voice="v1")
            tts = pooled.ElevenLabsTTSService(api_key=bot.KEY, url=stack.elevenlabs, settings=voice)
            llm = pooled.AnthropicLLMService(
                api_key=bot.KEY,
                base_url=base,
                settings=pooled.AnthropicLLMService.Settings(model="voicepool-emulator"),
            )
            return [stt, llm, tts]

        pools = pooled.PipecatPools(
            concurrency=2, audio_in_sample_rate=bot.IN_RATE, audio_out_sample_rate=bot.OUT_RATE
        )
        pools.declare(*services())
        async with pools:
            connects = stack.emulators["llm"].connections_accepted
            result = await bot.run_call(services(), turns=2)
            assert stack.emulators["llm"].connections_accepted == connects  # the pool's only
        assert result.audio_bytes > 0
        assert len(result.turn_ms) == 2
        assert not pools.index.misses


async def test_next_call_never_receives_the_previous_calls_audio() -> None:
    """Call 1 ends while its TTS socket is still streaming (slow chunks, a long reply); call 2,
    on the same pools, hears only its own contexts on another socket."""
    async with bot.emulated_services() as stack:
        stack.emulators["elevenlabs"].chunk_interval = 0.05
        stack.emulators["llm"].tokens = 40
        pools = pooled.PipecatPools(
            concurrency=1, audio_in_sample_rate=bot.IN_RATE, audio_out_sample_rate=bot.OUT_RATE
        )
        pools.declare(*bot.make_services(stack))
        async with pools:
            first = await bot.run_call(bot.make_services(stack), turns=1)
            second = await bot.run_call(bot.make_services(stack), turns=1)
        assert first.contexts
        assert second.contexts
        assert not first.contexts & second.contexts
        el = stack.emulators["elevenlabs"]
        assert el.accepted >= 2  # two sockets: a released one is never lent again


async def test_fastapi_runner_shares_one_pool_set_across_bot_tasks() -> None:
    import httpx

    runner = load_example("pipecat_runner")
    app = runner.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
            for _ in range(3):
                assert (await client.post("/calls")).json()["started"]
            results = await asyncio.gather(*app.state.tasks)
            health = (await client.get("/health")).json()
    assert all(r.audio_bytes > 0 for r in results)
    assert health["status"] == "ready"
    assert health["pool_misses"] == 0
