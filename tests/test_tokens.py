"""relay.tokens: verification with real HS256 / RS256 / ES256 / JWKS keys, minting, the secret file, the CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from relay import tokens
from relay.settings import AuthSettings
from relay.tokens import Claims, TokenError, TokenVerifier, load_secret, mint_token, parse_duration

NOW = 1_700_000_000.0
SECRET = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # longer than SHA-256's 32 bytes


# -- keys and tokens ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test in its own working directory: a default (relative) secret_file never lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_file(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(path)


def jwks_file(path: Path, keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]) -> str:
    entries = []
    for kid, key in keys.items():
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "RS256"}
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "ES256"}
        entries.append(jwk | {"kid": kid, "use": "sig"})
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


def claims(**changes: Any) -> dict[str, Any]:
    """A valid payload; a change to None removes the claim."""
    payload = {"sub": "u1", "company": "acme", "role": "office", "exp": NOW + 3600, "jti": "j1", "iat": NOW}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def sign(key: Any, algorithm: str = "HS256", kid: str | None = None, **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def reason(verifier: TokenVerifier, token: str, now: float | None = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now=now)
    return info.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(header: object, payload: object, signature: bytes = b"x") -> str:
    """A token from JSON values, signature unchecked."""
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)])


@pytest.fixture
def hs() -> TokenVerifier:
    return TokenVerifier(AuthSettings(secret=SECRET))


# -- HS256 and minting -------------------------------------------------------------


def test_hs256_mint_and_verify_round_trip(hs: TokenVerifier) -> None:
    token = mint_token(
        AuthSettings(secret=SECRET),
        role="driver",
        company="acme",
        user="u1",
        ttl_s=600,
        assets=["truck-7", "van-1"],
        name="Ann",
        email="ann@example.com",
        now=NOW,
    )
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    got = hs.verify(token, now=NOW)
    assert got == Claims(
        sub="u1",
        company="acme",
        role="driver",
        exp=NOW + 600,
        jti=got.jti,
        assets=("truck-7", "van-1"),
        name="Ann",
        email="ann@example.com",
    )
    assert len(got.jti) == 32 and int(got.jti, 16) >= 0
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert raw["iat"] == NOW and raw["exp"] - raw["iat"] == 600
    assert "iss" not in raw and "aud" not in raw


def test_minted_tokens_have_distinct_jti(hs: TokenVerifier) -> None:
    settings = AuthSettings(secret=SECRET)
    first, second = (mint_token(settings, role="office", company="c", user="u", ttl_s=60) for _ in range(2))
    assert hs.verify(first).jti != hs.verify(second).jti


def test_optional_claims_default_to_none(hs: TokenVerifier) -> None:
    got = hs.verify(sign(SECRET), now=NOW)
    assert (got.assets, got.name, got.email) == (None, None, None)


def test_assets_claim_is_a_tuple(hs: TokenVerifier) -> None:
    got = hs.verify(sign(SECRET, assets=["a1", "a2", "a3"]), now=NOW)
    assert got.assets == ("a1", "a2", "a3")
    assert isinstance(got.assets, tuple)
    assert reason(hs, sign(SECRET, assets="a1")) == "invalid_claims"
    assert reason(hs, sign(SECRET, assets=[1, 2])) == "invalid_claims"


def test_mint_refuses_without_hs256(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    settings = AuthSettings(algorithms=["ES256"], public_key_file=pem_file(tmp_path / "ec.pem", ec_key))
    with pytest.raises(ValueError, match="HS256"):
        mint_token(settings, role="admin", company="acme", user="u1", ttl_s=60)


@pytest.mark.parametrize(
    "changes",
    [{"role": "root"}, {"user": ""}, {"company": ""}, {"ttl_s": 0}, {"ttl_s": -5}, {"ttl_s": float("inf")}],
)
def test_mint_refuses_bad_arguments(changes: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"role": "office", "company": "acme", "user": "u1", "ttl_s": 60} | changes
    with pytest.raises(ValueError):
        mint_token(AuthSettings(secret=SECRET), **arguments)


def test_short_secret_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="too short"):
        TokenVerifier(AuthSettings(secret="short"))
    with pytest.raises(ValueError, match="too short"):
        mint_token(AuthSettings(secret="short"), role="office", company="acme", user="u1", ttl_s=60)


# -- public keys and JWKS ----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_file(
    algorithm: str, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key = rsa_key if algorithm == "RS256" else ec_key
    public_key_file = pem_file(tmp_path / "pub.pem", key)
    verifier = TokenVerifier(
        AuthSettings(algorithms=[algorithm], public_key_file=public_key_file, secret_file=str(tmp_path / "s"))
    )
    assert verifier.algorithms == {algorithm}
    got = verifier.verify(sign(key, algorithm, role="admin"), now=NOW)
    assert (got.sub, got.company, got.role, got.exp) == ("u1", "acme", "admin", NOW + 3600)
    assert not (tmp_path / "s").exists(), "no HS algorithm: no secret file"


def test_public_key_file_refuses_another_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(AuthSettings(algorithms=["ES256"], public_key_file=pem_file(tmp_path / "p", ec_key)))
    other = ec.generate_private_key(ec.SECP256R1())
    assert reason(verifier, sign(other, "ES256")) == "invalid_signature"


@pytest.fixture
def jwks_verifier(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> tuple[TokenVerifier, dict[str, Any]]:
    keys: dict[str, Any] = {"rsa-1": rsa_key, "ec-1": ec_key, "ec-2": ec.generate_private_key(ec.SECP256R1())}
    settings = AuthSettings(algorithms=["RS256", "ES256"], jwks_file=jwks_file(tmp_path / "jwks.json", keys))
    return TokenVerifier(settings), keys


def test_jwks_selects_the_key_by_kid(jwks_verifier: tuple[TokenVerifier, dict[str, Any]]) -> None:
    verifier, keys = jwks_verifier
    assert verifier.verify(sign(keys["rsa-1"], "RS256", kid="rsa-1", sub="r"), now=NOW).sub == "r"
    assert verifier.verify(sign(keys["ec-1"], "ES256", kid="ec-1", sub="e1"), now=NOW).sub == "e1"
    assert verifier.verify(sign(keys["ec-2"], "ES256", kid="ec-2", sub="e2"), now=NOW).sub == "e2"
    # The kid picks one key; the token is not tried against the others.
    assert reason(verifier, sign(keys["ec-2"], "ES256", kid="ec-1")) == "invalid_signature"


def test_jwks_unknown_kid(jwks_verifier: tuple[TokenVerifier, dict[str, Any]]) -> None:
    verifier, keys = jwks_verifier
    assert reason(verifier, sign(keys["ec-1"], "ES256", kid="ec-9")) == "unknown_key"
    # Two ES256 keys and no kid: ambiguous, refused.
    assert reason(verifier, sign(keys["ec-1"], "ES256")) == "unknown_key"


def test_jwks_key_only_verifies_its_own_algorithm(jwks_verifier: tuple[TokenVerifier, dict[str, Any]]) -> None:
    verifier, keys = jwks_verifier
    # ec-1 is an ES256 key: an RS256 header naming it finds no RS256 key of that kid.
    assert reason(verifier, sign(keys["rsa-1"], "RS256", kid="ec-1")) == "unknown_key"


# -- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exp", "now", "leeway", "expected"),
    [
        (NOW + 60, NOW + 59, 0.0, None),
        (NOW + 60, NOW + 60, 0.0, "expired"),
        (NOW + 60, NOW + 3600, 0.0, "expired"),
        (NOW + 60, NOW + 89, 30.0, None),
        (NOW + 60, NOW + 90, 30.0, "expired"),
    ],
)
def test_expiry_against_the_injected_clock_with_leeway(
    exp: float, now: float, leeway: float, expected: str | None
) -> None:
    verifier = TokenVerifier(AuthSettings(secret=SECRET, leeway_s=leeway))
    token = sign(SECRET, exp=exp)
    if expected is None:
        assert verifier.verify(token, now=now).exp == exp
    else:
        assert reason(verifier, token, now=now) == expected


def test_system_clock_is_the_default(hs: TokenVerifier) -> None:
    assert reason(hs, sign(SECRET, exp=time.time() - 5), now=None) == "expired"
    assert hs.verify(sign(SECRET, exp=time.time() + 60)).sub == "u1"


def test_the_injected_clock_is_the_only_clock(hs: TokenVerifier) -> None:
    # A clock far ahead of the system's: iat/nbf/exp are all judged against it, none against time.time().
    future = time.time() + 10 * 365 * 86400
    token = mint_token(AuthSettings(secret=SECRET), role="office", company="acme", user="u1", ttl_s=60, now=future)
    assert hs.verify(token, now=future + 30).sub == "u1"
    assert reason(hs, token, now=future + 60) == "expired"


def test_not_before(hs: TokenVerifier) -> None:
    assert reason(hs, sign(SECRET, nbf=NOW + 10)) == "invalid_claims"
    assert hs.verify(sign(SECRET, nbf=NOW + 10), now=NOW + 10).sub == "u1"


@pytest.mark.parametrize("exp", [float("nan"), float("inf")])
def test_non_finite_exp_is_refused(hs: TokenVerifier, exp: float) -> None:
    # NaN compares false with everything: unchecked, such a token would never expire.
    assert reason(hs, sign(SECRET, exp=exp)) == "invalid_claims"


def test_wrong_secret(hs: TokenVerifier) -> None:
    assert reason(hs, sign(SECRET + "-other")) == "invalid_signature"


def test_tampered_payload(hs: TokenVerifier) -> None:
    header, _, signature = sign(SECRET).split(".")
    forged = b64(json.dumps(claims(role="admin", company="globex")).encode())
    assert reason(hs, f"{header}.{forged}.{signature}") == "invalid_signature"


def test_alg_none_is_refused(hs: TokenVerifier) -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    assert reason(hs, token) == "invalid_signature"
    with pytest.raises(ValueError, match="unsupported"):
        TokenVerifier(AuthSettings(secret=SECRET, algorithms=["HS256", "none"]))


def hs256_with_public_key_as_secret(pem: bytes, payload: dict[str, Any]) -> str:
    """The algorithm-confusion forgery, built by hand because PyJWT refuses to sign it."""
    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{b64(header)}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def test_hs256_token_refused_by_an_rs256_verifier(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    public_key_file = pem_file(tmp_path / "rsa.pem", rsa_key)
    forged = hs256_with_public_key_as_secret(Path(public_key_file).read_bytes(), claims(role="admin"))
    rs_only = TokenVerifier(AuthSettings(algorithms=["RS256"], public_key_file=public_key_file))
    assert reason(rs_only, forged) == "invalid_signature"
    assert reason(rs_only, sign(SECRET)) == "invalid_signature"
    # Both algorithms listed: HS256 still verifies with the secret only, never with the RSA key.
    both = TokenVerifier(AuthSettings(secret=SECRET, algorithms=["HS256", "RS256"], public_key_file=public_key_file))
    assert reason(both, forged) == "invalid_signature"
    assert both.verify(sign(rsa_key, "RS256"), now=NOW).sub == "u1"
    assert both.verify(sign(SECRET), now=NOW).sub == "u1"


def test_algorithm_without_key_material_is_refused(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="no configured key"):
        TokenVerifier(AuthSettings(algorithms=["RS256"]))
    # An EC key listed with RS256 too: RS256 is dropped, not accepted with the EC key.
    verifier = TokenVerifier(
        AuthSettings(algorithms=["RS256", "ES256"], public_key_file=pem_file(tmp_path / "ec.pem", ec_key))
    )
    assert verifier.algorithms == {"ES256"}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b.c",
        segments([], {}),  # header not an object
        segments({"typ": "JWT"}, claims()),  # no alg
    ],
)
def test_malformed(hs: TokenVerifier, token: str) -> None:
    assert reason(hs, token) == "malformed"


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b'"text"'])
def test_signed_payload_that_is_not_a_json_object(hs: TokenVerifier, payload: bytes) -> None:
    assert reason(hs, jwt.api_jws.encode(payload, SECRET, algorithm="HS256")) == "malformed"


def test_non_string_kid_is_malformed(hs: TokenVerifier) -> None:
    assert reason(hs, segments({"alg": "HS256", "kid": 7}, claims())) == "malformed"


@pytest.mark.parametrize("claim", ["sub", "company", "role", "exp", "jti"])
def test_missing_claim(hs: TokenVerifier, claim: str) -> None:
    removed: dict[str, Any] = {claim: None}
    assert reason(hs, sign(SECRET, **removed)) == "invalid_claims"


@pytest.mark.parametrize(
    "changes",
    [{"sub": ""}, {"sub": 5}, {"company": ""}, {"company": ["acme"]}, {"jti": 1}, {"exp": "soon"}, {"name": 3}],
)
def test_invalid_claim_values(hs: TokenVerifier, changes: dict[str, Any]) -> None:
    assert reason(hs, sign(SECRET, **changes)) == "invalid_claims"


@pytest.mark.parametrize("role", ["driver", "office", "admin"])
def test_roles(hs: TokenVerifier, role: str) -> None:
    assert hs.verify(sign(SECRET, role=role), now=NOW).role == role


@pytest.mark.parametrize("role", ["root", "Admin", "", 1])
def test_bad_role(hs: TokenVerifier, role: object) -> None:
    assert reason(hs, sign(SECRET, role=role)) == "invalid_claims"


def test_issuer_and_audience_checked_when_configured() -> None:
    settings = AuthSettings(secret=SECRET, issuer="https://id.example", audience="fleetgate-relay")
    verifier = TokenVerifier(settings)
    good: dict[str, Any] = {"iss": "https://id.example", "aud": "fleetgate-relay"}
    assert verifier.verify(sign(SECRET, **good), now=NOW).sub == "u1"
    assert verifier.verify(sign(SECRET, **good | {"aud": ["other", "fleetgate-relay"]}), now=NOW).sub == "u1"
    for changes in ({"iss": None}, {"iss": "https://evil.example"}, {"aud": None}, {"aud": "other"}):
        assert reason(verifier, sign(SECRET, **good | changes)) == "invalid_claims", changes
    minted = mint_token(settings, role="office", company="acme", user="u1", ttl_s=60, now=NOW)
    assert verifier.verify(minted, now=NOW).sub == "u1"
    raw = jwt.decode(minted, SECRET, algorithms=["HS256"], audience="fleetgate-relay", options={"verify_exp": False})
    assert (raw["iss"], raw["aud"]) == ("https://id.example", "fleetgate-relay")


def test_issuer_and_audience_ignored_when_not_configured(hs: TokenVerifier) -> None:
    token = sign(SECRET, iss="https://anyone.example", aud="anything")
    assert hs.verify(token, now=NOW).sub == "u1"


# -- the secret file ---------------------------------------------------------------


def test_load_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "fleetgate.secret"
    settings = AuthSettings(secret_file=str(path))
    secret = load_secret(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) == 32
    assert path.read_text().strip() == secret
    assert load_secret(settings) == secret
    assert load_secret(AuthSettings(secret_file=str(path))) == secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleetgate.secret"], "no temporary file left"
    assert load_secret(AuthSettings(secret_file=str(tmp_path / "other"))) != secret


def test_a_racing_creator_keeps_the_first_secret(tmp_path: Path) -> None:
    # Another process created the file between our read and our create: its secret wins, unchanged.
    path = tmp_path / "fleetgate.secret"
    path.write_text(SECRET + "\n")
    assert tokens._create_secret_file(path) == SECRET
    assert path.read_text() == SECRET + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleetgate.secret"]


def test_load_secret_prefers_the_configured_secret(tmp_path: Path) -> None:
    path = tmp_path / "fleetgate.secret"
    assert load_secret(AuthSettings(secret=SECRET, secret_file=str(path))) == SECRET
    assert not path.exists()


def test_load_secret_reads_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "given.secret"
    path.write_text(SECRET + "\n")
    assert load_secret(AuthSettings(secret_file=str(path))) == SECRET
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_secret(AuthSettings(secret_file=str(path)))


def test_verifier_and_minting_share_the_created_secret(tmp_path: Path) -> None:
    settings = AuthSettings(secret_file=str(tmp_path / "fleetgate.secret"))
    verifier = TokenVerifier(settings)
    token = mint_token(settings, role="admin", company="acme", user="root", ttl_s=60, now=NOW)
    assert verifier.verify(token, now=NOW).role == "admin"


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1.5h", 5400), (" 10s ", 10), ("0", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1w", "-5", "1 h", "1H", "1.h", "inf", "nan", "5mm", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- fleetgate token ---------------------------------------------------------------


def main(argv: list[str]) -> int:
    # Imported here so that the rest of this file runs even while another part of the CLI is broken.
    from fleetgate.cli import main as fleetgate_main

    return fleetgate_main(argv)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No outside FLEETGATE_* settings (the working directory is tmp_path already); returns the secret file."""
    for name in list(os.environ):
        if name.startswith("FLEETGATE_"):
            monkeypatch.delenv(name)
    secret_file = tmp_path / "cli.secret"
    monkeypatch.setenv("FLEETGATE_AUTH__SECRET_FILE", str(secret_file))
    return secret_file


