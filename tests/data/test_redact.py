"""PII redaction and repost-boilerplate removal: true positives, decoys, mixed text, the Step."""

from __future__ import annotations

import gzip
import json

import pytest

from smelt.config import PIIConfig
from smelt.data import Document, redact_text
from smelt.data.steps.redact import (
    _BP_ANYWHERE_ZH,
    _BP_CREDIT_ZH,
    _BP_START_ZH,
    _GATE,
    ALL_TYPES,
    COUNT_KEYS,
    PIIRedactor,
    Redactor,
    card_scheme,
    cn_id_valid,
    iban_valid,
    luhn_valid,
    remove_boilerplate,
    ssn_valid,
)
from tests.data.pii_evalset import build, score


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# (input, expected output, expected non-zero counts)
TRUE_POSITIVES = [
    # e-mail
    ("Contact john.doe@example.com for details.", "Contact <EMAIL> for details.", {"email": 1}),
    ("Write to a.b+tag@mail.sub.example.co.uk.", "Write to <EMAIL>.", {"email": 1}),
    ("联系邮箱：zhangsan@163.com，欢迎来信。", "联系邮箱：<EMAIL>，欢迎来信。", {"email": 1}),
    ("邮箱zhangsan@163.com", "邮箱<EMAIL>", {"email": 1}),
    ("QQ邮箱 13800138000@qq.com 常用", "QQ邮箱 <EMAIL> 常用", {"email": 1}),  # not <PHONE>@qq.com
    ("全角 lisi＠example.cn 也算", "全角 <EMAIL> 也算", {"email": 1}),
    ("mail john [at] example [dot] com now", "mail <EMAIL> now", {"email": 1}),
    ("mail john(at)example.com now", "mail <EMAIL> now", {"email": 1}),
    ("mailto:info@example.org", "mailto:<EMAIL>", {"email": 1}),
    # phones: international, North American, Chinese mobile and landline
    ("Call +1 415 555 0132 today.", "Call <PHONE> today.", {"phone": 1}),
    ("London: +44 20 7946 0958.", "London: <PHONE>.", {"phone": 1}),
    ("Brussels +32 (0)2 790 75 75 office", "Brussels <PHONE> office", {"phone": 1}),
    ("Paris +33 1 23 45 67 89", "Paris <PHONE>", {"phone": 1}),
    ("电话：+86 138 0013 8000", "电话：<PHONE>", {"phone": 1}),
    ("电话+8613800138000", "电话<PHONE>", {"phone": 1}),
    ("Office (415) 555-0132 or 415-555-0132 or 415.555.0132.", "Office <PHONE> or <PHONE> or <PHONE>.",
     {"phone": 3}),
    ("Toll free 1-800-555-0199.", "Toll free <PHONE>.", {"phone": 1}),
    ("+44 20 7946 0958 2023 was a year", "<PHONE> 2023 was a year", {"phone": 1}),  # E.164: 15 digits max
    ("手机13800138000，请联系。", "手机<PHONE>，请联系。", {"phone": 1}),
    ("手机：138 0013 8000 或 139-0013-9000", "手机：<PHONE> 或 <PHONE>", {"phone": 2}),
    ("Mobile 13912345678.", "Mobile <PHONE>.", {"phone": 1}),
    ("13800138000/13900139000", "<PHONE>/<PHONE>", {"phone": 2}),
    ("北京010-12345678，深圳0755-1234567。", "北京<PHONE>，深圳<PHONE>。", {"phone": 2}),
    ("总机（010）87654321转8001", "总机<PHONE>转8001", {"phone": 1}),
    ("电话 021-87654321-801 分机", "电话 <PHONE> 分机", {"phone": 1}),
    # Chinese resident ID (GB 11643-1999 checksum) and 15-digit legacy ID
    ("身份证号：11010519491231002X。", "身份证号：<ID_NUM>。", {"id_card": 1}),
    ("ID 440305198502141230 on file", "ID <ID_NUM> on file", {"id_card": 1}),
    ("lower-case x: 11010519491231002x", "lower-case x: <ID_NUM>", {"id_card": 1}),
    ("旧身份证110105491231002。", "旧身份证<ID_NUM>。", {"id_card": 1}),
    # bank / credit cards: Luhn + issuer prefix + length
    ("Visa 4111 1111 1111 1111 exp", "Visa <BANK_CARD> exp", {"bank_card": 1}),
    ("MC 5555-5555-5555-4444.", "MC <BANK_CARD>.", {"bank_card": 1}),
    ("MC2 2223003122003222", "MC2 <BANK_CARD>", {"bank_card": 1}),
    ("Amex 3782 822463 10005", "Amex <BANK_CARD>", {"bank_card": 1}),
    ("Amex 378282246310005", "Amex <BANK_CARD>", {"bank_card": 1}),
    ("Discover 6011111111111117; JCB 3530111333300000", "Discover <BANK_CARD>; JCB <BANK_CARD>",
     {"bank_card": 2}),
    ("卡号：6222 0212 3456 7890 128，户名张三", "卡号：<BANK_CARD>，户名张三", {"bank_card": 1}),
    ("银行卡6222021234567890128", "银行卡<BANK_CARD>", {"bank_card": 1}),
    ("card 4111 1111 1111 1111 123 cvv", "card <BANK_CARD> 123 cvv", {"bank_card": 1}),
    ("in 2023 4111 1111 1111 1111 was used", "in 2023 <BANK_CARD> was used", {"bank_card": 1}),
    # full-width forms (NFC keeps them; detection runs on a folded copy)
    ("手机１３８００１３８０００，邮箱ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ。", "手机<PHONE>，邮箱<EMAIL>。",
     {"phone": 1, "email": 1}),
    ("电话：＋８６ １３８ ００１３ ８０００", "电话：<PHONE>", {"phone": 1}),
    ("身份证１１０１０５１９４９１２３１００２Ｘ", "身份证<ID_NUM>", {"id_card": 1}),
    # IP addresses (public only)
    ("Login from 23.45.67.89 blocked.", "Login from <IP> blocked.", {"ip": 1}),
    ("服务器地址：47.100.23.5，端口 8080", "服务器地址：<IP>，端口 8080", {"ip": 1}),
    ("host 23.45.67.89:8080 up", "host <IP>:8080 up", {"ip": 1}),
    ("v6 2408:8207:2410:3c40:1d5b:9e5a:8b4c:7f01 seen", "v6 <IP> seen", {"ip": 1}),
    ("v6 2a03:2880:f12f:83:face:b00c:0:25de.", "v6 <IP>.", {"ip": 1}),
    ("mapped ::ffff:23.45.67.89", "mapped ::ffff:<IP>", {"ip": 1}),
    ("full 2a03:2880:f12f:0083:face:b00c:0000:25de here", "full <IP> here", {"ip": 1}),
    ("any block 7e2c:9ab3:1f:22:abcd:1:2:3.", "any block <IP>.", {"ip": 1}),
    ("upper 2408:8207:2410:3C40:1D5B:9E5A:8B4C:7F01 ok", "upper <IP> ok", {"ip": 1}),
    ("compressed 2001:470:1f0b::1 and 2a00:1450:4001:81c::200e", "compressed <IP> and <IP>", {"ip": 2}),
    # national phone formats (libphonenumber), with and without +CC, and extensions
    ("UK mobile 07700 900123 or +44 7700 900123", "UK mobile <PHONE> or <PHONE>", {"phone": 2}),
    ("UK 07911 123 456, London 020 7946 0958, Manchester (0161) 496 0123",
     "UK <PHONE>, London <PHONE>, Manchester <PHONE>", {"phone": 3}),
    ("AU 0491 570 156 and (02) 9123 4567", "AU <PHONE> and <PHONE>", {"phone": 2}),
    ("FR 06 12 34 56 78, 01.23.45.67.89, +33 6 12 34 56 78", "FR <PHONE>, <PHONE>, <PHONE>", {"phone": 3}),
    ("DE Tel. 030 12345678, Handy 0151 23456789", "DE Tel. <PHONE>, Handy <PHONE>", {"phone": 2}),
    ("BR (11) 91234-5678 ou (011) 3456-7890 ou 21 98765-4321", "BR <PHONE> ou <PHONE> ou <PHONE>", {"phone": 3}),
    ("IN 98765 43210, 098765 43210, +91 98765 43210", "IN <PHONE>, <PHONE>, <PHONE>", {"phone": 3}),
    ("JP 090-1234-5678, ES 612 345 678", "JP <PHONE>, ES <PHONE>", {"phone": 2}),
    ("dial 0044 20 7946 0958 or 001-415-555-0132", "dial <PHONE> or <PHONE>", {"phone": 2}),
    ("US 415-555-0132x123, (415) 555-0132 ext. 42.", "US <PHONE>, <PHONE>.", {"phone": 2}),
    ("手机14512345678、16612345678、17912345678、14412345678", "手机<PHONE>、<PHONE>、<PHONE>、<PHONE>", {"phone": 4}),
    # cards of every network
    ("Maestro 6759 6498 2643 8453 and 501800000009", "Maestro <BANK_CARD> and <BANK_CARD>", {"bank_card": 2}),
    ("Maestro19 6304000000000000000, UK 6761 0000 0000 0000 001", "Maestro19 <BANK_CARD>, UK <BANK_CARD>",
     {"bank_card": 2}),
    ("JCB 3566 0020 2036 0505, 213100000000001, 180000000000002", "JCB <BANK_CARD>, <BANK_CARD>, <BANK_CARD>",
     {"bank_card": 3}),
    ("Diners 3056 930902 5904, 38520000023237", "Diners <BANK_CARD>, <BANK_CARD>", {"bank_card": 2}),
    ("Discover 6011 0009 9013 9424, 6445644564456445", "Discover <BANK_CARD>, <BANK_CARD>", {"bank_card": 2}),
    ("Amex bare 340265470614635", "Amex bare <BANK_CARD>", {"bank_card": 1}),  # not a 15-digit legacy ID
    # US social security numbers
    ("SSN 536-22-1234, 536 22 1234.", "SSN <SSN>, <SSN>.", {"ssn": 2}),
    ("SSN: 536221234 on the form", "SSN: <SSN> on the form", {"ssn": 1}),
    ("社会安全号 001-01-0001", "社会安全号 <SSN>", {"ssn": 1}),
    # IBAN (ISO 13616), printed and compact
    ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN <IBAN>.", {"iban": 1}),
    ("GB82WEST12345698765432 / GB82 WEST 1234 5698 7654 32", "<IBAN> / <IBAN>", {"iban": 2}),
    ("收款账户：NL91ABNA0417164300，FR14 2004 1010 0505 0001 3M02 606。", "收款账户：<IBAN>，<IBAN>。", {"iban": 2}),
    ("IT60 X054 2811 1010 0000 0123 456 and NO93 8601 1117 947", "<IBAN> and <IBAN>", {"iban": 2}),
]

