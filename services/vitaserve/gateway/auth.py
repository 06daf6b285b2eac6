"""Who is calling: per-call credentials from gRPC metadata, turned into a Caller (tenant + scopes).

Two kinds of credential, one per call:
  x-api-key: <key>             keys from the JSON file named by $VITA_API_KEYS_FILE (a mounted Secret),
                               stored only as sha256 hex, each bound to a tenant
  authorization: Bearer <JWT>  verified offline against the public keys of a JWKS file (--jwks-file),
                               chosen by `kid`; RS256, ES256 and EdDSA only (never `none`, never HS*:
                               a public key used as an HMAC secret would let anyone sign)
Both files are re-read when they change (a rotated Secret needs no restart); a file that became
unreadable or malformed keeps the last good contents and is logged, so a half-written update
cannot lock every caller out.

Missing or bad credentials: UNAUTHENTICATED; valid but the RPC not in the caller's scopes:
PERMISSION_DENIED. Messages never echo a key or a token. Plain functions and classes: the servicer
calls `Authenticator.authenticate` with the call's metadata; tests call it directly too.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import jwt
import structlog

from vitaserve.common import keys
from vitaserve.gateway.quota import TenantLimits, parse_tenant_limits

log = structlog.get_logger(__name__)

API_KEYS_FILE_ENV = "VITA_API_KEYS_FILE"
API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
SCOPES = frozenset({"converse", "synthesize", "transcribe"})  # one per RPC of the Conversation service
JWT_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
# A file is stat()ed at most this often: a rotated key is in use within a second, and a busy
# gateway does not pay a system call per call.
RELOAD_CHECK_S = 1.0
MAX_CREDENTIAL_CHARS = 8192  # a JWT with a few claims is < 2 kB; longer is not one of ours


class AuthError(Exception):
    """A refused credential: `code` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class AuthConfigError(ValueError):
    """A key file or JWKS file that cannot be used (at start-up: the gateway does not start)."""


@dataclass(frozen=True)
class Caller:
    tenant: str
    scopes: frozenset[str]
    credential: str  # what authenticated it, for logs: "api-key:<id>", "jwt:<kid>", "anonymous"; no secret

    def require(self, rpc: str) -> None:
        if rpc not in self.scopes:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"this credential may not call {rpc} (its scopes: {', '.join(sorted(self.scopes)) or 'none'})")


