"""The shared control token: where it comes from (env or file) and how a presented one is checked.

Both the HTTP control API and the data-plane handshake use it, so a cluster has one secret to rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from pipeshift.errors import UserError

TOKEN_ENV = "PIPESHIFT_CONTROL_TOKEN"
TOKEN_FILE_ENV = "PIPESHIFT_CONTROL_TOKEN_FILE"


def load_control_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured token, or None when neither variable is set (then peers are not authenticated).

    A set-but-empty token is refused rather than treated as "open": an empty Kubernetes secret is far
    more likely a mistake than a wish to run unauthenticated.
    """
    env = os.environ if environ is None else environ
    inline = env.get(TOKEN_ENV)
    file_name = env.get(TOKEN_FILE_ENV)
    if inline is not None and file_name is not None:
        raise UserError(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; set only one of them")
    if file_name is not None:
        path = Path(file_name)
        try:
            token = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise UserError(f"{TOKEN_FILE_ENV}={file_name}: cannot read the token file ({exc.strerror})") from exc
        source = f"the file {path} ({TOKEN_FILE_ENV})"
    elif inline is not None:
        token, source = inline, TOKEN_ENV
    else:
        return None
    if not token:
        raise UserError(f"the control token from {source} is empty; give a non-empty token or unset it")
    return token


def token_matches(expected: str | None, presented: str | None) -> bool:
    """Whether a peer may pass: always when no token is configured, else only with the same token.

    Both sides are hashed first so the comparison takes the same time whatever the presented length;
    `hmac.compare_digest` alone returns early on a length mismatch and would leak the token's length.
    """
    if expected is None:
        return True
    if presented is None:
        return False
    # surrogatepass: undecodable bytes in the environment and lone surrogates in JSON still compare.
    want = hashlib.sha256(expected.encode("utf-8", errors="surrogatepass")).digest()
    got = hashlib.sha256(presented.encode("utf-8", errors="surrogatepass")).digest()
    return hmac.compare_digest(want, got)


def bearer_matches(expected: str | None, authorization: str | None) -> bool:
    """`token_matches` for an HTTP `Authorization: Bearer <token>` header value (None when absent)."""
    if expected is None:
        return True
    if authorization is None:
        return False
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return token_matches(expected, credentials.strip())
