"""A seeded evaluation set for PII redaction: public real-world formats in English and Chinese.

`build(seed)` generates sentences that hold one or two PII values, decoys (numbers that look like
PII and are not: dates, versions, ISBNs, order numbers, values with a wrong checksum, private
addresses, ...) or nothing at all. Every value is drawn from the format's public rules (issuer
prefixes and Luhn for cards, GB 11643-1999 for Chinese IDs, ISO 13616 for IBANs, the SSA's issued
ranges for SSNs, each country's numbering plan for phones); nothing comes from the redactor under
test, and nothing here is a real person's data. `score(redact, examples)` aligns the redacted text
with the sentence's pieces and reports recall per type (a PII value caught when its exact place
holds its own token) and the share of decoys left intact (the text around them must be intact too).

    python bench/redact.py --eval-only       # prints these figures for the old and new redactor
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

TOKENS = {"email": "<EMAIL>", "phone": "<PHONE>", "id_card": "<ID_NUM>", "bank_card": "<BANK_CARD>",
          "ip": "<IP>", "ssn": "<SSN>", "iban": "<IBAN>"}


@dataclass
class Example:
    """One sentence as pieces: ("text", s), (type, value) for PII, ("decoy", value)."""

    pieces: list[tuple[str, str]]
    lang: str
    fmt: str  # the generator that made the value(s), for per-format figures
    text: str = field(init=False)

    def __post_init__(self) -> None:
        self.text = "".join(v for _, v in self.pieces)


# --------------------------------------------------------------------------------------------
# value generators: each takes an rng and returns a string


def _d(r: random.Random, k: int) -> str:
    return "".join(r.choice("0123456789") for _ in range(k))


def _luhn_complete(body: str) -> str:
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


# (prefixes, lengths, grouping) from Wikipedia "Payment card number" (IIN ranges).
_CARDS = {
    "visa": (["4"], [13, 16, 19]), "mastercard": (["51", "52", "53", "54", "55", "2221", "2720", "2500"], [16]),
    "amex": (["34", "37"], [15]), "discover": (["6011", "65", "644", "649"], [16, 19]),
    "jcb": (["3528", "3566", "3589"], [16]), "jcb15": (["2131", "1800"], [15]),
    "diners": (["300", "305", "36", "38"], [14]), "maestro": (["5018", "5020", "5038", "6304", "6759", "6761", "6763"],
                                                              [12, 13, 16, 19]),
    "unionpay": (["62"], [16, 19]),
}


def card(r: random.Random, scheme: str) -> str:
    prefixes, lengths = _CARDS[scheme]
    p, n = r.choice(prefixes), r.choice(lengths)
    num = _luhn_complete(p + _d(r, n - len(p) - 1))
    style = r.choice(["bare", "space", "dash"])
    if style == "bare":
        return num
    sep = " " if style == "space" else "-"
    if n in (14, 15):  # Amex and Diners print 4-6-5 / 4-6-4
        return sep.join((num[:4], num[4:10], num[10:]))
    if n == 13:
        return sep.join((num[:4], num[4:8], num[8:]))
    return sep.join(num[i:i + 4] for i in range(0, n, 4))


def card_bad_luhn(r: random.Random) -> str:
    num = card(r, "visa").replace(" ", "").replace("-", "")
    num = num[:-1] + str((int(num[-1]) + r.randint(1, 9)) % 10)
    return " ".join(num[i:i + 4] for i in range(0, len(num), 4))


_ID_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_AREAS = ["110105", "310115", "440305", "330106", "510104", "420106", "320102", "610113", "210102", "350203"]


def cn_id(r: random.Random, valid: bool = True) -> str:
    y, m, dd = r.randint(1950, 2005), r.randint(1, 12), r.randint(1, 28)
    body = f"{r.choice(_AREAS)}{y:04d}{m:02d}{dd:02d}{_d(r, 3)}"
    check = "10X98765432"[sum(w * int(c) for w, c in zip(_ID_W, body)) % 11]
    if not valid:
        check = r.choice([c for c in "0123456789X" if c != check])
    return body + check


def ssn(r: random.Random) -> str:
    area = r.choice([a for a in range(1, 900) if a != 666])
    s = f"{area:03d}{r.randint(1, 99):02d}{r.randint(1, 9999):04d}"
    sep = r.choice(["-", "-", " "])
    return sep.join((s[:3], s[3:5], s[5:]))


def ssn_invalid(r: random.Random) -> str:
    a, g, s = f"{r.randint(1, 665):03d}", f"{r.randint(1, 99):02d}", f"{r.randint(1, 9999):04d}"
    bad = r.choice(["area0", "area666", "area9", "group", "serial", "fixed"])
    if bad == "fixed":
        return r.choice(["078-05-1120", "219-09-9999"])
    a = {"area0": "000", "area666": "666", "area9": f"9{_d(r, 2)}"}.get(bad, a)
    g = "00" if bad == "group" else g
    s = "0000" if bad == "serial" else s
    return f"{a}-{g}-{s}"


# (country, BBAN layout: n = digit, a = upper-case letter, c = either), ISO 13616 registry.
_IBAN_FMT = {"DE": "n" * 18, "GB": "aaaa" + "n" * 14, "FR": "n" * 10 + "c" * 11 + "nn", "ES": "n" * 20,
             "IT": "a" + "n" * 10 + "c" * 12, "NL": "aaaa" + "n" * 10, "BE": "n" * 12, "CH": "n" * 5 + "c" * 12,
             "AT": "n" * 16, "PL": "n" * 24, "PT": "n" * 21, "IE": "aaaa" + "n" * 14, "SE": "n" * 20,
             "NO": "n" * 11, "DK": "n" * 14, "FI": "n" * 14, "LU": "nnn" + "c" * 13, "SA": "nn" + "c" * 18}


def _iban_check(cc: str, bban: str) -> str:
    n = int("".join(str(int(c, 36)) for c in bban + cc + "00"))
    return f"{98 - n % 97:02d}"


def iban(r: random.Random, valid: bool = True) -> str:
    cc = r.choice(list(_IBAN_FMT))
    alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    # "c" (alphanumeric) positions hold account numbers: digits, now and then a letter.
    bban = "".join(r.choice("0123456789") if k == "n" or (k == "c" and r.random() < 0.9) else r.choice(alpha)
                   for k in _IBAN_FMT[cc])
    check = _iban_check(cc, bban)
    if not valid:
        check = f"{(int(check) + r.randint(1, 96)) % 97 + 2:02d}" if r.random() < 0.7 else check
        if check == _iban_check(cc, bban):  # the other kind of error: one character missing
            bban = bban[:-1]
    s = cc + check + bban
    return s if r.random() < 0.4 else " ".join(s[i:i + 4] for i in range(0, len(s), 4))


def ipv4(r: random.Random) -> str:
    while True:
        a = ipaddress.IPv4Address(r.randint(0x01000000, 0xDFFFFFFF))
        s = str(a)
        if a.is_global and not s.endswith((".0", ".255")) and not all(len(p) == 1 for p in s.split(".")):
            return s


def ipv4_private(r: random.Random) -> str:
    return r.choice([f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}", f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.1",
                     f"172.{r.randint(16, 31)}.{r.randint(0, 255)}.{r.randint(1, 254)}", "127.0.0.1",
                     f"203.0.113.{r.randint(1, 254)}", f"198.51.100.{r.randint(1, 254)}"])


def ipv6(r: random.Random) -> str:
    style = r.choice(["full", "full", "zeros", "compressed", "upper"])
    if style == "compressed":  # a real allocation with a run of zero groups
        groups = [r.choice(["2001:470", "2a00:1450", "2606:4700", "2400:cb00", "240e:3b0"]), *(f"{r.randint(1, 0xffff):x}"
                  for _ in range(r.randint(1, 3)))]
        return groups[0] + ":" + ":".join(groups[1:-1] or ["0"]) + "::" + groups[-1]
    while True:  # 128 random bits, as Faker's ipv6() draws them
        a = ipaddress.IPv6Address(r.getrandbits(128))
        if a.is_global and not a.is_multicast:
            break
    if style == "zeros":
        return a.exploded
    s = ":".join(f"{int(g, 16):x}" for g in a.exploded.split(":"))
    return s.upper() if style == "upper" else s


def ipv6_special(r: random.Random) -> str:
    return r.choice(["::1", "fe80::1", f"fe80::{r.randint(1, 0xffff):x}:{r.randint(1, 0xffff):x}", "2001:db8::1",
                     f"2001:db8:{r.randint(1, 0xffff):x}::{r.randint(1, 0xff):x}", "fd00::1", "ff02::1"])


_GIVEN = ["john", "mary", "li", "wei", "anna", "omar", "sofia", "raj", "chen", "emma", "lucas", "yuki", "fatima"]
_FAMILY = ["smith", "zhang", "wang", "garcia", "patel", "mueller", "rossi", "kim", "dubois", "silva", "nguyen"]
_DOMAINS = ["gmail.com", "example.com", "outlook.com", "163.com", "qq.com", "company.co.uk", "mail.example.org",
            "uni-heidelberg.de", "sina.com.cn", "yahoo.fr"]


def email(r: random.Random) -> str:
    g, f = r.choice(_GIVEN), r.choice(_FAMILY)
    local = r.choice([f"{g}.{f}", f"{g}{f}{r.randint(1, 99)}", f"{g[0]}{f}", f"{g}_{f}", f"{r.randint(10000, 9999999999)}"])
    return f"{local}@{r.choice(_DOMAINS)}"


# Phones: leading digits from each numbering plan (Ofcom, ACMA, ARCEP, BNetzA, Anatel, TRAI, MIIT,
# NANPA, MIC, CNMC), subscriber digits random.
def _nanp(r: random.Random) -> tuple[str, str, str]:
    return f"{r.randint(2, 9)}{_d(r, 2)}", f"{r.randint(2, 9)}{_d(r, 2)}", _d(r, 4)


def phone(r: random.Random, country: str) -> str:
    c = r.choice
    if country == "US":
        a, b, n = _nanp(r)
        return c([f"({a}) {b}-{n}", f"{a}-{b}-{n}", f"{a}.{b}.{n}", f"+1-{a}-{b}-{n}", f"1-{a}-{b}-{n}",
                  f"({a}){b}-{n}", f"{a}-{b}-{n}x{r.randint(100, 9999)}", f"+1 {a} {b} {n}",
                  f"001-{a}-{b}-{n}", f"({a}) {b}-{n} ext. {r.randint(10, 999)}"])
    if country == "GB":
        mob = f"07{c('1234579')}{_d(r, 2)}"
        sub = _d(r, 6)
        return c([f"{mob} {sub}", f"{mob} {sub[:3]} {sub[3:]}", f"+44 {mob[1:]} {sub}", f"020 7{_d(r, 3)} {_d(r, 4)}",
                  f"+44 (0)20 8{_d(r, 3)} {_d(r, 4)}", f"(0161) {c('2345789')}{_d(r, 2)} {_d(r, 4)}",
                  f"0117 {c('2345789')}{_d(r, 2)} {_d(r, 4)}", f"01632 960{_d(r, 3)}", f"07700 900{_d(r, 3)}"])
    if country == "AU":
        m = f"04{c('0123456789')}{_d(r, 1)}"
        return c([f"{m} {_d(r, 3)} {_d(r, 3)}", f"+61 {m[1:]} {_d(r, 3)} {_d(r, 3)}", f"(0{c('2378')}) {c('3456789')}{_d(r, 3)} {_d(r, 4)}",
                  f"0{c('2378')} {c('3456789')}{_d(r, 3)} {_d(r, 4)}", f"+61 {c('2378')} {c('3456789')}{_d(r, 3)} {_d(r, 4)}",
                  f"0491 570 {_d(r, 3)}"])
    if country == "FR":
        first = c("1234567")
        g = [_d(r, 2) for _ in range(4)]
        return c([f"0{first} {' '.join(g)}", f"0{first}.{'.'.join(g)}", f"+33 {first} {' '.join(g)}",
                  f"+33 (0){first} {' '.join(g)}", f"0{first}{''.join(g)}"])
    if country == "DE":
        return c([f"030 {c('2345689')}{_d(r, 7)}", f"0{c(['151', '160', '170', '171', '176'])} {_d(r, 8)}",
                  f"089 {c('2345')}{_d(r, 6)}", f"+49 30 {c('2345689')}{_d(r, 7)}",
                  f"+49 (0)171 {_d(r, 7)}", f"(069) {c('2345689')}{_d(r, 6)}", f"040 {c('2345')}{_d(r, 3)} {_d(r, 4)}"])
    if country == "BR":
        ddd = c(["11", "21", "31", "41", "51", "61", "71", "81", "85", "19"])
        return c([f"({ddd}) 9{_d(r, 4)}-{_d(r, 4)}", f"({ddd}) {c('2345')}{_d(r, 3)}-{_d(r, 4)}",
                  f"+55 {ddd} 9{_d(r, 4)}-{_d(r, 4)}", f"(0{ddd}) 9{_d(r, 4)}-{_d(r, 4)}", f"{ddd} 9{_d(r, 4)}-{_d(r, 4)}"])
    if country == "IN":
        m = f"{c('789')}{_d(r, 4)}"  # 6xxxx is only partly allocated (TRAI)
        s = _d(r, 5)
        return c([f"{m} {s}", f"+91 {m} {s}", f"+91-{m}{s}", f"0{m}{s}", f"+91{m}{s}", f"022 2{_d(r, 3)} {_d(r, 4)}",
                  f"011-2{_d(r, 7)}", f"{m}-{s}"])
    if country == "JP":
        return c([f"090-{_d(r, 4)}-{_d(r, 4)}", f"080-{_d(r, 4)}-{_d(r, 4)}", f"03-{_d(r, 4)}-{_d(r, 4)}",
                  f"+81 90-{_d(r, 4)}-{_d(r, 4)}", f"06-{c('2345689')}{_d(r, 3)}-{_d(r, 4)}"])
    if country == "ES":
        return c([f"6{_d(r, 2)} {_d(r, 3)} {_d(r, 3)}", f"+34 6{_d(r, 2)} {_d(r, 2)} {_d(r, 2)} {_d(r, 2)}",
                  f"91 {_d(r, 3)} {_d(r, 2)} {_d(r, 2)}"])
    if country == "CN":
        p = f"1{c('3456789')}{_d(r, 1)}"
        rest = _d(r, 8)
        return c([f"{p}{rest}", f"{p} {rest[:4]} {rest[4:]}", f"{p}-{rest[:4]}-{rest[4:]}", f"+86 {p} {rest[:4]} {rest[4:]}",
                  f"+86{p}{rest}", f"010-{c('2345689')}{_d(r, 7)}", f"0755-{c('2345689')}{_d(r, 7)}",
                  f"(021){c('2345689')}{_d(r, 7)}", f"0571-{c('2345689')}{_d(r, 6)}"])
    raise ValueError(country)


# --------------------------------------------------------------------------------------------
# decoys: (generator) -> value; the sentence says what the number is


def _isbn13(r: random.Random) -> str:
    body = "978" + _d(r, 9)
    check = (10 - sum((1 if i % 2 == 0 else 3) * int(ch) for i, ch in enumerate(body)) % 10) % 10
    s = body + str(check)
    return f"{s[:3]}-{s[3]}-{s[4:7]}-{s[7:12]}-{s[12]}"


def _isbn10(r: random.Random) -> str:
    body = r.choice("01") + _d(r, 8)
    check = (11 - sum((10 - i) * int(ch) for i, ch in enumerate(body)) % 11) % 11
    s = body + ("X" if check == 10 else str(check))
    return f"{s[0]}-{s[1:4]}-{s[4:9]}-{s[9]}"


DECOYS: dict[str, Callable[[random.Random], str]] = {
    "date": lambda r: r.choice([f"{r.randint(1990, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                                f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/{r.randint(1990, 2024)}",
                                f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(1990, 2024)}",
                                f"{r.randint(1990, 2024)}/{r.randint(1, 12)}/{r.randint(1, 28)} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
                                f"{r.randint(1990, 2024)}年{r.randint(1, 12)}月{r.randint(1, 28)}日"]),
    "year_range": lambda r: f"{(y := r.randint(1900, 2010))}-{y + r.randint(1, 14)}",
    "version": lambda r: r.choice([f"v{r.randint(1, 20)}.{r.randint(0, 30)}.{r.randint(0, 99)}",
                                   f"10.0.{r.randint(10000, 22631)}.{r.randint(1000, 4000)}",
                                   f"Chrome/{r.randint(90, 125)}.0.{r.randint(4000, 6500)}.{r.randint(10, 200)}"]),
    "isbn": lambda r: r.choice([_isbn13(r), _isbn10(r)]),
    "order": lambda r: r.choice([f"{r.randint(2019, 2024)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}{_d(r, 8)}",
                                 f"#{r.randint(1, 9)}{_d(r, 9)}", f"INV-{r.randint(2019, 2024)}-{_d(r, 6)}",
                                 f"1Z{_d(r, 3)}AA{_d(r, 10)}"]),
    "bad_id": lambda r: cn_id(r, valid=False),
    "bad_card": card_bad_luhn,
    "bad_ssn": ssn_invalid,
    "bad_iban": lambda r: iban(r, valid=False),
    "private_ip": ipv4_private,
    "special_ipv6": ipv6_special,
    "price": lambda r: r.choice([f"${r.randint(1, 9)},{_d(r, 3)}.{_d(r, 2)}", f"¥{r.randint(1, 99)},{_d(r, 3)},{_d(r, 3)}",
                                 f"{r.randint(1, 9)}5000000000"]),
    "measure": lambda r: r.choice([f"{r.randint(1, 3)}.{_d(r, 14)}", f"{r.randint(10, 89)}.{_d(r, 4)}, -{r.randint(10, 179)}.{_d(r, 4)}",
                                   f"{r.randint(10000, 99999)}-{_d(r, 4)}", f"pp. {(p := r.randint(100, 9000))}-{p + r.randint(5, 40)}"]),
    "timestamp": lambda r: r.choice([f"{r.randint(1500000000, 1735000000)}", f"{r.randint(1500000000, 1735000000)}{_d(r, 3)}"]),
    "ident": lambda r: r.choice([f"10.{r.randint(1000, 9999)}/{r.choice(['nature', 'science', 'j.cell'])}.{_d(r, 5)}",
                                 f"arXiv:{r.randint(15, 24)}{r.randint(1, 12):02d}.{_d(r, 5)}",
                                 f"{r.randint(50, 9999)}-{_d(r, 2)}-{r.randint(0, 9)}",
                                 "123e4567-e89b-12d3-a456-426614174000", "00:1A:2B:3C:4D:5E",
                                 f"9{r.randint(1, 5)}{_d(r, 4)}0100M{_d(r, 6)}Y4{r.randint(0, 9)}"]),
    "short": lambda r: r.choice([f"555-{_d(r, 4)}", f"{r.randint(10000, 99999)}", f"{r.randint(100000, 999999)}",
                                 f"1{r.choice('012')}{_d(r, 9)}"]),
}

EN_PII = ["Please call me at {} if anything changes.", "You can reach the office on {} between 9 and 5.",
          "Contact: {}", "For questions, write to {} or ask at the desk.", "Her details on file: {}.",
          "Send the refund to {} before Friday.", "The login came from {} at midnight.", "Reference holder — {}, verified."]
ZH_PII = ["如有疑问请联系{}。", "联系方式：{}", "请把资料发到{}，谢谢。", "客户信息：{}，已核实。", "他留下的是{}，请尽快回复。",
          "登录地址为{}，请确认是否本人操作。"]
TYPED_EN = {"phone": ["Call {} for bookings.", "Mobile: {}", "My number is {}, text me.", "Tel. {} (office hours)"],
            "bank_card": ["Card number: {}, exp 09/27.", "Please charge {} for the order.", "I paid with {}."],
            "ssn": ["SSN: {}", "Social security number {} was on the form.", "His SSN is {}."],
            "iban": ["IBAN: {}", "Please transfer to {} (BIC DEUTDEFF).", "Bank account {} for the deposit."],
            "id_card": ["ID number {} on file.", "Passport replaced by resident ID {}."],
            "ip": ["Blocked requests from {} today.", "The server at {} went down."],
            "email": ["Email me at {} please.", "Contact {} for the slides."]}
TYPED_ZH = {"phone": ["联系电话：{}", "手机{}，欢迎来电。", "请拨打{}预约。"],
            "bank_card": ["银行卡号：{}，户名张三。", "请转账至{}。"], "id_card": ["身份证号码：{}。", "身份证{}已登记。"],
            "ip": ["服务器地址：{}，端口 8080。", "异常登录IP：{}"], "email": ["邮箱：{}", "请发邮件至{}。"],
            "iban": ["收款账户（IBAN）：{}", "境外账户 {} 已绑定。"], "ssn": ["美国社会安全号 SSN：{}"]}
EN_DECOY = ["Published {} and updated since.", "See item {} in the list.", "The value was {} in the report.",
            "Order {} shipped today.", "ISBN {} (paperback).", "Build {} is out.", "Recorded as {}."]
ZH_DECOY = ["发布于{}，更新于今天。", "订单号：{}，已发货。", "书号 ISBN {}。", "数据为{}，见附表。", "编号{}的文件已归档。"]
CLEAN = ["The committee met on Tuesday and agreed on the budget.", "我们在周二开会，通过了预算。",
         "She read the report twice before signing it.", "天气晴朗，适合出门散步。",
         "C++ code uses std::vector and a[1::2] slices in Python.", "他说这件事要从长计议。"]


def _one(r: random.Random, typ: str, fmt: str, value: str) -> Example:
    zh = r.random() < 0.4
    pool = (TYPED_ZH if zh else TYPED_EN).get(typ, []) + (ZH_PII if zh else EN_PII)
    tpl = r.choice(pool)
    a, b = tpl.split("{}")
    return Example([("text", a), (typ, value), ("text", b)], "zh" if zh else "en", fmt)


def build(seed: int = 0, per_format: int = 40) -> list[Example]:
    """PII sentences (`per_format` per format), decoy sentences, mixed and clean sentences."""
    r = random.Random(seed)
    gens: dict[str, tuple[str, Callable[[random.Random], str]]] = {
        "email": ("email", email), "cn_id": ("id_card", cn_id), "ssn": ("ssn", ssn), "iban": ("iban", iban),
        "ipv4": ("ip", ipv4), "ipv6": ("ip", ipv6),
        **{f"card_{k}": ("bank_card", partial(card, scheme=k)) for k in _CARDS},
        **{f"phone_{k}": ("phone", partial(phone, country=k))
           for k in ("US", "GB", "AU", "FR", "DE", "BR", "IN", "JP", "ES", "CN")},
    }
    out: list[Example] = []
    for fmt, (typ, gen) in gens.items():
        for _ in range(per_format * (3 if fmt == "phone_CN" else 1)):
            out.append(_one(r, typ, fmt, gen(r)))
    for name, gen in DECOYS.items():
        for _ in range(per_format):
            zh = r.random() < 0.4
            a, b = r.choice(ZH_DECOY if zh else EN_DECOY).split("{}")
            out.append(Example([("text", a), ("decoy", gen(r)), ("text", b)], "zh" if zh else "en", f"decoy_{name}"))
    for _ in range(per_format):  # PII and a decoy in one sentence
        fmt = r.choice(list(gens))
        typ, gen = gens[fmt]
        d = r.choice(list(DECOYS))
        out.append(Example([("text", "On "), ("decoy", DECOYS["date"](r)), ("text", " she wrote from "), (typ, gen(r)),
                            ("text", " about item "), ("decoy", DECOYS[d](r)), ("text", ".")], "en", f"mixed_{fmt}"))
    out += [Example([("text", t)], "zh" if re.search("[\u4e00-\u9fff]", t) else "en", "clean") for t in CLEAN]
    r.shuffle(out)
    return out


@dataclass
class Score:
    pii: Counter  # type -> values
    caught: Counter  # type -> values replaced by their own token
    decoys: Counter  # decoy kind -> values
    kept: Counter  # decoy kind -> values left intact
    misses: list[tuple[str, str]]  # (fmt, text) of PII not caught
    broken: list[tuple[str, str]]  # (fmt, text) of decoys or context changed

    @property
    def recall(self) -> float:
        return sum(self.caught.values()) / max(1, sum(self.pii.values()))

    @property
    def decoys_kept(self) -> float:
        return sum(self.kept.values()) / max(1, sum(self.decoys.values()))


def score(redact: Callable[[str], str], examples: list[Example]) -> Score:
    """Align each redacted sentence with its pieces: text pieces must survive verbatim; a PII piece
    is caught when its place holds its type's token; a decoy is kept when it is unchanged."""
    sc = Score(Counter(), Counter(), Counter(), Counter(), [], [])
    for ex in examples:
        out = redact(ex.text)
        pattern = "".join(re.escape(v) if k == "text" else "(.*?)" for k, v in ex.pieces)
        m = re.fullmatch(pattern, out, re.DOTALL)
        got = iter(m.groups()) if m else None
        context_ok = True
        for k, v in ex.pieces:
            if k == "text":
                continue
            g = next(got) if got is not None else None
            if k == "decoy":
                kind = ex.fmt.removeprefix("decoy_") if ex.fmt.startswith("decoy_") else "mixed"
                sc.decoys[kind] += 1
                if g == v:
                    sc.kept[kind] += 1
                else:
                    context_ok = False
            else:
                sc.pii[k] += 1
                if g == TOKENS[k]:
                    sc.caught[k] += 1
                else:
                    sc.misses.append((ex.fmt, ex.text))
        if m is None or not context_ok:
            sc.broken.append((ex.fmt, ex.text))
    return sc