DECOYS = [
    # dates and times
    "Published 2023-11-25 at 14:30:00, updated 11/25/2023 10:05.",
    "发布于2023年11月25日 14:30，更新于2023-11-25。",
    "全角日期２０２３年１１月２５日，价格１２３４５元，版本ｖ２．１０．４，订单２０２３１１２５１２３４５６７８９０。",
    "From 1958-1965 and 2003-2007; 2010/11/25.",
    # version numbers
    "Upgrade to 1.2.3 or v2.10.4; see v1.2.3.4 and version 10.0.0.1 and Version 23.45.67.89.",
    "固件版本 4.3.2.1，版本号 23.45.67.89，当前 v2.10.4。",
    "Chrome/120.0.0.0 Safari/537.36",
    "Section 3.2.1.4 and 1.2.3.4.5 and 01.02.03.04 and 256.1.1.1",
    # ISBNs
    "ISBN 978-7-111-54742-6 and ISBN 978-0-306-40615-7, ISBN-10 0-306-40615-2, 9787111547426.",
    "书号：ISBN 978-7-111-54742-6",
    # order numbers, IDs with a wrong checksum or date, cards failing Luhn or issuer
    "订单号：202311251234567890，物流单号 SF1234567890123。",
    "Order #1234567890123 and invoice 20231125-0001.",
    "错误校验位 110101199003077570 与 31011519921130456 0",
    "未来日期 110101209901017577，二月三十日 110105194902300020，月份错误 110105491331002。",
    "Card 4111111111111112 fails Luhn; 1234567812345670 passes Luhn but has no issuer.",
    "Barcode 6901234567892 and timestamp 1700000000000.",
    # prices, years, math, short phone-like numbers
    "Price $1,299.99 or ¥12,345,678; in 2023 revenue was 15000000000 yuan.",
    "售价12,345元，总投资15000000000元，增长3.5%。",
    "pi = 3.14159265358979, e = 2.718281828459045",
    "Call 555-0132 or 12345 or 123-456-7890; 138001380 is too short; 12012345678 has no mobile prefix.",
    "电话 1380013 8000 与 13800138000123 都不是手机号",
    "Score +15000000000 and +1 vote and +5 10",
    # private / special addresses and non-addresses
    "Router 192.168.1.1, localhost 127.0.0.1, 10.0.0.1, DNS 8.8.8.8 and 114.114.114.114.",
    "服务器地址：203.0.113.7（RFC 5737 文档地址），网关 172.16.0.1",
    "IPv6 ::1, fe80::1, 2001:db8::1, slices x[1::2], std::vector, time 12:30:45, MAC 00:1A:2B:3C:4D:5E.",
    # not e-mail addresses
    "Follow @LearnonScreen, pkg@1.2.3, user@localhost, icon@2x.png, a@b, john at example dot com.",
    # URLs are kept verbatim, whatever they contain
    "See https://example.com/user/13800138000 and http://23.45.67.89/x and https://medium.com/@john.doe/post.",
    "网址：https://www.example.cn/item/202311251234567890.html，www.example.com/u/13800138000",
    # SSN shapes the SSA never issues, and the two voided numbers
    "Invalid: 000-12-3456, 666-12-3456, 912-34-5678, 536-00-1234, 536-22-0000, 078-05-1120, 219-09-9999.",
    "Example SSN 123-45-6789 and zip+4 94105-1234; bare 536221234 without a keyword.",
    # IBANs with a wrong checksum or length
    "IBAN DE89 3704 0044 0532 0130 01 (bad check) and GB82 WEST 1234 5698 7654 3 (short).",
    # national-number look-alikes: dates, ISBN-10, references, sections, decimals
    "ISBN 0-306-40615-2, order no. 0123456789, ref 0491570156, invoice #07700900123.",
    "Dates 25.11.2023, 11/25/2023 14:30:00, time 0.9468822170900693 s, coordinates 37.7749, -122.4194.",
    "Build 10.0.19045.3693, pages 1234-1256, CAS 7732-18-5, 2003-2007 and 1958–1965.",
    "UUID 123e4567-e89b-12d3-a456-426614174000, timestamp 1700000000123, EAN 0 12345 67890 5.",
    "统一社会信用代码91350100M000100Y43，邮编100871，发票号码04400123456789。",
    "A Maestro-prefixed 12-digit tail: 4467 5641 0800 3273 fails Luhn as a whole.",
    "digits = '0123456789'; hexdigits = '0123456789abcdef'",
]


