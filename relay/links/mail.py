"""Sending verification codes for ``email_code`` tracking links.

* :class:`SmtpMailer`: plain-text mail over SMTP (none, STARTTLS or implicit TLS, optional AUTH),
  with the standard library's smtplib on a worker thread: one short session per code.
* :class:`LogMailer`: embedded demo mode without a mail server; the code goes to the log.

Every failure to hand a mail over is a :class:`MailError`; the REST layer answers 503 with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal, Protocol

log = logging.getLogger(__name__)

TlsMode = Literal["none", "starttls", "tls"]


class MailError(Exception):
    """The mail could not be handed to the SMTP server (unreachable, refused, auth failed, bad address)."""

    reason = "mail_failed"


class Mailer(Protocol):
    async def send_code(self, to: str, code: str, link_name: str, valid_minutes: int) -> None:
        """Send ``code`` to ``to``; :class:`MailError` when it could not be handed over."""
        ...


def code_message(sender: str, to: str, code: str, link_name: str, valid_minutes: int) -> EmailMessage:
    """The plain-text mail carrying a code. Control characters in the link name cannot inject headers."""
    name = " ".join(link_name.split())  # the display name is user input: no CR/LF into the Subject
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"Your code for {name}"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(
        f"Your verification code for {name} is:\n\n"
        f"    {code}\n\n"
        f"It is valid for {valid_minutes} minutes. If you did not ask for it, ignore this mail.\n"
    )
    return message


class SmtpMailer:
    """:class:`Mailer` over SMTP at ``host:port``.

    ``tls``: "none" (plain, e.g. a local relay), "starttls" (upgrade on port 587) or "tls" (implicit
    TLS on port 465), verified against the system's CA store. ``username`` / ``password`` log in
    when given. ``timeout_s`` bounds each socket operation.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMode = "none",
        sender: str = "fleetgate@localhost",
        timeout_s: float = 10,
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._tls: TlsMode = tls
        self._sender = sender
        self._timeout_s = timeout_s

    async def send_code(self, to: str, code: str, link_name: str, valid_minutes: int) -> None:
        try:
            message = code_message(self._sender, to, code, link_name, valid_minutes)
        except ValueError as exc:  # an address the email package refuses (e.g. with a line break)
            raise MailError(f"bad address: {exc}") from exc
        await asyncio.to_thread(self._send, message)

    def _send(self, message: EmailMessage) -> None:
        try:
            with self._connect() as smtp:
                if self._tls == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if self._username is not None:
                    smtp.login(self._username, self._password or "")
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:  # OSError: refused, unreachable, timeout, TLS
            raise MailError(f"smtp {self._host}:{self._port}: {type(exc).__name__}: {exc}") from exc

    def _connect(self) -> smtplib.SMTP:
        if self._tls == "tls":
            context = ssl.create_default_context()
            return smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout_s, context=context)
        return smtplib.SMTP(self._host, self._port, timeout=self._timeout_s)


class LogMailer:
    """:class:`Mailer` for embedded demo mode: logs the code at WARNING instead of sending it."""

    async def send_code(self, to: str, code: str, link_name: str, valid_minutes: int) -> None:
        log.warning("verification code for %s: %s", to, code)
