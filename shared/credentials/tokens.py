"""Ferry's access tokens: JWTs signed with the configured secret or key pair, and checked.

The web process checks them on every request in server mode; the `ferry users token` command
signs them offline, so this lives where both can import it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.settings import Settings


def issue_access_token(settings: Settings, user_id: str) -> tuple[str, int]:
    """A signed JWT for `user_id` and its lifetime in seconds."""
    now = int(time.time())
    claims = {"sub": user_id, "iss": settings.jwt_issuer, "aud": settings.jwt_audience,
              "iat": now, "exp": now + settings.access_token_ttl_s}
    key = signing_key(settings)
    return jwt.encode(claims, key.sign, algorithm=key.algorithm), settings.access_token_ttl_s


def verify_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """The claims of a token Ferry signed; raises `jwt.InvalidTokenError` (or its subclass
    `ExpiredSignatureError`) for any other. Only the configured algorithm is accepted."""
    pair = signing_key(settings)
    return jwt.decode(token, pair.verify, algorithms=[pair.algorithm],
                      audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                      options={"require": ["exp", "iat", "sub", "iss", "aud"]})


@dataclass(frozen=True)
class SigningKey:
    algorithm: str  # the only one accepted when verifying: no "none", no HS/RS confusion
    sign: Any
    verify: Any


def signing_key(settings: Settings) -> SigningKey:
    """The key pair in FERRY_JWT_PRIVATE_KEY_FILE (RSA: RS256, EC P-256: ES256), else the secret."""
    if settings.jwt_private_key_file is not None:
        return _key_pair(settings.jwt_private_key_file)
    if settings.jwt_secret is None:
        raise RuntimeError("FERRY_AUTH=on needs FERRY_JWT_SECRET or FERRY_JWT_PRIVATE_KEY_FILE")
    secret = settings.jwt_secret.get_secret_value()
    return SigningKey("HS256", secret, secret)


@functools.cache
def _key_pair(path: Path) -> SigningKey:
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(private, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1":
        algorithm = "ES256"
    else:
        raise ValueError(f"{path}: expected an RSA or EC P-256 private key (PEM)")
    return SigningKey(algorithm, private, private.public_key())
