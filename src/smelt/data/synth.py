"""A seeded generator of messy web-like documents in English and Chinese.

It plants the problems a curation pipeline must catch, and labels each document with what was
planted (``meta["planted"]``), so tests and the demo can check that every problem is caught:

- ``clean``: ordinary prose (kept, unless a rule is wrong)
- ``exact_dup`` / ``near_dup``: copies of an earlier document (``meta["copy_of"]``), near ones
  with a few words changed
- ``pii``: prose with e-mails, phone numbers, ID numbers, card numbers and IPs
- ``boilerplate``: prose with repost lines ("转载自…", "Originally published at …") and a
  navigation footer repeated across many pages (``meta["boilerplate_lines"]`` lists them)
- ``spam``: keyword-stuffed ads, link lists, repeated phrases
- ``mojibake``: UTF-8 text decoded as Latin-1
- ``short``: a few words only
- ``contaminated``: prose that quotes an evaluation item given to the generator

The prose is built from sentence templates and a small vocabulary: realistic enough for
quality rules (stop words, punctuation, sentence and word lengths), varied enough that
independent documents are not near-duplicates of each other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from smelt.data.document import Document

_EN_SUBJ = ["the committee", "our team", "the city council", "a local farmer", "the researchers", "my neighbour",
            "the new library", "the company", "a small bakery", "the school board", "the museum", "the old bridge",
            "the river", "the hospital", "an engineer", "the orchestra", "the mayor", "a young student",
            "the football club", "the village", "the market", "the train station", "the garden", "the council"]
_EN_VERB = ["announced", "described", "reviewed", "planned", "discussed", "explained", "celebrated", "questioned",
            "welcomed", "opened", "improved", "studied", "changed", "supported", "visited", "recorded", "built",
            "tested", "measured", "painted", "shared", "repaired", "organised", "remembered"]
_EN_OBJ = ["a plan for the summer", "the results of the survey", "the cost of the repairs", "a new bus route",
           "the history of the town", "an exhibition of local art", "the weather in spring", "a festival of music",
           "the price of bread", "a better way to recycle", "the opening hours", "the water supply",
           "a programme for children", "the safety of the roads", "the number of visitors", "an old photograph",
           "the quality of the soil", "a course in cooking", "the growth of the forest", "the sound of the bells"]
_EN_TAIL = ["after a long meeting", "before the end of the year", "with the help of volunteers",
            "because many people had asked", "in front of a large crowd", "during the first week of May",
            "without any extra money", "as part of a wider project", "for the first time in ten years",
            "while the rain kept falling", "on a quiet Sunday morning", "in a letter to the newspaper"]
_EN_LINK = ["However,", "Later,", "In the end,", "Meanwhile,", "At first,", "Still,", "Even so,", "Since then,"]

_ZH_SUBJ = ["市政府", "研究人员", "这家公司", "我们学校", "当地农民", "图书馆", "博物馆", "医院", "老师们",
            "志愿者", "工程师", "这座城市", "村里的人", "新成立的委员会", "一位年轻的学生", "音乐团"]
_ZH_VERB = ["宣布了", "讨论了", "介绍了", "改进了", "研究了", "支持了", "记录了", "完成了", "参观了", "修复了",
            "组织了", "分享了"]
_ZH_OBJ = ["夏季的发展计划", "调查的结果", "维修的费用", "新的公交线路", "这个小镇的历史", "本地艺术展览",
           "春天的天气变化", "一次音乐节", "面包的价格", "更好的回收方法", "开放时间的安排", "供水系统",
           "儿童教育项目", "道路安全问题", "游客数量的变化", "土壤的质量", "森林的生长情况"]
_ZH_TAIL = ["在一次很长的会议之后", "在年底之前", "在志愿者的帮助下", "因为很多人都提出了要求",
            "在众多市民的见证下", "在五月的第一周", "没有花费额外的资金", "作为一个更大项目的一部分",
            "这是十年来的第一次", "虽然雨一直在下", "在一个安静的周日早上"]
_ZH_LINK = ["但是，", "后来，", "最后，", "与此同时，", "起初，", "尽管如此，", "从那以后，", "因此，"]

_SPAM_EN = ["BEST CASINO BONUS", "cheap pills online", "click here now", "FREE money", "win big today",
            "limited offer", "buy followers", "hot deals"]
_SPAM_ZH = ["代开发票", "网络赌博", "博彩平台", "加微信", "免费领取", "点击进入", "最新优惠", "日赚千元"]
_FOOTER_EN = ["Home | About us | Contact | Privacy policy | Terms of use",
              "Copyright 2024 Example Media Group. All rights reserved.",
              "Subscribe to our newsletter for weekly updates and offers."]
_FOOTER_ZH = ["首页 | 关于我们 | 联系方式 | 隐私政策 | 使用条款", "版权所有 2024 示例传媒集团 保留所有权利。"]


class _Sampler:
    """Draws phrases without replacement within one document, so that a document does not
    repeat its own 5-grams (Gopher's repetition rules would rightly reject it)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pools: dict[int, list[str]] = {}

    def __call__(self, options: list[str]) -> str:
        pool = self.pools.get(id(options))
        if not pool:
            pool = self.pools[id(options)] = self.rng.sample(options, len(options))
        return pool.pop()


def en_sentence(rng: random.Random, pick: _Sampler | None = None) -> str:
    pick = pick or _Sampler(rng)
    s = f"{pick(_EN_SUBJ)} {rng.choice(_EN_VERB)} {pick(_EN_OBJ)} {pick(_EN_TAIL)}."
    if rng.random() < 0.3:
        s = f"{rng.choice(_EN_LINK)} {s}"
    return s[0].upper() + s[1:]


def zh_sentence(rng: random.Random, pick: _Sampler | None = None) -> str:
    pick = pick or _Sampler(rng)
    s = f"{pick(_ZH_SUBJ)}{pick(_ZH_TAIL)}{rng.choice(_ZH_VERB)}{pick(_ZH_OBJ)}。"
    if rng.random() < 0.3:
        s = rng.choice(_ZH_LINK) + s
    return s


def prose(rng: random.Random, lang: str, paragraphs: int | None = None) -> str:
    """2-3 paragraphs of 3-4 sentences (at most 12 sentences: the size of the smallest pool)."""
    paragraphs = paragraphs or rng.randint(2, 3)
    sent = en_sentence if lang == "en" else zh_sentence
    sep = " " if lang == "en" else ""
    pick = _Sampler(rng)
    return "\n\n".join(sep.join(sent(rng, pick) for _ in range(rng.randint(3, 4))) for _ in range(paragraphs))


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def card_number(rng: random.Random) -> str:
    body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
    n = body + _luhn_digit(body)
    return " ".join(n[i:i + 4] for i in range(0, 16, 4))


def cn_id_number(rng: random.Random) -> str:
    """A syntactically valid Chinese resident ID (GB 11643-1999 checksum), random digits."""
    area = rng.choice(["110101", "310104", "440305", "510107"])
    birth = f"{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    seq = f"{rng.randint(0, 999):03d}"
    body = area + birth + seq
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, weights)) % 11]
    return body + check