@pytest.mark.parametrize("text,expected,counts", TRUE_POSITIVES, ids=[t[0][:30] for t in TRUE_POSITIVES])
def test_true_positives(text: str, expected: str, counts: dict[str, int]) -> None:
    out, got = redact_text(text)
    assert out == expected
    assert nonzero(got) == counts
    assert set(got) == set(COUNT_KEYS)  # every key present, zeros included


@pytest.mark.parametrize("text", DECOYS, ids=[t[:30] for t in DECOYS])
def test_decoys_survive(text: str) -> None:
    out, got = redact_text(text)
    assert out == text
    assert nonzero(got) == {}


def test_url_kept_but_email_in_text_redacted() -> None:
    text = "Docs at https://example.com/a?id=5 or mail help@example.com; 见 http://example.cn/p/1 或 li@example.cn"
    out, got = redact_text(text)
    assert out == "Docs at https://example.com/a?id=5 or mail <EMAIL>; 见 http://example.cn/p/1 或 <EMAIL>"
    assert got["email"] == 2


BOILERPLATE = [
    # (input, expected, statements removed)
    ("正文第一段。\n转载自人民网\n正文第二段。", "正文第一段。\n正文第二段。", 1),
    ("正文。本文来源：新华网。后文。", "正文。后文。", 1),
    ("来源：新华网\n今天召开会议。", "今天召开会议。", 1),
    ("来源：新华网 北京11月25日电 今天召开会议。", "北京11月25日电 今天召开会议。", 1),
    ("【来源：新华网】今天天气很好。", "今天天气很好。", 1),
    ("正文（注：转载自人民网）后文。", "正文后文。", 1),
    ("原文链接：https://example.com/a/1\n正文", "正文", 1),
    ("正文。\n版权归原作者所有，如有侵权请联系删除。", "正文。", 1),
    ("本文为原创，转载请注明出处。欢迎阅读。", "欢迎阅读。", 1),
    ("para1\n\n转载自人民网\n\npara2", "para1\n\npara2", 1),
    ("转载自人民网\n\npara2\n", "para2\n", 1),
    ("Body text.\nOriginally published at Medium.\nMore text.", "Body text.\nMore text.", 1),
    ("Great post. Originally published at https://medium.com/@x/post-1.", "Great post.", 1),
    ("Body.\nThis article was originally published on The Conversation. Read the original article.", "Body.", 2),
    ("Body.\nThis article is republished from The Conversation under a Creative Commons license.", "Body.", 1),
    ("Body.\n  *This post first appeared on Example.com.*\n", "Body.\n", 1),
    ("Body.\nThe post Ten Tips for Winter appeared first on My Blog.", "Body.", 1),
    ("Body.\nReposted with permission from the author.", "Body.", 1),
]

