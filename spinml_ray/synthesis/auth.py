"""Bearer tokens for the synthesis HTTP API: each token belongs to one tenant.

The ingress reads the tokens itself, on its own node, when it starts: from `SPINML_API_TOKENS`
("TOKEN:TENANT,TOKEN2:TENANT2") or from a file named in `SPINML_API_TOKENS_FILE` (a YAML or JSON
mapping of token to tenant), both set by the platform on the node (`ray start`'s environment, a
KubeRay secret). They are never forwarded to Ray workers through a runtime environment, so they
appear in no job table, dashboard or runtime-env log. With neither, every call is refused.

A token file is strict: every key and value must be a string in the file itself (a YAML `null`,
`true` or `123` key would otherwise become the guessable token "None", "True" or "123"), and every
tenant must be an identifier; anything else is a start-up error naming the line. Tokens shorter than
`MIN_TOKEN_LENGTH` characters are accepted with a warning that names the tenant, never the token.
"""

from __future__ import annotations

import hmac
import logging
import os

import yaml

from spinml_ray.storage import IDENTIFIER, IDENTIFIER_RULE

log = logging.getLogger(__name__)
MIN_TOKEN_LENGTH = 16
_STRING = "tag:yaml.org,2002:str"


class AuthError(PermissionError):
    pass


def _pairs_from_env(value: str) -> list[tuple[str, str, str]]:
    pairs = []
    for number, pair in enumerate(filter(None, (p.strip() for p in value.split(","))), start=1):
        token, sep, tenant = pair.partition(":")
        if not sep or not token or not tenant:
            raise ValueError(f"SPINML_API_TOKENS: entry {number} is not TOKEN:TENANT (entries are separated by commas)")
        pairs.append((token, tenant, f"SPINML_API_TOKENS entry {number}"))
    return pairs


def _pairs_from_file(path: str) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8") as handle:
        try:
            root = yaml.compose(handle, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML/JSON ({exc})") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"{path}: expected a mapping of token to tenant")
    pairs = []
    for key, value in root.value:
        where = f"{path} line {key.start_mark.line + 1}"
        for node, what in ((key, "token"), (value, "tenant")):
            if not isinstance(node, yaml.ScalarNode) or node.tag != _STRING:
                raise ValueError(f"{where}: the {what} must be a string (quote it)")
        pairs.append((key.value, value.value, where))
    return pairs


def load_tokens(environ=os.environ) -> dict[str, str]:
    """{token: tenant} from the environment of this process (see the module docstring)."""
    pairs = _pairs_from_env(environ.get("SPINML_API_TOKENS", ""))
    if environ.get("SPINML_API_TOKENS_FILE"):
        pairs += _pairs_from_file(environ["SPINML_API_TOKENS_FILE"])
    tokens: dict[str, str] = {}
    for token, tenant, where in pairs:
        if not token.strip() or token != token.strip():
            raise ValueError(f"{where}: a token must not be empty or start or end with spaces")
        if not IDENTIFIER.fullmatch(tenant):
            raise ValueError(f"{where}: tenant is not an identifier ({IDENTIFIER_RULE})")
        if token in tokens and tokens[token] != tenant:
            raise ValueError(f"{where}: the same token is given to two tenants")
        if len(token) < MIN_TOKEN_LENGTH:
            log.warning("%s: the token of tenant %r is shorter than %d characters", where, tenant, MIN_TOKEN_LENGTH)
        tokens[token] = tenant
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