def test_cli_mints_a_token_the_verifier_accepts(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--role", "office", "--company", "acme", "--user", "u7", "--ttl", "2h"]
    before = time.time()
    assert main([*argv, "--asset", "truck-7", "--asset", "van-1", "--name", "Ann"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    token = out.strip()
    got = TokenVerifier(AuthSettings(secret_file=str(cli_env))).verify(token)
    assert (got.sub, got.company, got.role, got.name) == ("u7", "acme", "office", "Ann")
    assert got.assets == ("truck-7", "van-1")
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["exp"] - raw["iat"] == 7200
    assert before - 1 <= raw["iat"] <= time.time()


def test_cli_defaults_to_one_hour_in_the_working_directory(
    cli_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETGATE_AUTH__SECRET_FILE")
    assert main(["token", "--role", "driver", "--company", "acme", "--user", "d1"]) == 0
    token = capsys.readouterr().out.strip()
    assert (cli_env.parent / "fleetgate.secret").is_file()
    got = TokenVerifier(AuthSettings()).verify(token)  # relative secret_file, same working directory
    assert (got.role, got.assets) == ("driver", None)
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["exp"] - raw["iat"] == 3600


def test_cli_refuses_without_hs256(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = cli_env.parent / "fleetgate.toml"
    config.write_text('[auth]\nalgorithms = ["RS256"]\npublic_key_file = "none.pem"\n')
    assert main(["token", "--role", "admin", "--company", "c", "--user", "u", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "HS256" in captured.err


@pytest.mark.parametrize("bad", [["--ttl", "soon"], ["--ttl", "0"], ["--role", "root"]])
def test_cli_refuses_bad_arguments(cli_env: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "--role", "office", "--company", "c", "--user", "u", *bad])
    assert info.value.code == 2
    assert not cli_env.exists()