NOT_BOILERPLATE = [
    "数据来源：国家统计局。",  # a citation inside the article
    "该文章被大量转载，引发讨论。",
    "版权所有 © 2023 新华网",
    "他的观点来源于生活。",
    "The novel was originally published in 1925.",
    "Originally published in 1925, the novel sold well.",
    "The article was published in Nature in 2020.",
    "We read the original manuscript.",
]


@pytest.mark.parametrize("text,expected,n", BOILERPLATE, ids=[t[0][:30] for t in BOILERPLATE])
def test_boilerplate_removed(text: str, expected: str, n: int) -> None:
    out, got = redact_text(text)
    assert out == expected
    assert nonzero(got) == {"boilerplate": n}
    assert remove_boilerplate(text) == (expected, n)


@pytest.mark.parametrize("text", NOT_BOILERPLATE)
def test_not_boilerplate(text: str) -> None:
    assert redact_text(text) == (text, dict.fromkeys(COUNT_KEYS, 0))


def test_boilerplate_off_keeps_statements() -> None:
    text = "正文。\n转载自人民网，联系 a@b.com"
    assert redact_text(text, boilerplate=False)[0] == "正文。\n转载自人民网，联系 <EMAIL>"
    assert redact_text(text)[0] == "正文。"  # the statement goes as a whole, e-mail included


