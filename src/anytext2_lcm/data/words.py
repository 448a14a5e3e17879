"""Vocabularies of the synthetic data: the built-in sign words, the testbed's training strings and its held-out words.

The testbed model (``config.testbed``) must write words it never saw, so its training lines and its evaluation lines
come from disjoint sources:

* **training** (``vocabulary="testbed-train"``): random strings — Latin letters and digits of random length and case,
  or 1–4 characters drawn from :data:`CHINESE_POOL` — with every held-out word excluded. The model can only learn to
  copy glyphs, not to remember words.
* **held-out** (``vocabulary="testbed-heldout"``): real English words (:data:`HELDOUT_LATIN`, shown lower-case,
  capitalised or upper-case) and Chinese words (:data:`HELDOUT_CHINESE`), none of which the training generator can
  produce (:func:`is_heldout`).

``vocabulary="builtin"`` keeps the original sign-like word lists (:data:`WORDS_LATIN`, :data:`WORDS_CHINESE`); a path
names a UTF-8 file with one line of text per row (a row with a CJK character counts as Chinese).
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

import numpy as np

WORDS_LATIN = (
    "OPEN", "CLOSED", "SALE", "EXIT", "STOP", "Coffee", "Welcome", "Hello", "World", "Bakery", "Market", "Hotel",
    "Pizza", "Books", "Music", "Garden", "Station", "Street", "Avenue", "Park", "Museum", "Cinema", "Theatre",
    "Fresh", "Organic", "Daily", "Special", "Menu", "Breakfast", "Lunch", "Dinner", "Tea", "Juice", "Bread",
    "Flowers", "Fashion", "Studio", "Design", "Future", "Dream", "Happy", "Birthday", "Holiday", "Summer",
    "Winter", "Spring", "Autumn", "Ocean", "Mountain", "River", "Forest", "City", "Light", "Night", "Morning",
    "Love", "Peace", "Hope", "Power", "Energy", "Space", "Rocket", "Planet", "Star", "Galaxy", "Robot", "Tech",
    "Cloud", "Data", "Smart", "Home", "Family", "Friends", "Party", "Club", "Bar", "Grill", "Kitchen", "Shop",
    "Store", "Outlet", "Discount", "Free", "New", "Best", "Quality", "Premium", "Classic", "Vintage", "Modern",
    "Urban", "Travel", "Adventure", "Explore", "Journey", "Airport", "Taxi", "Parking", "Entrance", "Office",
    "Bank", "School", "Library", "Hospital", "Pharmacy", "Police", "Fire", "Danger", "Caution", "Warning",
    "Sunday", "Monday", "Friday", "Festival", "Concert", "Gallery", "Art", "Photo", "Camera", "Action", "Game",
    "Sport", "Team", "Winner", "Gold", "Silver", "Blue", "Green", "Red", "Yellow", "Magic", "Wonder", "Smile",
)
WORDS_CHINESE = (
    "你好", "世界", "欢迎光临", "咖啡", "中国", "北京", "上海", "开业大吉", "新年快乐", "春节", "促销", "特价",
    "营业中", "出口", "入口", "停车场", "禁止吸烟", "小心地滑", "超市", "餐厅", "面包", "水果", "蔬菜", "茶",
    "书店", "图书馆", "医院", "学校", "银行", "酒店", "电影", "音乐", "艺术", "设计", "科技", "未来", "梦想",
    "希望", "和平", "自由", "时间", "天空", "大海", "山水", "花园", "月亮", "太阳", "星星", "朋友", "生日快乐",
    "谢谢", "再见", "早安", "晚安", "美食", "火锅", "面条", "饺子", "包子", "奶茶", "啤酒", "旅行", "机场",
    "火车站", "地铁", "公交", "出租车", "东方", "南方", "龙", "福", "喜", "春", "夏", "秋", "冬", "猫", "熊猫",
    "长城", "故宫", "西湖", "黄河", "长江", "人民", "城市", "乡村", "工厂", "公园", "博物馆", "商店", "打折",
    "免费", "新品", "精品", "老字号", "家常菜", "小吃", "甜品", "冰淇淋", "烧烤", "牛肉面", "早餐", "午餐",
    "晚餐", "欢乐", "幸福", "平安", "健康", "吉祥", "如意", "恭喜发财", "万事如意", "学习", "工作", "生活",
)

HELDOUT_LATIN = tuple(dict.fromkeys("""
able acid aged also area army away baby back ball band bank base bath bear beat been beer bell belt best bike
bird blow boat body bone book born boss both bowl bulk burn bush busy cake calm came camp card care cart case
cash cast cell chat chip city club coal coat code cold come cook cool cope copy core cost crew crop dark date dawn
deal dear debt deep deny desk diet dirt dish disk dock door dose down draw drew drop drug dual duke dust duty
each earn ease east easy edge else even ever evil exam face fact fail fair fall farm fast fate fear feed feel
file fill film find fine firm fish five flag flat flew flow folk food foot fork form fort four fuel full fund
gain gate gave gear gift girl give glad goal goes gone grew grey grow gulf hair half hall hand hang hard harm
hate have head hear heat held help here hero hide high hill hint hire hold hole holy hook horn host hour
huge hung hunt hurt idea inch iron item jazz join joke jump jury just keen kept kick kind king knee knew know
lack lady laid lake lamp land lane last late lawn lead leaf lean left lend lens less life lift like lime line
link lion list live load loan lock logo long look lord lose loss lost loud luck
apple basket candle dragon engine finger guitar hammer island jacket kettle ladder magnet needle orange pencil
rabbit saddle tablet turtle violin wallet window yogurt zipper anchor bottle castle desert forest harbor lemon
marble nectar oyster pepper quartz ribbon spider tomato velvet walnut barrel cactus donkey falcon goblet hazel
iguana jungle kitten lizard meadow napkin pillow rocket salmon tunnel unicorn vessel wizard banana cherry
climate dolphin eclipse fortune gravity harvest journal kingdom lantern mission network orchard penguin pyramid
quarter rainbow shelter thunder uniform volcano whisper blanket capital diamond example factory glacier history
justice kitchen leather machine natural october pattern quality respect science traffic village weather
""".split()))
"""Real English words never produced by the testbed's training generator (lower-case forms; the held-out data shows
each lower-case, capitalised or upper-case)."""

HELDOUT_CHINESE = tuple(dict.fromkeys("""
春风 夏雨 秋月 冬阳 明天 清水 高楼 白云 蓝色 花开 鸟鸣 书房 茶杯 饭馆 邮局 码头 广场 大桥 花店 药房
面馆 酒馆 鲜花 果园 菜园 山路 河边 海岸 森林 草原 沙漠 雪山 小河 大江 灯光 夜色 晨光 黄昏 日出 日落
彩虹 雷电 风雨 阳光 月光 星空 银河 宇宙 地球 火星 电话 手机 电脑 相机 钢琴 吉他 画家 作家 老师 学生
医生 警察 司机 厨师 农民 工人 商人 父亲 母亲 兄弟 姐妹 孩子 老人 青年 少年 故乡 家乡 祖国 首都 省会
红茶 绿茶 牛奶 果汁 米饭 馒头 鸡蛋 豆腐 白菜 土豆 苹果 香蕉 西瓜 葡萄 橘子 草莓 桃花 荷花 菊花 梅花
长安 江南 塞北 天山 黄山 泰山 华山 东海 南海 北海 书法 国画 京剧 武术 太极 围棋 象棋 灯笼 鞭炮 春联
好运 快乐 开心 美丽 温暖 安静 光明 勇敢 智慧 友谊 团结 胜利 进步 发展 创新 文化 历史 教育 经济 社会
""".split()))
"""Chinese words never produced by the testbed's training generator."""

