"""The bundled HR routing dataset: seeded templates over data/tools/hr_tools.json, train and test kept independent.

Data design (what a reader of the data needs to know):
- Targets must be determinable from the query alone, because the developer turn carries no current date. So queries
  use absolute dates only (no "明天", "next Monday"); a date or month written without a year means 2026
  (YEAR below), consistently. Ambiguous numeric forms (5/3, 3.5) are never generated.
- Arguments follow the schema exactly: optional arguments (leave_type of get_leave_balance, end_date, reason,
  description, field) appear only when the query states them. A single day of leave or attendance has no end_date.
  cancel_leave takes only the first day, even when the query names a range or a leave type.
- Free-text arguments are copied verbatim from the query, always with the same span:
  employee_name is the name exactly as written; reason is the stated reason without its lead-in (因为, 由于, 原因：,
  because of, due to, reason:, for); description is what the money went on, without the amount, the category word
  or a lead-in (用途：, 备注, for, description:); new_value is the whole new value (a phone number in the format
  written, an address in full, an emergency contact as relation + name + phone); search_policy's query is the topic
  phrase with its own modifiers and article ("病假工资", "the probation period", "overtime pay on public holidays")
  but without the framing around it (公司关于…有什么规定, …的政策, policy on…, what does the handbook say about…).
  Training values come both short and long, so the span is what gets learnt, not a typical length.
- Amounts and hours are numbers: integers stay integers (128), others keep their decimals (1280.5).
- Queries whose intent is clear but that lack a required argument ("我想请假") are left out on purpose: whether the
  router should call or ask is a product decision, and a test case must have one right answer.
- No-call samples (~12% of train, ~15% of test) are greetings, thanks, questions about the assistant, feelings,
  and out-of-scope requests (weather, jokes, code, maths, IT support, bookings); each is answered with a short
  canned text in the query's language.
- Train and test are generated from separate template banks and separate value pools (names, reasons, topics,
  expense descriptions, contact values), so the test measures generalisation, not recall; `assert_no_leakage`
  proves it (no near-duplicate queries, no shared sentence patterns after masking the slot values).
- Training is broad on purpose, so the router learns the intent and not a few phrasings: 822 templates (69-108 per
  function, in four sets: verb synonyms, terse keyword and form style, polite, questions, colloquial, mixed
  Chinese-English, different slot orders, requests on behalf of someone, many lead-ins for optional arguments,
  several phrasings for every `field` value, context that is not an argument; the third and fourth sets are
  hr_third_set and hr_fourth_set), extra words for every leave type and expense category (补休, time off in lieu,
  出租车费, stationery), and about 12% of queries with one typo in a literal keyword (请加, 工姿, 矿工, cancle), never
  inside a value that is copied into the arguments. The test bank has its own
  templates, words and typos; nothing in training was written from them.
- 250 samples per function and 300 no-call ones (2800): one epoch over them trains about as long as three over 1000 did,
  and each step sees new values. Names are mostly composed (hr_names: surname x given name, 361 names), so the
  router learns where a name starts and ends rather than a few dozen names.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import random
import re
import string
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from src.data_engine.hr_names import composed_names
from src.data_engine.hr_fourth_set import FOURTH_TEMPLATES, MORE_NO_CALL_4, MORE_VALUES_4
from src.data_engine.hr_third_set import MORE_NO_CALL, MORE_VALUES, THIRD_TEMPLATES
from src.data_engine.split import jaccard, ngrams
from src.data_engine.validate import ToolCatalog, query_key

YEAR = 2026
TRAIN_SEED = 20260105
TEST_SEED = 20260718
TRAIN_PER_FUNCTION = 250
N_TRAIN_NO_CALL = 300
TEST_PER_FUNCTION = 14
N_TEST_NO_CALL = 25
NEAR_DUP = 0.6  # raw-query Jaccard (char 3-grams) at or above which a test query counts as seen in training
PATTERN_DUP = 0.6  # same, on queries with names/values/numbers masked: a shared sentence pattern


@dataclass
class Sample:
    query: str
    tool: str | None
    args: dict
    answer: str | None = None
    template: str = ""


# ---------------------------------------------------------------------------------------------------- values

_CN_DIGITS = "零一二三四五六七八九"
_EN_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def cn_int(n: int, liang: bool = False) -> str:
    """Chinese numerals for 0-99999 (三百零五); liang=True says 两 for a leading 2 the way people count money/hours."""
    if n < 10:
        out = _CN_DIGITS[n]
    elif n < 20:
        out = "十" + (_CN_DIGITS[n - 10] if n > 10 else "")
    else:
        parts, zero = [], False
        for value, unit in ((10000, "万"), (1000, "千"), (100, "百"), (10, "十"), (1, "")):
            d = n // value % 10
            if d == 0:
                zero = bool(parts)
                continue
            if zero:
                parts.append("零")
                zero = False
            parts.append(_CN_DIGITS[d] + unit)
        out = "".join(parts)
    if liang and out.startswith("二") and (len(out) == 1 or out[1] in "百千万"):
        out = "两" + out[1:]
    return out


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 2)


ZH_DATE = [
    lambda d: d.isoformat(),
    lambda d: f"{d.year}/{d.month}/{d.day}",
    lambda d: f"{d.year}年{d.month}月{d.day}日",
    lambda d: f"{d.month}月{d.day}日",
    lambda d: f"{d.month}月{d.day}号",
    lambda d: f"{d.month}月{d.day}号",
    lambda d: f"{cn_int(d.month)}月{cn_int(d.day)}号",
]
EN_DATE = [
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}",
    lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}",
    lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1]}",
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: d.isoformat(),
]
ZH_MONTH = [
    lambda y, m: f"{y}年{m}月", lambda y, m: f"{m}月", lambda y, m: f"{m}月份", lambda y, m: f"{cn_int(m)}月份",
    lambda y, m: f"{y}-{m:02d}", lambda y, m: f"{y % 100}年{m}月",
]
EN_MONTH = [
    lambda y, m: f"{_MONTHS[m - 1]} {y}", lambda y, m: _MONTHS[m - 1], lambda y, m: f"{_MONTHS[m - 1][:3]} {y}",
    lambda y, m: f"{y}-{m:02d}",
]


def _zh_range(rng: random.Random, a: dt.date, b: dt.date, connectors: list[str]) -> str:
    style = rng.randrange(len(ZH_DATE))
    conn = rng.choice(connectors)
    if a.month == b.month and style in (3, 4, 5) and rng.random() < 0.6:  # 3月5日到7日
        unit = "日" if style == 3 else "号"
        return f"{a.month}月{a.day}{unit}{conn}{b.day}{unit}"
    return ZH_DATE[style](a) + conn + ZH_DATE[style](b)


def _en_range(rng: random.Random, a: dt.date, b: dt.date, connectors: list[str]) -> str:
    style = rng.randrange(len(EN_DATE))
    conn = rng.choice(connectors)
    if a.month == b.month and style in (0, 2) and rng.random() < 0.5:  # March 5-7
        return f"{EN_DATE[style](a)}-{b.day}"
    return EN_DATE[style](a) + conn + EN_DATE[style](b)


def zh_amount(rng: random.Random, x: float) -> str:
    v = _num(x)
    text = f"{v:,}" if v >= 1000 and rng.random() < 0.5 else str(v)
    if isinstance(v, float) and rng.random() < 0.5:
        text = f"{v:,.2f}" if v >= 1000 else f"{v:.2f}"
    forms = [f"{text}元", f"{text}块", f"¥{text}", f"￥{text}", f"{text}块钱", f"RMB{text}", f"人民币{text}元"]
    if isinstance(v, int) and v < 10000 and (v % 10 == 0):
        forms += [f"{cn_int(v, liang=True)}块", f"{cn_int(v, liang=True)}元"]
    return rng.choice(forms)


def en_amount(rng: random.Random, x: float) -> str:
    v = _num(x)
    text = f"{v:,}" if v >= 1000 and rng.random() < 0.5 else str(v)
    if isinstance(v, float) and rng.random() < 0.5:
        text = f"{v:,.2f}" if v >= 1000 else f"{v:.2f}"
    return rng.choice([f"${text}", f"{text} dollars", f"{text} USD", f"¥{text}", f"{text} yuan", f"RMB {text}",
                       f"{text} bucks"])


def zh_hours(rng: random.Random, h: float) -> str:
    v = _num(h)
    forms = [f"{v}小时", f"{v}个小时", f"{v}h"]
    whole = int(h)
    if whole >= 1:
        forms.append(f"{cn_int(whole, liang=True)}个{'半' if h != whole else ''}小时")
    return rng.choice(forms)


def en_hours(rng: random.Random, h: float) -> str:
    v = _num(h)
    unit = "hour" if v == 1 else "hours"
    forms = [f"{v} {unit}", f"{v} hrs" if v != 1 else "1 hr", f"{v}h"]
    whole = int(h)
    if 1 <= whole <= 12:
        forms.append(f"{_EN_NUM[whole]} and a half hours" if h != whole else f"{_EN_NUM[whole]} {unit}")
    return rng.choice(forms)


LEAVE_ZH = {"annual": ["年假", "年休假"], "sick": ["病假"], "personal": ["事假"], "compensatory": ["调休", "调休假"],
            "marriage": ["婚假"], "maternity": ["产假"], "paternity": ["陪产假"]}
LEAVE_EN = {"annual": ["annual leave", "vacation"], "sick": ["sick leave"], "personal": ["personal leave"],
            "compensatory": ["comp time", "compensatory leave"], "marriage": ["marriage leave", "wedding leave"],
            "maternity": ["maternity leave"], "paternity": ["paternity leave"]}
CAT_ZH = {"travel": ["差旅费", "出差费用"], "meals": ["餐费", "招待餐费"], "transport": ["交通费", "打车费"],
          "office_supplies": ["办公用品费", "文具费"], "training": ["培训费", "课程费"], "other": ["其他费用", "杂费"]}
CAT_EN = {"travel": ["travel expenses", "business trip costs"], "meals": ["meal expenses", "meals"],
          "transport": ["transport", "taxi fares"], "office_supplies": ["office supplies"],
          "training": ["training fees", "course fees"], "other": ["miscellaneous expenses", "other costs"]}
# Training also says the enum values in words the test never uses (补休, time off in lieu, 出租车费, stationery), so the
# router learns the concept rather than a fixed word list; the test bank keeps the base words above.
_TRAIN_LEAVE_EXTRA = ({"annual": ["带薪年假"], "sick": ["病休"], "personal": ["私事假"], "compensatory": ["补休", "倒休"],
                       "marriage": ["结婚假"], "maternity": ["生育假"], "paternity": ["护理假"]},
                      {"annual": ["paid vacation", "PTO"], "sick": ["sick days", "medical leave"],
                       "personal": ["personal time"], "compensatory": ["time off in lieu", "TOIL"],
                       "marriage": ["honeymoon leave"], "maternity": ["mat leave"], "paternity": ["paternity time off"]})
_TRAIN_CAT_EXTRA = ({"travel": ["出差开销", "差旅"], "meals": ["餐饮费", "饭钱"], "transport": ["车费", "出租车费"],
                     "office_supplies": ["办公耗材", "文具"], "training": ["学习费用", "培训课程费"], "other": ["其它费用", "零星开支"]},
                    {"travel": ["travel costs", "trip expenses"], "meals": ["food", "client meals"],
                     "transport": ["cab fares", "transportation"], "office_supplies": ["stationery", "office supply costs"],
                     "training": ["tuition", "training costs"], "other": ["misc costs", "other expenses"]})


def _extend(base: dict[str, list[str]], extra: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v + extra.get(k, []) for k, v in base.items()}


TRAIN_LEAVE_WORDS = (_extend(LEAVE_ZH, _TRAIN_LEAVE_EXTRA[0]), _extend(LEAVE_EN, _TRAIN_LEAVE_EXTRA[1]))
TRAIN_CAT_WORDS = (_extend(CAT_ZH, _TRAIN_CAT_EXTRA[0]), _extend(CAT_EN, _TRAIN_CAT_EXTRA[1]))
SLOT_LEXICON = sorted({w for d in (*TRAIN_LEAVE_WORDS, *TRAIN_CAT_WORDS) for ws in d.values() for w in ws} | set(_MONTHS),
                      key=len, reverse=True)


# ---------------------------------------------------------------------------------------------------- banks

@dataclass
class Bank:
    """Everything one split is generated from; train and test each get their own, written independently."""

    names_zh: list[str]
    names_en: list[str]
    templates: dict[str, list[tuple[dict, str]]]  # tool -> [(fixed args, template text)]
    leave_reasons: dict[str, tuple[list[str], list[str]]]  # leave type -> (zh, en)
    overtime_reasons: tuple[list[str], list[str]]
    topics: tuple[list[str], list[str]]
    expense_desc: dict[str, tuple[list[str], list[str]]]
    streets: tuple[list[str], list[str]]
    contacts: tuple[list[tuple[str, str]], list[tuple[str, str]]]  # (relation, person) pairs that agree
    email_domains: list[str]
    no_call: list[tuple[str, str]]  # (query, kind)
    typos: dict[str, str]
    zh_connectors: list[str]
    en_connectors: list[str]
    seed: int
    per_function: int
    n_no_call: int
    amounts: tuple[float, float] = (12, 3000)
    hours: tuple[float, ...] = (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8)
    leave_words: tuple[dict, dict] = (LEAVE_ZH, LEAVE_EN)  # leave type -> words for it (zh, en)
    cat_words: tuple[dict, dict] = (CAT_ZH, CAT_EN)  # expense category -> words for it (zh, en)
    typo_rate: float = 0.12  # chance that a template gets one of `typos`, when it contains one of their words


def _t(fixed: dict | None, *texts: str) -> list[tuple[dict, str]]:
    return [(dict(fixed or {}), t) for t in texts]


# Train phrasings: the original core plus a second set written to vary the verb (取消/撤销/撤回/作废/不休了,
# withdraw/revoke/scrap/drop/call off/delete), the register (terse keyword style, polite, colloquial, questions,
# mixed Chinese-English) and the slot order. Every `field` value of get_employee_info and update_contact_info has
# several phrasings of its own. None is taken from TEST_TEMPLATES; assert_no_leakage checks that.
TRAIN_TEMPLATES = {
    "get_leave_balance": _t(None,
        "查询{name}的{lt}", "{name}还剩几天{lt}？", "帮我看下{name}{lt}还有多少天", "我是{name}，我的{lt}还剩多少",
        "{name}今年的{lt}用完了没", "麻烦查一下{name}剩余的{lt}天数", "{name}这边{lt}余额是多少啊",
        "想知道{name}还能休几天{lt}", "{name}还有多少假期", "帮{name}查一下假期余额", "我是{name}，看看我各种假还剩多少天",
        "{name}的假期余额", "查下{name}所有假期的剩余情况",
        "How many {lt} days does {name} have left?", "check {name}'s remaining {lt}",
        "This is {name}, how much {lt} do I still have?", "{lt} balance for {name} pls",
        "can u tell me how many days of {lt} {name} has", "What's {name}'s leave balance?",
        "show me all remaining leave for {name}", "Hi, {name} here. How many days off do I have left in total?",
        "帮我check一下{name}的{lt}", "{name}的leave balance还剩多少",
        # second set
        "{name}{lt}余额", "余额查询：{name}，{lt}", "{lt}还剩几天？我是{name}", "请问{name}的{lt}还有几天可以用？",
        "{name}剩下的{lt}有几天", "{name}的{lt}是不是快没了，还剩几天", "我（{name}）今年还能用多少天{lt}",
        "你好，想问下{name}的{lt}额度还有多少", "统计一下{name}各类假别的余额", "{name}假期还剩多少天啊，全部列出来",
        "{name}的{lt} quota还剩多少", "check下{name}还有几天{lt}", "{name}的leave余额查一下",
        "{name} {lt} balance", "how much {lt} is left for {name}?", "Could you check how many {lt} days {name} still has, please?",
        "I'm {name} - any {lt} left this year?", "remaining {lt} for {name}?", "{name} wants to know their {lt} balance",
        "Hey, what's my total leave balance? Name's {name}", "list all of {name}'s leave balances",
        "days off remaining for {name}, all types", "Is there any {lt} left on {name}'s account?"),
    "request_leave": _t(None,
        "{name}请{lt}，{date}", "帮{name}请{date}的{lt}", "我是{name}，想请{range}的{lt}", "{name}申请{lt}，时间{range}",
        "我要请{lt}！{name}，{date}一天", "{name}{range}请{lt}，原因：{reason}", "{name}因为{reason}，需要请{date}的{lt}",
        "给{name}提个{lt}申请，{range}", "{name}想{date}休{lt}", "你好，我是{name}，{range}休{lt}，{reason}",
        "提交请假：{name}，{lt}，{date}",
        "I'd like to request {lt} for {name} on {date}", "{name} needs {lt} from {range}",
        "Please submit a {lt} request for {name}, {range}", "This is {name}. I want to take {lt} on {date} because of {reason}",
        "{name} - {lt} - {date}", "book {lt} for {name} {range}, reason: {reason}",
        "帮{name}请个{lt}，{date}，reason是{reason}", "{name}要take {lt}，{range}",
        # second set
        "{name}，{lt}，{range}", "我想{date}那天休{lt}，我是{name}", "{name}申请{date}休一天{lt}",
        "麻烦帮我请个{lt}，{range}，我叫{name}", "{name}从{date}休到{end}，{lt}", "{name}要在{date}请一天{lt}，{reason}",
        "请假申请｜{name}｜{lt}｜{range}", "我是{name}，{reason}，想{date}请天{lt}", "帮忙给{name}申请{range}的{lt}吧",
        "{name} apply {lt}，{date}", "帮{name} book一下{range}的{lt}", "我是{name}，想take {date}一天的{lt}",
        "Can I take {lt} on {date}? - {name}", "{name} would like to apply for {lt}, first day {date}, last day {end}",
        "put in a {lt} request for {name}: {range}", "Requesting {lt} for {range} due to {reason}. Employee: {name}",
        "{name} wants {date} off as {lt}", "book me {lt} on {date}, I'm {name}, it's for {reason}",
        "leave request - {name}, {lt}, {range}", "I need to be off {range} ({lt}) - {name}"),
    "cancel_leave": _t(None,
        "取消{name}{date}的请假", "{name}{date}那天的假不请了，帮忙撤销", "撤回{name}从{date}开始的{lt}申请",
        "我是{name}，{date}的假期取消掉", "{name}计划有变，{date}开始的假帮我销掉", "把{name}{range}的{lt}取消",
        "{name}之前申请的{date}的假作废", "麻烦把{name}{date}起的休假撤了",
        "Cancel {name}'s leave starting {date}", "please withdraw the leave request {name} made for {date}",
        "{name} here, I no longer need my time off on {date}, cancel it pls", "cancel {name}'s {lt} from {range}",
        "{name} won't be taking the days off from {date} after all - please cancel",
        "帮{name} cancel掉{date}的leave", "{name}的{lt}（{date}开始）不休了，cancel一下",
        # second set
        "{name}{date}的假不休了", "撤销{name}{date}的请假申请", "帮{name}把{date}那天的请假删了", "{name}的假（{date}起）作废吧",
        "我是{name}，{date}那个假不请了", "{name}取消请假，{date}", "{range}那次{lt}，{name}不休了，帮忙撤回",
        "请假撤回：{name}，{date}", "{name}想把{date}开始的{lt}退掉",
        "{name} {date}的请假帮忙withdraw一下", "{name}的leave（{date}）要cancel",
        "Withdraw {name}'s leave request for {date}", "revoke the {lt} {name} applied for starting {date}",
        "Please delete {name}'s time-off entry on {date}", "{name} is calling off the leave from {range}",
        "drop {name}'s {lt} on {date}, plans changed", "I'm {name}, please scrap my day off on {date}",
        "cancel leave: {name}, {date}", "remove {name}'s leave booking for {date} from the system",
        "{name} doesn't need the {lt} on {date} anymore"),
    "get_payslip": _t(None,
        "查询{name}{month}的工资条", "{name}{month}工资多少", "我是{name}，想看下{month}的工资单",
        "把{name}{month}的薪资明细发我", "{name} {month}工资条", "{month}的工资条帮{name}调出来",
        "{name}{month}到手多少钱，看下工资条", "打印一份{name}{month}的工资单",
        "Show me {name}'s payslip for {month}", "{name}'s salary slip, {month}",
        "Can I get my pay stub for {month}? I'm {name}", "payslip {month} for {name}",
        "I need {name}'s {month} salary statement", "{name}的{month} payslip", "帮我拉一下{name} {month}的salary明细",
        # second set
        "{name}的{month}薪资单", "工资条 {name} {month}", "我是{name}，{month}的工资发了多少？", "{name}{month}实发工资是多少",
        "帮忙查一下{name}{month}的薪水", "{month}{name}的工资明细有吗", "请问能看{name}{month}的工资单吗",
        "{name}想核对一下{month}的工资", "{name} {month}的pay slip发我", "查下{name} {month}的salary",
        "how much was {name}'s pay for {month}?", "{name} wants the {month} paycheck details",
        "download {name}'s {month} payslip", "Hi, could I have my salary breakdown for {month}? {name}",
        "pay stub {name} {month}"),
    "get_attendance": _t(None,
        "{name}{range}的考勤记录", "查下{name}{date}有没有打卡", "{name}{range}迟到了几次", "看看{name}{date}几点上班打的卡",
        "我是{name}，想核对一下{range}的出勤", "{name}{date}的打卡记录", "{name}{range}有没有缺勤",
        "调一下{name}{date}的考勤",
        "Pull {name}'s attendance from {range}", "Did {name} clock in on {date}?", "attendance record for {name}, {range}",
        "was {name} late on {date}", "I'm {name}, show my clock-in times {range}",
        "{name} {range}的attendance", "查一下{name} {date}的clock in时间",
        # second set
        "{name}{date}打卡了吗", "{name}{range}出勤怎么样", "看看{name}{range}有没有早退", "{name}{date}是不是旷工了",
        "考勤查询：{name}，{range}", "我是{name}，{date}忘记打卡了吗？查下记录", "{name}{range}每天几点到的公司",
        "{name}{date}来上班了没有", "{name} {range}的打卡record", "查下{name} {date}的attendance记录",
        "{name}'s attendance {range}", "any absences for {name} in the period {range}?",
        "what time did {name} clock out on {date}?", "show the timesheet for {name}, {range}", "Was {name} at work on {date}?",
        "check clock-in and clock-out for {name} on {date}"),
    "submit_expense": _t(None,
        "{name}报销{cat}{amount}", "帮{name}提交一笔{cat}报销，金额{amount}", "我是{name}，{cat}花了{amount}，要报销",
        "{name}要报{amount}的{cat}", "报销申请：{name}，{cat}，{amount}",
        "{name}报销{amount}，{desc}", "{desc}花了{amount}，帮{name}报一下", "我是{name}，{desc}，一共{amount}，帮我走报销",
        "{name}提交报销：{amount}，用途：{desc}", "{name}报一下{cat}，{amount}，备注{desc}",
        "Submit an expense claim for {name}: {amount} for {cat}", "{name} spent {amount} on {cat}, please reimburse",
        "Expense for {name}: {amount}, {desc}", "{name} paid {amount} for {desc}, need to get reimbursed",
        "reimburse {name} {amount} - {desc}", "{name}报销{amount}，description: {desc}", "帮{name}报个{cat}, {amount}",
        # second set
        "报销：{name} {cat} {amount}", "{name}有一笔{cat}要报，{amount}", "{name}{desc}花了{amount}，能报销吗",
        "帮我报销一下，{name}，{desc}，{amount}", "{name}申请报销{cat}共计{amount}",
        "我是{name}，{cat}自己先垫了{amount}，麻烦给报了", "{name}：{desc}，{amount}，申请报销",
        "{amount}的{cat}，{name}的，帮忙提交报销", "{name}的expense：{cat} {amount}", "帮{name} file一个报销，{amount}，{desc}",
        "claim {amount} {cat} for {name}", "{name} needs reimbursement for {desc}: {amount}",
        "I'm {name}, I paid {amount} out of pocket for {cat}", "new expense - {name} - {cat} - {amount} - {desc}",
        "could you file {amount} for {desc} under {name}'s name?", "expense report for {name}: {cat}, {amount}",
        "Please pay back {name} {amount} for {cat}"),
    "get_employee_info": (
        _t({"field": "department"}, "{name}在哪个部门？", "{name}是哪个部门的", "Which department is {name} in?", "{name}的department",
           "{name}属于什么部门", "查部门：{name}", "What department does {name} belong to?", "{name}'s dept?")
        + _t({"field": "manager"}, "{name}的直属领导是谁", "{name}汇报给谁", "Who is {name}'s manager?", "查下{name}的manager是谁",
             "{name}的上司是哪位", "谁管{name}？", "{name}'s boss?", "who manages {name}")
        + _t({"field": "email"}, "{name}的邮箱是多少", "给我{name}的邮件地址", "What's {name}'s email address?", "{name}的email是啥",
             "{name}邮件地址发我一下", "email for {name}?", "how do I email {name}", "{name}邮箱")
        + _t({"field": "phone"}, "{name}的电话号码", "{name}手机号多少", "I need {name}'s phone number", "how can I reach {name} by phone",
             "给我{name}的电话", "{name}的手机", "phone no. for {name}", "{name}'s mobile number?")
        + _t({"field": "position"}, "{name}是什么职位", "{name}现在的岗位是啥", "What's {name}'s job title?", "what position does {name} hold",
             "{name}是做什么工作的", "{name}的title是什么", "{name}'s role?", "what does {name} do at the company")
        + _t({"field": "hire_date"}, "{name}什么时候入职的", "{name}的入职日期", "When did {name} join the company?", "{name}'s hire date?",
             "{name}哪天入职的", "{name}入职时间", "what's {name}'s start date", "when was {name} hired?", "{name}来公司多少年了")
        + _t(None, "查一下{name}的员工信息", "{name}的个人资料", "给我看看{name}的档案", "Look up {name} in the directory",
             "Show me {name}'s employee profile", "帮我搜一下{name}这个人",
             "{name}的基本信息", "查人：{name}", "who is {name}? show the profile", "{name}的员工资料卡发我")
    ),
    "search_policy": _t(None,
        "公司关于{topic}有什么规定？", "{topic}的政策是怎样的", "想了解一下{topic}的规定", "员工手册里{topic}是怎么写的",
        "查一下{topic}相关的制度", "{topic}有什么要求吗", "咱们公司{topic}怎么规定的呀",
        "What is the company policy on {topic}?", "What does the handbook say about {topic}?",
        "Can you look up the rules for {topic}?", "how does {topic} work here", "policy on {topic}?",
        "公司的{topic} policy是什么", "想查下{topic}的rules",
        # second set
        "问一下，{topic}是怎么规定的", "{topic} 政策", "查制度：{topic}", "公司在{topic}方面有啥政策",
        "新员工想了解{topic}的相关规定", "请问{topic}公司有明文规定吗", "规章制度里有没有提到{topic}",
        "HR，{topic}的规则是什么", "handbook里{topic}那部分怎么说",
        "policy: {topic}", "what are the rules around {topic}?", "Do we have a policy for {topic}?",
        "quick q about {topic} - what's allowed?", "Is {topic} covered in the employee handbook?",
        "explain the company's position on {topic}"),
    "request_overtime": _t(None,
        "{name}{date}加班{hours}", "帮{name}登记一下加班，{date}，{hours}", "我是{name}，{date}加了{hours}的班，因为{reason}",
        "{name}申请加班：{date}，时长{hours}，原因{reason}", "{date}{name}{reason}加班，一共{hours}，帮忙报个加班",
        "提交{name}的加班申请 {date} {hours}", "{name}{date}加班{hours}，{reason}",
        "Log {hours} of overtime for {name} on {date}", "{name} worked {hours} overtime on {date} for {reason}",
        "I'm {name}, I stayed {hours} late on {date}, please register it as overtime",
        "overtime request: {name}, {date}, {hours}, reason: {reason}",
        "{name} {date} OT {hours}", "帮{name}报个overtime，{date}，{hours}",
        # second set
        "加班登记：{name}，{date}，{hours}", "{name}{date}晚上加了{hours}", "我{date}加班{hours}，我是{name}，帮我提交一下",
        "{name}于{date}因{reason}加班{hours}", "帮{name}申请{date}的加班，{hours}，{reason}", "{name}要报加班：{date}共{hours}",
        "{name} {date}加班{hours}，reason：{reason}", "帮{name} submit一个OT申请，{date}，{hours}",
        "{name} did {hours} of overtime on {date}", "OT for {name}: {hours} on {date}, reason {reason}",
        "please file overtime - {name} - {date} - {hours}", "I worked late on {date}, {hours} extra, for {reason}. Name: {name}",
        "Register {name}'s overtime of {hours} on {date}"),
    "update_contact_info": (
        _t({"field": "phone"}, "{name}的手机号改成{value}", "我是{name}，换号了，新号码是{value}",
           "Update {name}'s phone number to {value}", "{name} has a new phone: {value}", "{name}的phone number改成{value}",
           "{name}电话变了：{value}", "手机号更新 {name} {value}", "我是{name}，以后打我新手机{value}",
           "my phone number changed to {value} - {name}", "{name}: new mobile {value}")
        + _t({"field": "email"}, "把{name}的邮箱更新为{value}", "{name}邮箱换成{value}了", "change {name}'s email to {value}",
             "{name}'s new email is {value}, please update", "帮{name} update一下email：{value}",
             "{name}的邮箱地址改一下，新的是{value}", "我是{name}，以后用{value}这个邮箱", "update email for {name} -> {value}",
             "{name} would like to use {value} as email from now on", "邮箱变更 {name} {value}")
        + _t({"field": "address"}, "{name}搬家了，新地址：{value}", "更新{name}的住址为{value}",
             "Update {name}'s home address to {value}", "{name} moved - new address {value}", "{name}的address改成{value}",
             "{name}的地址变更：{value}", "我是{name}，我现在住{value}", "change {name}'s address to {value}",
             "{name} lives at {value} now, update the record", "帮{name}改下家庭住址，{value}")
        + _t({"field": "emergency_contact"}, "{name}的紧急联系人改成{value}", "帮{name}把紧急联系人更新一下：{value}",
             "Change {name}'s emergency contact to {value}", "set emergency contact for {name}: {value}",
             "{name}的emergency contact换成{value}",
             "紧急联系人更新：{name}，{value}", "我是{name}，紧急联系人换成{value}", "{name} wants {value} listed as emergency contact",
             "update emergency contact of {name}: {value}", "{name}的紧急联系人信息改为{value}")
    ),
}

for _set in (THIRD_TEMPLATES, FOURTH_TEMPLATES):  # the third and fourth sets (hr_third_set, hr_fourth_set)
    for _tool, _extra in _set.items():
        TRAIN_TEMPLATES[_tool] = TRAIN_TEMPLATES[_tool] + _extra

TEST_TEMPLATES = {
    "get_leave_balance": _t(None,
        "能不能告诉我{name}目前可用的{lt}", "{name}的{lt}够不够用，剩多少", "老板让我确认下{name}的{lt}剩余",
        "{name}目前总共积攒了多少天假", "Quick question: what is {name}'s {lt} balance right now?",
        "Does {name} still have any {lt} available?", "Could you pull up every leave balance {name} has?",
        "{name}手上还有几天{lt}没休"),
    "request_leave": _t(None,
        "{name}打算{date}休个{lt}，麻烦走一下流程", "请替{name}安排{range}这几天的{lt}",
        "{name}由于{reason}，{range}需要休{lt}", "Kindly file {lt} for {name} covering {range}",
        "Put {name} down for {lt} on {date} - {reason}", "{name}预计{date}开始休{lt}，一直到{end}",
        "Going on {lt} {range}. Name: {name}", "{name}这边{date}得请个{lt}"),
    "cancel_leave": _t(None,
        "{name}原定{date}开始的假期要撤销", "请把{name}在{date}的休假申请删掉",
        "Scrap the leave {name} booked beginning {date}", "{name} changed plans; remove the leave from {date}",
        "{name}那个{date}起的{lt}别批了，撤掉", "Undo {name}'s time-off request for {date}"),
    "get_payslip": _t(None,
        "想看{name}在{month}发的工资明细", "{name}那个月（{month}）扣了多少税？把工资单给我",
        "Could you send over the {month} payslip of {name}?", "I'd like to see what {name} was paid in {month}",
        "请导出{name}{month}的薪资单", "{month} pay statement, employee {name}"),
    "get_attendance": _t(None,
        "统计{name}{range}期间的出勤情况", "{name}在{date}当天是否到岗", "How many times was {name} late during {range}?",
        "Need the punch-in log of {name} for {date}", "导出{name}{range}的上下班打卡明细", "{name}那天（{date}）几点下的班"),
    "submit_expense": _t(None,
        "{name}垫付了{amount}的{cat}，走个报销流程", "替{name}录入报销单：{cat}，{amount}",
        "{name}这笔{amount}是{desc}的钱，要报", "Please claim {amount} of {cat} on behalf of {name}",
        "{name} has a receipt for {amount}: {desc}", "For {name}: {desc}, total {amount}, please file it",
        "{name}的{cat}发票{amount}，帮忙报掉"),
    "get_employee_info": (
        _t({"field": "department"}, "{name}隶属于哪个团队部门", "Tell me what department {name} works in")
        + _t({"field": "manager"}, "{name}的上级领导叫什么", "Who does {name} report to directly?")
        + _t({"field": "email"}, "我需要给{name}发邮件，邮箱地址是", "Need the e-mail of {name}")
        + _t({"field": "phone"}, "能给我{name}的联系电话吗", "What number can I call {name} on?")
        + _t({"field": "position"}, "{name}目前担任什么岗位职务", "Tell me the role {name} currently has")
        + _t({"field": "hire_date"}, "{name}是哪一年哪一天进公司的", "Since when has {name} been with us?")
        + _t(None, "把{name}的完整员工档案调出来", "Pull up the full directory entry for {name}")
    ),
    "search_policy": _t(None,
        "我想问问{topic}这块公司有规定吗", "{topic}，员工手册上怎么说", "关于{topic}，制度里是怎么要求的",
        "Where can I read about {topic} in our HR rules?", "Is there an official guideline on {topic}?",
        "请帮我检索{topic}的相关条款"),
    "request_overtime": _t(None,
        "{name}在{date}多干了{hours}，记一下加班", "替{name}申报{date}的加班{hours}，事由：{reason}",
        "Record overtime: {name} put in an extra {hours} on {date}", "{name} had to do {hours} extra on {date} because of {reason}",
        "{date}那天{name}加班了{hours}，请审批", "Please note {hours} OT for {name} on {date}"),
    "update_contact_info": (
        _t({"field": "phone"}, "{name}手机号码变更为{value}", "{name} switched numbers, the new one is {value}")
        + _t({"field": "email"}, "请将{name}的电子邮箱修改为{value}", "Replace {name}'s email with {value}")
        + _t({"field": "address"}, "{name}的家庭住址现在是{value}，请更新", "New home address for {name}: {value}")
        + _t({"field": "emergency_contact"}, "{name}想把紧急联络人设为{value}", "{name}'s emergency contact should now be {value}")
    ),
}

TRAIN_NO_CALL_QUERIES = [(q, "hello") for q in [
    "你好", "您好", "嗨", "在吗", "早上好", "下午好呀", "哈喽", "你好呀小助手", "hi", "hello there", "good morning",
    "hey", "Hello! Anyone here?"]] + [(q, "about") for q in [
    "你是谁", "你能做什么", "你叫什么名字", "你是机器人吗", "你都会些什么功能", "who are you", "what can you do",
    "are you a bot?", "What kind of things can you help me with?"]] + [(q, "thanks") for q in [
    "谢谢", "多谢啦", "好的谢谢", "辛苦了", "没事了，拜拜", "ok 收到", "thanks!", "thank you so much", "ok bye",
    "cool, thanks for the help", "That's all, cheers"]] + [(q, "feel") for q in [
    "今天好累啊", "上班好无聊", "压力好大", "I'm so stressed out today", "feeling tired, long week"]] + [(q, "oos") for q in [
    "北京明天天气怎么样", "今天上海会下雨吗", "广州这周末热不热", "what's the weather like in London today",
    "is it going to snow in Chicago tomorrow", "讲个笑话", "给我讲个冷笑话呗", "tell me a joke", "say something funny",
    "帮我写一个Python快速排序", "这段SQL怎么优化：select * from orders", "写个正则匹配邮箱地址",
    "how do I reverse a list in python", "write a bash script that backs up my home folder", "JavaScript的闭包是什么意思",
    "123乘以456等于多少", "帮我算一下3200的15%是多少", "what's 17 times 23", "sqrt of 144?",
    "把“我爱你”翻译成英文", "translate 'good morning' into Japanese", "“项目进度”用英语怎么说",
    "附近有什么好吃的", "推荐一部好看的电影", "recommend a good book for the weekend", "中午吃什么好呢",
    "我电脑连不上wifi了", "VPN密码忘了怎么办", "打印机又卡纸了", "my laptop won't turn on", "how do I reset my outlook password",
    "帮我订个明天下午的会议室", "book the big meeting room for friday", "食堂今天有什么菜",
    "今天A股怎么样", "比特币现在多少钱", "what's Tesla's stock price", "帮我订一张去上海的机票",
    "book me a hotel in Shenzhen", "从国贸到首都机场怎么走", "地球到月球有多远", "who won the 2022 world cup",
    "北京是哪一年举办奥运会的", "帮我写一封给客户的道歉邮件", "给我写首关于春天的诗", "what's the capital of Australia",
    "播放一首周杰伦的歌", "set an alarm for 7am", "提醒我下午三点开会", "今天是几号", "what time is it in New York",
    "how many calories in a banana", "帮我查下快递到哪了", "iPhone和安卓哪个好", "怎么做红烧肉",
    "what's a good name for a cat", "帮我总结一下这篇文章", "can you summarize the news today", "明天几点日出",
    "怎么煮咖啡比较好喝", "best way to learn Spanish?", "帮我生成一个随机密码", "what's the meaning of life",
    "周末去哪玩比较好", "recommend a podcast about history", "这个月的电费怎么交", "how do I make pancakes",
    "给我讲讲量子计算", "which is bigger, a whale or an elephant", "帮我画一只猫", "世界上最高的山是哪座",
    "how far is Paris from Berlin", "今晚有什么球赛", "who is the CEO of Apple", "股票怎么开户",
    "帮我想个团建口号", "write a haiku about coffee", "电动车怎么选", "what's trending on twitter",
    "帮我点份外卖", "怎么戒烟比较有效", "what's the best laptop for coding", "给我推荐个健身房",
    "how do I tie a tie", "你喜欢什么颜色", "do you ever dream?", "帮我写个周报模板",
]] + MORE_NO_CALL + MORE_NO_CALL_4  # the third and fourth sets' no-call queries

TEST_NO_CALL_QUERIES = [(q, "hello") for q in ["喂，有人吗", "早安呀～", "Yo, morning!"]] + [(q, "about") for q in [
    "介绍一下你自己吧", "So what exactly are you for?"]] + [(q, "thanks") for q in [
    "谢了兄弟", "行，先这样", "Appreciate it, that's everything."]] + [(q, "feel") for q in [
    "这周加班加到崩溃了，想哭"]] + [(q, "oos") for q in [
    "深圳后天会降温吗", "Will it be sunny in Sydney on Saturday?", "帮我写首七言绝句", "compose a limerick about a frog",
    "2的10次方是多少", "How tall is Mount Everest in feet?", "我的显示器一直闪屏", "Excel里vlookup怎么用",
    "推荐几首适合跑步听的歌", "晚饭做点什么菜好", "帮我把这句话译成法语：会议推迟了", "Which airline flies direct to Tokyo?",
    "给我订一间杭州西湖边的民宿", "What's the exchange rate of euro to yuan today?", "熊猫一天吃多少竹子",
    "Can you fix this JavaScript null pointer bug?"]]

ANSWERS = {
    ("hello", "zh"): "您好！我是人事助手，可以帮您查询假期余额、申请或取消请假、查看工资条和考勤、提交报销、查询同事信息和公司制度、登记加班以及更新联系方式。请问需要办理什么？",
    ("hello", "en"): "Hi! I'm the HR assistant. I can check leave balances, request or cancel leave, show payslips and attendance, file expenses, look up colleagues and HR policies, log overtime and update contact details. What do you need?",
    ("thanks", "zh"): "不客气！还有其他人事方面的问题随时找我。",
    ("thanks", "en"): "You're welcome! Let me know if there's anything else HR-related I can help with.",
    ("oos", "zh"): "抱歉，这个我帮不上忙。我只负责人事相关的事务，比如请假、工资条、考勤、报销和人事制度查询。",
    ("oos", "en"): "Sorry, I can't help with that. I only handle HR matters such as leave, payslips, attendance, expenses and HR policies.",
    ("feel", "zh"): "辛苦了，注意休息！如果需要请假或者查询假期余额，我可以帮您办理。",
    ("feel", "en"): "Sorry to hear that, take care of yourself! If you'd like to take some time off or check your leave balance, I can help.",
}
ANSWERS[("about", "zh")] = ANSWERS[("hello", "zh")]
ANSWERS[("about", "en")] = ANSWERS[("hello", "en")]

TRAIN_BANK = Bank(
    names_zh=["张三", "李四", "王五", "王小明", "欧阳娜娜", "刘洋", "陈静", "杨帆", "黄磊", "周杰", "吴敏", "徐丽", "孙悦",
              "马超", "朱婷", "胡军", "郭晶晶", "何静", "高翔", "林娜", "罗兰", "郑爽", "梁晨", "谢婷婷", "宋佳", "韩梅梅",
              "唐小龙", "许巍", "邓超群", "冯雪", "曹阳", "彭丽娟", "曾志伟", "萧然", "田甜", "董明", "程昱", "上官婉儿",
              "司马明远", "诸葛青", "慕容雪", "王建国", "李秀英", "张伟", "刘芳", "赵丽华", "孙浩然", "周子涵",
              "白雪", "石磊", "叶子琪", "江涛", "孔德明", "陆雨晴", "秦朗", "尉迟恭", "苏婉", "闫旭"],
    names_en=["John Smith", "Emily Johnson", "Michael Brown", "Sarah Davis", "David Wilson", "Jessica Taylor",
              "Chris Anderson", "Amanda Thomas", "Daniel Martinez", "Laura Garcia", "Kevin Lee", "Tom Harris",
              "Olivia Clark", "James Lewis", "Sophia Walker", "Ryan Hall", "Emma Young", "Grace King",
              "Li Wei", "Zhang San", "Wang Fang", "Liu Yang", "Chen Jing", "Zhao Lei", "Huang Min", "Zhou Tao",
              "Wang Xiaoming", "Ouyang Nana", "Amy Zhang", "Tony Wang", "Cindy Liu", "Jack Chen", "Vivian Li",
              "john smith", "li wei", "Aisha Khan", "Carlos Mendes", "Priya Patel", "Hiroshi Sato", "Yuki Tanaka",
              "Ma Jun", "Xu Jing", "Mary-Jane O'Neil"],
    templates=TRAIN_TEMPLATES,
    # Free-text values come short and long, so the span convention (module docstring) is learnt, not a length.
    leave_reasons={
        "annual": (["回老家看爸妈", "出去旅游", "带孩子去三亚玩", "朋友结婚要去当伴郎", "带家人去海边度假", "回老家过中秋"],
                   ["a family trip to Japan", "my sister's graduation", "a hiking trip", "visiting my parents in Chengdu",
                    "a beach holiday with the kids"]),
        "sick": (["发烧了", "重感冒", "肠胃炎", "要去医院复查", "牙疼得厉害要去拔牙", "做个小手术"],
                 ["the flu", "a dental surgery", "a migraine", "a bad cold", "a follow-up appointment at the hospital"]),
        "personal": (["家里有事", "搬家", "孩子开家长会", "去办护照", "办理孩子的入学手续", "去银行处理房贷"],
                     ["moving house", "a family matter", "renewing my passport", "a visa interview", "helping my parents move"]),
        "compensatory": (["上周末加了两天班", "国庆值班补休", "上个月连续加班"],
                         ["working last weekend", "covering the Saturday shift", "the extra hours during the launch"]),
        "marriage": (["要办婚礼", "领证结婚", "回老家办酒席"], ["my wedding", "getting married", "the wedding banquet"]),
        "maternity": (["预产期快到了", "准备生宝宝", "宝宝快出生了"], ["my due date", "having a baby", "the birth of my baby"]),
        "paternity": (["老婆要生了", "媳妇生孩子", "爱人生二胎"], ["my wife is due", "the birth of our son",
                                                        "helping my wife after the birth"]),
    },
    overtime_reasons=(["赶项目上线", "处理线上故障", "月底结账", "准备客户演示", "服务器迁移", "版本发布前的联调", "客户临时加需求",
                       "系统升级"],
                      ["the product launch", "a production incident", "month-end closing", "the client demo",
                       "a release deadline", "fixing a payment bug", "the database upgrade"]),
    topics=(["年假", "病假工资", "婚假天数", "试用期", "加班费", "出差补贴", "远程办公", "公积金", "迟到扣款", "离职流程",
             "调休有效期", "报销时限", "产假", "绩效考核", "转正流程", "社保缴纳", "餐补", "工龄", "考勤打卡", "培训补贴",
             "试用期员工的年假", "异地出差的住宿标准", "节假日加班的工资计算", "未休年假的折算", "外地员工的租房补贴",
             "周末加班的调休安排"],
            ["remote work", "sick pay", "maternity leave", "the probation period", "overtime pay", "travel allowance",
             "the dress code", "expense deadlines", "parental leave", "performance reviews", "carrying over annual leave",
             "flexible hours", "the commuting allowance", "unused annual leave at the end of the year",
             "overtime pay on public holidays", "working from home two days a week",
             "reimbursement of taxi fares after late shifts", "sick leave during the probation period"]),
    expense_desc={
        "travel": (["去北京出差的机票", "深圳出差住了两晚酒店", "去上海见客户的高铁票", "出差杭州的酒店",
                    "去广州参加展会的往返机票和两晚住宿"],
                   ["flights for the Beijing trip", "two hotel nights in Shenzhen", "the hotel in Shanghai for the sales conference",
                    "a train ticket to Suzhou"]),
        "meals": (["请客户吃饭", "项目组聚餐", "加班叫的外卖", "和合作方的午餐"],
                  ["dinner with a client", "the team lunch", "lunch with the new hires", "pizza for the late-night release"]),
        "transport": (["打车去机场", "滴滴回公司", "去客户那边的出租车", "机场大巴票", "去客户公司的地铁和打车"],
                      ["a taxi to the airport", "an Uber to the client office", "a cab to the train station",
                       "bus fares for site visits"]),
        "office_supplies": (["买了两个键盘", "打印纸和笔", "显示器支架", "一箱A4纸", "给新同事买的鼠标"],
                            ["a new keyboard", "printer paper and pens", "a box of sticky notes", "an ergonomic mouse"]),
        "training": (["PMP考试报名", "参加Python线上课程", "财务软件培训课", "考CPA的报名费"],
                     ["the AWS certification exam", "an online SQL course", "a Python bootcamp", "the PMP exam fee"]),
        "other": (["寄合同的快递费", "给客户买的礼品", "寄样品的快递费", "给住院同事买的慰问品"],
                  ["courier fees for contracts", "a gift for a client", "postage for client samples",
                   "flowers for a colleague in hospital"]),
    },
    streets=(["上海市浦东新区张江路88号", "北京市朝阳区建国路15号院3号楼", "深圳市南山区科技园南路6号", "杭州市西湖区文三路120号",
              "广州市天河区体育西路191号", "武汉市洪山区珞喻路129号", "西安市雁塔区高新路52号", "苏州工业园区星湖街328号"],
             ["12 Baker Street, London", "455 Market St, San Francisco, CA", "88 Queen's Road, Hong Kong", "7 Orchard Road, Singapore",
              "500 Fifth Avenue, New York, NY", "Flat 3, 14 Elm Road, Manchester", "33 Nathan Road, Kowloon"]),
    contacts=([("妈妈", "李秀兰"), ("爸爸", "王大伟"), ("老婆", "陈美玲"), ("老公", "赵刚"), ("姐姐", "刘芳芳"), ("哥哥", "张国强"),
               ("弟弟", "陈小军"), ("妻子", "林晓"), ("丈夫", "周建华")],
              [("wife", "Anna Lee"), ("father", "Mark Smith"), ("mother", "Linda Brown"), ("husband", "Peter Wang"),
               ("brother", "Sam Green"), ("sister", "Kate Miller"), ("son", "Max Brown"), ("partner", "Alex Kim")]),
    email_domains=["gmail.com", "163.com", "qq.com", "outlook.com", "company.com", "sina.com", "icloud.com"],
    no_call=TRAIN_NO_CALL_QUERIES,
    # Literal words only (never a slot value). Chinese entries are the pinyin-input slips people make: a homophone or
    # look-alike character in a keyword. The test bank's own typo pairs are deliberately not reused.
    typos={"请假": "请加", "年假": "年价", "工资条": "工资调", "报销": "报消", "考勤": "考琴", "邮箱": "油箱", "查询": "查寻",
           "工资": "工姿", "薪资": "新资", "取消": "取销", "撤销": "撤消", "撤回": "撤会", "打卡": "打咔", "加班": "家班",
           "手机号": "手记号", "电话": "电化", "部门": "部们", "入职": "入值", "职位": "职为", "地址": "地止", "住址": "主址",
           "紧急联系人": "紧急连系人", "规定": "规订", "政策": "正策", "制度": "制都", "申请": "申清", "余额": "鱼额",
           "剩余": "剩于", "迟到": "迟道", "出勤": "出琴", "麻烦": "麻凡", "假期": "假其", "员工": "圆工",
           "还剩": "还生", "剩下": "剩夏", "请个": "请各", "不请了": "不清了", "作废": "作费", "缺勤": "却勤", "早退": "早推",
           "旷工": "矿工", "上班": "上般", "薪水": "新水", "备注": "被注",
           "balance": "balence", "leave": "leav", "payslip": "payslipp", "attendance": "attendence", "expense": "expence",
           "overtime": "overtiem", "address": "adress", "please": "plz", "cancel": "cancle", "salary": "salery",
           "employee": "employe", "department": "deparment", "manager": "manger", "email": "emial", "phone": "phnoe",
           "policy": "polcy", "withdraw": "witdraw", "reimburse": "reimburce", "submit": "sumbit", "contact": "contcat",
           "remaining": "remianing", "check": "chek", "update": "updaet", "change": "chnage", "handbook": "handbok",
           "request": "requset", "delete": "delet", "revoke": "revok", "clock": "clokc", "absences": "absenses",
           "timesheet": "timesheat", "days": "dyas", "take": "tkae", "apply": "aply", "anymore": "anymroe"},
    typo_rate=0.15,
    leave_words=TRAIN_LEAVE_WORDS,
    cat_words=TRAIN_CAT_WORDS,
    zh_connectors=["到", "至", "-", "~"],
    en_connectors=[" to ", " - ", " through "],
    seed=TRAIN_SEED,
    per_function=TRAIN_PER_FUNCTION,
    n_no_call=N_TRAIN_NO_CALL,
)

TEST_BANK = Bank(
    names_zh=["蒋文博", "沈雨桐", "韦一鸣", "卢思远", "贺子琪", "夏晓雯", "邓佳怡", "曹宇航", "彭博", "董晓燕", "袁梦", "潘磊",
              "司徒静", "皇甫俊", "令狐晨", "钟书宁", "范思哲", "丁一"],
    names_en=["Nathan Brooks", "Chloe Bennett", "Ethan Price", "Hannah Ward", "Lucas Foster", "Mia Russell", "Owen Hughes",
              "Deng Hao", "Peng Yu", "Cao Xin", "Jiang Tao", "Bella Xu", "Leo Zhou", "Coco Huang", "Frank Sun"],
    templates=TEST_TEMPLATES,
    leave_reasons={
        "annual": (["陪家人去云南"], ["a week in Bali"]), "sick": (["腰椎间盘突出"], ["food poisoning"]),
        "personal": (["处理房产过户"], ["jury duty"]), "compensatory": (["春节期间值了班"], ["the holiday on-call shift"]),
        "marriage": (["举行婚礼"], ["our wedding ceremony"]), "maternity": (["快要分娩"], ["the baby's arrival"]),
        "paternity": (["太太剖腹产"], ["my partner giving birth"]),
    },
    overtime_reasons=(["年度审计", "双十一大促保障"], ["the annual audit", "the quarterly release"]),
    topics=(["丧假", "哺乳假", "高温补贴", "年终奖发放", "员工体检", "内推奖金"],
            ["bereavement leave", "relocation support", "the referral bonus", "annual health checkups"]),
    expense_desc={
        "travel": (["成都出差的住宿"], ["my train tickets to Nanjing"]), "meals": (["部门年会订餐"], ["coffee with a vendor"]),
        "transport": (["深夜加班打车回家"], ["parking at the airport"]), "office_supplies": (["白板和马克笔"], ["a laptop stand"]),
        "training": (["英语口语培训班"], ["a UX design workshop"]), "other": (["公司活动的横幅制作"], ["a visa application fee"]),
    },
    streets=(["南京市鼓楼区中山北路200号", "成都市高新区天府大道1000号"], ["21 Pitt Street, Sydney", "300 King St W, Toronto"]),
    contacts=([("妹妹", "吴桂芳"), ("舅舅", "郑海涛")], [("aunt", "Rosa Diaz"), ("cousin", "Sam Carter")]),
    email_domains=["foxmail.com", "hotmail.com", "corp.cn"],
    no_call=TEST_NO_CALL_QUERIES,
    typos={"工资": "公资", "加班": "加斑", "leave": "laeve", "request": "reqest"},
    zh_connectors=["～", "至"],
    en_connectors=[" until ", " to "],
    seed=TEST_SEED,
    per_function=TEST_PER_FUNCTION,
    n_no_call=N_TEST_NO_CALL,
    amounts=(20, 2600),
    hours=(2, 3, 4, 4.5, 6, 7, 9, 10),
)


def _strings(x) -> set[str]:
    if isinstance(x, str):
        return {x}
    items = x.values() if isinstance(x, dict) else x
    return set().union(*(_strings(v) for v in items)) if items else set()


def _add_values(bank: Bank, more: dict, exclude: set[str]) -> None:
    """Append the third set's values to a bank's pools (same nesting), skipping values in `exclude`."""
    for key, value in more.items():
        pool = getattr(bank, key)
        for sub, (zh, en) in (value.items() if isinstance(value, dict) else [(None, value)]):
            target = pool if sub is None else pool[sub]
            for mine, extra in zip(target, (zh, en)):
                # a contact is a (relation, person) pair: it stays out when its person is a test value
                mine.extend(v for v in extra if v not in mine and v not in exclude
                            and not (isinstance(v, tuple) and v[-1] in exclude))


# Separate value pools: a third/fourth-set value that happens to be a test value ("the annual audit") stays out.
for _more in (MORE_VALUES, MORE_VALUES_4):
    _add_values(TRAIN_BANK, _more, exclude=set().union(*(_strings(getattr(TEST_BANK, k)) for k in _more)))


# ---------------------------------------------------------------------------------------------------- generation


_CJK = re.compile(r"[\u3400-\u9fff]")
FEMALE = {"欧阳娜娜", "陈静", "吴敏", "徐丽", "孙悦", "朱婷", "郭晶晶", "何静", "林娜", "罗兰", "郑爽", "谢婷婷", "宋佳", "韩梅梅",
          "冯雪", "彭丽娟", "田甜", "上官婉儿", "慕容雪", "李秀英", "刘芳", "赵丽华", "Emily Johnson", "Sarah Davis",
          "Jessica Taylor", "Amanda Thomas", "Laura Garcia", "Olivia Clark", "Sophia Walker", "Emma Young", "Grace King",
          "Wang Fang", "Chen Jing", "Ouyang Nana", "Amy Zhang", "Cindy Liu", "Vivian Li", "白雪", "叶子琪", "陆雨晴", "苏婉",
          "Aisha Khan", "Priya Patel", "Yuki Tanaka", "Xu Jing", "Mary-Jane O'Neil",
          "沈雨桐", "夏晓雯", "邓佳怡", "董晓燕", "袁梦", "司徒静", "钟书宁", "Chloe Bennett", "Hannah Ward", "Mia Russell",
          "Bella Xu", "Coco Huang"}
MALE = {"张三", "李四", "王五", "王小明", "黄磊", "周杰", "马超", "胡军", "高翔", "唐小龙", "许巍", "邓超群", "曾志伟", "董明",
        "程昱", "司马明远", "王建国", "张伟", "孙浩然", "John Smith", "Michael Brown", "David Wilson", "Daniel Martinez",
        "Kevin Lee", "Tom Harris", "James Lewis", "Ryan Hall", "Zhang San", "Zhao Lei", "Zhou Tao", "Wang Xiaoming",
        "Tony Wang", "Jack Chen", "john smith", "石磊", "江涛", "孔德明", "秦朗", "尉迟恭", "闫旭", "Carlos Mendes",
        "Hiroshi Sato", "Ma Jun", "蒋文博", "韦一鸣", "卢思远", "曹宇航", "彭博", "潘磊", "皇甫俊", "范思哲", "丁一",
        "Nathan Brooks", "Ethan Price", "Lucas Foster", "Owen Hughes", "Deng Hao", "Peng Yu", "Jiang Tao", "Leo Zhou",
        "Frank Sun"}
# Composed names (hr_names): most training names are new combinations, so the span is learnt, not the names.
_ZH, _EN, _F, _M = composed_names(TRAIN_SEED, 160, 100, exclude=set(TEST_BANK.names_zh + TEST_BANK.names_en
                                                                    + TRAIN_BANK.names_zh + TRAIN_BANK.names_en))
TRAIN_BANK.names_zh.extend(_ZH)
TRAIN_BANK.names_en.extend(_EN)
FEMALE |= _F
MALE |= _M
# Plausible lengths (days after the first day) of a range, by leave type: maternity leave is months, not days.
RANGE_DAYS = {"maternity": [97, 127, 157], "paternity": [4, 9, 14], "marriage": [2, 4, 9, 12], "get_attendance": list(range(2, 31)),
              "default": list(range(1, 10))}


def _lang(template: str) -> str:
    literal = re.sub(r"\{[a-z_]+\}", "", template)
    has_zh, has_en = bool(_CJK.search(literal)), bool(re.search(r"[A-Za-z]{2,}", literal))
    return "mix" if has_zh and has_en else ("zh" if has_zh else "en")


class _Gen:
    """Fills one bank's templates; every random choice comes from one seeded RNG, so output is reproducible."""

    def __init__(self, bank: Bank, catalog: ToolCatalog):
        self.bank, self.catalog = bank, catalog
        self.rng = random.Random(bank.seed)

    def enum(self, tool: str, arg: str) -> list[str]:
        return list(self.catalog.params[tool]["properties"][arg]["enum"])

    def name(self, lang: str, leave_type: str | None = None) -> str:
        """Mostly names that fit the language, but Chinese names in English requests and vice versa too."""
        p_zh = {"zh": 0.8, "mix": 0.6, "en": 0.1}[lang]
        pool = self.bank.names_zh if self.rng.random() < p_zh else self.bank.names_en
        if leave_type in ("maternity", "paternity"):  # keep the demo data free of "Daniel takes maternity leave"
            pool = [n for n in pool if n in (FEMALE if leave_type == "maternity" else MALE)]
        return self.rng.choice(pool)

    def sub_lang(self, lang: str) -> str:
        return self.rng.choice(["zh", "en"]) if lang == "mix" else lang

    def date(self, weekday: bool = True) -> dt.date:
        while True:
            d = dt.date(YEAR, 1, 1) + dt.timedelta(days=self.rng.randrange(365))
            if not weekday or d.weekday() < 5:
                return d

    def fmt_date(self, d: dt.date, lang: str) -> str:
        return self.rng.choice(ZH_DATE if lang == "zh" else EN_DATE)(d)

    def fmt_range(self, a: dt.date, b: dt.date, lang: str) -> str:
        if lang == "zh":
            return _zh_range(self.rng, a, b, self.bank.zh_connectors)
        return _en_range(self.rng, a, b, self.bank.en_connectors)

    def pick(self, pair: tuple[list[str], list[str]], lang: str) -> str:
        zh, en = pair
        return self.rng.choice(zh if lang == "zh" else en)

    def contact_value(self, field_: str, lang: str, person: str) -> str:
        rng = self.rng
        if field_ == "phone":
            digits = "1" + rng.choice("3578") + "".join(rng.choice(string.digits) for _ in range(9))
            return rng.choice([digits, f"{digits[:3]}-{digits[3:7]}-{digits[7:]}", f"+86 {digits[:3]} {digits[3:7]} {digits[7:]}"])
        if field_ == "email":
            user = re.sub(r"[^a-z]", "", person.lower()) or rng.choice(["xiaoming", "lily", "dragon", "sunny"])
            if not user.isascii():
                user = rng.choice(["xiaoming", "lily", "dragon", "sunny", "happy", "tiger"])
            return f"{user}{rng.choice(['', str(rng.randrange(10, 99))])}@{rng.choice(self.bank.email_domains)}"
        if field_ == "address":
            return self.pick(self.bank.streets, lang)
        zh, en = self.bank.contacts
        rel, who = self.rng.choice(zh if lang == "zh" else en)
        phone = "1" + rng.choice("3589") + "".join(rng.choice(string.digits) for _ in range(9))
        return f"{rel}{who} {phone}" if lang == "zh" else f"{who} ({rel}), {phone}"

    def typo(self, template: str) -> str:
        """Misspell one literal word of the template (never a slot value), like a hurried employee would."""
        if self.rng.random() >= self.bank.typo_rate:
            return template
        literal_spans = re.split(r"(\{[a-z_]+\})", template)
        for word in sorted(self.bank.typos, key=lambda w: (self.rng.random(), w)):
            for i, span in enumerate(literal_spans):
                if not span.startswith("{") and word in span:
                    literal_spans[i] = span.replace(word, self.bank.typos[word], 1)
                    return "".join(literal_spans)
        return template

    def fill(self, tool: str, fixed: dict, template: str, enum_value: str | None) -> Sample:
        lang = _lang(template)
        slots: dict[str, str] = {}
        args: dict = {}
        names = re.findall(r"\{([a-z_]+)\}", template)
        lt = enum_value if tool in ("get_leave_balance", "request_leave", "cancel_leave") else None
        if "name" in names:
            args["employee_name"] = slots["name"] = self.name(lang, lt)
        if "lt" in names:
            sl = self.sub_lang(lang)
            slots["lt"] = self.rng.choice(self.bank.leave_words[sl == "en"][lt])
            if tool != "cancel_leave":
                args["leave_type"] = lt
        if "range" in names or "end" in names:
            a = self.date()
            b = a + dt.timedelta(days=self.rng.choice(RANGE_DAYS.get(lt or tool, RANGE_DAYS["default"])))
            if b.year != YEAR:
                a, b = a - (b - dt.date(YEAR, 12, 31)), dt.date(YEAR, 12, 31)
            sl = self.sub_lang(lang)
            if "range" in names:
                slots["range"] = self.fmt_range(a, b, sl)
            else:
                style = self.rng.choice(ZH_DATE if sl == "zh" else EN_DATE)
                slots["date"], slots["end"] = style(a), style(b)
            args["start_date"] = a.isoformat()
            if tool != "cancel_leave":
                args["end_date"] = b.isoformat()
        elif "date" in names:
            d = self.date(weekday=tool != "request_overtime")
            slots["date"] = self.fmt_date(d, self.sub_lang(lang))
            args["date" if tool == "request_overtime" else "start_date"] = d.isoformat()
        if "month" in names:
            m = self.rng.randint(1, 12)
            forms = ZH_MONTH if self.sub_lang(lang) == "zh" else EN_MONTH
            slots["month"] = self.rng.choice(forms)(YEAR, m)
            args["month"] = f"{YEAR}-{m:02d}"
        if "amount" in names:
            lo, hi = self.bank.amounts
            x = self.rng.choice([self.rng.randint(int(lo), int(hi)),
                                 self.rng.randint(int(lo), int(hi)) // 10 * 10,
                                 round(self.rng.uniform(lo, hi), self.rng.choice([1, 2]))])
            x = _num(x) or 50
            slots["amount"] = (zh_amount if self.sub_lang(lang) == "zh" else en_amount)(self.rng, x)
            args["amount"] = _num(x)
        if "hours" in names:
            h = self.rng.choice(self.bank.hours)
            slots["hours"] = (zh_hours if self.sub_lang(lang) == "zh" else en_hours)(self.rng, h)
            args["hours"] = _num(h)
        if tool == "submit_expense":
            cat = enum_value
            if "cat" in names:
                slots["cat"] = self.rng.choice(self.bank.cat_words[self.sub_lang(lang) == "en"][cat])
            if "desc" in names:
                args["description"] = slots["desc"] = self.pick(self.bank.expense_desc[cat], self.sub_lang(lang))
            args["category"] = cat
        if "reason" in names:
            sl = self.sub_lang(lang)
            pool = self.bank.overtime_reasons if tool == "request_overtime" else self.bank.leave_reasons[lt]
            args["reason"] = slots["reason"] = self.pick(pool, sl)
        if "topic" in names:
            args["query"] = slots["topic"] = self.pick(self.bank.topics, self.sub_lang(lang))
        if tool == "update_contact_info":
            args["field"] = fixed["field"]
            args["new_value"] = slots["value"] = self.contact_value(fixed["field"], self.sub_lang(lang), args["employee_name"])
        if tool == "get_employee_info" and "field" in fixed:
            args["field"] = fixed["field"]
        query = self.typo(template).format(**slots)
        return Sample(query=query, tool=tool, args=args, template=template)

    def function_samples(self, tool: str, n: int) -> list[Sample]:
        templates = list(self.bank.templates[tool])
        # Enum values are dealt round-robin (not sampled) so every value gets its share even in a small test set.
        enums = {"get_leave_balance": self.enum(tool, "leave_type") if tool == "get_leave_balance" else [],
                 "request_leave": self.enum("request_leave", "leave_type"),
                 "cancel_leave": self.enum("request_leave", "leave_type"),
                 "submit_expense": self.enum("submit_expense", "category") if tool == "submit_expense" else []}.get(tool, [])
        always = tool in ("request_leave", "submit_expense")
        out, seen, i = [], set(), 0
        order: list[tuple[dict, str]] = []
        while len(out) < n:
            if not order:
                order = templates[:]
                self.rng.shuffle(order)
            fixed, template = order.pop()
            enum_value = None
            if enums and (always or "{lt}" in template):
                enum_value, i = enums[i % len(enums)], i + 1
            for _ in range(20):
                s = self.fill(tool, fixed, template, enum_value)
                key = query_key(s.query)
                if key not in seen:
                    seen.add(key)
                    out.append(s)
                    break
        return out

    def no_call_samples(self, n: int) -> list[Sample]:
        pool = list(self.bank.no_call)
        if n > len(pool):
            raise ValueError(f"no-call bank has {len(pool)} queries, {n} requested")
        self.rng.shuffle(pool)
        out = []
        for query, kind in pool[:n]:
            lang = "zh" if _CJK.search(query) else "en"
            out.append(Sample(query=query, tool=None, args={}, answer=ANSWERS[(kind, lang)], template=query))
        return out

    def build(self) -> list[Sample]:
        samples = []
        for tool in self.catalog.names:
            samples += self.function_samples(tool, self.bank.per_function)
        samples += self.no_call_samples(self.bank.n_no_call)
        self.rng.shuffle(samples)
        return samples