def _scopes(raw: Any, where: str) -> frozenset[str]:
    if raw is None:
        return SCOPES
    items = raw.split() if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise AuthConfigError(f"{where}: scopes must be a list of names (or a space-separated string)")
    unknown = set(items) - SCOPES
    if unknown:
        raise AuthConfigError(f"{where}: unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    return frozenset(items)


def _tenant(raw: Any, where: str) -> str:
    try:
        return keys.check_tenant(raw)
    except keys.InvalidKeyPart as exc:
        raise AuthConfigError(f"{where}: {exc}") from None


def hash_key(key: str) -> str:
    """The form a key is stored in: sha256 hex of its UTF-8 bytes. Keys are random (apikey_cli:
    256 bits), so a plain hash is enough; no salt or slow hash is needed against guessing."""
    return hashlib.sha256(key.encode()).hexdigest()


class ReloadingFile:
    """A file parsed by `parse`, parsed again when it changes (mtime, size or inode: a Kubernetes
    Secret update swaps a symlink). Thread-safe; a failed re-parse keeps the last good value."""

    def __init__(self, path: str, parse: Callable[[bytes], Any], what: str):
        self.path, self.parse, self.what = path, parse, what
        self._lock = threading.Lock()
        self._checked = 0.0
        self._signature = self._stat()
        self.value = self._load()  # at start-up a bad file is an error

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> Any:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise AuthConfigError(f"{self.what} {self.path}: {exc.strerror}") from None
        try:
            return self.parse(data)
        except AuthConfigError:
            raise
        except ValueError as exc:
            raise AuthConfigError(f"{self.what} {self.path}: {exc}") from None

    def get(self) -> Any:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self.value
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return self.value
            self._checked = now
            signature = self._stat()
            if signature is not None and signature != self._signature:
                try:
                    self.value = self._load()
                    self._signature = signature
                    log.info("credentials file reloaded", what=self.what, path=self.path)
                except AuthConfigError as exc:
                    log.warning("credentials file not reloaded: keeping the last good one", what=self.what,
                                path=self.path, error=str(exc))
        return self.value


@dataclass(frozen=True)
class ApiKeyEntry:
    id: str
    tenant: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class ApiKeysDoc:
    by_hash: dict[str, ApiKeyEntry]
    tenants: dict[str, TenantLimits]  # the optional "tenants" section: per-tenant quotas (gateway.quota)


def _with_keys_list(data: bytes, what: str) -> dict:
    """The JSON object of an API-keys or JWKS file, which both hold a "keys" list."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise AuthConfigError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise AuthConfigError(f'{what} must be an object with a "keys" list')
    return doc


def parse_api_keys(data: bytes) -> ApiKeysDoc:
    """{"keys": [{"id", "tenant", "sha256", "scopes"?}], "tenants"?: {name: {...}}}."""
    doc = _with_keys_list(data, "API keys file")
    by_hash: dict[str, ApiKeyEntry] = {}
    for i, item in enumerate(doc["keys"]):
        where = f"API keys file, keys[{i}]"
        if not isinstance(item, dict):
            raise AuthConfigError(f"{where}: must be an object")
        key_id, digest = item.get("id"), item.get("sha256")
        if not isinstance(key_id, str) or not key_id or len(key_id) > 64:
            raise AuthConfigError(f"{where}: id must be a string of 1-64 characters")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AuthConfigError(f"{where} ({key_id}): sha256 must be 64 lowercase hex digits (the key's hash, "
                                  "never the key)")
        if digest in by_hash:
            raise AuthConfigError(f"{where} ({key_id}): the same key is listed twice")
        by_hash[digest] = ApiKeyEntry(key_id, _tenant(item.get("tenant"), f"{where} ({key_id})"),
                                      _scopes(item.get("scopes"), f"{where} ({key_id})"))
    try:
        tenants = parse_tenant_limits(doc.get("tenants", {}), "API keys file")
    except ValueError as exc:
        raise AuthConfigError(str(exc)) from None
    return ApiKeysDoc(by_hash, tenants)


def parse_jwks(data: bytes) -> dict[str, jwt.PyJWK]:
    """kid -> public key. Only keys usable with an allowed algorithm; a symmetric ("oct") or
    private key is refused outright rather than skipped, so a misplaced secret is noticed."""
    doc = _with_keys_list(data, "JWKS file")
    found: dict[str, jwt.PyJWK] = {}
    for i, item in enumerate(doc["keys"]):
        where = f"JWKS file, keys[{i}]"
        if not isinstance(item, dict):
            raise AuthConfigError(f"{where}: must be an object")
        kid = item.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthConfigError(f"{where}: every key needs a kid (tokens choose their key by it)")
        if item.get("kty") == "oct" or "d" in item:
            raise AuthConfigError(f"{where} ({kid}): only public keys belong here (no symmetric or private key)")
        try:
            key = jwt.PyJWK(item)
        except jwt.PyJWKError as exc:
            raise AuthConfigError(f"{where} ({kid}): {exc}") from None
        if key.algorithm_name not in JWT_ALGORITHMS:
            raise AuthConfigError(f"{where} ({kid}): algorithm {key.algorithm_name} is not allowed; "
                                  f"use one of {sorted(JWT_ALGORITHMS)}")
        if kid in found:
            raise AuthConfigError(f"{where}: kid {kid!r} is listed twice")
        found[kid] = key
    return found


@dataclass(frozen=True)
class JwtRules:
    issuer: str
    audience: str
    tenant_claim: str = "tenant"
    leeway_s: float = 30.0


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


def verify_jwt(token: str, jwks: dict[str, jwt.PyJWK], rules: JwtRules) -> Caller:
    """The caller a JWT names, or AuthError(UNAUTHENTICATED) saying why (never the token itself)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _unauthenticated("the bearer token is not a JWT") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in JWT_ALGORITHMS:
        raise _unauthenticated(f"JWT algorithm {str(alg)[:16]!r} is not accepted; use one of {sorted(JWT_ALGORITHMS)}")
    if not isinstance(kid, str) or kid not in jwks:
        raise _unauthenticated("the JWT names no known key (kid)")
    key = jwks[kid]
    if key.algorithm_name != alg:  # e.g. an RSA key asked to check an ES256 signature
        raise _unauthenticated(f"the JWT's algorithm {alg} does not match its key {kid!r}")
    try:
        claims = jwt.decode(token, key.key, algorithms=[alg], audience=rules.audience, issuer=rules.issuer,
                            leeway=rules.leeway_s, options={"require": ["exp", "iss", "aud"]})
    except jwt.ExpiredSignatureError:
        raise _unauthenticated("the JWT has expired") from None
    except jwt.InvalidAudienceError:
        raise _unauthenticated("the JWT is for another audience") from None
    except jwt.InvalidIssuerError:
        raise _unauthenticated("the JWT is from another issuer") from None
    except jwt.ImmatureSignatureError:
        raise _unauthenticated("the JWT is not valid yet (nbf/iat in the future)") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _unauthenticated(f"the JWT lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError:
        raise _unauthenticated("the JWT's signature or claims are invalid") from None
    tenant = claims.get(rules.tenant_claim)
    try:
        keys.check_tenant(tenant)
    except keys.InvalidKeyPart:
        raise _unauthenticated(f"the JWT's {rules.tenant_claim!r} claim must name a tenant "
                               "(1-64 of letters, digits, '_', '.', '-')") from None
    scope = claims.get("scope")
    # an identity provider's other scopes (openid, email, ...) are not ours: only ours count
    scopes = SCOPES if scope is None else SCOPES & set(scope.split() if isinstance(scope, str) else ())
    return Caller(tenant, frozenset(scopes), f"jwt:{kid}")


class Authenticator:
    """Metadata -> Caller. Configured sources: API keys, JWKS (either, both), and anonymous callers
    (tenant keys.ANONYMOUS_TENANT) only when allow_anonymous."""

    def __init__(self, api_keys_file: str | None = None, jwks_file: str | None = None,
                 jwt_rules: JwtRules | None = None, allow_anonymous: bool = False):
        if jwks_file and jwt_rules is None:
            raise AuthConfigError("a JWKS file needs an issuer and an audience to check")
        self.api_keys = ReloadingFile(api_keys_file, parse_api_keys, "API keys file") if api_keys_file else None
        self.jwks = ReloadingFile(jwks_file, parse_jwks, "JWKS file") if jwks_file else None
        self.jwt_rules = jwt_rules
        self.allow_anonymous = allow_anonymous

    def tenant_overrides(self) -> dict[str, TenantLimits]:
        """The "tenants" section of the API keys file (reloaded with it); {} without one."""
        return self.api_keys.get().tenants if self.api_keys is not None else {}

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None, rpc: str) -> Caller:
        """The caller of `rpc`, or AuthError (UNAUTHENTICATED / PERMISSION_DENIED)."""
        api_keys, bearers = [], []
        for name, value in metadata or ():
            if name == API_KEY_HEADER:
                api_keys.append(value)
            elif name == AUTHORIZATION_HEADER:
                bearers.append(value)
        if len(api_keys) + len(bearers) > 1:
            raise _unauthenticated(f"send one credential: either {API_KEY_HEADER} or {AUTHORIZATION_HEADER}, once")
        if api_keys:
            caller = self._api_key(api_keys[0])
        elif bearers:
            caller = self._bearer(bearers[0])
        elif self.allow_anonymous:
            caller = Caller(keys.ANONYMOUS_TENANT, SCOPES, "anonymous")
        else:
            raise _unauthenticated(f"no credentials: send `{AUTHORIZATION_HEADER}: Bearer <JWT>` or "
                                   f"`{API_KEY_HEADER}: <key>` metadata")
        caller.require(rpc)
        return caller

    def _api_key(self, value: Any) -> Caller:
        if self.api_keys is None:
            raise _unauthenticated("this gateway accepts no API keys")
        if not isinstance(value, str) or not value or len(value) > MAX_CREDENTIAL_CHARS:
            raise _unauthenticated("the API key is not recognised")
        entry = self.api_keys.get().by_hash.get(hash_key(value))
        if entry is None:
            raise _unauthenticated("the API key is not recognised")
        return Caller(entry.tenant, entry.scopes, f"api-key:{entry.id}")

    def _bearer(self, value: Any) -> Caller:
        if self.jwks is None:
            raise _unauthenticated("this gateway accepts no bearer tokens")
        if not isinstance(value, str) or len(value) > MAX_CREDENTIAL_CHARS:
            raise _unauthenticated("the bearer token is not a JWT")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated(f"{AUTHORIZATION_HEADER} must be `Bearer <JWT>`")
        return verify_jwt(token.strip(), self.jwks.get(), self.jwt_rules)
