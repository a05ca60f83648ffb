"""Composed employee names for the training bank: surnames x given names, so the router learns to copy a span.

With a few dozen fixed names, a router learns the names rather than where a name starts and ends, and cuts unseen
ones short ("邓佳" for a three-character name, "狐晨" for a compound surname). Composed names vary the length
(one or two given characters, single or compound surname; English, pinyin and mixed two-word names) over hundreds
of names.
The surname lists are the common ones (the most frequent single surnames and the canonical compound surnames),
not chosen from any test set; names equal to a test name are dropped by the caller's `exclude`.
"""
from __future__ import annotations

import random

SURNAMES_ZH = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
                   "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
COMPOUND_SURNAMES_ZH = ["欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒", "夏侯",
                        "令狐", "端木", "独孤", "南宫", "西门"]
GIVEN_ZH = {
    "f": list("静丽娜婷芳敏燕雪慧玲欣怡悦琳晶佳颖洁雯倩萍红霞月兰瑶璐思梦雨紫涵诗琪蕾薇菲岚蓉秀珊"),
    "m": list("伟强磊军勇杰涛明超刚平辉鹏华飞鑫波斌宇浩凯健俊帆旭宁龙林峰博文航远鸣哲一成然昊轩"),
}
FIRST_EN = {
    "f": ["Anna", "Sophie", "Lily", "Zoe", "Nina", "Rachel", "Helen", "Julia", "Kate", "Megan", "Ruby", "Alice", "Ivy",
          "Fiona", "Jenny", "Sandra", "Tina", "Wendy", "Lucy", "Maya"],
    "m": ["Adam", "Ben", "Chris", "Eric", "George", "Henry", "Ian", "Jason", "Mark", "Oscar", "Paul", "Sam", "Victor",
          "Will", "Alan", "Brian", "Derek", "Felix", "Hugo", "Max"],
}
SURNAMES_EN = ["Miller", "Moore", "Jackson", "White", "Thompson", "Robinson", "Wright", "Scott", "Green", "Adams",
               "Baker", "Nelson", "Carter", "Mitchell", "Roberts", "Turner", "Phillips", "Campbell", "Parker", "Evans",
               "Edwards", "Collins", "Stewart", "Morris", "Murphy", "Cook", "Rogers", "Morgan", "Cooper", "Reed"]
PINYIN_SURNAMES = ["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Zhao", "Wu", "Sun", "Hu", "Guo", "He", "Gao", "Lin",
                   "Luo", "Zheng", "Liang", "Xie", "Song", "Tang", "Han", "Feng", "Yu", "Dong", "Xiao", "Cheng", "Cai",
                   "Du", "Ye", "Wei", "Lu", "Ren", "Yao", "Cui", "Tan", "Fan", "Jin", "Shi", "Bai", "Qin", "Ouyang",
                   "Shangguan", "Situ"]
PINYIN_GIVEN = {
    "f": ["Jing", "Li", "Na", "Ting", "Fang", "Min", "Yan", "Xue", "Hui", "Ling", "Xin", "Yue", "Lin", "Ying", "Qian",
          "Mengyao", "Shiyu", "Xiaoli", "Yuting", "Jiayi"],
    "m": ["Wei", "Qiang", "Lei", "Jun", "Yong", "Jie", "Ming", "Chao", "Gang", "Hui", "Peng", "Bo", "Bin", "Kai", "Jian",
          "Zhiwei", "Haoran", "Yifan", "Zihao", "Junjie"],
}


def composed_names(seed: int, n_zh: int, n_en: int, exclude: set[str]) -> tuple[list[str], list[str], set[str], set[str]]:
    """(Chinese names, English/pinyin names, female ones, male ones): deterministic, unique, none in `exclude`."""
    rng = random.Random(seed)
    zh: dict[str, str] = {}
    en: dict[str, str] = {}
    while len(zh) < n_zh:
        sex = rng.choice("fm")
        surname = rng.choice(COMPOUND_SURNAMES_ZH) if rng.random() < 0.15 else rng.choice(SURNAMES_ZH)
        given = "".join(rng.choice(GIVEN_ZH[sex]) for _ in range(rng.choice([1, 2, 2])))
        name = surname + given
        if name not in exclude:
            zh.setdefault(name, sex)
    while len(en) < n_en:
        sex = rng.choice("fm")
        if rng.random() < 0.5:
            name = f"{rng.choice(FIRST_EN[sex])} {rng.choice(SURNAMES_EN)}"
        elif rng.random() < 0.7:
            name = f"{rng.choice(PINYIN_SURNAMES)} {rng.choice(PINYIN_GIVEN[sex])}"  # Chinese order: surname first
        else:
            name = f"{rng.choice(FIRST_EN[sex])} {rng.choice(PINYIN_SURNAMES)}"
        if name not in exclude:
            en.setdefault(name, sex)
    both = {**zh, **en}
    return (list(zh), list(en), {k for k, s in both.items() if s == "f"}, {k for k, s in both.items() if s == "m"})
