"""Local stand-ins for the services a voice worker talks to, for tests, benchmarks and the demo.

Every server here listens on 127.0.0.1, port 0 by default, and never contacts anything else.
TLS certificates come from :mod:`voicepool.testing.tls` (``trustme``).
"""

from voicepool.testing.faultproxy import FaultProxy, ProxyConnection
from voicepool.testing.nginx import Nginx, free_port, nginx_available
from voicepool.testing.tls import TestCertificates, test_certificates

__all__ = [
    "FaultProxy",
    "Nginx",
    "ProxyConnection",
    "TestCertificates",
    "free_port",
    "nginx_available",
    "test_certificates",
]
