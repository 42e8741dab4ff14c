"""An offline fake of Globus Auth that fakes only the HTTP edge (``responses`` callbacks).

Kept real: ``globus_sdk.UserApp`` and everything under it -- the native-app login flow
(authorize URL with PKCE), ``NativeAppAuthClient``, the ``id_token`` decoding (a real RS256
JWT checked by ``IDTokenDecoder`` against the JWK the fake publishes), the validating token
storage (identity, refresh tokens, scope and ``data_access`` consent checks), and the
``RefreshTokenAuthorizer``'s refresh on expiry or on a 401.

Faked: ``POST /v2/oauth2/token`` (``authorization_code`` with the PKCE verifier checked;
``refresh_token``, answering ``invalid_grant`` for a revoked one), ``POST
/v2/oauth2/token/revoke``, the OpenID configuration and JWK, and ``GET
/v2/api/identities/<id>/consents`` (the consent forest of what the user approved). The
user's browser is :meth:`FakeGlobusAuth.approve`: it reads the authorize URL the SDK
printed and returns the code Auth would show. Resource servers (the Transfer fake) call
:meth:`FakeGlobusAuth.check` on the ``Authorization`` header they receive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from urllib.parse import parse_qs, urlparse

BASE = "https://auth.globus.org"
JSON = {"Content-Type": "application/json"}
AUTH_RS = "auth.globus.org"
OPENID_SCOPES = {"openid", "profile", "email"}


def resource_server_of(scope: str) -> str:
    """The resource server a root scope string belongs to."""
    if scope in OPENID_SCOPES or scope.startswith("urn:globus:auth:scope:auth.globus.org"):
        return AUTH_RS
    m = re.fullmatch(r"urn:globus:auth:scope:([^:]+):.+", scope)
    if m:
        return m.group(1)
    from globus_sdk.scopes import ComputeScopes

    if scope == str(ComputeScopes.all):
        return ComputeScopes.resource_server
    m = re.fullmatch(r"https://auth\.globus\.org/scopes/([^/]+)/.+", scope)
    return m.group(1) if m else scope


class FakeGlobusAuth:
    """Globus Auth for one user, in memory."""

    def __init__(self, *, access_lifetime_s: int = 172800) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.identity_id = str(uuid.uuid4())
        self.username = "ada@example.edu"
        self.access_lifetime_s = access_lifetime_s
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._codes: dict[str, dict] = {}
        self.access: dict[str, dict] = {}     # token -> {rs, scope, expires_at}
        self.refresh: dict[str, dict] = {}    # token -> {rs, scope, revoked}
        self.consented: list[str] = []        # scope strings the user approved (full trees)
        self.grants: list[str] = []           # grant types seen at the token endpoint
        self.requests: list[tuple[str, str]] = []
        self.revoke_fails = False             # the revoke endpoint refuses (400)
        self._lock = threading.RLock()

    # -- the user's side
    def approve(self, authorize_url: str) -> str:
        """What the user's browser does with the printed URL: consent to every scope asked
        for, and return the authorization code Auth shows."""
        q = parse_qs(urlparse(authorize_url).query)
        assert q["response_type"] == ["code"] and q["code_challenge_method"] == ["S256"]
        scopes = q["scope"][0]
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = {"scope": scopes, "challenge": q["code_challenge"][0],
                                 "client_id": q["client_id"][0]}
            self.consented.append(scopes)
        return code

    def expire_access_tokens(self) -> None:
        with self._lock:
            for tok in self.access.values():
                tok["expires_at"] = time.time() - 1

    def revoke_refresh_tokens(self) -> None:
        with self._lock:
            for tok in self.refresh.values():
                tok["revoked"] = True
            self.access.clear()

    def check(self, authorization: str | None, resource_server: str) -> bool:
        """Whether a resource server should accept this ``Authorization`` header."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        tok = self.access.get(authorization[len("Bearer "):])
        return bool(tok and tok["rs"] == resource_server and tok["expires_at"] > time.time())

    def tokens_in(self, text: str) -> list[str]:
        """Every token this fake issued that appears in ``text`` (leak checks)."""
        return [t for t in (*self.access, *self.refresh) if t in text]

    # -- HTTP edge
    def install(self, rsps) -> None:
        def cb(method, pattern, fn):
            rsps.add_callback(method, re.compile(re.escape(BASE) + pattern),
                              callback=self._logged(fn))

        cb("POST", r"/v2/oauth2/token/revoke$", self._revoke)
        cb("POST", r"/v2/oauth2/token$", self._token)
        cb("GET", r"/\.well-known/openid-configuration$", self._openid)
        cb("GET", r"/jwk\.json$", self._jwk)
        cb("GET", r"/v2/api/identities/[^/]+/consents.*", self._consents)

    def _logged(self, fn):
        def inner(request):
            with self._lock:
                self.requests.append((request.method, urlparse(request.url).path))
                return fn(request)
        return inner

    @staticmethod
    def _form(request) -> dict[str, str]:
        body = request.body or ""
        if isinstance(body, bytes):
            body = body.decode()
        return {k: v[0] for k, v in parse_qs(body).items()}

    def _error(self, status: int, error: str, description: str):
        return status, JSON, json.dumps({"error": error, "error_description": description})

    def _issue(self, rs: str, scope: str, refresh_token: str | None) -> dict:
        access = secrets.token_urlsafe(24)
        self.access[access] = {"rs": rs, "scope": scope,
                               "expires_at": time.time() + self.access_lifetime_s}
        doc = {"access_token": access, "scope": scope, "resource_server": rs,
               "expires_in": self.access_lifetime_s, "token_type": "Bearer",
               "state": "_default"}
        if refresh_token is not None:
            doc["refresh_token"] = refresh_token
        return doc

    def _token(self, request):
        form = self._form(request)
        grant = form.get("grant_type", "")
        self.grants.append(grant)
        if grant == "authorization_code":
            info = self._codes.pop(form.get("code", ""), None)
            if info is None:
                return self._error(400, "invalid_grant", "unknown or used code")
            verifier = form.get("code_verifier", "")
            challenge = base64.urlsafe_b64encode(
                hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if challenge != info["challenge"]:
                return self._error(400, "invalid_grant", "PKCE verification failed")
            from globus_sdk.scopes import ScopeParser

            by_rs: dict[str, list[str]] = {}
            for scope in ScopeParser.parse(info["scope"]):
                by_rs.setdefault(resource_server_of(scope.scope_string), []).append(
                    scope.scope_string)
            docs = []
            for rs, scopes in by_rs.items():
                scope = " ".join(dict.fromkeys(scopes))
                refresh = secrets.token_urlsafe(24)
                self.refresh[refresh] = {"rs": rs, "scope": scope, "revoked": False}
                docs.append(self._issue(rs, scope, refresh))
            docs.sort(key=lambda d: d["resource_server"] != AUTH_RS)  # auth's first
            top = docs[0]
            if top["resource_server"] == AUTH_RS:
                top["id_token"] = self._id_token(info["client_id"])
            top["other_tokens"] = docs[1:]
            return 200, JSON, json.dumps(top)
        if grant == "refresh_token":
            info = self.refresh.get(form.get("refresh_token", ""))
            if info is None or info["revoked"]:
                return self._error(400, "invalid_grant", "refresh token revoked or unknown")
            doc = self._issue(info["rs"], info["scope"], form["refresh_token"])
            doc["other_tokens"] = []
            return 200, JSON, json.dumps(doc)
        return self._error(400, "unsupported_grant_type", grant)

    def _revoke(self, request):
        if self.revoke_fails:
            return self._error(400, "invalid_request", "revocation refused")
        token = self._form(request).get("token", "")
        self.access.pop(token, None)
        if token in self.refresh:
            self.refresh[token]["revoked"] = True
        return 200, JSON, json.dumps({"active": False})

    def _id_token(self, client_id: str) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": BASE, "sub": self.identity_id, "aud": client_id, "iat": now,
                  "exp": now + 172800, "preferred_username": self.username,
                  "identity_provider": str(uuid.uuid4())}
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": "fake"})

    def _openid(self, request):
        return 200, JSON, json.dumps({
            "issuer": BASE, "jwks_uri": f"{BASE}/jwk.json",
            "authorization_endpoint": f"{BASE}/v2/oauth2/authorize",
            "token_endpoint": f"{BASE}/v2/oauth2/token",
            "id_token_signing_alg_values_supported": ["RS512", "RS256"]})

    def _jwk(self, request):
        from jwt.algorithms import RSAAlgorithm

        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid="fake", use="sig", alg="RS256")
        return 200, JSON, json.dumps({"keys": [jwk]})

    def _consents(self, request):
        if not self.check(request.headers.get("Authorization"), AUTH_RS):
            return self._error(401, "unauthorized", "no valid token")
        from globus_sdk.scopes import ScopeParser

        consents: list[dict] = []

        def add(scope, path: list[int]) -> None:
            cid = len(consents) + 1
            consents.append({
                "id": cid, "status": "approved", "allows_refresh": True,
                "dependency_path": [*path, cid], "scope_name": scope.scope_string,
                "atomically_revocable": False, "effective_identity": self.identity_id,
                "auto_approved": False, "scope": str(uuid.uuid4()),
                "client": str(uuid.uuid4()), "created": "2026-12-01T00:00:00+00:00",
                "updated": "2026-12-01T00:00:00+00:00",
                "last_used": "2026-12-01T00:00:00+00:00"})
            for dep in scope.dependencies:
                add(dep, [*path, cid])

        for approved in self.consented:
            for scope in ScopeParser.parse(approved):
                add(scope, [])
        return 200, JSON, json.dumps({"consents": consents})
