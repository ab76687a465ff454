"""Throwaway TLS certificates for local servers, made with ``trustme``.

One CA per process (cached) issues a certificate for ``127.0.0.1`` and ``localhost``. Clients trust
it through :meth:`TestCertificates.client_context`; nothing is written to the system trust store.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from pathlib import Path

try:
    import trustme
except ModuleNotFoundError as exc:  # trustme (and the cryptography it pulls, ~16 MB) is an extra
    raise ModuleNotFoundError(
        "voicepool.testing (the emulators, the demo, `voicepool emulate`) needs the `testing` "
        "extra: pip install 'voicepool[testing]'",
        name=exc.name,
    ) from exc

__all__ = ["TestCertificates", "test_certificates"]


class TestCertificates:
    """A CA and a server certificate for 127.0.0.1 / localhost."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        # mkdtemp + atexit rather than TemporaryDirectory: its finalizer warns (ResourceWarning)
        # at interpreter exit, which scripts run with -W error turn into a failure.
        d = Path(tempfile.mkdtemp(prefix="voicepool-tls-"))
        atexit.register(shutil.rmtree, d, True)
        self.ca_path = d / "ca.pem"
        self.cert_path = d / "server.pem"
        self.key_path = d / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.server_cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for extra in self.server_cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_path), append=True)
        self.server_cert.private_key_pem.write_to_path(str(self.key_path))

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A server-side context; ``alpn`` e.g. ``["h2", "http/1.1"]``."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A client-side context that trusts this CA (and only it)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


@functools.cache
def test_certificates() -> TestCertificates:
    """The process-wide test certificates (made once: key generation costs ~50 ms)."""
    return TestCertificates()


test_certificates.__test__ = False  # type: ignore[attr-defined]
