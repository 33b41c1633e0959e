"""JWT access tokens: verification (HS256 / RS256 / ES256 / JWKS) and development minting.

A :class:`TokenVerifier` is built once from :class:`~relay.settings.AuthSettings`
and checks every token a client presents. Key material is the HS256 shared
secret (:func:`load_secret`), a PEM public key file, or a JWKS file whose
``kid`` selects the key. An algorithm is accepted only when it is listed in
``settings.algorithms`` *and* a key of its family is configured, so ``none``
never verifies and an HS256 token is never checked against an RSA public key
(the classic algorithm-confusion attack).

Exceptions::

    TokenError (reason: malformed | expired | invalid_signature | invalid_claims | unknown_key)

A token that fails verification raises :class:`TokenError`; unusable settings
or key files raise ``ValueError`` (or ``OSError`` for a file that cannot be
read or created) when the verifier is built, never per token.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import jwt
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from relay.settings import AuthSettings

ROLES = ("driver", "office", "admin")
MINT_ALGORITHM = "HS256"

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Claims(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The verified content of an access token."""

    sub: _NonEmpty  # user id
    company: _NonEmpty  # company id
    role: str  # one of ROLES (checked by TokenVerifier.verify)
    exp: float  # unix seconds
    jti: _NonEmpty
    assets: tuple[str, ...] | None = None  # asset ids the token may see; None: the role decides
    name: str | None = None  # display name, for presence
    email: str | None = None


class TokenError(Exception):
    """A token that must be refused; ``reason`` is a stable slug for metrics, logs and close reasons."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


# Key type each algorithm verifies with. Checking the family ourselves (rather
# than trusting whatever the library would coerce) is what keeps an HS256
# header from being verified with an RSA public key used as an HMAC secret.
_KEY_TYPES: dict[str, type | tuple[type, ...]] = {
    "HS256": bytes,
    "HS384": bytes,
    "HS512": bytes,
    "RS256": RSAPublicKey,
    "RS384": RSAPublicKey,
    "RS512": RSAPublicKey,
    "PS256": RSAPublicKey,
    "PS384": RSAPublicKey,
    "PS512": RSAPublicKey,
    "ES256": EllipticCurvePublicKey,
    "ES256K": EllipticCurvePublicKey,
    "ES384": EllipticCurvePublicKey,
    "ES512": EllipticCurvePublicKey,
    "EdDSA": (Ed25519PublicKey, Ed448PublicKey),
}
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
_MINTER = jwt.PyJWT({"enforce_minimum_key_length": True})

# PyJWT exception -> reason, most specific first (InvalidSignatureError is a DecodeError).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.InvalidSignatureError, "invalid_signature"),
    (jwt.InvalidAlgorithmError, "invalid_signature"),
    (jwt.DecodeError, "malformed"),
    (jwt.MissingRequiredClaimError, "invalid_claims"),
    (jwt.InvalidIssuerError, "invalid_claims"),
    (jwt.InvalidAudienceError, "invalid_claims"),
    (InvalidSubjectError, "invalid_claims"),
    (InvalidJTIError, "invalid_claims"),
    (jwt.InvalidIssuedAtError, "invalid_claims"),
    (jwt.ImmatureSignatureError, "invalid_claims"),
    (jwt.PyJWTError, "malformed"),
)


class _Key(NamedTuple):
    kid: str | None  # None: the key matches any (or no) "kid" header
    key: Any  # prepared for its algorithm: bytes or a cryptography public key


class TokenVerifier:
    """Checks access tokens against the configured keys; build once, call :meth:`verify` per token."""

    def __init__(self, settings: AuthSettings) -> None:
        self._issuer = settings.issuer or None
        self._audience = settings.audience or None
        self._leeway = settings.leeway_s
        self._keys = _load_keys(settings)
        # The clock is ours (``now``), so PyJWT's time checks, which read the
        # system clock, are off; exp and nbf are checked in verify(). Required
        # claims and their types are Claims' job; PyJWT requires iss/aud when
        # they are configured.
        self._jwt = jwt.PyJWT(
            {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": self._audience is not None}
        )

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms this verifier accepts: listed in the settings and backed by a configured key."""
        return frozenset(self._keys)

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Check signature, algorithm, key, required claims, issuer/audience (when configured), ``nbf``
        and ``exp`` (against ``now``, default the system clock, with the configured leeway) and
        return the claims; raise :class:`TokenError` with a ``reason`` slug otherwise."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if not isinstance(algorithm, str):
                raise TokenError("malformed", "header has no alg")
            key = self._select_key(algorithm, header.get("kid"))
            payload = self._jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason_for(exc), str(exc)) from None
        return self._check_claims(payload, time.time() if now is None else now)

    def _select_key(self, algorithm: str, kid: str | None) -> _Key:
        keys = self._keys.get(algorithm)
        if keys is None:
            raise TokenError("invalid_signature", f"algorithm {algorithm!r} is not accepted")
        if kid is not None:
            keys = [k for k in keys if k.kid == kid] or [k for k in keys if k.kid is None]
        if len(keys) != 1:
            # Several keys and no kid to choose: refuse rather than try each,
            # which would multiply the cost of every forged token.
            raise TokenError("unknown_key", f"no single {algorithm} key for kid {kid!r}")
        return keys[0]

    def _check_claims(self, payload: dict[str, Any], now: float) -> Claims:
        try:
            claims = msgspec.convert(payload, Claims)
        except msgspec.ValidationError as exc:
            raise TokenError("invalid_claims", str(exc)) from None
        if claims.role not in ROLES:
            raise TokenError("invalid_claims", f"unknown role {claims.role!r}")
        # NaN or infinity would make the comparisons below never expire the token.
        if not math.isfinite(claims.exp):
            raise TokenError("invalid_claims", "exp is not a finite number")
        nbf = payload.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, int | float) or isinstance(nbf, bool) or not math.isfinite(nbf):
                raise TokenError("invalid_claims", "nbf is not a number")
            if nbf > now + self._leeway:
                raise TokenError("invalid_claims", "token not yet valid (nbf)")
        # Same boundary as PyJWT: a token is expired at exp itself.
        if claims.exp <= now - self._leeway:
            raise TokenError("expired", "token has expired")
        return claims