def build_split(which: str, tools: list) -> list[Sample]:
    """"train" or "test" samples; deterministic (each bank has its own seed)."""
    bank = {"train": TRAIN_BANK, "test": TEST_BANK}[which]
    return _Gen(bank, ToolCatalog(tools)).build()


# ---------------------------------------------------------------------------------------------------- leakage

def mask(query: str, args: dict) -> str:
    """The sentence pattern of a query: argument values, leave/category words and numbers replaced by placeholders."""
    out = query
    values = [str(v) for v in args.values() if isinstance(v, str)]
    for v in sorted(values, key=len, reverse=True):
        if len(v) >= 2:
            out = out.replace(v, "§")
    for w in SLOT_LEXICON:
        out = out.replace(w, "§")
    out = re.sub(r"[0-9][0-9,.]*", "#", out)
    return out


def _qa(item) -> tuple[str, dict]:
    if isinstance(item, Sample):
        return item.query, item.args
    if "messages" in item:
        user = next(m["content"] for m in item["messages"] if m["role"] == "user")
        calls = item["messages"][-1].get("tool_calls") or []
        return user, (calls[0]["function"]["arguments"] if calls else {})
    return item["user_content"], item.get("expected_arguments") or {}


def leakage_report(train, test, near_dup: float = NEAR_DUP, pattern_dup: float = PATTERN_DUP) -> list[str]:
    """Human-readable findings: test queries too close to a training query, verbatim or as a masked pattern."""
    tr = [_qa(x) for x in train]
    te = [_qa(x) for x in test]
    from src.data_engine.split import similar_pairs

    findings = []
    for i, j, score in similar_pairs([q for q, _ in te], near_dup, other=[q for q, _ in tr]):
        findings.append(f"near-duplicate ({score:.2f}): test {te[i][0]!r} ~ train {tr[j][0]!r}")
    masked_te = [mask(q, a) for q, a in te]
    masked_tr = [mask(q, a) for q, a in tr]
    for i, j, score in similar_pairs(masked_te, pattern_dup, other=masked_tr):
        findings.append(f"shared pattern ({score:.2f}): test {masked_te[i]!r} ~ train {masked_tr[j]!r}")
    return findings


