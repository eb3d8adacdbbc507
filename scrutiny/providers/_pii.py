"""PII detection by patterns and checksums: no model, no download, no network.

Kinds: ``email`` (internationalized addresses too), ``phone`` (international ``+CC ...`` or
``00 CC ...`` / ``011 CC ...`` numbers, North American ``(555) 123-4567`` /
``555-123-4567``, national numbers with a leading 0 such as ``020 7946 0958``, and the French
``01 23 45 67 89``; never the end of a time ("10:30:00.123456") nor a signed decimal such
as a coordinate, "+48.8582602"), ``credit_card`` (13-19 digits of a payment card — first
digit 2 to 6, 13 digits only for Visa's 4 — that pass the Luhn check, not after a "+": a
13-digit millisecond timestamp or "+49 15112345678" is no card),
``iban`` (valid mod-97 check digits, any case, spaces or dashes), ``ipv4`` (not a version
number: "python 3.11.4.0") and ``ipv6`` (validated by :mod:`ipaddress`).

Checksummed kinds are matched first and their characters are taken out of the running,
so a card number is never also reported as a phone number; nor is a card- or IBAN-shaped
number that is not a valid one. Explanations name the kinds and
show masked forms only (``j***@***.com``, ``****1111``): never the PII itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from scrutiny.core import ConfigurationError
from scrutiny.providers._text import all_text

__all__ = ["KINDS", "PIIDetector", "PIIMatch", "card_valid", "iban_valid", "luhn_valid"]

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[\w-]+\.)+[^\W\d_]{2,}\b")
# Not inside a longer token: digits of a hex hash or an id ("…deadbeef") are no card.
# (not after "+": "+49 15112345678" is a phone number, even when it passes Luhn)
_CARD = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Printed in groups of 4 (or not at all), with a card's first digit: a number with this
# shape that fails the Luhn check is a card number mistyped or made up, and no phone number
# either ("00442079460958" has no card's first digit: it is one).
_CARD_SHAPED = re.compile(
    r"(?<![\w+-])(?:[2-6]\d{3}(?:[ -]\d{4}){3}(?:[ -]\d{1,3})?|[2-6]\d{12,18})(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,3})?\b",
                   re.IGNORECASE)
# An IBAN's shape with wrong check digits is not a phone number either.
_IBAN_SHAPED = re.compile(r"\b[A-Z]{2}\d{2}(?:[ -][A-Z0-9]{4}){3,7}(?:[ -][A-Z0-9]{1,3})?\b",
                          re.IGNORECASE)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# A dotted quad after one of these words is a version, not an address ("python 3.11.4.0").
_VERSION_WORD = re.compile(r"(?:\b(?:v|ver|versions?|releases?|build|python|node|java|firmware|"
                           r"kernel|rfc|revision|rev)\.?:?\s*)$", re.IGNORECASE)
# Not the rest of a time or a number: "10:30:00.123456" ends in "00.123456", which is no
# call to country 1.
_NOT_AFTER = r"(?<!\d[:.,])"
# Each run of digits is taken whole ("(?!\d)"): splitting a long run every possible way
# to find a phone number in it cost milliseconds per "+" (a minute for a long table).
_PHONES = (
    re.compile(rf"{_NOT_AFTER}(?<![\w+])\+\d{{1,15}}(?!\d)"
               rf"(?:[\s.-]?\(\d{{1,4}}\)[\s.-]?\d{{1,12}}(?!\d))?"
               rf"(?:[\s.-]\d{{1,12}}(?!\d)){{0,6}}(?![\w-])"),
    # the international prefix dialled instead of "+": 00 (most countries), 011 (N. America)
    re.compile(rf"{_NOT_AFTER}(?<![\w+])(?:00|011)[\s.-]?[1-9]\d{{0,13}}(?!\d)"
               rf"(?:[\s.-]?\(\d{{1,4}}\)[\s.-]?\d{{1,12}}(?!\d))?"
               rf"(?:[\s.-]\d{{1,12}}(?!\d)){{0,6}}(?![\w-])"),
    re.compile(rf"{_NOT_AFTER}(?<![\w(])(?:\(\d{{3}}\)\s?|\d{{3}}[\s.-])\d{{3}}[\s.-]\d{{4}}"
               rf"(?![\w-])"),
    re.compile(rf"{_NOT_AFTER}(?<![\w+])(?:\(0\d{{1,4}}\)\s?|0\d{{1,4}}[\s-])\d{{3,4}}[\s-]?"
               rf"\d{{3,4}}(?![\w-])"),
    # French: five pairs, the same separator between each ("06 12 34 56 78", "01.23.45.67.89")
    re.compile(rf"{_NOT_AFTER}(?<![\w+.-])0[1-9]([\s.-])\d{{2}}(?:\1\d{{2}}){{3}}(?![\w-]|\.\d)"),
)

KINDS = ("iban", "credit_card", "email", "ipv4", "ipv6", "phone")
"""Every kind, in the order they are matched."""


def luhn_valid(number: str) -> bool:
    """True when the digits of `number` pass the Luhn check (and are not all zero)."""
    digits = [int(c) for c in number if c.isdigit()]
    if not digits or not any(digits):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_valid(number: str) -> bool:
    """True when `number` can be a payment card's: 13-19 digits, a first digit of 2-6 (the
    banking and travel industries of ISO/IEC 7812; 13 digits only for Visa's 4), passing
    the Luhn check."""
    digits = "".join(c for c in number if c.isdigit())
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    if len(digits) == 13 and digits[0] != "4":
        return False
    return luhn_valid(digits)


def iban_valid(candidate: str) -> bool:
    """True when `candidate` (spaces or dashes allowed, any case) has valid IBAN check digits
    (ISO 13616 mod 97)."""
    compact = candidate.replace(" ", "").replace("-", "").upper()
    if not 15 <= len(compact) <= 34 or not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


@dataclass(frozen=True, slots=True)
class PIIMatch:
    """One piece of PII: its kind, where it is, and a masked form safe to show."""

    kind: str
    start: int
    end: int
    masked: str


def _mask_email(text: str) -> str:
    local, _, domain = text.partition("@")
    return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"


def _mask_tail(keep: int) -> Callable[[str], str]:
    def mask(text: str) -> str:
        digits = re.sub(r"[^0-9A-Za-z]", "", text)
        return "****" + digits[-keep:]

    return mask


def _mask_iban(text: str) -> str:
    compact = text.replace(" ", "").replace("-", "")
    return f"{text[:2]}** **** ... ({len(compact)} characters)"


def _mask_ipv4(text: str) -> str:
    return text.split(".", 1)[0] + ".*.*.*"


def _mask_ipv6(text: str) -> str:
    return text.split(":", 1)[0] + ":*:*"


def _iban_spans(text: str) -> Iterable[tuple[int, int]]:
    for match in _IBAN.finditer(text):
        candidate = match.group(0)
        # a trailing upper-case word may have been taken in: drop groups from the right
        while candidate:
            if iban_valid(candidate):
                yield match.start(), match.start() + len(candidate)
                break
            cut = max(candidate.rfind(" "), candidate.rfind("-"))
            if cut <= 0:
                break
            candidate = candidate[:cut]


def _regex_spans(pattern: re.Pattern[str], valid: Callable[[str], bool] = lambda _: True
                 ) -> Callable[[str], Iterable[tuple[int, int]]]:
    def spans(text: str) -> Iterable[tuple[int, int]]:
        for match in pattern.finditer(text):
            if valid(match.group(0)):
                yield match.span()

    return spans


def _ipv6_valid(text: str) -> bool:
    if text.count(":") < 2 or sum(c.isalnum() for c in text) < 2:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _ipv4_spans(text: str) -> Iterable[tuple[int, int]]:
    for match in _IPV4.finditer(text):
        if not _VERSION_WORD.search(text, max(0, match.start() - 12), match.start()):
            yield match.span()


_DECIMAL = re.compile(r"[+]?\d+\.\d+")  # "+48.8566140": a coordinate, a signed change


def _phone_spans(text: str) -> Iterable[tuple[int, int]]:
    for pattern in _PHONES:
        for match in pattern.finditer(text):
            digits = sum(c.isdigit() for c in match.group(0))
            if 8 <= digits <= 15 and not _DECIMAL.fullmatch(match.group(0)):
                yield match.span()


def _shaped_but_invalid(text: str) -> Iterable[tuple[int, int]]:
    """Card- and IBAN-shaped numbers whose checksum fails: reported as nothing, and not
    left for the looser phone patterns to report as phone numbers."""
    for match in _CARD_SHAPED.finditer(text):
        if not card_valid(match.group(0)):
            yield match.span()
    for match in _IBAN_SHAPED.finditer(text):
        if not iban_valid(match.group(0)):
            yield match.span()


_FINDERS: dict[str, tuple[Callable[[str], Iterable[tuple[int, int]]], Callable[[str], str]]] = {
    "iban": (_iban_spans, _mask_iban),
    "credit_card": (_regex_spans(_CARD, card_valid), _mask_tail(4)),
    "email": (_regex_spans(_EMAIL), _mask_email),
    "ipv4": (_ipv4_spans, _mask_ipv4),
    "ipv6": (_regex_spans(_IPV6, _ipv6_valid), _mask_ipv6),
    "phone": (_phone_spans, _mask_tail(2)),
}


class PIIDetector:
    """A feedback that flags PII in a text: 1 when any is found, else 0 (lower is better).

    Args:
        kinds: the kinds to look for, or one kind (default: all of :data:`KINDS`).
        name: the feedback name (default ``"pii"``).

    Calling it returns ``{"score", "explanation", "kinds", "counts"}``; the explanation
    and the stored metadata hold only kinds, counts and masked forms.
    """

    __slots__ = ("kinds", "name")

    def __init__(self, kinds: str | Iterable[str] | None = None, *, name: str = "pii") -> None:
        # (one kind as a string, as Contains takes one phrase: "email" was its letters)
        chosen = (kinds,) if isinstance(kinds, str) else tuple(KINDS if kinds is None else kinds)
        unknown = sorted(set(chosen) - set(KINDS))
        if unknown or not chosen:
            raise ConfigurationError(
                f"unknown PII kind(s) {unknown}; choose from {list(KINDS)}" if unknown
                else "PIIDetector needs at least one kind")
        self.kinds = tuple(k for k in KINDS if k in chosen)
        self.name = name

    @property
    def __scrutiny_feedback__(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": False}

    def find(self, text: Any) -> list[PIIMatch]:
        """Every piece of PII in `text`, in order of position.

        A structured value (a mapping, a list, a pydantic model, messages with their tool
        calls' arguments) is searched whole: every string in it, one per line (positions
        are in that joined text). Only its question or answer field was searched before:
        ``{"question": ..., "email": "jane@example.com"}`` had no PII.
        """
        body = all_text(text)
        taken = [False] * len(body)
        found: list[PIIMatch] = []
        for kind in self.kinds:
            if kind == "phone":  # (after the checksummed kinds had their pick)
                for start, end in _shaped_but_invalid(body):
                    taken[start:end] = [True] * (end - start)
            spans, mask = _FINDERS[kind]
            for start, end in spans(body):
                if any(taken[start:end]):
                    continue
                taken[start:end] = [True] * (end - start)
                found.append(PIIMatch(kind, start, end, mask(body[start:end])))
        return sorted(found, key=lambda m: m.start)

    def __call__(self, text: Any) -> dict[str, Any]:
        matches = self.find(text)
        counts = Counter(m.kind for m in matches)
        if not matches:
            return {"score": 0.0, "explanation": "no PII found", "kinds": [], "counts": {}}
        parts = []
        for kind in sorted(counts):
            examples = [m.masked for m in matches if m.kind == kind][:3]
            parts.append(f"{kind} x{counts[kind]} ({', '.join(examples)})")
        return {"score": 1.0, "explanation": "found PII: " + "; ".join(parts),
                "kinds": sorted(counts), "counts": dict(sorted(counts.items()))}