def test_every_boilerplate_marker_passes_the_gate() -> None:
    # The one-scan gate decides whether boilerplate removal runs at all: it must see every marker.
    for marker in (*_BP_ANYWHERE_ZH, *_BP_START_ZH, *(c + "：" for c in _BP_CREDIT_ZH)):
        assert _GATE.search(marker), marker
    for text, _, _ in BOILERPLATE:
        assert any(h not in ("@", "＠", "::") for h in _GATE.findall(text)), text


MIXED_EN = (
    "Hi team,\n"
    "Reach me at jane.roe@corp.example.com or +1 (415) 555-0132. The 2023-11-25 release (v2.10.4) "
    "went out from 23.45.67.89; ISBN 978-0-306-40615-7 is unchanged. Card on file: 4111-1111-1111-1111.\n"
    "Originally published at https://blog.example.com/post/42.\n"
)
MIXED_EN_OUT = (
    "Hi team,\n"
    "Reach me at <EMAIL> or <PHONE>. The 2023-11-25 release (v2.10.4) "
    "went out from <IP>; ISBN 978-0-306-40615-7 is unchanged. Card on file: <BANK_CARD>.\n"
)
MIXED_ZH = (
    "张三，身份证11010519491231002X，手机13800138000，邮箱zhangsan@163.com，"
    "于2023年11月25日在订单号：202311251234567890中使用银行卡6222021234567890128支付了¥1,299.00。\n"
    "版权归原作者所有，如有侵权请联系删除。"
)
MIXED_ZH_OUT = (
    "张三，身份证<ID_NUM>，手机<PHONE>，邮箱<EMAIL>，"
    "于2023年11月25日在订单号：202311251234567890中使用银行卡<BANK_CARD>支付了¥1,299.00。"
)


