"""Verification-code mail: a real SMTP server (aiosmtpd on a free loopback port) receives what SmtpMailer sends."""

from __future__ import annotations

import email
import email.policy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from servers import free_port

from relay.links.mail import LogMailer, MailError, SmtpMailer

# The test server takes AUTH over plain text (no certificates in tests); aiosmtpd warns about that, rightly.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

USER, PASSWORD = "fleetgate", "s3cret-pass"


@dataclass
class Inbox:
    """The aiosmtpd handler: keeps every mail it accepts."""

    mails: list[tuple[Envelope, EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append((envelope, message))
        return "250 Message accepted for delivery"


def _authenticate(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself


@dataclass
class SmtpServer:
    inbox: Inbox
    port: int


def _serve(**smtp_options: Any) -> Iterator[SmtpServer]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **smtp_options)
    controller.start()
    try:
        yield SmtpServer(inbox, port)
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    yield from _serve()


@pytest.fixture
def smtp_auth() -> Iterator[SmtpServer]:
    """AUTH PLAIN/LOGIN over plain text (no TLS in the test), required before MAIL FROM."""
    yield from _serve(authenticator=_authenticate, auth_required=True, auth_require_tls=False)


def _code_in(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = re.search(r"\b(\d{6})\b", body.get_content())
    assert found is not None
    return found.group(1)


async def test_code_is_delivered(smtp: SmtpServer) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp.port, sender="tracking@fleet.example")
    await mailer.send_code("jane@example.com", "042137", "Delivery 42", 10)
    [(envelope, message)] = smtp.inbox.mails
    assert envelope.mail_from == "tracking@fleet.example"
    assert envelope.rcpt_tos == ["jane@example.com"]
    assert message["Subject"] == "Your code for Delivery 42"
    assert message["From"] == "tracking@fleet.example"
    assert message["To"] == "jane@example.com"
    assert message["Message-ID"].endswith("@fleet.example>")
    assert message.get_content_type() == "text/plain"
    assert _code_in(message) == "042137"
    assert "10 minutes" in message.get_content()


async def test_link_name_cannot_inject_headers(smtp: SmtpServer) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp.port)
    await mailer.send_code("jane@example.com", "123456", "Delivery\r\nBcc: spy@evil.example\n", 10)
    [(envelope, message)] = smtp.inbox.mails
    assert envelope.rcpt_tos == ["jane@example.com"]
    assert message["Bcc"] is None
    assert message["Subject"] == "Your code for Delivery Bcc: spy@evil.example"


async def test_bad_recipient_is_mail_error(smtp: SmtpServer) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp.port)
    with pytest.raises(MailError):
        await mailer.send_code("jane@example.com\r\nBcc: spy@evil.example", "123456", "Delivery", 10)
    assert smtp.inbox.mails == []


async def test_auth(smtp_auth: SmtpServer) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp_auth.port, username=USER, password=PASSWORD)
    await mailer.send_code("jane@example.com", "654321", "Delivery 7", 15)
    [(_, message)] = smtp_auth.inbox.mails
    assert _code_in(message) == "654321"


@pytest.mark.parametrize(("username", "password"), [(USER, "wrong"), (None, None)])
async def test_auth_failures_are_mail_errors(smtp_auth: SmtpServer, username: str | None, password: str | None) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp_auth.port, username=username, password=password)
    with pytest.raises(MailError) as caught:
        await mailer.send_code("jane@example.com", "654321", "Delivery 7", 15)
    assert caught.value.reason == "mail_failed"
    assert PASSWORD not in str(caught.value)
    assert smtp_auth.inbox.mails == []


async def test_starttls_never_falls_back_to_plain_text(smtp: SmtpServer) -> None:
    mailer = SmtpMailer("127.0.0.1", smtp.port, tls="starttls", username=USER, password=PASSWORD)
    with pytest.raises(MailError, match=r"(?i)starttls"):
        await mailer.send_code("jane@example.com", "123456", "Delivery", 10)
    assert smtp.inbox.mails == []


@pytest.mark.parametrize("tls", ["none", "tls"])
async def test_server_down_is_mail_error(tls: str) -> None:
    mailer = SmtpMailer("127.0.0.1", free_port(), tls=tls, timeout_s=2)  # type: ignore[arg-type]
    with pytest.raises(MailError):
        await mailer.send_code("jane@example.com", "123456", "Delivery", 10)


async def test_log_mailer_writes_the_code(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.links.mail"):
        await LogMailer().send_code("jane@example.com", "777123", "Delivery", 10)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "verification code for jane@example.com: 777123"