_COMMON_CHINESE = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天"
    "而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与"
    "高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东"
    "政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张"
    "活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接"
    "它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言"
)

CHINESE_POOL = tuple(dict.fromkeys(_COMMON_CHINESE + "".join(WORDS_CHINESE) + "".join(HELDOUT_CHINESE)))
"""Characters of the testbed's Chinese training strings: common characters plus every character of the built-in and
held-out words (the held-out *words* never occur in training; their characters do, as letters do in Latin)."""

LATIN_CHARS = string.ascii_letters + string.digits

VOCABULARIES = ("builtin", "testbed-train", "testbed-heldout")
"""Named vocabularies; anything else is read as a word-list file."""


def is_cjk(text: str) -> bool:
    return any("\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in text)


@lru_cache(maxsize=1)
def _heldout_set() -> frozenset[str]:
    return frozenset(w.lower() for w in HELDOUT_LATIN) | frozenset(HELDOUT_CHINESE)


def is_heldout(text: str) -> bool:
    """Whether ``text`` (any case) is a held-out word or contains one as a whole word (Latin) or substring (Chinese)."""
    held = _heldout_set()
    if is_cjk(text):
        return any(w in text for w in HELDOUT_CHINESE)
    return any(tok.lower() in held for tok in text.split())


def _cased(word: str, rng: np.random.Generator) -> str:
    r = rng.random()
    return word.upper() if r < 0.3 else (word.capitalize() if r < 0.65 else word.lower())


def training_string(rng: np.random.Generator, chinese: bool) -> str:
    """One testbed training line: a random Latin string (3–8 letters, sometimes with digits, random case) or 1–4
    random Chinese characters; never a held-out word (:func:`is_heldout`)."""
    while True:
        if chinese:
            n = int(rng.choice([1, 2, 2, 3, 3, 4]))
            text = "".join(CHINESE_POOL[int(i)] for i in rng.integers(len(CHINESE_POOL), size=n))
        elif rng.random() < 0.1:
            text = "".join(string.digits[int(i)] for i in rng.integers(10, size=int(rng.integers(2, 6))))
        else:
            n = int(rng.integers(3, 9))
            text = _cased("".join(string.ascii_lowercase[int(i)] for i in rng.integers(26, size=n)), rng)
            if rng.random() < 0.1:
                text = text[:-1] + string.digits[int(rng.integers(10))]
        if not is_heldout(text):
            return text


def heldout_string(rng: np.random.Generator, chinese: bool) -> str:
    """One held-out line: a held-out Chinese word, or a held-out English word in a random case."""
    if chinese:
        return HELDOUT_CHINESE[int(rng.integers(len(HELDOUT_CHINESE)))]
    return _cased(HELDOUT_LATIN[int(rng.integers(len(HELDOUT_LATIN)))], rng)


@lru_cache(maxsize=8)
def read_word_file(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(Latin rows, CJK rows) of a UTF-8 word list, one line of text per row (blank rows ignored)."""
    rows = [r.strip() for r in Path(path).read_text(encoding="utf-8").splitlines() if r.strip()]
    if not rows:
        raise ValueError(f"{path}: the word list is empty")
    return tuple(r for r in rows if not is_cjk(r)), tuple(r for r in rows if is_cjk(r))


def builtin_string(rng: np.random.Generator, chinese: bool) -> str:
    """A sign-like line from the built-in word lists (1–3 words, sometimes a number)."""
    if chinese:
        n = 1 if rng.random() < 0.7 else 2
        return "".join(WORDS_CHINESE[int(i)] for i in rng.integers(len(WORDS_CHINESE), size=n))[:12]
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    words = [WORDS_LATIN[int(i)] for i in rng.integers(len(WORDS_LATIN), size=n)]
    style = rng.random()
    text = " ".join(words)
    if style < 0.25:
        text = text.upper()
    elif style < 0.35:
        text = text.lower()
    if rng.random() < 0.1:
        text = f"{text} {int(rng.integers(1, 2030))}"
    return text[:20].strip()


def random_text(vocabulary: str, rng: np.random.Generator, chinese: bool) -> str:
    """A line of ``vocabulary`` (a name of :data:`VOCABULARIES` or a word-list file); a file without rows of the
    asked script falls back to its other rows."""
    if vocabulary == "builtin":
        return builtin_string(rng, chinese)
    if vocabulary == "testbed-train":
        return training_string(rng, chinese)
    if vocabulary == "testbed-heldout":
        return heldout_string(rng, chinese)
    latin, cjk = read_word_file(vocabulary)
    pool = (cjk or latin) if chinese else (latin or cjk)
    return pool[int(rng.integers(len(pool)))]


__all__ = ["CHINESE_POOL", "HELDOUT_CHINESE", "HELDOUT_LATIN", "VOCABULARIES", "WORDS_CHINESE", "WORDS_LATIN",
           "builtin_string", "heldout_string", "is_cjk", "is_heldout", "random_text", "read_word_file",
           "training_string"]
