"""Local stand-ins for the services a voice worker talks to, for tests, benchmarks and the demo.

Every server here listens on 127.0.0.1, port 0 by default, and never contacts anything else.
TLS certificates come from :mod:`voicepool.testing.tls` (``trustme``).
"""

from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.fake import (
    FakeAdapter,
    FakeConn,
    FakeMuxAdapter,
    FakeNoResetAdapter,
    FakeSingleUseAdapter,
    wait_until,
)
from voicepool.testing.faultproxy import FaultProxy, ProxyConnection
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.rest import RestEmulator
from voicepool.testing.sip_registrar import RegistrarMode, SipRegistrar
from voicepool.testing.tls import TestCertificates, test_certificates
from voicepool.testing.tts import CartesiaEmulator, ElevenLabsEmulator
from voicepool.testing.udp_delay import UdpDelayRelay

__all__ = [
    "CartesiaEmulator",
    "DeepgramEmulator",
    "ElevenLabsEmulator",
    "FakeAdapter",
    "FakeConn",
    "FakeMuxAdapter",
    "FakeNoResetAdapter",
    "FakeSingleUseAdapter",
    "FaultProxy",
    "LlmEmulator",
    "ProxyConnection",
    "RegistrarMode",
    "RestEmulator",
    "SipRegistrar",
    "TestCertificates",
    "UdpDelayRelay",
    "test_certificates",
    "wait_until",
]