def test_mixed_documents() -> None:
    out, got = redact_text(MIXED_EN)
    assert out == MIXED_EN_OUT
    assert got == {"email": 1, "phone": 1, "id_card": 0, "bank_card": 1, "ip": 1, "ssn": 0, "iban": 0, "boilerplate": 1}
    out, got = redact_text(MIXED_ZH)
    assert out == MIXED_ZH_OUT
    assert got == {"email": 1, "phone": 1, "id_card": 1, "bank_card": 1, "ip": 0, "ssn": 0, "iban": 0, "boilerplate": 1}


ALL_INPUTS = ([t for t, _, _ in TRUE_POSITIVES] + DECOYS + [t for t, _, _ in BOILERPLATE] + NOT_BOILERPLATE
              + [MIXED_EN, MIXED_ZH])


def test_idempotent() -> None:
    for text in ALL_INPUTS:
        once, _ = redact_text(text)
        twice, counts = redact_text(once)
        assert twice == once, text
        assert nonzero(counts) == {}, text


def test_type_selection() -> None:
    text = "mail a@b.com, phone 13800138000, ip 23.45.67.89, id 11010519491231002X, card 4111111111111111"
    out, got = redact_text(text, types=["phone"], boilerplate=False)
    assert out == "mail a@b.com, phone <PHONE>, ip 23.45.67.89, id 11010519491231002X, card 4111111111111111"
    assert nonzero(got) == {"phone": 1}
    out, _ = redact_text(text, types=("ip", "id_card"))
    assert out == "mail a@b.com, phone 13800138000, ip <IP>, id <ID_NUM>, card 4111111111111111"
    assert redact_text(text, types=())[0] == text


def test_disabled_type_still_protects_its_span() -> None:
    # The digits of a QQ address are part of the address even when e-mails are not redacted.
    assert redact_text("QQ 13800138000@qq.com", types=["phone"]) == (
        "QQ 13800138000@qq.com", dict.fromkeys(COUNT_KEYS, 0))


