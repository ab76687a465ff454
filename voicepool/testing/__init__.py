"""Local stand-ins for the services a voice worker talks to, for tests, benchmarks and the demo.

Every server here listens on 127.0.0.1, port 0 by default, and never contacts anything else.
TLS certificates come from :mod:`voicepool.testing.tls` (``trustme``).
"""

from voicepool.testing.faultproxy import FaultProxy, ProxyConnection
from voicepool.testing.tls import TestCertificates, test_certificates

__all__ = ["FaultProxy", "ProxyConnection", "TestCertificates", "test_certificates"]
