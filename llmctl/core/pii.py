"""PII redaction for web text: e-mail addresses, IP addresses and phone numbers.

Matches are replaced by the placeholders the BigCode/StarCoder redaction pipeline uses
(`<EMAIL>`, `<IP_ADDRESS>`, `<PHONE>`), so a model learns the shape of the text without the
values. Deliberately conservative, as datatrove's PIIFormatter is: an IP address is redacted only
when it is a valid, globally routable address (`ipaddress.is_global`), so version strings like
1.2.3 and private addresses like 192.168.0.1 stay; a phone number is either international (+CC and
groups) or North American with separators ((415) 555-0132, 415-555-0132), 8 to 15 digits (E.164's
maximum): a bare run of digits, a date or an ISBN is far more often a number than a phone.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

KINDS = ("email", "ip", "phone")
PLACEHOLDER = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# Candidate IPv6: hex groups and colons; ipaddress decides, and 3+ non-empty groups are required
# so that C++'s std::x or a label like a::b is not an address.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international: +CC then groups
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (415) 555-0132
    r"|\d{3}([.-])\d{3}\1\d{4}"  # 415-555-0132 or 415.555.0132 (one separator throughout)
    r")(?!\w|[.-]\d)"
)


def _is_public_ip(s: str) -> bool:
    if ":" in s and sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


def _is_phone(s: str) -> bool:
    return 8 <= sum(c.isdigit() for c in s) <= 15


def redact(text: str) -> tuple[str, Counter]:
    """Replace e-mail addresses, public IP addresses and phone numbers with placeholders.

    Args:
        text: Document text.

    Returns:
        The redacted text and the number of replacements per kind (email, ip, phone).
    """
    counts: Counter = Counter()

    def sub(kind: str, pattern: re.Pattern, text: str, valid=None) -> str:  # noqa: ANN001
        def repl(m: re.Match) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDER[kind]

        return pattern.sub(repl, text)

    text = sub("email", _EMAIL, text)
    text = sub("ip", _IPV6, text, _is_public_ip)
    text = sub("ip", _IPV4, text, _is_public_ip)
    text = sub("phone", _PHONE, text, _is_phone)
    return text, counts