def test_unknown_type_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown PII type\(s\) \['passport'\]; allowed: \['email', 'phone'"):
        Redactor(types=["email", "passport"])


def test_validators() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and luhn_valid("0")
    assert not luhn_valid("4111111111111112")
    assert card_scheme("4111111111111111") == "visa"
    assert card_scheme("2223003122003222") == "mastercard"
    assert card_scheme("378282246310005") == "amex"
    assert card_scheme("6222021234567890128") == "unionpay"
    assert card_scheme("3530111333300000") == "jcb"
    assert card_scheme("36227206271667") == "diners"
    assert card_scheme("41111111111111") is None  # Visa has 13, 16 or 19 digits
    assert card_scheme("1234567812345670") is None
    assert cn_id_valid("11010519491231002X")  # the example of GB 11643-1999
    assert cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021")  # wrong check character
    # the following carry a correct check character, so only the named rule can reject them
    assert not cn_id_valid("990105194912310023")  # no province 99
    assert not cn_id_valid("110105194902300020")  # 30 February
    assert not cn_id_valid("110101209901017577")  # born in the future
    assert not cn_id_valid("110105189912310023")  # born before 1900
    assert cn_id_valid("110105190001010028")
    assert cn_id_valid("110105491231002")  # 15-digit legacy: 1949-12-31
    assert not cn_id_valid("110105491331002")  # month 13
    assert not cn_id_valid("1101054912310")
    # networks beyond Visa / Mastercard / Amex / UnionPay, lengths included
    assert card_scheme("6759649826438453") == "maestro" and card_scheme("501800000009") == "maestro"
    assert card_scheme("5018000000000000009") == "maestro" and card_scheme("50180000009") is None
    assert card_scheme("213100000000001") == "jcb" and card_scheme("180000000000002") == "jcb"
    assert card_scheme("2131000000000000") is None  # the 2131/1800 JCBs have 15 digits
    assert card_scheme("38520000023237") == "diners" and card_scheme("6445644564456445") == "discover"
    # SSA rules
    assert ssn_valid("536221234") and ssn_valid("001010001") and ssn_valid("899999999")
    for bad in ("000221234", "666221234", "900221234", "999221234", "536001234", "536220000", "078051120",
                "219099999", "123456789", "53622123", "53622123a"):
        assert not ssn_valid(bad), bad
    # ISO 13616: registry length and mod 97
    for good in ("DE89370400440532013000", "GB82WEST12345698765432", "NL91ABNA0417164300", "NO9386011117947",
                 "FR1420041010050500013M02606", "MT84MALT011000012345MTLCAST001S"):
        assert iban_valid(good), good
    assert not iban_valid("DE89370400440532013001")  # check digits
    assert not iban_valid("DE8937040044053201300")  # length for DE is 22
    assert not iban_valid("XX89370400440532013000")  # no such country


# --------------------------------------------------------------------------------------------
# the Step


def test_step_counts_and_meta() -> None:
    step = PIIRedactor(PIIConfig())
    assert step.name == "pii"
    docs = [Document("a", MIXED_ZH, domain="zh"), Document("b", "clean text, 2023-11-25", domain="zh"),
            Document("c", "ping 23.45.67.89 or 24.45.67.89", domain="web")]
    kept = list(step.run(docs))
    assert [d.id for d in kept] == ["a", "b", "c"]  # never rejects
    assert docs[0].text == MIXED_ZH_OUT
    assert docs[0].meta["pii"] == {"email": 1, "phone": 1, "id_card": 1, "bank_card": 1, "boilerplate": 1}
    assert docs[1].text == "clean text, 2023-11-25" and "pii" not in docs[1].meta
    assert docs[2].meta["pii"] == {"ip": 2}
    zh = step.stats.by_domain["zh"]
    assert (zh.seen, zh.kept, sum(zh.dropped.values())) == (2, 2, 0)
    assert dict(zh.counters) == {"email": 1, "phone": 1, "id_card": 1, "bank_card": 1, "boilerplate": 1,
                                 "docs_redacted": 1}
    assert dict(step.stats.by_domain["web"].counters) == {"ip": 2, "docs_redacted": 1}


def test_step_respects_config() -> None:
    step = PIIRedactor(PIIConfig(types=["email"], boilerplate=False, skip_domains=["code"]))
    code = Document("c", "host = '23.45.67.89'  # admin@example.com", domain="code")
    web = Document("w", "转载自人民网\nmail admin@example.com, ip 23.45.67.89", domain="web")
    assert step(code) is None and step(web) is None
    assert code.text == "host = '23.45.67.89'  # admin@example.com" and "pii" not in code.meta
    assert web.text == "转载自人民网\nmail <EMAIL>, ip 23.45.67.89"
    assert web.meta["pii"] == {"email": 1}


def test_step_default_config_and_idempotent_rerun() -> None:
    step = PIIRedactor()
    # PIIConfig.types (smelt.config) lists its own defaults; the step follows the config.
    assert step.redactor.types == frozenset(PIIConfig().types) and step.redactor.boilerplate
    doc = Document("d", MIXED_EN)
    step(doc)
    meta = dict(doc.meta["pii"])
    step(doc)  # a second pass finds nothing and leaves the record alone
    assert doc.text == MIXED_EN_OUT and doc.meta["pii"] == meta
    assert step.stats.total().counters["docs_redacted"] == 1


# --------------------------------------------------------------------------------------------
# real text from ../shared/data


def test_dolma_sample_emails(shared_data) -> None:
    # dolma's PII tagger flagged e-mails in three of these documents (its fixture, not human labels).
    path = shared_data / "web_cc_dolma_sample" / "provided_documents_000.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = {r["id"]: r["text"] for r in map(json.loads, f)}
    found = {}
    for doc_id, text in docs.items():
        out, counts = redact_text(text)
        if counts["email"]:
            found[doc_id.split("/")[2]] = counts["email"]
            assert "@" not in out.replace("@LearnonScreen", "")
    assert found == {"bufvc.ac.uk": 1, "claihr.ca": 1, "cpdlab.eun.org": 1}


def test_clean_prose_is_untouched(shared_data) -> None:
    # Encyclopedia prose (Chinese and English) holds no personal data: any PII match is a false positive.
    with open(shared_data / "cmrc2018" / "cmrc2018_dev.json", encoding="utf-8") as f:
        texts = [p["context"] for a in json.load(f)["data"] for p in a["paragraphs"]]
    texts += (shared_data / "wikitext2" / "valid.txt").read_text(encoding="utf-8").split("\n \n")
    assert len(texts) > 2000
    redactor = Redactor(boilerplate=False)
    changed = [t[:80] for t in texts if redactor(t)[0] != t]
    assert changed == []


def test_large_document_counts_scale() -> None:
    # 300 copies on separate lines: counts multiply exactly, and the "@"-dense path (one full
    # e-mail scan instead of windows) gives the same answer as the windowed one.
    text = "\n".join([MIXED_ZH] * 300)
    out, got = redact_text(text)
    assert out == "\n".join([MIXED_ZH_OUT] * 300)
    assert got == {"email": 300, "phone": 300, "id_card": 300, "bank_card": 300, "ip": 0, "ssn": 0, "iban": 0,
                   "boilerplate": 300}
    obf = " ".join(["mail john [at] example [dot] com"] * 40)
    assert redact_text(obf) == (" ".join(["mail <EMAIL>"] * 40), {**dict.fromkeys(COUNT_KEYS, 0), "email": 40})


# --------------------------------------------------------------------------------------------
# the generated evaluation set (tests/data/pii_evalset.py)


def test_evalset_recall_and_decoys() -> None:
    # Seeded sentences in English and Chinese, every type and format; figures in the README.
    sc = score(lambda t: redact_text(t)[0], build(seed=0))
    assert sum(sc.pii.values()) > 1000 and sum(sc.decoys.values()) > 600
    assert set(sc.pii) == set(ALL_TYPES)
    assert sc.recall >= 0.99, sc.misses[:10]
    assert sc.decoys_kept >= 0.95, sc.broken[:10]
    for typ, n in sc.pii.items():
        assert sc.caught[typ] / n >= 0.97, (typ, [m for m in sc.misses if typ in m[0]][:5])


def test_evalset_is_seeded() -> None:
    assert [e.text for e in build(seed=3, per_format=2)] == [e.text for e in build(seed=3, per_format=2)]
    assert [e.text for e in build(seed=3, per_format=2)] != [e.text for e in build(seed=4, per_format=2)]


def test_phone_library_runs_only_on_phone_shaped_spans(monkeypatch) -> None:
    # libphonenumber costs ~0.1 ms per region: prose, dates, years and Chinese numbers never reach it.
    import smelt.data.steps.redact as rd

    calls = []
    monkeypatch.setattr(rd, "_find_phone_lib", lambda *a: calls.append(a[1]))
    for text in DECOYS[:4] + ["手机13800138000", "In 1958-1965 and 2003-2007 the 2023-11-25 figure was 12,345,678."]:
        redact_text(text)
    assert calls == []
    redact_text("Call 0491 570 156.")
    assert calls == [5]
