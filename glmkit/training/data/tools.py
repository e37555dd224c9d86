"""Tool-use conversations for the GLM-4 demo model (`glmkit demo build --model glm4-demo`).

Four tools (TOOLS: weather, unit conversion, arithmetic, time zones), English and Chinese. A conversation is a
system turn offering a subset of the tools, a user question, and then either a call (`name\\n{json}`), the tool's
result under `<|observation|>` and an answer that repeats the result's values, or a direct answer when no offered
tool fits (chit-chat, simple facts, or a question for a tool that is not offered: it must not be called).

What the held-out split tests is copying, not memorising: argument values (cities, time zones, numbers) and
question phrasings (templates) are split before any conversation is written, so a held-out question has a
phrasing and a value no training conversation has. `split_report` checks that the two sides are disjoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

LANGS = ("en", "zh")

TOOLS: dict[str, dict] = {
    "get_weather": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}},
    "convert_units": {
        "name": "convert_units", "description": "Convert a value between units",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}},
    "calculate": {
        "name": "calculate", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "pattern": r"^[0-9+\-*/(). ]+$"}},
            "required": ["expression"]}},
    "get_time": {
        "name": "get_time", "description": "Local time in a time zone or city",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                       "required": ["timezone"]}},
}  # fmt: skip

# symbol -> (English names, Chinese names, kind, factor to the kind's base unit); temperatures are special-cased.
UNITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, float]] = {
    "km": (("km", "kilometers"), ("公里", "千米"), "length", 1000.0),
    "m": (("m", "meters"), ("米",), "length", 1.0),
    "cm": (("cm", "centimeters"), ("厘米",), "length", 0.01),
    "mi": (("miles",), ("英里",), "length", 1609.344),
    "ft": (("feet", "ft"), ("英尺",), "length", 0.3048),
    "in": (("inches",), ("英寸",), "length", 0.0254),
    "kg": (("kg", "kilograms"), ("千克", "公斤"), "mass", 1.0),
    "g": (("grams", "g"), ("克",), "mass", 0.001),
    "lb": (("pounds", "lb"), ("磅",), "mass", 0.45359237),
    "oz": (("ounces", "oz"), ("盎司",), "mass", 0.028349523125),
    "l": (("liters", "L"), ("升",), "volume", 1.0),
    "ml": (("milliliters", "ml"), ("毫升",), "volume", 0.001),
    "gal": (("gallons",), ("加仑",), "volume", 3.785411784),
    "c": (("Celsius", "degrees Celsius"), ("摄氏度",), "temperature", 1.0),
    "f": (("Fahrenheit", "degrees Fahrenheit"), ("华氏度",), "temperature", 1.0),
    "kmh": (("km/h", "kilometers per hour"), ("公里每小时",), "speed", 1 / 3.6),
    "mph": (("mph", "miles per hour"), ("英里每小时",), "speed", 0.44704),
}
# The schema names no enum (it would double the tools block's length); evaluation checks the symbols against UNITS.
UNIT_SYMBOLS = tuple(UNITS)

# Chinese cities (English name, Chinese name) beside CLDR's time-zone cities, which have few Chinese ones.
CHINA_CITIES = [
    ("Beijing", "北京"), ("Shanghai", "上海"), ("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Chengdu", "成都"),
    ("Hangzhou", "杭州"), ("Wuhan", "武汉"), ("Nanjing", "南京"), ("Xi'an", "西安"), ("Chongqing", "重庆"),
    ("Tianjin", "天津"), ("Suzhou", "苏州"), ("Changsha", "长沙"), ("Zhengzhou", "郑州"), ("Qingdao", "青岛"),
    ("Shenyang", "沈阳"), ("Dalian", "大连"), ("Xiamen", "厦门"), ("Kunming", "昆明"), ("Harbin", "哈尔滨"),
    ("Jinan", "济南"), ("Fuzhou", "福州"), ("Hefei", "合肥"), ("Nanning", "南宁"), ("Guiyang", "贵阳"),
    ("Lanzhou", "兰州"), ("Taiyuan", "太原"), ("Shijiazhuang", "石家庄"), ("Nanchang", "南昌"), ("Haikou", "海口"),
    ("Lhasa", "拉萨"), ("Xining", "西宁"), ("Yinchuan", "银川"), ("Hohhot", "呼和浩特"), ("Changchun", "长春"),
    ("Ningbo", "宁波"), ("Wuxi", "无锡"), ("Foshan", "佛山"), ("Dongguan", "东莞"), ("Zhuhai", "珠海"),
    ("Sanya", "三亚"), ("Guilin", "桂林"), ("Luoyang", "洛阳"), ("Yantai", "烟台"), ("Wenzhou", "温州"),
    ("Shantou", "汕头"), ("Datong", "大同"), ("Kaifeng", "开封"), ("Yangzhou", "扬州"), ("Lijiang", "丽江"),
]  # fmt: skip

CONDITIONS = {"sunny": "晴", "cloudy": "多云", "light rain": "小雨", "heavy rain": "大雨", "snow": "下雪",
              "windy": "大风", "foggy": "有雾", "overcast": "阴"}

# ----- question templates: {city} {unit_en} {value} {from} {to} {expr} {tz}; a template id is its index.

Q = {
    ("get_weather", "en"): [
        "What's the weather in {city}?", "What is the weather like in {city} today?", "How is the weather in {city}?",
        "Weather in {city}, please.", "Tell me the current weather in {city}.", "Is it raining in {city} right now?",
        "How hot is it in {city}?", "Do I need an umbrella in {city} today?", "What's the temperature in {city}?",
        "Check the weather for {city}.", "Give me the weather report for {city}.", "How cold is it in {city} now?",
        "I'm going to {city}. What's the weather there?", "Could you look up the weather in {city}?",
        "Current conditions in {city}?", "{city} weather now?", "Any idea what the weather is doing in {city}?",
        "What's the forecast for {city} right now?",
        "What's the weather in {city} in {unit_en}?", "Temperature in {city} in {unit_en}, please.",
        "How warm is it in {city}? Answer in {unit_en}.", "Show me the weather in {city} using {unit_en}.",
    ],
    ("get_weather", "zh"): [
        "{city}今天天气怎么样？", "{city}的天气如何？", "查一下{city}的天气。", "{city}现在下雨吗？", "{city}现在多少度？",
        "告诉我{city}现在的天气。", "我要去{city}，那边天气怎么样？", "{city}冷不冷？", "{city}热吗？", "帮我看看{city}的天气。",
        "请问{city}天气如何？", "{city}今天需要带伞吗？", "{city}现在的气温是多少？", "能查一下{city}的天气吗？",
        "{city}天气", "现在{city}是什么天气？", "想知道{city}的天气情况。", "{city}那边天气好吗？",
        "{city}现在多少度？用{unit_zh}。", "用{unit_zh}告诉我{city}的气温。", "{city}的天气，温度用{unit_zh}表示。",
    ],
    ("convert_units", "en"): [
        "Convert {value} {from} to {to}.", "How many {to} is {value} {from}?", "What is {value} {from} in {to}?",
        "{value} {from} to {to}?", "Please convert {value} {from} into {to}.", "How much is {value} {from} in {to}?",
        "I have {value} {from}. How many {to} is that?", "Can you turn {value} {from} into {to}?",
        "{value} {from} equals how many {to}?", "Change {value} {from} to {to}, please.",
        "What do {value} {from} come to in {to}?", "Express {value} {from} in {to}.", "Unit conversion: {value} {from} to {to}.",
        "If something is {value} {from}, what is it in {to}?", "Quick conversion: {value} {from} in {to}?",
    ],
    ("convert_units", "zh"): [
        "{value}{from}等于多少{to}？", "把{value}{from}换算成{to}。", "{value}{from}是多少{to}？", "请把{value}{from}转换为{to}。",
        "{value}{from}换成{to}是多少？", "帮我把{value}{from}转成{to}。", "{value}{from}合多少{to}？", "换算：{value}{from}到{to}。",
        "我有{value}{from}，是多少{to}？", "{value}{from}折合多少{to}？", "单位换算，{value}{from}等于几{to}？",
        "请问{value}{from}相当于多少{to}？", "{value}{from}用{to}表示是多少？", "把{value}{from}变成{to}。",
    ],
    ("calculate", "en"): [
        "What is {expr}?", "Calculate {expr}.", "Compute {expr}.", "What's {expr}?", "Please work out {expr}.",
        "How much is {expr}?", "Evaluate {expr}.", "Can you calculate {expr} for me?", "{expr} = ?", "Solve {expr}.",
        "What does {expr} equal?", "I need the result of {expr}.", "Do the math: {expr}.", "Give me the value of {expr}.",
        "Help me compute {expr}.", "What is the answer to {expr}?",
    ],
    ("calculate", "zh"): [
        "{expr}等于多少？", "计算{expr}。", "请计算{expr}。", "{expr}是多少？", "帮我算一下{expr}。", "算算{expr}。",
        "{expr}的结果是什么？", "求{expr}的值。", "{expr} = ?", "请问{expr}等于几？", "帮忙计算：{expr}", "我想知道{expr}的结果。",
        "{expr}得多少？", "算一下{expr}等于多少。", "能帮我算{expr}吗？",
    ],
    ("get_time", "en"): [
        "What time is it in {tz}?", "What's the time in {tz}?", "Current time in {tz}?", "Tell me the time in {tz}.",
        "What is the local time in {tz}?", "Do you know what time it is in {tz}?", "Time in {tz}, please.",
        "Check the current time in {tz}.", "What's the clock showing in {tz} now?", "Is it late in {tz}? What time is it there?",
        "I need the local time for {tz}.", "Can you tell me the time in {tz} right now?", "How late is it in {tz}?",
        "What hour is it in {tz}?", "Look up the time in {tz}.",
    ],
    ("get_time", "zh"): [
        "{tz}现在几点？", "{tz}现在是什么时间？", "查一下{tz}的时间。", "告诉我{tz}的当地时间。", "{tz}几点了？",
        "请问{tz}现在几点钟？", "{tz}的时间是多少？", "帮我看看{tz}现在几点。", "现在{tz}是几点？", "{tz}当地时间？",
        "我想知道{tz}现在的时间。", "{tz}那边几点了？", "能告诉我{tz}的时间吗？", "{tz}此刻是几点？",
    ],
}  # fmt: skip

# Questions no tool fits, with their answers (one answer list per question group).
DIRECT = {
    "en": [
        (["Hello!", "Hi there.", "Hey!", "Good morning!", "Hello, how are you?", "Hi, nice to meet you."],
         ["Hello! How can I help you today?", "Hi! What can I do for you?"]),
        (["Thank you!", "Thanks a lot.", "Thanks, that helps.", "Great, thank you."],
         ["You're welcome!", "Glad I could help."]),
        (["Who are you?", "What are you?", "What's your name?", "Introduce yourself."],
         ["I am a small demo assistant trained by glmkit. I can call tools when they are available."]),
        (["Tell me a joke.", "Say something funny.", "Do you know a joke?"],
         ["Why did the computer go to the doctor? It had a virus."]),
        (["What is the capital of France?", "Which city is the capital of France?"], ["The capital of France is Paris."]),
        (["What is the capital of Japan?", "Which city is the capital of Japan?"], ["The capital of Japan is Tokyo."]),
        (["What is the capital of China?", "Which city is the capital of China?"], ["The capital of China is Beijing."]),
        (["How many days are in a week?", "How many days does a week have?"], ["A week has seven days."]),
        (["What color is the sky?", "Why is the sky blue?"], ["The sky looks blue because air scatters blue light more."]),
        (["Write a short poem.", "Give me a two-line poem."], ["Quiet rain on the window, / the city falls asleep."]),
        (["Can you help me?", "I have a question.", "Are you there?"], ["Of course. What would you like to know?"]),
        (["Goodbye!", "Bye.", "See you later."], ["Goodbye! Have a nice day."]),
        (["What can you do?", "What are you able to help with?"],
         ["I can answer simple questions and use tools such as weather, unit conversion, arithmetic and time zones."]),
        (["Recommend a book.", "What book should I read?"], ["Try \"The Little Prince\": short, and worth rereading."]),
        (["How are you doing?", "How is your day?"], ["I'm doing well, thank you. How can I help?"]),
    ],
    "zh": [
        (["你好！", "您好。", "嗨！", "早上好！", "你好，最近怎么样？", "哈喽"], ["你好！有什么可以帮你的吗？", "您好！请问需要什么帮助？"]),
        (["谢谢！", "非常感谢。", "谢谢你的帮助。", "太好了，谢谢。"], ["不客气！", "很高兴能帮到你。"]),
        (["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？"], ["我是 glmkit 训练的一个小型演示助手，可以在有工具时调用工具。"]),
        (["讲个笑话。", "说点好笑的。", "你会讲笑话吗？"], ["电脑为什么去看医生？因为它中了病毒。"]),
        (["法国的首都是哪里？", "法国首都是哪座城市？"], ["法国的首都是巴黎。"]),
        (["日本的首都是哪里？", "日本首都是哪座城市？"], ["日本的首都是东京。"]),
        (["中国的首都是哪里？", "中国首都是哪座城市？"], ["中国的首都是北京。"]),
        (["一周有几天？", "一个星期有多少天？"], ["一周有七天。"]),
        (["天空为什么是蓝色的？", "天是什么颜色的？"], ["因为空气对蓝光的散射更强，所以天空看起来是蓝色的。"]),
        (["写一首短诗。", "给我写两句诗。"], ["细雨敲窗夜，城灯入梦眠。"]),
        (["能帮我个忙吗？", "我有个问题。", "你在吗？"], ["当然可以，请问你想知道什么？"]),
        (["再见！", "拜拜。", "回头见。"], ["再见！祝你愉快。"]),
        (["你能做什么？", "你会些什么？"], ["我可以回答简单的问题，也能使用天气、单位换算、计算和时间等工具。"]),
        (["推荐一本书。", "我该读什么书？"], ["推荐《小王子》，篇幅不长，值得反复读。"]),
        (["你今天过得怎么样？", "你好吗？"], ["我很好，谢谢！有什么可以帮你？"]),
    ],
}  # fmt: skip

# The answer when a question needs a tool that is not offered.
NO_TOOL = {
    "en": {"get_weather": "I can't check the weather right now: no weather tool is available.",
           "convert_units": "I can't convert units right now: no conversion tool is available.",
           "calculate": "I can't run that calculation right now: no calculator tool is available.",
           "get_time": "I can't look up the time right now: no time tool is available."},
    "zh": {"get_weather": "抱歉，现在没有可用的天气工具，无法查询天气。",
           "convert_units": "抱歉，现在没有可用的单位换算工具。",
           "calculate": "抱歉，现在没有可用的计算工具。",
           "get_time": "抱歉，现在没有可用的时间工具，无法查询时间。"},
}  # fmt: skip

ANSWERS = {
    ("get_weather", "en"): ["It is {temperature}{deg} and {condition} in {city}.",
                            "In {city} it is currently {condition}, {temperature}{deg}.",
                            "The weather in {city}: {condition}, {temperature}{deg}."],
    ("get_weather", "zh"): ["{city}现在{condition_zh}，气温{temperature}{deg}。", "{city}当前天气：{condition_zh}，{temperature}{deg}。"],
    ("convert_units", "en"): ["{value} {from_unit} is {result} {to_unit}.", "That is {result} {to_unit}.",
                              "{value} {from_unit} = {result} {to_unit}."],
    ("convert_units", "zh"): ["{value} {from_unit} 等于 {result} {to_unit}。", "换算结果是 {result} {to_unit}。"],
    ("calculate", "en"): ["{expression} = {result}.", "The result is {result}.", "It equals {result}."],
    ("calculate", "zh"): ["{expression} = {result}。", "结果是 {result}。", "计算结果为 {result}。"],
    ("get_time", "en"): ["It is {time} in {timezone} ({date}).", "The local time in {timezone} is {time}.",
                         "Right now it is {time} in {timezone}."],
    ("get_time", "zh"): ["{timezone}现在是 {time}（{date}）。", "{timezone}当地时间 {time}。"],
}  # fmt: skip

ANSWER_KEYS = {"get_weather": ("temperature", "city"), "convert_units": ("result",), "calculate": ("result",),
               "get_time": ("time",)}  # the observation's values an answer must repeat


# ----- argument values


@dataclass(frozen=True)
class Place:
    en: str
    zh: str
    zone: str


def cldr_places(babel_wheel: Path) -> list[Place]:
    """CLDR's time-zone exemplar cities with their Chinese names (babel's locale data, read without babel)."""
    from glmkit.training.data.instructions import _CldrUnpickler
    from glmkit.training.data.sources import read_member

    zh = _CldrUnpickler(io.BytesIO(read_member(babel_wheel, "babel/locale-data/zh.dat"))).load()["time_zones"]
    places = []
    for zone, names in zh.items():
        if not isinstance(names, dict) or "city" not in names or zone.split("/")[0] in ("Etc", "Antarctica"):
            continue
        en = zone.rsplit("/", 1)[-1].replace("_", " ")
        if not re.fullmatch(r"[A-Z][a-z]+(?: [A-Z][a-z]+)*", en) or not re.fullmatch(r"[\u4e00-\u9fff·]+", names["city"]):
            continue
        places.append(Place(en, names["city"], zone))
    return places


def all_places(babel_wheel: Path | None) -> list[Place]:
    places = [Place(en, zh, "Asia/Shanghai") for en, zh in CHINA_CITIES]
    if babel_wheel is not None:
        seen = {p.en for p in places} | {p.zh for p in places}
        places += [p for p in cldr_places(babel_wheel) if p.en not in seen and p.zh not in seen]
    return places


def _bucket(text: str, salt: str) -> float:
    """A stable uniform draw in [0, 1) for `text`: the same split on every machine and run."""
    return int(hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()[:8], 16) / 2**32


def held_out_value(value: str, fraction: float = 0.2) -> bool:
    return _bucket(value, "value") < fraction


def held_out_template(tool: str, lang: str, index: int, count: int) -> bool:
    """About one template in five per tool and language, never the first two (so each side keeps some)."""
    return index >= 2 and _bucket(f"{tool}/{lang}/{index}", "template") < 0.2


def number_text(rng: random.Random, heldout: bool) -> str:
    """A number as a user types it, varied in length and decimals; held-out numbers are disjoint by value."""
    while True:
        digits = rng.choice((1, 2, 2, 3, 3, 4))
        n = rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)
        text = str(n) if rng.random() < 0.6 else f"{n}.{rng.randint(1, 99) if rng.random() < 0.5 else rng.randint(1, 9)}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
        if held_out_value(text) == heldout:
            return text


def expression(rng: random.Random, heldout: bool) -> str:
    for _ in range(1000):
        ops = rng.choice((1, 1, 2, 2, 3))
        parts = [str(rng.randint(1, 999 if rng.random() < 0.5 else 99))]
        for _ in range(ops):
            parts += [rng.choice("+-*/"), str(rng.randint(1, 999 if rng.random() < 0.4 else 99))]
        expr = " ".join(parts)
        if ops >= 2 and rng.random() < 0.3:
            expr = f"({' '.join(parts[:3])}) {' '.join(parts[3:])}"
        if rng.random() < 0.2:
            expr = expr.replace(" ", "")
        if held_out_value(expr) == heldout:
            return expr
    raise RuntimeError("no expression found")


def evaluate(expr: str) -> int | float:
    value = eval(compile(expr, "<expr>", "eval", flags=0), {"__builtins__": {}}, {})  # digits and + - * / ( ) only
    return int(value) if float(value).is_integer() else round(value, 4)


def convert(value: float, source: str, target: str) -> float:
    kind = UNITS[source][2]
    if kind == "temperature":
        celsius = value if source == "c" else (value - 32) * 5 / 9
        result = celsius if target == "c" else celsius * 9 / 5 + 32
    else:
        result = value * UNITS[source][3] / UNITS[target][3]
    return round(result, 3) if abs(result) >= 1 else round(result, 5)


def json_number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def clock(rng: random.Random) -> tuple[str, str]:
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


# ----- conversations


def _fill(template: str, values: dict) -> str:
    return template.format(**values)


def tool_question(tool: str, lang: str, template: str, rng: random.Random, places: list[Place],
                  heldout: bool) -> tuple[str, dict, dict, dict]:
    """(question, call arguments, observation, answer values) for one question of `tool`."""
    if tool == "get_weather":
        place = rng.choice(places)
        city = place.en if lang == "en" else place.zh
        values = {"city": city}
        arguments: dict = {"city": city}
        if "{unit_" in template:
            unit = rng.choice(("celsius", "fahrenheit"))
            values.update(unit_en=unit.capitalize() if rng.random() < 0.5 else unit, unit_zh="摄氏度" if unit == "celsius" else "华氏度")
            arguments["unit"] = unit
        unit = arguments.get("unit", "celsius")
        temperature = rng.randint(-25, 40) if unit == "celsius" else rng.randint(-13, 104)
        condition = rng.choice(list(CONDITIONS))
        observation = {"city": city, "temperature": temperature, "unit": unit, "condition": condition}
        answer = {**observation, "condition_zh": CONDITIONS[condition], "deg": "°C" if unit == "celsius" else "°F"}
        return _fill(template, values), arguments, observation, answer
    if tool == "convert_units":
        kind = rng.choice(("length", "length", "mass", "volume", "temperature", "speed"))
        source, target = rng.sample([u for u, spec in UNITS.items() if spec[2] == kind], 2)
        value = number_text(rng, heldout)
        names = 0 if lang == "en" else 1
        values = {"value": value, "from": rng.choice(UNITS[source][names]), "to": rng.choice(UNITS[target][names])}
        arguments = {"value": json_number(value), "from_unit": source, "to_unit": target}
        result = convert(float(value), source, target)
        observation = {**arguments, "result": result}
        return _fill(template, values), arguments, observation, {**observation, "value": value}
    if tool == "calculate":
        expr = expression(rng, heldout)
        observation = {"expression": expr, "result": evaluate(expr)}
        return _fill(template, {"expr": expr}), {"expression": expr}, observation, observation
    if tool == "get_time":
        place = rng.choice(places)
        tz = rng.choice((place.zone, place.en if lang == "en" else place.zh)) if place.zone != "Asia/Shanghai" else (
            place.en if lang == "en" else place.zh)
        time_, date = clock(rng)
        observation = {"timezone": tz, "time": time_, "date": date}
        return _fill(template, {"tz": tz}), {"timezone": tz}, observation, observation
    raise ValueError(f"unknown tool {tool!r}")


def _tool_subset(rng: random.Random, must: str | None, exclude: str | None) -> list[str]:
    names = [n for n in TOOLS if n != exclude]
    k = rng.randint(1, len(names))
    chosen = set(rng.sample(names, k))
    if must is not None:
        chosen.add(must)
    order = list(TOOLS)
    rng.shuffle(order)
    return [n for n in order if n in chosen]


def conversation(rng: random.Random, lang: str, kind: str, places: list[Place], templates: dict, heldout: bool) -> dict:
    """One record: {"lang", "kind", "tool", "template", "tools", "messages", "call", "observation", "answer"}.

    kind "call": a question for an offered tool. "direct": chit-chat with tools offered or not. "not_offered": a
    question for a tool that is not in the system turn."""
    if kind == "direct":
        groups = DIRECT[lang]
        gi = rng.randrange(len(groups))
        questions, answers = groups[gi]
        qi = [i for i in range(len(questions)) if held_out_template("direct", lang, gi * 10 + i, 0) == heldout]
        question = questions[rng.choice(qi)] if qi else rng.choice(questions)
        tools = _tool_subset(rng, None, None) if rng.random() < 0.75 else []
        return {"lang": lang, "kind": kind, "tool": None, "template": gi, "tools": tools,
                "messages": [{"role": "user", "content": question}], "call": None, "observation": None,
                "answer": rng.choice(answers)}
    tool = rng.choice(list(TOOLS))
    index, template = rng.choice(templates[(tool, lang)])
    question, arguments, observation, answer_values = tool_question(tool, lang, template, rng, places, heldout)
    if kind == "not_offered":
        tools = _tool_subset(rng, None, tool) if rng.random() < 0.8 else []
        return {"lang": lang, "kind": kind, "tool": tool, "template": index, "tools": tools,
                "messages": [{"role": "user", "content": question}], "call": None, "observation": None,
                "answer": NO_TOOL[lang][tool]}
    tools = _tool_subset(rng, tool, None)
    answer = rng.choice(ANSWERS[(tool, lang)]).format(**answer_values)
    return {"lang": lang, "kind": kind, "tool": tool, "template": index, "tools": tools,
            "messages": [{"role": "user", "content": question}], "call": {"name": tool, "arguments": arguments},
            "observation": observation, "answer": answer}


def full_messages(record: dict) -> list[dict]:
    """The record as GLM-4 messages (tools go to the renderer): user, [call, observation], answer."""
    messages = list(record["messages"])
    if record["call"] is not None:
        messages += [{"role": "assistant", "metadata": record["call"]["name"],
                      "content": json.dumps(record["call"]["arguments"], ensure_ascii=False)},
                     {"role": "observation", "content": json.dumps(record["observation"], ensure_ascii=False)}]
    return [*messages, {"role": "assistant", "content": record["answer"]}]


def template_split(heldout: bool) -> dict:
    out = {}
    for (tool, lang), items in Q.items():
        out[(tool, lang)] = [(i, t) for i, t in enumerate(items) if held_out_template(tool, lang, i, len(items)) == heldout]
    return out


def place_split(places: list[Place], heldout: bool) -> list[Place]:
    return [p for p in places if held_out_value(p.en) == heldout]


MIX = (("call", 0.72), ("direct", 0.14), ("not_offered", 0.14))


def generate(count: int, heldout: bool, seed: int, places: list[Place], per_kind: dict | None = None) -> list[dict]:
    """`count` conversations (both languages alternating) from one side of the split; `per_kind` (kind -> count per
    language) replaces the mix, for evaluation sets."""
    rng = random.Random(f"{seed}/{'heldout' if heldout else 'train'}")
    templates, pool = template_split(heldout), place_split(places, heldout)
    kinds = [k for k, _ in MIX]
    out = []
    if per_kind is not None:
        for lang in LANGS:
            for kind, n in per_kind.items():
                out += [conversation(rng, lang, kind, pool, templates, heldout) for _ in range(n)]
        return out
    for i in range(count):
        kind = rng.choices(kinds, weights=[w for _, w in MIX])[0]
        out.append(conversation(rng, LANGS[i % 2], kind, pool, templates, heldout))
    return out


def split_report(train: list[dict], heldout: list[dict]) -> dict:
    """What the two sides share (values and question templates): all zero for a sound split."""
    def values(records):
        out = set()
        for r in records:
            if r["call"]:
                out |= {str(v) for k, v in r["call"]["arguments"].items() if k not in ("unit", "from_unit", "to_unit")}
        return out

    def templates(records):
        return {(r["tool"], r["lang"], r["template"]) for r in records if r["kind"] == "call"}

    return {"shared_values": sorted(values(train) & values(heldout))[:20],
            "shared_templates": sorted(templates(train) & templates(heldout))[:20],
            "train": len(train), "heldout": len(heldout)}


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_tool_data(out: Path, train_count: int, heldout_per_kind: dict, seed: int = 0,
                    babel_wheel: Path | None = None) -> dict:
    """train.jsonl, heldout.jsonl and summary.json under `out`; returns the summary."""
    places = all_places(babel_wheel)
    train = generate(train_count, False, seed, places)
    held = generate(0, True, seed, places, per_kind=heldout_per_kind)
    summary = {"places": len(places), "heldout_places": len(place_split(places, True)), **split_report(train, held)}
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held, out / "heldout.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