def _reason_for(exc: jwt.PyJWTError) -> str:
    return next(reason for kind, reason in _REASONS if isinstance(exc, kind))


def _load_keys(settings: AuthSettings) -> dict[str, list[_Key]]:
    """Every configured key, under each accepted algorithm it is valid for."""
    unknown = [a for a in settings.algorithms if a not in _KEY_TYPES]
    if unknown:
        raise ValueError(f"auth: unsupported algorithms {unknown} (supported: {sorted(_KEY_TYPES)})")
    material: list[tuple[str | None, Any, str | None]] = []  # kid, key, algorithm it is bound to (JWK "alg")
    if any(_KEY_TYPES[a] is bytes for a in settings.algorithms):
        material.append((None, load_secret(settings).encode(), None))
    if settings.public_key_file:
        material.append((None, _read_pem_public_key(settings.public_key_file), None))
    if settings.jwks_file:
        material.extend(_read_jwks(settings.jwks_file))
    keys: dict[str, list[_Key]] = {}
    for kid, key, bound in material:
        for algorithm in settings.algorithms:
            if bound not in (None, algorithm) or not isinstance(key, _KEY_TYPES[algorithm]):
                continue
            prepared = _prepare(algorithm, key)
            if prepared is None:
                continue
            if any(k.kid == kid for k in keys.get(algorithm, ())):
                raise ValueError(f"auth: two {algorithm} keys with kid {kid!r}")
            keys.setdefault(algorithm, []).append(_Key(kid, prepared))
    if not keys:
        raise ValueError(f"auth: no configured key fits any of the algorithms {settings.algorithms}")
    return keys