def assert_no_leakage(train, test, near_dup: float = NEAR_DUP, pattern_dup: float = PATTERN_DUP) -> None:
    """Raise AssertionError if any test query is a near-duplicate of, or shares a sentence pattern with, training."""
    findings = leakage_report(train, test, near_dup, pattern_dup)
    if findings:
        raise AssertionError(f"{len(findings)} leaking test queries; first: {findings[0]}")


def max_similarity(train, test) -> tuple[float, float]:
    """Highest raw and masked similarity between any test and training query (for reporting the margin)."""
    tr, te = [_qa(x) for x in train], [_qa(x) for x in test]
    g_tr = [ngrams(q) for q, _ in tr]
    m_tr = [ngrams(mask(q, a)) for q, a in tr]
    raw = masked = 0.0
    for q, a in te:
        g, m = ngrams(q), ngrams(mask(q, a))
        raw = max(raw, max(jaccard(g, x) for x in g_tr))
        masked = max(masked, max(jaccard(m, x) for x in m_tr))
    return raw, masked


# ---------------------------------------------------------------------------------------------------- output

def to_processed(sample: Sample, tools: list) -> dict:
    from src.data_engine.formatter import routing_messages

    messages = routing_messages(sample.query)
    if sample.tool is None:
        messages.append({"role": "assistant", "content": sample.answer})
    else:
        messages.append({"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": sample.tool, "arguments": sample.args}}]})
    return {"messages": messages, "tools": tools}


