"""PII redaction (English and Chinese) and removal of repost boilerplate.

`redact_text(text)` replaces personal data by typed tokens and returns the counts per type::

    e-mail                    <EMAIL>      john.doe@example.com, zhangsan＠163.com, john [at] example [dot] com
    phone                     <PHONE>      +44 20 7946 0958, (415) 555-0132, 07700 900123, 0491 570 156,
                                           06 12 34 56 78, (11) 91234-5678, 138 0013 8000, 010-12345678
    Chinese resident ID       <ID_NUM>     18 characters with a valid GB 11643-1999 checksum, or 15 digits
    US social security number <SSN>        123-45-6789 / 123 45 6789 within the SSA's issued ranges
                                           (bare 9 digits only after "SSN" / "social security")
    IBAN                      <IBAN>       DE89 3704 0044 0532 0130 00, GB82WEST12345698765432: ISO 13616
                                           mod-97 checksum and the registry length of its country
    bank / credit card        <BANK_CARD>  12-19 digits, Luhn-valid, with a real issuer prefix and length
    IP address                <IP>         public IPv4 / IPv6 addresses

and, with ``boilerplate=True``, deletes repost / source statements ("转载自…", "本文来源：…",
"原文链接：…", "版权归原作者所有", "Originally published at …", "The post … appeared first on …").

How it works, and why it is fast on the common (clean) document:

* Every detector proposes ``(start, end, type)`` spans on the *same* input text; overlaps are
  resolved once by type priority (e-mail > IP > ID > IBAN > card > SSN > phone), and the output is rebuilt in
  one join. A span claimed by a type that is switched off still protects its characters (the
  digits of ``13800138000@qq.com`` never become ``<PHONE>`` even with e-mail redaction off).
* Numeric detectors (IPv4, ID, IBAN, card, SSN, phone) never scan the whole document: one cheap regex finds
  "numeric spans" (digits joined by at most two of ``space - . ( )``) of at least 7 characters,
  the shortest any of them can match ("1.2.3.4"), and the detectors run only on a small window
  around each span (``Pattern.finditer(text, pos, endpos)``; look-behinds still see before
  ``pos``). A 2 KB document without such spans costs one C-level scan.
* Phone numbers outside China's numbering plan are validated by Google's libphonenumber (the
  ``phonenumbers`` package, which Presidio uses too), ``Leniency.VALID``: the number must be
  valid in a region's metadata, not just the right length. Its matcher costs ~0.1 ms per region,
  so it runs only on numeric spans shaped like a national number (a trunk "0", an international
  "00", a bracketed area code, or 9-11 digits in 2-3 groups); in ordinary text that is a few
  spans per MB. "+" numbers keep the E.164 rule below, Chinese numbers their own patterns.
* One more literal-prefix scan (``_GATE``) tells whether the text has an ``@``/``＠``, a bracketed
  "at", a ``::`` or a boilerplate marker; the e-mail, obfuscated e-mail, IPv6 and boilerplate
  detectors run only then, and e-mail detection only in a window around each ``@``.
* Every detector is a strict pattern plus a validator (checksum, Luhn, issuer table, calendar
  date, `ipaddress`), so that the decoys in ordinary text survive: dates, times, versions,
  ISBNs, order numbers, prices, numbers inside longer digit runs, URLs (never modified).

Choices (and why):

* Obfuscated e-mail: only bracketed forms (``name [at] example [dot] com``, ``name(at)example.com``)
  and the full-width ``＠``. The bare form "name at example dot com" is not matched: "visit us at
  example dot com" is a web address, and "at" is among the most frequent English words.
* IP addresses: only globally routable ones are redacted, as datatrove's ``PIIFormatter``
  (``only_remove_public_ip=True``) and BigCode's PII pipeline do: 192.168.1.1, 127.0.0.1 or
  2001:db8::1 identify nobody, and they are everywhere in technical text. Well-known public DNS
  resolvers (8.8.8.8, 114.114.114.114, ...) are kept for the same reason. An IPv6 address written
  in full (eight groups) is redacted unless private, link-local, multicast or documentation; a
  compressed one (``::``) needs four written groups or a place in 2000::/3, the only block IANA
  allocates for global unicast (RFC 4291), so that ``1::2`` (a Python slice) is never an address.
* Version strings are not addresses: an IPv4 candidate preceded by a letter, "/" or "-"
  (``v1.2.3.4``, ``Chrome/120.0.0.0``), by a version keyword (``version 10.0.0.1``, ``版本 4.3.2.1``),
  with all four parts single digits (section numbers "1.2.3.4"), or ending in .0 / .255 (network
  and broadcast addresses; "120.0.0.0" is a browser version) is left alone.
* Chinese mobile numbers start with 13x-19x: MIIT has issued every one of these blocks (14x data
  and IoT lines, 16x, 17x virtual operators), so no finer prefix table. Round amounts like
  "15000000000" are kept out by their subscriber part of one repeated digit.
* US social security numbers: the SSA never issues area 000, 666 or 900-999, group 00 or serial
  0000 ("Social Security Number Randomization", SSA 2011), nor the two numbers it retired after
  they were printed in advertising (078-05-1120, 219-09-9999); 123-45-6789 is everyone's example.
  A bare 9-digit run is as likely a zip+4 or an order number, so it needs "SSN" just before it.
* Chinese landlines need the separator after the area code (``010-12345678``, ``(0755)1234567``):
  a bare 11-12 digit run starting with 0 is as likely an order or account number.
* 15-digit legacy IDs have no checksum; they need a valid province code and a valid YYMMDD date.
* Text inside URLs is never modified (the brief's "keep URLs"), including digits and ``@``.
* Full-width forms (``１３８００１３８０００``, ``＋８６``, ``ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ``) are detected on a
  folded copy (U+FF01-FF5E -> ASCII, one character for one, so offsets carry over) and replaced
  in the original text; the fold runs only when the gate saw a full-width digit or "＠".
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import re
from bisect import bisect_right
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from smelt.data.document import Document
from smelt.data.pipeline import Step

if TYPE_CHECKING:
    from smelt.config import PIIConfig

log = logging.getLogger(__name__)

__all__ = ["ALL_TYPES", "COUNT_KEYS", "TOKENS", "PIIRedactor", "Redactor", "card_scheme", "cn_id_valid",
           "iban_valid", "luhn_valid", "redact_text", "remove_boilerplate", "ssn_valid"]

ALL_TYPES: tuple[str, ...] = ("email", "phone", "id_card", "bank_card", "ip", "ssn", "iban")
COUNT_KEYS: tuple[str, ...] = ALL_TYPES + ("boilerplate",)
TOKENS: dict[str, str] = {"email": "<EMAIL>", "phone": "<PHONE>", "id_card": "<ID_NUM>",
                          "bank_card": "<BANK_CARD>", "ip": "<IP>", "ssn": "<SSN>", "iban": "<IBAN>"}
# Overlap resolution: a lower number wins. E-mail first (QQ mail addresses are phone-like digits
# before "@"), then IP, then the checksum-validated IDs (an 18-digit run that is a valid ID is an
# ID even if it also passes Luhn; an IBAN's digits may hold a Luhn-valid run), then cards, then
# SSNs (a strict shape), then phones (the loosest patterns).
_PRIORITY = {"email": 0, "ip": 1, "id_card": 2, "iban": 3, "bank_card": 4, "ssn": 5, "phone": 6}

# --------------------------------------------------------------------------------------------
# validators


# Luhn: double every second digit from the right; a doubled digit d contributes "0246813579"[d].
_LUHN_DOUBLE = str.maketrans("0123456789", "0246813579")


def luhn_valid(digits: str) -> bool:
    """ISO/IEC 7812-1 Luhn check of a string of ASCII digits."""
    rev = digits[::-1]
    total = sum(map(int, rev[0::2])) + sum(map(int, rev[1::2].translate(_LUHN_DOUBLE)))
    return total % 10 == 0


_L16_19 = (16, 17, 18, 19)
_L14_19 = (14, 15, 16, 17, 18, 19)
_L12_19 = tuple(range(12, 20))
# (low, high, prefix length, allowed lengths, scheme): issuer identification number ranges from
# the ISO/IEC 7812 registry as summarized by Wikipedia "Payment card number" (IIN ranges, 2024).
_CARD_RANGES: tuple[tuple[int, int, int, tuple[int, ...], str], ...] = (
    (4, 4, 1, (13, 16, 19), "visa"),
    (51, 55, 2, (16,), "mastercard"),
    (2221, 2720, 4, (16,), "mastercard"),
    (34, 34, 2, (15,), "amex"),
    (37, 37, 2, (15,), "amex"),
    (62, 62, 2, _L16_19, "unionpay"),
    (6011, 6011, 4, _L16_19, "discover"),
    (644, 649, 3, _L16_19, "discover"),
    (65, 65, 2, _L16_19, "discover"),
    (3528, 3589, 4, _L16_19, "jcb"),
    (2131, 2131, 4, (15,), "jcb"),
    (1800, 1800, 4, (15,), "jcb"),
    # JCB's ranges before 3528-3589 (ISO/IEC 7812 lists of the 1990s); cards still print them and
    # Faker's generator, behind Presidio's synthetic PII set, issues 16-digit numbers from them.
    (3088, 3094, 4, (16,), "jcb"),
    (3096, 3102, 4, (16,), "jcb"),
    (3112, 3120, 4, (16,), "jcb"),
    (3158, 3159, 4, (16,), "jcb"),
    (3337, 3349, 4, (16,), "jcb"),
    (300, 305, 3, _L14_19, "diners"),
    (3095, 3095, 4, _L14_19, "diners"),
    (36, 36, 2, _L14_19, "diners"),
    (38, 39, 2, _L14_19, "diners"),  # 14 digits: Diners' original numbering
    (2200, 2204, 4, _L16_19, "mir"),
    (5018, 5018, 4, _L12_19, "maestro"),
    (5020, 5020, 4, _L12_19, "maestro"),
    (5038, 5038, 4, _L12_19, "maestro"),
    (5893, 5893, 4, _L12_19, "maestro"),
    (6304, 6304, 4, _L12_19, "maestro"),
    (6759, 6759, 4, _L12_19, "maestro"),
    (6761, 6763, 4, _L12_19, "maestro"),
)


def card_scheme(digits: str) -> str | None:
    """The card scheme whose issuer prefix and length `digits` match, or None (no Luhn check)."""
    n = len(digits)
    for lo, hi, k, lengths, scheme in _CARD_RANGES:
        if n in lengths and lo <= int(digits[:k]) <= hi:
            return scheme
    return None


def _card_valid(digits: str) -> bool:
    return card_scheme(digits) is not None and luhn_valid(digits)


# GB 11643-1999: weights 2^(17-i) mod 11 for positions 1..17, check character "10X98765432"[sum mod 11].
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# First two digits: province-level codes of GB/T 2260, plus 71 (Taiwan), 81/82/83 (Hong Kong,
# Macao, Taiwan residents' residence permits, which use the same 18-character layout since 2018).
_ID_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82 83"
    .split())
_MIN_BIRTH_YEAR = 1900
_MAX_BIRTH_YEAR = _dt.date.today().year  # a birth date in the future is not plausible


def _valid_date(y: int, m: int, d: int) -> bool:
    if not (_MIN_BIRTH_YEAR <= y <= _MAX_BIRTH_YEAR):
        return False
    try:
        _dt.date(y, m, d)
    except ValueError:
        return False
    return True


def cn_id_valid(s: str) -> bool:
    """Chinese resident ID: 18 characters (GB 11643-1999 checksum) or 15 digits (legacy, pre-1999).

    Both need a known province code and a real calendar birth date between 1900 and this year;
    the 15-digit form (year as YY, no check character) has nothing else to validate.
    """
    n = len(s)
    if n == 18:
        body = s[:17]
        if not body.isdigit() or body[:2] not in _ID_PROVINCES:
            return False
        if not _valid_date(int(body[6:10]), int(body[10:12]), int(body[12:14])):
            return False
        total = sum(w * int(c) for w, c in zip(_ID_WEIGHTS, body))
        return _ID_CHECK[total % 11] == s[17].upper()
    if n == 15:
        return (s.isdigit() and s[:2] in _ID_PROVINCES
                and _valid_date(1900 + int(s[6:8]), int(s[8:10]), int(s[10:12])))
    return False


# SSA: areas 000, 666 and 900-999, group 00 and serial 0000 are never issued; 078-05-1120 (the
# Woolworth wallet card, 1938) and 219-09-9999 (an SSA leaflet) were voided after they appeared in
# print; 123-45-6789 is the textbook example (Presidio rejects it too).
_SSN_VOID = frozenset({"078051120", "219099999", "123456789"})


def ssn_valid(digits: str) -> bool:
    """A 9-digit US social security number the SSA could have issued."""
    if len(digits) != 9 or not digits.isdigit() or digits in _SSN_VOID:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# IBAN length per country (89): SWIFT's IBAN Registry (ISO 13616), as tabulated by Wikipedia, 2024.
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30}


def iban_valid(iban: str) -> bool:
    """ISO 13616 IBAN without separators: registry length of its country, then mod 97 == 1
    (the first four characters moved to the end, letters as 10-35)."""
    if (_IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isascii()
            or not iban.isalnum()):
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _uniform_tail(digits: str, k: int) -> bool:
    """True when the last `k` digits are one repeated digit ("15000000000" is an amount, not a line)."""
    tail = digits[-k:]
    return tail == tail[0] * len(tail)


# Public resolvers: addresses of infrastructure, not of people (BigCode's PII pipeline keeps them too).
_IP_ALLOW = frozenset({
    "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112", "208.67.222.222",
    "208.67.220.220", "114.114.114.114", "114.114.115.115", "223.5.5.5", "223.6.6.6", "119.29.29.29",
    "180.76.76.76", "2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111",
    "2606:4700:4700::1001"})
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:version|ver|rev|release|build|firmware|v)\.?|版本号?|固件)\s*[:：]?\s*\Z", re.IGNORECASE)


def _ipv4_redactable(text: str, start: int, s: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(s)  # rejects octets > 255 and leading zeros
    except ValueError:
        return False
    parts = s.split(".")
    if all(len(p) == 1 for p in parts) or parts[3] in ("0", "255"):
        return False
    if not addr.is_global or s in _IP_ALLOW:
        return False
    return _VERSION_BEFORE.search(text, max(0, start - 16), start) is None


def _ipv6_redactable(s: str) -> bool:
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    if not addr.is_global or addr.is_multicast or str(addr) in _IP_ALLOW:
        return False
    # Eight written groups, or four around a "::", are an address whatever block they fall in
    # (generated and reserved-range addresses still name a host); a shorter compressed form must
    # be global unicast, so that slices ("1::2") and scope operators stay text.
    return addr in _GLOBAL_UNICAST or sum(1 for g in s.split(":") if g) >= 4


# --------------------------------------------------------------------------------------------
# patterns

# Numeric boundaries: not glued to a word character, and not the fraction of a decimal number.
_NB_L = r"(?<![0-9A-Za-z_])(?<![0-9][.,])"
_NB_R = r"(?![0-9A-Za-z_])(?![.,][0-9])"

# A numeric span: digits joined by at most two separator characters, at least 7 characters long
# (the look-ahead after the first digit keeps short numbers such as years out of Python).
_NUM_SPAN = re.compile(r"[0-9](?=[0-9 \-.()（）]{6})[0-9]*(?:[ \-.()（）]{1,2}[0-9]+)*")
_SPAN_DROP = str.maketrans("", "", " -.()（）")

_IPV4 = re.compile(r"(?<![0-9A-Za-z_./\-])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9A-Za-z_]|[.\-][0-9A-Za-z])")
# 12-19 digit run (cards; Maestro starts at 12) or 15/18 characters with a final X (IDs).
_LONG_RUN = re.compile(_NB_L + r"[0-9]{12,19}[Xx]?" + _NB_R)
# Card written in 3-5 groups; the exact window of groups is chosen in Python (a year or a CVV
# next to the number must not hide it).
_CARD_GROUPS = re.compile(r"(?<![0-9A-Za-z_])(?<![0-9][.,\-])[0-9]{4,6}(?:[ \-][0-9]{3,6}){2,4}(?![0-9A-Za-z_])")
_GROUP = re.compile(r"[0-9]+")
# International: "+" country code, optional "(0)"-style trunk, then groups; digit count checked in Python.
_INTL = re.compile(r"(?<![0-9A-Za-z_+])\+[1-9][0-9]{0,2}(?:[ \-.]?\([0-9]{1,4}\))?[ \-.]?[0-9]+(?:[ \-.][0-9]+)*")
# North American Numbering Plan: NPA and NXX start with 2-9; "(415) 555-0132", "415-555-0132",
# "415.555.0132", optional leading "1-" or "001-", optional extension "x123". Bare space-separated
# triples are too often table cells.
_NANP = re.compile(
    r"(?<![0-9A-Za-z_+(])(?:(?:001|1)[ \-.]?)?"
    r"(?:\([2-9][0-9]{2}\)[ \-.]?[2-9][0-9]{2}[ \-.]|[2-9][0-9]{2}(?P<sep>[\-.])[2-9][0-9]{2}(?P=sep))"
    r"[0-9]{4}(?: ?(?:[xX]|[eE]xt\.?) ?[0-9]{1,6})?" + _NB_R)
# Chinese mobile, 13x-19x (see module doc); 11 digits, or 3-4-4 with one kind of separator.
_CN_MOBILE = re.compile(_NB_L + r"1[3-9][0-9](?P<sep>[ \-]?)[0-9]{4}(?P=sep)[0-9]{4}" + _NB_R)
# Chinese landline: area code 010, 02X or 0XXX (3-9), local number of 7-8 digits (not starting with 0),
# optional extension.
_CN_LANDLINE = re.compile(
    r"(?<![0-9A-Za-z_])(?<![0-9][.,])"
    r"(?:0(?:10|2[0-9]|[3-9][0-9]{2})[\- ]|[(（]0(?:10|2[0-9]|[3-9][0-9]{2})[)）] ?)"
    r"[1-9][0-9]{6,7}(?:-[0-9]{1,5})?" + _NB_R)

# An extension after a phone number: "x123", " ext. 123", " extension 12".
_PHONE_EXT = re.compile(r" ?(?:x|ext\.?|extension) ?[0-9]{1,6}(?![0-9A-Za-z_])", re.IGNORECASE)
# A number after these words is a reference, not a line (libphonenumber accepts many such runs).
_NOT_PHONE_BEFORE = re.compile(
    r"(?:\b(?:ISBN|ISSN|DOI|order|invoice|tracking|ref|reference|serial|account|acct|no)\.?|#|订单|单号|编号|账号|帐号)"
    r"(?:\s*(?:no\.?|number|num|#))?\s*[:：]?\s*\Z", re.IGNORECASE)

# US SSN, 3-2-4 with one kind of separator; the bare form only right after "SSN" / "social security".
_SSN = re.compile(r"(?<![0-9A-Za-z_\-])(?<![0-9][.,])[0-9]{3}(?P<sep>[ \-])[0-9]{2}(?P=sep)[0-9]{4}"
                  r"(?![0-9A-Za-z_]|[.,\-][0-9])")
_SSN_BARE = re.compile(_NB_L + r"[0-9]{9}" + _NB_R)
_SSN_BEFORE = re.compile(r"(?:\bSSN|\bSS#|social security(?: number| no\.?)?)\s*(?:#|no\.?|number)?\s*[:：]?\s*\Z",
                         re.IGNORECASE)
# IBAN: country, check digits, then the BBAN in groups of four (printed form) or unbroken; length
# and checksum are checked in Python (`_iban_end`).
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[ \-]?[A-Z0-9]{4}){2,7}(?:[ \-]?[A-Z0-9]{1,3})?"
                   r"(?![A-Za-z0-9])")
_IBAN_SEPS = str.maketrans("", "", " -")

_LOCAL = r"[A-Za-z0-9_%+\-](?:[A-Za-z0-9._%+\-]{0,62}[A-Za-z0-9_%+\-])?"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])" + _LOCAL + r"[@＠](?:" + _LABEL + r"\.)+(?P<tld>[A-Za-z]{2,24})"
    r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])")
_OBF_AT = r" ?[\[({（【] ?(?:at|AT|At) ?[\])}）】] ?"
_OBF_DOT = r"(?:\.| ?[\[({（【] ?(?:dot|DOT|Dot) ?[\])}）】] ?)"
_OBF_HINT = re.compile(r"[\[({（【] ?(?:at|AT|At) ?[\])}）】]")
_EMAIL_OBF = re.compile(
    r"(?<![A-Za-z0-9._%+\-])" + _LOCAL + _OBF_AT + r"(?:" + _LABEL + _OBF_DOT + r")+(?P<tld>[A-Za-z]{2,24})"
    r"(?![A-Za-z0-9\-])")
# "icon@2x.png" is an asset name, not an address.
_FILE_TLDS = frozenset("png jpg jpeg gif svg webp bmp ico tif tiff css js json pdf html htm php txt mp3 mp4".split())

_IPV6 = re.compile(
    r"(?<![0-9A-Za-z_:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![0-9A-Za-z_:]|\.[0-9A-Za-z])")

# URLs are kept verbatim: RFC 3986 characters only (so a URL ends at CJK text or full-width
# punctuation), minus trailing sentence punctuation.
_URL = re.compile(r"(?<![A-Za-z0-9])(?:(?:https?|ftp)://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_URL_TRAIL = ".,;:!?)]'\""

# --------------------------------------------------------------------------------------------
# boilerplate

# Statements that are boilerplate wherever they occur: the whole sentence around them goes.
_BP_ANYWHERE_ZH = (
    "转载自", "转载于", "本文转自", "文章转自", "转载请", "禁止转载", "不得转载", "严禁转载", "谢绝转载", "请勿转载",
    "版权归原作者", "版权归作者", "版权归原创作者", "版权属于原作者", "版权归属原作者", "如有侵权", "若有侵权",
    "侵权请联系", "侵权联系删除", "侵删", "原文链接", "原文地址", "原文网址", "点击阅读原文")
# Statements that are boilerplate only at the start of a sentence ("数据来源：统计局" mid-sentence
# is a citation, "来源：新华网" opening a line is a repost credit): removed from there to the end.
_BP_START_ZH = ("本文来源", "本文来自", "本文转载", "文章来源", "稿件来源", "图片来源", "新闻来源", "内容来源",
                "阅读原文")
# "来源：X" / "出处：X" / "原标题：X" / "责任编辑：X": a name follows, so the statement ends at the
# first space as well (news pages run "来源：新华网 北京11月25日电 ..." into the article).
_BP_CREDIT_ZH = ("来源", "出处", "原标题", "责任编辑")
# English statements start a sentence, so they start with a capital letter; every alternative
# begins with a literal, which lets the regex engine skip ahead to candidate first letters.
_BP_SUBJECT_EN = "article|post|story|piece|essay|column|entry|blog post|blog|interview|review|op-ed|content|report"
_BP_START_EN = (
    r"Th(?:is|e) (?:" + _BP_SUBJECT_EN + r")(?: (?:was|is|has been|had been|also))* "
    r"(?:(?:originally|first) (?:published|posted|appeared|ran)"
    r"|republished|reposted|reprinted|syndicated|cross-posted)\b",
    r"Originally (?:published|posted|appeared)\b(?! in (?:1[5-9]|20)[0-9]{2}\b)",  # not "published in 1925"
    *(w + r" (?:from|with (?:the )?permission|by permission|courtesy)\b"
      for w in ("Reposted", "Republished", "Reprinted", "Cross-posted", "Crossposted", "Syndicated")),
    r"Read the original (?:article|post|story|piece)\b",
    r"The post [^\n]{1,200}? appeared first on\b",  # WordPress feed footer
)
_BP_RE = re.compile("|".join(
    (*_BP_ANYWHERE_ZH, *_BP_START_ZH, *(c + r"\s*[:：]" for c in _BP_CREDIT_ZH), *_BP_START_EN)))
_BP_ANY_SET = frozenset(_BP_ANYWHERE_ZH)
_BP_START_SET = frozenset(_BP_START_ZH)

# One scan decides which of the rarer detectors run: "@"/"＠" (e-mail), a bracketed "at"
# (obfuscated e-mail), "::" (IPv6) or a boilerplate key (each marker above contains one). Every
# alternative begins with a literal, so the engine only stops at candidate first characters:
# ~3 µs per 2 KB instead of one full scan per detector.
_GATE_BP = ("转载", "转自", "本文来自", "来源", "原文", "版权", "侵", "出处", "原标题", "责任编辑",
            "Originally ", "Reposted ", "Republished ", "Reprinted ", "Cross-posted ", "Crossposted ",
            "Syndicated ", "Read the original ", r"Th(?:is|e) (?:" + _BP_SUBJECT_EN + ") ")
_GATE = re.compile("|".join((
    "@", "＠", "::", *"０１２３４５６７８９",
    *(o + " ?(?:at|AT|At) ?" + c
      for o, c in ((r"\[", r"\]"), (r"\(", r"\)"), (r"\{", r"\}"), ("（", "）"), ("【", "】"))),
    *_GATE_BP)))


def _gate(text: str) -> tuple[bool, bool, bool, bool, bool]:
    """(has "@", has bracketed "at", has "::", has a boilerplate key, has full-width digits or "＠")."""
    at = obf = v6 = bp = fw = False
    for h in _GATE.findall(text):
        c = h[0]
        if c == "@":
            at = True
        elif c == "＠" or "０" <= c <= "９":
            at = at or c == "＠"
            fw = True
        elif h == "::":
            v6 = True
        elif c in "[({（【":
            obf = True
        else:
            bp = True
    return at, obf, v6, bp, fw


# Full-width ASCII variants (U+FF01-FF5E) to ASCII: one code point for one, so spans found on the
# folded text are spans of the original.
_FW_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}


# Sentence ends: CJK and ASCII terminators; an ASCII "." only when followed by space or line end
# (so "example.com" does not end a sentence).
_SENT_END = re.compile(r"[。！？!?；;]|\.(?=\s|$)")
_CLOSER_OF = {"（": "）", "(": ")", "【": "】", "[": "]", "「": "」", "『": "』"}
# What may precede a sentence-start marker: space, list bullets, markdown emphasis, an opening bracket.
_LEAD = re.compile(r"[\s>*_#\-—–•·|（(【\[「『]*")
_COLON_NEXT = re.compile(r"\s*[:：]")
_CREDIT_NAME = re.compile(r"[\s:：]*[^\s]+")
_HAS_WORD = re.compile(r"\w")
# Boilerplate statements are short; a longer "sentence" means the marker sits in real prose
# (or the page has no punctuation), and deleting it would delete content. 300 chars: about three
# times the longest credit line in our zh/en samples.
_BP_MAX_CHARS = 300


def _statement_span(line: str, m: re.Match[str]) -> tuple[int, int] | None:
    """[start, end) of the boilerplate statement whose marker is `m`, or None if it is not one."""
    ms, me = m.span()
    # Look for the sentence start at most _BP_MAX_CHARS back (a longer statement is rejected
    # anyway): keeps a huge single-line document with many markers linear.
    lo = max(0, ms - _BP_MAX_CHARS)
    start = -1
    for e in _SENT_END.finditer(line, lo, ms):
        start = e.end()
    if start == -1:
        if lo > 0:
            return None
        start = 0
    lead = line[start:ms]
    marker = m.group()
    if marker in _BP_ANY_SET:
        kind = "any"
    elif marker in _BP_START_SET or marker[0].isascii():
        kind = "start"
    else:
        kind = "credit"
    if kind != "any" and _LEAD.fullmatch(lead) is None:
        return None  # a sentence-start marker in the middle of a sentence
    # "正文（注：转载自人民网）" : the statement is the bracket, not the whole sentence.
    closer = ""
    opened = max((lead.rfind(o), o) for o in _CLOSER_OF)
    if opened[0] != -1 and _CLOSER_OF[opened[1]] not in lead[opened[0]:]:
        start += opened[0]
        closer = _CLOSER_OF[opened[1]]
    e = _SENT_END.search(line, me, me + _BP_MAX_CHARS)
    end = len(line) if e is None else e.end()
    if closer:
        c = line.find(closer, me, min(end, me + _BP_MAX_CHARS))
        if c != -1:
            end = c + 1
    if kind == "start" and _COLON_NEXT.match(line, me):
        kind = "credit"  # "本文来源：新华网 ..." is a credit line like "来源：新华网"
    if kind == "credit" and not closer:  # the credited name ends at the first space after it
        name = _CREDIT_NAME.match(line, me, end)
        if name is not None:
            end = name.end()
    if end - start > _BP_MAX_CHARS:
        return None
    return start, end


def _join_pieces(pieces: list[str]) -> str:
    """Glue what is left of a line: one space where a cut touched whitespace, none in CJK text."""
    new = pieces[0]
    for p in pieces[1:]:
        gap = new[-1:] in (" ", "\t") or p[:1] in (" ", "\t")
        p = p.lstrip(" \t")
        if new.strip():  # (a blank left side is the line's indentation: keep it as it is)
            new = new.rstrip(" \t")
            if gap and p:
                new += " "
        new += p
    return new.rstrip(" \t") if not pieces[-1].strip() else new


def _strip_line(line: str) -> tuple[str, int]:
    spans: list[tuple[int, int]] = []
    for m in _BP_RE.finditer(line):
        if spans and m.start() < spans[-1][1]:
            continue  # inside a statement already removed
        sp = _statement_span(line, m)
        if sp is None:
            continue
        if spans and sp[0] < spans[-1][1]:  # same sentence as the previous marker
            spans[-1] = (spans[-1][0], max(spans[-1][1], sp[1]))
        else:
            spans.append(sp)
    if not spans:
        return line, 0
    pieces, prev = [], 0
    for s, e in spans:
        pieces.append(line[prev:s])
        prev = e
    pieces.append(line[prev:])
    return _join_pieces(pieces), len(spans)


def remove_boilerplate(text: str) -> tuple[str, int]:
    """Delete repost/source statements; a line left with no word character is dropped entirely.

    Returns the new text and the number of statements removed.
    """
    hits = [m.start() for m in _BP_RE.finditer(text)]
    if not hits:
        return text, 0
    lines = text.split("\n")
    marked, line_no, prev = set(), 0, 0  # indices of the lines holding a marker
    for h in hits:
        line_no += text.count("\n", prev, h)
        marked.add(line_no)
        prev = h
    kept: list[str] = []
    removed = 0
    skip_blank = False  # a dropped line took its paragraph gap with it
    for i, line in enumerate(lines):
        if skip_blank and not line.strip():
            skip_blank = False
            continue
        skip_blank = False
        new, k = _strip_line(line) if i in marked else (line, 0)
        if k:
            removed += k
            if _HAS_WORD.search(new) is None:
                # Drop the whole line; at the start of the text or after a blank line, also drop
                # the blank line that follows, so that no double gap is left.
                skip_blank = not kept or not kept[-1].strip()
                continue
        kept.append(new)
    if removed and skip_blank and kept and not kept[-1].strip():
        kept.pop()  # the statement was the last line: no dangling blank line
    return "\n".join(kept), removed


# --------------------------------------------------------------------------------------------
# detectors: each appends (start, end, type) spans of `text`

Span = tuple[int, int, str]


def _find_emails(text: str, out: list[Span]) -> None:
    """Addresses around each "@"/"＠" (a window, not a scan of the whole text)."""
    n = len(text)
    if text.count("@") + text.count("＠") > 16:  # "@"-dense text (mentions, code): one scan is cheaper
        for m in _EMAIL.finditer(text):
            if m.group("tld").lower() not in _FILE_TLDS and not _is_service_address(m.group()):
                out.append((m.start(), m.end(), "email"))
        return
    seen: set[tuple[int, int]] = set()
    for at in ("@", "＠"):
        i = text.find(at)
        while i != -1:
            # 66 = longest local part (64, RFC 5321) + look-behind; 260 > longest domain (253).
            for m in _EMAIL.finditer(text, max(0, i - 66), min(n, i + 260)):
                if m.start() <= i < m.end():
                    if (m.group("tld").lower() not in _FILE_TLDS and not _is_service_address(m.group())
                            and m.span() not in seen):
                        seen.add(m.span())
                        out.append((m.start(), m.end(), "email"))
                    break
            i = text.find(at, i + 1)


def _is_service_address(addr: str) -> bool:
    # "git@github.com:user/repo.git" is an SSH remote (the account every user shares), not a person.
    return addr.startswith("git@")


def _find_obfuscated_emails(text: str, out: list[Span]) -> None:
    n = len(text)
    hints = _OBF_HINT.findall(text)
    if len(hints) > 16:  # many bracketed "at": one scan of the whole text is cheaper than windows
        for m in _EMAIL_OBF.finditer(text):
            if m.group("tld").lower() not in _FILE_TLDS:
                out.append((m.start(), m.end(), "email"))
        return
    for h in _OBF_HINT.finditer(text):
        for m in _EMAIL_OBF.finditer(text, max(0, h.start() - 67), min(n, h.end() + 300)):
            if m.start() <= h.start() < m.end():
                if m.group("tld").lower() not in _FILE_TLDS:
                    out.append((m.start(), m.end(), "email"))
                break


def _find_ipv6(text: str, out: list[Span]) -> None:
    for m in _IPV6.finditer(text):
        if m.group().count(":") >= 2 and _ipv6_redactable(m.group()):
            out.append((m.start(), m.end(), "ip"))


def _card_window(text: str, m: re.Match[str]) -> tuple[int, int] | None:
    """Best run of whole groups inside a grouped match that is a valid card: longest, then leftmost."""
    groups = [(g.start(), g.end()) for g in _GROUP.finditer(text, m.start(), m.end())]
    best: tuple[int, int, int] | None = None  # (-digits, start, end)
    for i in range(len(groups)):
        digits = ""
        for j in range(i, len(groups)):
            digits += text[groups[j][0]:groups[j][1]]
            if len(digits) > 19:
                break
            # 12 digits (Maestro) only as the whole printed number: a 12-digit tail of a longer
            # grouped number is too often Luhn-valid by chance.
            if (len(digits) >= 13 or (i == 0 and j == len(groups) - 1)) and j > i and _card_valid(digits):
                seps = {text[groups[k][1]:groups[k + 1][0]] for k in range(i, j)}
                if len(seps) == 1:  # one kind of separator: "4111 1111-1111 1111" is not how cards print
                    cand = (-len(digits), groups[i][0], groups[j][1])
                    if best is None or cand < best:
                        best = cand
    return None if best is None else (best[1], best[2])


def _intl_span(m: re.Match[str]) -> int | None:
    """End offset (relative to the match) of a plausible E.164 number, or None."""
    s = m.group()
    groups = [(g.start(), g.end()) for g in _GROUP.finditer(s)]
    total = 0
    end = None
    for k, (a, b) in enumerate(groups):
        if k >= 2 and b - a < 2 and k == len(groups) - 1 and total >= 8:
            break  # a trailing lone digit belongs to the text, not the number
        total += b - a
        if total > 15:  # E.164 (ITU-T): at most 15 digits including the country code
            total -= b - a
            break
        end = b
    if end is None or total < 8:
        return None
    if len(groups) == 1 and total < 10:  # unformatted "+12345678" is more likely an amount
        return None
    digits = "".join(ch for ch in s[:end] if ch.isdigit())
    if _uniform_tail(digits, 7):
        return None
    return end


def _iban_end(m: re.Match[str]) -> int | None:
    """End of the IBAN that starts the match (trailing groups may be the next word), or None."""
    want = _IBAN_LENGTHS.get(m.group()[:2])
    if want is None:
        return None
    s, text = m.start(), m.string
    got, i = 0, s
    while got < want and i < m.end():
        if text[i] not in " -":
            got += 1
        i += 1
    if got < want or (i < m.end() and text[i] not in " -"):
        return None  # too short, or the country's length ends inside a group
    return i if iban_valid(text[s:i].translate(_IBAN_SEPS)) else None


# Regions whose national numbers libphonenumber tries, by the shape of the span. A trunk "0"
# opens national numbers across Europe, Oceania, India, Brazil, Japan and Korea (Italy keeps its
# 0 in every number); "00" is the international prefix in all of these (GB stands for them), "011"
# in North America. 2-3 groups of 9-11 digits without a 0 are Indian and Spanish mobiles and
# Brazilian numbers without the trunk; a bracketed 2-digit area code is Brazilian ("(11) 91234-5678";
# NANP's "(415)" has its own pattern). Order: most frequent first, the first valid region wins.
_TRUNK_REGIONS = ("GB", "DE", "FR", "AU", "IN", "BR", "IT", "NL", "BE", "CH", "AT", "IE", "NZ", "ZA", "JP", "KR")
_GROUPED_REGIONS = ("IN", "ES", "BR")


def _phone_regions(text: str, s: int, span: str, nd: int) -> tuple[str, ...]:
    """Regions to try on the numeric span `span` at `s` (digit count `nd`), or () when its shape
    is not a national phone number."""
    lead = text[s - 1] if s else ""
    if lead and lead.isascii() and (lead.isalnum() or lead in "_+"):
        return ()  # glued to a word, or "+" (the E.164 rule's)
    groups = _GROUP.findall(span)
    if len(groups) == 3 and span[3:4] == "-" and list(map(len, groups)) == [3, 2, 4]:
        return ()  # the SSN shape: no numbering plan prints 3-2-4
    first = groups[0]
    if first == "011" and lead != "(" and 12 <= nd <= 17:
        regions: tuple[str, ...] = ("US",)
    elif first.startswith("00") and first[2:3] != "0" and lead != "(" and 10 <= nd <= 17:
        regions = ("GB",)
    elif first[0] == "0" and len(first) >= 2 and 9 <= nd <= 13:
        if len(groups) == 1 and (span in "01234567890" or span in "09876543210"):
            return ()  # "0123456789": a digit alphabet in code, not a number
        regions = _TRUNK_REGIONS
    elif first[0] == "0":
        return ()
    elif lead == "(" and len(first) == 2 and span[2] == ")" and 10 <= nd <= 11:
        regions = ("BR",)
    elif 9 <= nd <= 11 and 2 <= len(groups) <= 4 and min(map(len, groups)) >= 2 and "(" not in span:
        return () if _NOT_PHONE_BEFORE.search(text, max(0, s - 24), s) else _GROUPED_REGIONS
    else:
        return ()
    if _NOT_PHONE_BEFORE.search(text, max(0, s - 24), s):
        return ()
    return regions


def _valid_national(phonenumbers, digits: str, region: str) -> bool:  # type: ignore[no-untyped-def]
    """`digits` (a trunk "0" included, if any) is a valid national number of `region`."""
    if digits[0] == "0" and region != "IT":  # Italy keeps its 0 in the national number
        digits = digits[1:]
    num = phonenumbers.PhoneNumber(country_code=phonenumbers.country_code_for_region(region),
                                   national_number=int(digits), italian_leading_zero=digits[0] == "0" or None)
    return phonenumbers.is_valid_number_for_region(num, region)


def _find_phone_lib(text: str, s: int, e: int, regions: tuple[str, ...], out: list[Span]) -> None:
    """The longest number libphonenumber finds valid in one of `regions` over [s, e); the first
    region whose number covers the whole span ends the search.

    Leniency.VALID (valid in the region's metadata) as Presidio uses; numbers without a trunk "0"
    or "00" (`_GROUPED_REGIONS`) must also be grouped exactly as the region prints them
    (EXACT_GROUPING), so that "666-12-3456" (an SSN shape) is not a Spanish mobile.
    """
    import phonenumbers  # deferred: ~15 ms, and only text with national-format numbers needs it

    leniency = (phonenumbers.Leniency.EXACT_GROUPING if regions is _GROUPED_REGIONS
                else phonenumbers.Leniency.VALID)
    if len(regions) > 1:
        # Pre-check: the span's digits as a national number of each region (~7 µs a region, against
        # ~100 µs for a matcher); the matcher then runs only where the whole number is valid.
        digits = text[s:e].translate(_SPAN_DROP)
        regions = tuple(r for r in regions if _valid_national(phonenumbers, digits, r))
    # The window starts two characters early (the matcher checks what precedes a number, and a
    # bracketed area code opens before the span) and runs on for an extension.
    w0 = max(0, s - 2)
    window = text[w0:min(len(text), e + 16)]
    best: tuple[int, int] | None = None
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=leniency):
            a, b = w0 + m.start, w0 + m.end
            if a < e and b > s and (best is None or b - a > best[1] - best[0]):
                best = (a, b)
        if best is not None and best[0] <= s and best[1] >= e:
            break
    if best is not None:
        out.append((best[0], best[1], "phone"))


def _find_numeric(text: str, out: list[Span], want_ip: bool, want_num: bool) -> None:
    n = len(text)
    for sp in _NUM_SPAN.finditer(text):
        s, e = sp.span()
        if e - s < 7:
            continue
        span = sp.group()
        pos, endpos = max(0, s - 1), min(n, e + 2)
        if want_ip and span.count(".") >= 3:
            for m in _IPV4.finditer(text, pos, endpos):
                if _ipv4_redactable(text, m.start(), m.group()):
                    out.append((m.start(), m.end(), "ip"))
        if not want_num:
            continue
        # The span's digit count bounds every candidate inside it: skip detectors that need more.
        nd = len(span.translate(_SPAN_DROP))
        if nd >= 12:  # cards have 12-19 digits, IDs 15 or 18
            for m in _LONG_RUN.finditer(text, pos, endpos):
                run = m.group()
                # A 15-digit legacy ID has no check digit, so a Luhn-valid Amex number (34/37, also
                # the Anhui and Shandong province codes) is read as the card; 18-digit IDs win.
                if len(run) == 18 and cn_id_valid(run):
                    out.append((m.start(), m.end(), "id_card"))
                elif run.isdigit() and _card_valid(run):
                    out.append((m.start(), m.end(), "bank_card"))
                elif len(run) == 15 and cn_id_valid(run):
                    out.append((m.start(), m.end(), "id_card"))
            for m in _CARD_GROUPS.finditer(text, pos, endpos):
                w = _card_window(text, m)
                if w is not None:
                    out.append((w[0], w[1], "bank_card"))
        if nd >= 9:
            for m in _SSN.finditer(text, pos, endpos):
                if ssn_valid(m.group().translate(_SPAN_DROP)):
                    out.append((m.start(), m.end(), "ssn"))
            if nd == 9 and _SSN_BEFORE.search(text, max(0, s - 24), s):
                for m in _SSN_BARE.finditer(text, pos, endpos):
                    if ssn_valid(m.group()):
                        out.append((m.start(), m.end(), "ssn"))
        # An IBAN's first long digit run starts right after a letter ("DE89 3704...", "NL91ABNA0417...")
        # or a letter and a space ("GB82 WEST 1234..."); its start is at most 10 characters back.
        if s > 0 and ("A" <= text[s - 1] <= "Z" or (s > 1 and text[s - 1] == " " and "A" <= text[s - 2] <= "Z")):
            for m in _IBAN.finditer(text, max(0, s - 12), min(n, e + 44)):
                end = _iban_end(m)
                if end is not None:
                    out.append((m.start(), end, "iban"))
        if nd < 8:
            continue
        k = len(out)
        if s > 0 and text[s - 1] == "+":  # E.164 numbers have 8-15 digits here
            for m in _INTL.finditer(text, pos, endpos):
                end = _intl_span(m)
                if end is not None:
                    out.append((m.start(), m.start() + end, "phone"))
        if nd >= 10:  # NANP 10, Chinese mobile 11, landline 10-12
            for rx in (_NANP, _CN_MOBILE, _CN_LANDLINE):
                for m in rx.finditer(text, pos, min(n, e + 10)):  # (NANP's extension runs past the span)
                    if not _uniform_tail(m.group().translate(_SPAN_DROP), 7):
                        out.append((m.start(), m.end(), "phone"))
        if len(out) == k and nd <= 20:
            regions = _phone_regions(text, s, span, nd)
            if regions:
                _find_phone_lib(text, s, e, regions, out)
        for i in range(k, len(out)):  # "(415) 555-0132 x123": the extension is part of the number
            a, b, t = out[i]
            m = _PHONE_EXT.match(text, b) if t == "phone" else None
            if m is not None:
                out[i] = (a, m.end(), t)


def _url_spans(text: str) -> list[tuple[int, int]]:
    if "://" not in text and "www." not in text:
        return []
    spans = []
    for m in _URL.finditer(text):
        s, e = m.span()
        while e > s and text[e - 1] in _URL_TRAIL:
            e -= 1
        spans.append((s, e))
    return spans


# --------------------------------------------------------------------------------------------
# public API


class Redactor:
    """Compiled redaction settings; `redact(text)` returns (new_text, counts by type).

    `types` are the PII kinds replaced by their token; `boilerplate` also removes repost
    statements. The counts always have every key of `COUNT_KEYS`.
    """

    def __init__(self, types: Iterable[str] = ALL_TYPES, boilerplate: bool = True) -> None:
        types = tuple(types)
        bad = sorted(set(types) - set(ALL_TYPES))
        if bad:
            raise ValueError(f"unknown PII type(s) {bad}; allowed: {list(ALL_TYPES)}")
        self.types = frozenset(types)
        self.boilerplate = boilerplate
        # Which detectors must run: e-mail spans also protect the digits before "@" from the
        # numeric detectors; the numeric detectors arbitrate among themselves (ID vs card).
        self._num = bool(self.types & {"phone", "id_card", "bank_card"})
        self._email = "email" in self.types or self._num
        self._ip = "ip" in self.types

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts = dict.fromkeys(COUNT_KEYS, 0)
        at, obf, v6, bp, fw = _gate(text)
        if self.boilerplate and bp:
            text, counts["boilerplate"] = remove_boilerplate(text)
        scan = text.translate(_FW_FOLD) if fw else text  # same length, same offsets
        spans: list[Span] = []
        if self._email:
            if at:
                _find_emails(scan, spans)
            if obf:
                _find_obfuscated_emails(scan, spans)
        if self._ip and (v6 or scan.count(":") >= 7):  # an IPv6 address has "::" or 7 colons
            _find_ipv6(scan, spans)
        if self._num or self._ip:
            _find_numeric(scan, spans, self._ip, self._num)
        if not spans:
            return text, counts
        return _apply(text, scan, spans, self.types, counts), counts

    __call__ = redact


def _apply(text: str, scan: str, spans: list[Span], types: frozenset[str], counts: dict[str, int]) -> str:
    """Drop spans inside URLs, resolve overlaps, rebuild `text` with tokens for enabled types.

    `scan` is the text the detectors saw (`text`, or its full-width fold: same offsets).

    Overlaps are resolved inside each cluster of transitively overlapping spans (tiny in practice):
    highest priority first, then earliest, then longest. Sorting plus bisect keeps a document
    with very many matches O(n log n).
    """
    urls = _url_spans(scan)
    url_starts = [u[0] for u in urls]
    spans.sort()
    accepted: list[Span] = []
    cluster: list[Span] = []
    cluster_end = -1

    def flush() -> None:
        chosen: list[Span] = []
        for sp in sorted(cluster, key=lambda x: (_PRIORITY[x[2]], x[0], x[0] - x[1])):
            if not any(sp[0] < ce and cs < sp[1] for cs, ce, _ in chosen):
                chosen.append(sp)
        accepted.extend(sorted(chosen))

    for sp in spans:
        s, e, _ = sp
        if urls:
            k = bisect_right(url_starts, s)
            if (k and urls[k - 1][1] > s) or (k < len(urls) and urls[k][0] < e):
                continue  # never touch a URL
        if cluster and s >= cluster_end:
            flush()
            cluster = []
        cluster.append(sp)
        cluster_end = max(cluster_end, e) if len(cluster) > 1 else e
    if cluster:
        flush()
    out: list[str] = []
    prev = 0
    for s, e, t in accepted:
        if t not in types:
            continue  # detected only to protect its characters from other detectors
        out.append(text[prev:s])
        out.append(TOKENS[t])
        counts[t] += 1
        prev = e
    if not out:
        return text
    out.append(text[prev:])
    return "".join(out)


@lru_cache(maxsize=64)
def _cached(types: frozenset[str], boilerplate: bool) -> Redactor:
    return Redactor(types, boilerplate)


def redact_text(text: str, types: Iterable[str] = ALL_TYPES, boilerplate: bool = True) -> tuple[str, dict[str, int]]:
    """Replace PII by typed tokens (and remove repost boilerplate); return (text, counts by type).

    >>> redact_text("写信到 zhangsan@163.com 或致电 138-0013-8000。")  # doctest: +NORMALIZE_WHITESPACE
    ('写信到 <EMAIL> 或致电 <PHONE>。', {'email': 1, 'phone': 1, 'id_card': 0, 'bank_card': 0, 'ip': 0, 'ssn': 0,
     'iban': 0, 'boilerplate': 0})
    """
    return _cached(frozenset(types), boilerplate).redact(text)


class PIIRedactor(Step):
    """Curation step "pii": rewrites ``doc.text``, never rejects.

    Counts matches per type (``self.count``) and documents touched (``docs_redacted``), and records
    ``doc.meta["pii"] = {type: n}`` for the types found, only when something was redacted.
    """

    name = "pii"

    def __init__(self, cfg: PIIConfig | None = None) -> None:
        super().__init__()
        if cfg is None:
            from smelt.config import PIIConfig  # deferred: keeps worker imports light

            cfg = PIIConfig()
        self.cfg = cfg
        self.redactor = Redactor(cfg.types, cfg.boilerplate)
        log.debug("pii step: types=%s boilerplate=%s", sorted(self.redactor.types), cfg.boilerplate)

    def process(self, doc: Document) -> str | None:
        if not self.cfg.applies_to(doc.domain):
            return None
        text, counts = self.redactor.redact(doc.text)
        found = {k: v for k, v in counts.items() if v}
        if found:
            doc.text = text
            doc.meta["pii"] = found
            for k, v in found.items():
                self.count(doc, k, v)
            self.count(doc, "docs_redacted")
        return None