def _pii_sentences(rng: random.Random, lang: str) -> list[str]:
    user = rng.choice(["alice", "bob.smith", "chen.wei", "li_na", "support"])
    email = f"{user}{rng.randint(1, 99)}@{rng.choice(['example.com', 'mail.example.org', 'qq.com'])}"
    ip = f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if lang == "en":
        return [f"For questions, write to {email} or call +1 415 555 {rng.randint(1000, 9999)}.",
                f"The payment was made with card {card_number(rng)} last week.",
                f"The server at {ip} was restarted on 2023-11-25."]
    mobile = f"{rng.choice(['138', '139', '150', '186', '177', '199'])}{rng.randint(0, 99999999):08d}"
    return [f"如有疑问请联系{email}或拨打{mobile}。", f"身份证号码是{cn_id_number(rng)}，请妥善保管。",
            f"服务器地址{ip}已于2023年11月25日重启。"]


def _mojibake(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def _near_copy(rng: random.Random, text: str, lang: str, frac: float = 0.015) -> str:
    if lang == "en":
        words = text.split(" ")
        for _ in range(max(1, int(len(words) * frac))):
            i = rng.randrange(len(words))
            words[i] = rng.choice(["really", "quite", "very", "also", "indeed"])
        return " ".join(words)
    chars = list(text)
    for _ in range(max(1, int(len(chars) * frac))):
        i = rng.randrange(len(chars))
        if chars[i] not in "。，\n":
            chars[i] = rng.choice("很也都还就又")
    return "".join(chars)


def generate(n: int = 200, seed: int = 0, eval_items: list[str] | None = None,
             mix: dict[str, float] | None = None, domain: str = "web") -> Iterator[Document]:
    """Yield `n` labelled documents (half English, half Chinese unless `mix` says otherwise)."""
    rng = random.Random(seed)
    mix = mix or {"clean": 0.45, "exact_dup": 0.08, "near_dup": 0.08, "pii": 0.08, "boilerplate": 0.1,
                  "spam": 0.08, "mojibake": 0.04, "short": 0.04, "contaminated": 0.05}
    kinds, weights = zip(*mix.items())
    history: list[tuple[str, str, str]] = []  # (id, text, lang) of clean-ish docs to copy from
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        kind = rng.choices(kinds, weights)[0]
        if kind in ("exact_dup", "near_dup") and not [h for h in history if h[2] == lang]:
            kind = "clean"
        if kind == "contaminated" and not eval_items:
            kind = "clean"
        meta: dict = {"planted": kind, "lang": lang}
        if kind == "clean":
            text = prose(rng, lang)
        elif kind in ("exact_dup", "near_dup"):
            src_id, src_text, _ = rng.choice([h for h in history if h[2] == lang])
            text = src_text if kind == "exact_dup" else _near_copy(rng, src_text, lang)
            meta["copy_of"] = src_id
        elif kind == "pii":
            parts = prose(rng, lang).split("\n\n")
            parts.insert(1, (" " if lang == "en" else "").join(_pii_sentences(rng, lang)))
            text = "\n\n".join(parts)
        elif kind == "boilerplate":
            head = ("转载自：示例新闻网 www.example.cn" if lang == "zh"
                    else "Originally published at www.example-news.com")
            footer_lines = _FOOTER_ZH if lang == "zh" else _FOOTER_EN
            text = f"{head}\n\n{prose(rng, lang)}\n\n" + "\n".join(footer_lines)
            meta["boilerplate_lines"] = [head, *footer_lines]
        elif kind == "spam":
            words = _SPAM_EN if lang == "en" else _SPAM_ZH
            lines = [" ".join(rng.choices(words, k=6)) for _ in range(rng.randint(8, 20))]
            text = "\n".join(lines)
        elif kind == "mojibake":
            text = prose(rng, lang)
            if lang == "en":  # plain ASCII survives a Latin-1 mis-decode, so add typographic marks
                text = text.replace("the ", "the “café” ", 3).replace(". ", "’s. ", 3)
            text = _mojibake(text)
        elif kind == "short":
            text = "Click to read more" if lang == "en" else "点击查看"
        else:  # contaminated
            item = rng.choice(eval_items or [""])
            text = f"{prose(rng, lang, 1)}\n\n{item}\n\n{prose(rng, lang, 1)}"
            meta["eval_item"] = item[:80]
        doc_id = f"synth-{seed}-{i:06d}"
        if kind in ("clean", "pii", "boilerplate"):
            history.append((doc_id, text, lang))
        yield Document(id=doc_id, text=text, domain=domain, meta=meta)