def to_test_case(sample: Sample) -> dict:
    return {"user_content": sample.query, "expected_tool": sample.tool, "expected_arguments": sample.args}


def to_simple_row(sample: Sample) -> dict:
    return {
        "user_content": sample.query,
        "tool_name": sample.tool or "",
        "tool_arguments": json.dumps(sample.args, ensure_ascii=False) if sample.tool else "",
        "answer": sample.answer or "",
    }


SIMPLE_COLUMNS = ("user_content", "tool_name", "tool_arguments", "answer")


def xlsx_bytes(rows: list[dict]) -> bytes:
    """A simple-shape workbook, byte-for-byte reproducible (fixed document and zip timestamps)."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "hr_functions"
    ws.append(list(SIMPLE_COLUMNS))
    for r in rows:
        ws.append([r[c] for c in SIMPLE_COLUMNS])
    for col, width in zip("ABCD", (60, 22, 80, 40)):
        ws.column_dimensions[col].width = width
    fixed = dt.datetime(YEAR, 1, 1)
    wb.properties.created = wb.properties.modified = fixed
    wb.properties.creator = "scripts/make_hr_data.py"
    buf = io.BytesIO()
    wb.save(buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*", rb"\g<1>2026-01-01T00:00:00Z", data)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(YEAR, 1, 1, 0, 0, 0)), data,
                         compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


@dataclass
class Built:
    train: list[Sample]
    test: list[Sample]
    processed: list[dict] = field(default_factory=list)
    test_cases: list[dict] = field(default_factory=list)
    simple_rows: list[dict] = field(default_factory=list)


def build(tools: list) -> Built:
    """Generate, validate against the catalog and check for leakage; raise on any problem (a bug, not user input)."""
    catalog = ToolCatalog(tools)
    train, test = build_split("train", tools), build_split("test", tools)
    for s in train + test:
        if s.tool is not None:
            problems = catalog.check_call(s.tool, s.args, "tool", "arguments")
            assert not problems, f"{s.query!r}: {problems}"
    assert_no_leakage(train, test)
    return Built(train, test, [to_processed(s, tools) for s in train], [to_test_case(s) for s in test],
                 [to_simple_row(s) for s in train])


def write_all(root: str | Path) -> dict:
    """Write data/processed/hr_functions.jsonl, data/test.jsonl and data/raw/hr_functions.xlsx under `root`."""
    from src.utils.io import atomic_write_bytes, atomic_write_jsonl, read_json

    root = Path(root)
    tools = read_json(root / "data/tools/hr_tools.json")
    built = build(tools)
    paths = {
        "processed": atomic_write_jsonl(root / "data/processed/hr_functions.jsonl", built.processed),
        "test": atomic_write_jsonl(root / "data/test.jsonl", built.test_cases),
        "xlsx": atomic_write_bytes(root / "data/raw/hr_functions.xlsx", xlsx_bytes(built.simple_rows)),
    }
    return {"paths": paths, "built": built}
