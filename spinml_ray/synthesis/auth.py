"""Bearer tokens for the synthesis HTTP API: each token belongs to one tenant.

Configured by `SPINML_API_TOKENS` ("TOKEN:TENANT,TOKEN2:TENANT2") or by a mounted file named in
`SPINML_API_TOKENS_FILE` (YAML or JSON mapping token -> tenant). With neither, every call is refused.
"""

from __future__ import annotations

import hmac
import os

import yaml


class AuthError(PermissionError):
    pass


def load_tokens(environ=os.environ) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in environ.get("SPINML_API_TOKENS", "").split(","))):
        token, sep, tenant = pair.partition(":")
        if not sep or not token or not tenant:
            raise ValueError("SPINML_API_TOKENS: entries must be TOKEN:TENANT separated by commas")
        tokens[token] = tenant
    path = environ.get("SPINML_API_TOKENS_FILE")
    if path:
        with open(path) as handle:
            mapping = yaml.safe_load(handle) or {}
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: expected a mapping of token to tenant")
        tokens.update({str(k): str(v) for k, v in mapping.items()})
    return tokens


def tenant_for(authorization: str | None, tokens: dict[str, str]) -> str:
    """The tenant whose token the `Authorization: Bearer ...` header carries; AuthError otherwise."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthError("missing bearer token")
    for token, tenant in tokens.items():
        if hmac.compare_digest(token.encode(), presented.strip().encode()):
            return tenant
    raise AuthError("invalid bearer token")
