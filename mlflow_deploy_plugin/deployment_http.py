"""HTTP to a deployment of ours (``predict``, the canary's ``/metrics`` scrape), over TLS trusting
the deployment's own certificate file (``-C tls_cert``) the way a user means it.

``requests`` with ``verify=tls_cert`` gets two cases wrong:

- A certificate from a real CA arrives as the leaf plus intermediates, without the root (that is
  how servers are meant to send it). OpenSSL refuses such a chain unless it ends at a self-signed
  root it trusts, so the file a user serves could not be used to reach that very server. We set
  ``VERIFY_X509_PARTIAL_CHAIN``: a chain that reaches any certificate in the file is trusted, the
  CAs the user trusts stay trusted as well.
- A deployment bound to ``0.0.0.0`` (or to its own name) is reached at ``127.0.0.1``, and a
  certificate naming ``churn.example.com`` fails the host-name check there. The check is skipped
  only for loopback URLs: the certificate is still verified, and a loopback address cannot be
  another machine. For any other host the name is checked as usual.

Trusting the very certificate the deployment serves (pinning it) is how a self-signed certificate
is meant to be used (``curl --cacert``). A CA-issued one is trusted both ways: pinned, and through
the CAs the user trusts, chosen as ``requests`` chooses them: ``$REQUESTS_CA_BUNDLE``, else
``$CURL_CA_BUNDLE`` (a file or a folder of certificates), else certifi's public CAs. So a private
CA's bundle keeps working when the file no longer holds what the server sends (the certificate
was renewed on disk before the deployment restarted with it).
"""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import urlsplit

import certifi
import requests
from requests.adapters import HTTPAdapter

from mlflow_deploy_plugin.spec import is_loopback_host


def user_ca_bundle() -> str:
    """The CA bundle ``requests`` would verify with here: ``$REQUESTS_CA_BUNDLE``, else
    ``$CURL_CA_BUNDLE``, else certifi's (a file, or a folder of hashed certificates)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


def _trust_context(tls_cert: str) -> ssl.SSLContext:
    """The user's CAs (:func:`user_ca_bundle`) plus the deployment's own certificate file.

    Raises ``requests.exceptions.SSLError`` (what callers already handle) naming the file that
    cannot be read."""
    bundle = user_ca_bundle()
    try:
        if os.path.isdir(bundle):
            context = ssl.create_default_context(capath=bundle)
        else:
            context = ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise requests.exceptions.SSLError(
            f"The CA bundle {bundle!r} ($REQUESTS_CA_BUNDLE or $CURL_CA_BUNDLE) cannot be read as PEM "
            f"certificates ({exc}): fix or unset the variable") from None
    try:
        context.load_verify_locations(cafile=tls_cert)
    except (OSError, ssl.SSLError) as exc:
        raise requests.exceptions.SSLError(
            f"The deployment's certificate file tls_cert={tls_cert!r} cannot be read as PEM ({exc}): "
            "restore it, or update the deployment with -C tls_cert=... -C tls_key=...") from None
    return context


class _DeploymentCertAdapter(HTTPAdapter):
    """Verifies with one SSL context: the deployment's certificate file plus the user's CAs."""

    def __init__(self, tls_cert: str, check_hostname: bool) -> None:
        self._context = _trust_context(tls_cert)
        self._context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self._context.check_hostname = check_hostname
        self._check_hostname = check_hostname
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        if not self._check_hostname:
            kwargs["assert_hostname"] = False  # urllib3 checks the name itself unless told not to
        super().init_poolmanager(connections, maxsize, block=block, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # Our context already holds the CAs; requests would otherwise reload certifi's bundle into it.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None
        if cert:
            super().cert_verify(conn, url, False, cert)


def deployment_session(url: str | None, tls_cert: str | None) -> requests.Session:
    """A session for requests to a deployment at ``url``: over https with ``tls_cert`` it trusts that
    file (partial chains included) and the user's CAs (:func:`user_ca_bundle`), and skips the
    host-name check for loopback hosts only."""
    session = requests.Session()
    parts = urlsplit(url or "")
    if parts.scheme == "https" and tls_cert:
        host = parts.hostname or ""
        session.mount(f"https://{parts.netloc}", _DeploymentCertAdapter(tls_cert, not is_loopback_host(host)))
    return session