def _prepare(algorithm: str, key: Any) -> Any:
    """The key as PyJWT uses it, or None when it does not fit (an EC key on another curve)."""
    implementation = _ALGORITHMS[algorithm]
    try:
        prepared = implementation.prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError):
        return None
    weak = implementation.check_key_length(prepared)
    if weak:
        # Refused at startup: a short HMAC secret can be brute-forced offline into admin tokens.
        raise ValueError(f"auth: {algorithm} key too short: {weak}")
    return prepared


def _read_pem_public_key(path: str) -> Any:
    try:
        return load_pem_public_key(Path(path).read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"auth: public_key_file {path}: not a PEM public key ({exc})") from None


def _read_jwks(path: str) -> list[tuple[str | None, Any, str | None]]:
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        jwks = jwt.PyJWKSet.from_dict(data)
    except (ValueError, jwt.PyJWTError) as exc:
        raise ValueError(f"auth: jwks_file {path}: {exc}") from None
    # PyJWK binds each key to one algorithm (its "alg", else inferred from kty/crv).
    return [(jwk.key_id, jwk.key, jwk.algorithm_name) for jwk in jwks if jwk.public_key_use in (None, "sig")]


def load_secret(settings: AuthSettings) -> str:
    """The HS256 shared secret: ``settings.secret`` when set, else the content of ``settings.secret_file``,
    which is created (mode 0600, 32 random bytes as URL-safe base64) when missing, so that ``fleetgate
    run`` and ``fleetgate token`` agree on a secret with no configuration. Raises ``ValueError`` for an
    empty secret file and ``OSError`` when the file cannot be read or created."""
    if settings.secret:
        return settings.secret
    path = Path(settings.secret_file)
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = _create_secret_file(path)
    if not secret:
        raise ValueError(f"auth: secret_file {path} is empty")
    return secret


def _create_secret_file(path: Path) -> str:
    secret = secrets.token_urlsafe(32)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secret + "\n")
            file.flush()
            os.fsync(file.fileno())
        # link(), unlike rename(), never replaces: when two processes race to
        # create the file, both end up with the winner's secret.
        os.link(temporary, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        temporary.unlink(missing_ok=True)
    return secret


def mint_token(
    settings: AuthSettings,
    *,
    role: str,
    company: str,
    user: str,
    ttl_s: float,
    assets: Sequence[str] | None = None,
    name: str | None = None,
    email: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token signed with :func:`load_secret` carrying ``sub``, ``company``, ``role``, ``iat``,
    ``exp`` (``iat + ttl_s``, whole seconds), a random ``jti``, ``iss``/``aud`` when configured and the
    optional ``assets``/``name``/``email``. For development and tests: raises ``ValueError`` when
    ``settings.algorithms`` lacks HS256 (a verifier would refuse the token), for an unknown role, an
    empty user or company, a non-positive ttl or a secret too short to be safe."""
    if MINT_ALGORITHM not in settings.algorithms:
        raise ValueError(f"auth: minting needs {MINT_ALGORITHM} in algorithms (have {settings.algorithms})")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if not user or not company:
        raise ValueError("user and company must not be empty")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl_s!r}")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "sub": user,
        "company": company,
        "role": role,
        "iat": issued,
        "exp": issued + math.ceil(ttl_s),
        "jti": uuid.uuid4().hex,
    }
    optional = {
        "iss": settings.issuer or None,
        "aud": settings.audience or None,
        "assets": None if assets is None else list(assets),
        "name": name,
        "email": email,
    }
    payload.update((k, v) for k, v in optional.items() if v is not None)
    try:
        return _MINTER.encode(payload, load_secret(settings), algorithm=MINT_ALGORITHM)
    except jwt.InvalidKeyError as exc:
        raise ValueError(f"auth: {MINT_ALGORITHM} secret too short: {exc}") from None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` (a decimal number and an optional
    unit); raises ``ValueError`` for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (examples: 90, 90s, 15m, 1h, 2d)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]
