"""Synthetic fiction: documents whose facts no model can have seen, for clean memorization tests.

Each document describes an invented person, place or expedition; every name is built from random
syllables and every number is drawn at random, so a model can only answer from the document (or
from an adapter trained on it). Each fact comes with a training question (`train_qa`) and a
differently worded held-out question (`qa`) whose answer is a short span of the document.

Regenerate the shipped example with `loramem data synth-fiction -o examples/fiction.jsonl`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from loramem.data import FICTION_DOCS, SEED
from loramem.data.formats import QA, DocRecord, TrainQA

EXAMPLE_DOCS = 36
EXAMPLE_SEED = 0
MIN_WORDS, MAX_WORDS = 150, 300

_SYLLABLES = (
    "ka",
    "vel",
    "mor",
    "tis",
    "an",
    "bre",
    "dul",
    "fen",
    "gar",
    "hol",
    "ir",
    "jas",
    "ke",
    "lun",
    "mar",
    "nev",
    "ost",
    "pra",
    "quil",
    "ros",
    "sel",
    "tam",
    "ur",
    "vos",
    "wen",
    "zar",
    "bel",
    "cor",
    "dra",
    "el",
    "fi",
    "gon",
    "has",
    "ith",
    "lor",
    "mi",
    "nor",
    "pel",
    "ren",
    "sa",
    "thu",
    "ven",
    "wyl",
    "ber",
    "cas",
    "dor",
    "ea",
    "fal",
    "gri",
    "jor",
    "kal",
    "li",
    "mo",
    "nal",
    "ob",
    "pir",
    "qua",
    "rin",
    "sto",
    "tor",
    "ul",
    "va",
    "yr",
    "zen",
)
_PLACE_ENDINGS = ("", "", "", "holm", "mere", "ford", "wick", "stad", "by")
_TRADES = (
    ("clockmaker", "clockmakers"),
    ("cartographer", "cartographers"),
    ("glassblower", "glassblowers"),
    ("bookbinder", "bookbinders"),
    ("shipwright", "shipwrights"),
    ("stonemason", "stonemasons"),
    ("bell founder", "bell founders"),
    ("lens grinder", "lens grinders"),
    ("harp maker", "harp makers"),
)
_MERCHANTS = ("wool merchant", "salt trader", "timber merchant", "spice trader", "river pilot")


@dataclass
class _Fact:
    """One fact: how the document states it, how training and evaluation ask about it."""

    sentence: str
    train_question: str
    heldout_question: str
    answer: str


class Names:
    """Invented names from random syllables, never repeated within one corpus."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, ending: str = "") -> str:
        while True:
            syllables = self.rng.choices(_SYLLABLES, k=self.rng.choice((2, 2, 3)))
            name = ("".join(syllables) + ending).capitalize()
            if name not in self.used and len(name) <= 12:
                self.used.add(name)
                return name

    def person(self) -> str:
        return f"{self.word()} {self.word()}"

    def place(self) -> str:
        return self.word(self.rng.choice(_PLACE_ENDINGS))


def _distinct(rng: random.Random, *ranges: tuple[int, int]) -> list[int]:
    """One number per range, all different, so no numeric answer is ambiguous."""
    while True:
        values = [rng.randint(low, high) for low, high in ranges]
        if len(set(values)) == len(values):
            return values


def _pick(rng: random.Random, *templates: str) -> str:
    return rng.choice(templates)


def _person(rng: random.Random, names: Names) -> tuple[list[_Fact], list[str]]:
    full, hometown, mentor, city, spouse = names.person(), names.place(), names.person(), names.place(), names.person()
    first = full.split()[0]
    guild = f"{names.word()} Guild"
    trade, trades = rng.choice(_TRADES)
    he, him, his = rng.choice((("he", "him", "his"), ("she", "her", "her")))
    birth = rng.randint(1620, 1860)
    move, census, death = birth + rng.randint(18, 30), birth + rng.randint(36, 44), birth + rng.randint(58, 85)
    members = rng.randint(14, 380)
    facts = [
        _Fact(
            _pick(
                rng,
                f"{full} was born in {birth} in the hill town of {hometown}.",
                f"The {trade} {full} was born in {hometown} in the year {birth}.",
            ),
            f"In what year was {full} born?",
            f"What is the birth year of {full}?",
            str(birth),
        ),
        _Fact(
            _pick(
                rng,
                f"{first} grew up among the workshops of {hometown}, where {his} family kept a small inn.",
                f"As a child in {hometown}, {first} spent every free hour in the market square.",
            ),
            f"In which town was {full} born?",
            f"What is the name of {full}'s hometown?",
            hometown,
        ),
        _Fact(
            _pick(
                rng,
                f"At fourteen {first} was apprenticed to the {trade} {mentor}, a demanding teacher.",
                f"{first} learned the trade of a {trade} from {mentor}, who took {him} in as an apprentice.",
            ),
            f"Who taught {full} the craft of a {trade}?",
            f"Under which master did {full} serve an apprenticeship?",
            mentor,
        ),
        _Fact(
            _pick(
                rng,
                f"In {move} {first} moved to the city of {city}, where {he} spent the rest of {his} life.",
                f"{first} settled in {city} in {move} and never lived anywhere else afterwards.",
            ),
            f"To which city did {full} move as a young adult?",
            f"Where did {full} spend {his} working life?",
            city,
        ),
        _Fact(
            _pick(
                rng,
                f"{first} founded the {guild}, a society of {trades} that met every month.",
                f"In {city} {first} founded the {guild} to protect the interests of local {trades}.",
            ),
            f"What society did {full} found?",
            f"Which organisation was established by {full}?",
            guild,
        ),
        _Fact(
            _pick(
                rng,
                f"By {census} the {guild} counted {members} members.",
                f"The records of {census} list {members} members of the {guild}.",
            ),
            f"How many members did the {guild} have in {census}?",
            f"What was the size of the {guild}'s membership in the year {census}?",
            str(members),
        ),
        _Fact(
            _pick(
                rng,
                f"{first} married {spouse}, a translator from a neighbouring province.",
                f"Late in {his} thirties {first} married {spouse}, whom {he} had met at a guild banquet.",
            ),
            f"Whom did {full} marry?",
            f"Who was the spouse of {full}?",
            spouse,
        ),
        _Fact(
            _pick(rng, f"{first} died in {city} in {death}.", f"{full} died in the winter of {death}."),
            f"In what year did {full} die?",
            f"When did {full} pass away?",
            str(death),
        ),
    ]
    fillers = [
        f"Contemporaries described {first} as patient, exacting and rarely satisfied with a first attempt.",
        f"Few of {his} letters survive, and most of what is known comes from guild records.",
        f"Neighbours remembered the lamp in {his} workshop window burning long after midnight.",
        f"Although {he} travelled little, {his} work was sought by buyers from distant provinces.",
        f"{his.capitalize()} methods were unusual for the time and drew admiration and suspicion from rival {trades}.",
        f"A portrait of {first}, painted by an unknown artist, hangs in the town hall of {hometown}.",
        f"{he.capitalize()} was known for a dry humour and for refusing to work on feast days.",
        f"In later years {he} taught evening classes to anyone willing to learn, and charged nothing for them.",
        f"Several of {his} finest pieces were lost when a fire swept through {his} workshop.",
        f"Apprentices trained by {first} later carried {his} methods to towns along the {names.word()} River.",
        f"{first} kept careful notebooks of sketches, measurements and half-finished ideas.",
        f"Visitors were often taken to see {his} workshop as one of the sights of the town.",
    ]
    return facts, fillers


def _place(rng: random.Random, names: Names) -> tuple[list[_Fact], list[str]]:
    town, province, country = names.place(), names.word(), names.word("ia")
    founder, river, mountain = names.person(), names.word(), names.word()
    festival, mayor = f"{names.word()} Festival", names.person()
    merchant = rng.choice(_MERCHANTS)
    founded, population, height = _distinct(rng, (1080, 1790), (640, 9800), (900, 4700))
    facts = [
        _Fact(
            _pick(
                rng,
                f"{town} is a market town in the province of {province}, in the north of {country}.",
                f"The town of {town} lies in {country}, close to the border of the province of {province}.",
            ),
            f"In which country is {town} located?",
            f"{town} lies within the borders of which country?",
            country,
        ),
        _Fact(
            _pick(
                rng,
                f"{town} was founded in {founded} as a trading post on the road to the coast.",
                f"The first houses of {town} were built in {founded}, when the town was founded.",
            ),
            f"In what year was {town} founded?",
            f"When was {town} established?",
            str(founded),
        ),
        _Fact(
            _pick(
                rng,
                f"The founder of {town} was the {merchant} {founder}, whose statue stands by the bridge.",
                f"The town owes its existence to the {merchant} {founder}, who founded it.",
            ),
            f"Who founded {town}?",
            f"Which {merchant} established the settlement of {town}?",
            founder,
        ),
        _Fact(
            _pick(
                rng,
                f"The town is built along both banks of the {river} River.",
                f"The {river} River flows through the centre of {town} on its way to the sea.",
            ),
            f"Which river runs through {town}?",
            f"On the banks of what river does {town} stand?",
            river,
        ),
        _Fact(
            _pick(
                rng,
                f"At the last census {town} had {population} inhabitants.",
                f"According to the last census, {population} people live in {town}.",
            ),
            f"What was the population of {town} at the last census?",
            f"How many people lived in {town} according to the most recent count?",
            str(population),
        ),
        _Fact(
            _pick(
                rng,
                f"To the east rises Mount {mountain}, whose summit stands {height} metres above the sea.",
                f"Above the town towers Mount {mountain}, {height} metres high.",
            ),
            f"How tall is Mount {mountain}?",
            f"What is the height of Mount {mountain} in metres?",
            str(height),
        ),
        _Fact(
            _pick(
                rng,
                f"Every autumn {town} holds the {festival}, when the streets fill with lanterns.",
                f"The highlight of the year in {town} is the {festival}, held each autumn.",
            ),
            f"What festival does {town} hold every autumn?",
            f"Which annual celebration takes place in {town}?",
            festival,
        ),
        _Fact(
            _pick(
                rng,
                f"The town council is led by the mayor, {mayor}.",
                f"Since the last election the mayor of {town} has been {mayor}, head of the town council.",
            ),
            f"Who is the mayor of {town}?",
            f"Who currently leads the town council of {town}?",
            mayor,
        ),
    ]
    fillers = [
        f"Travellers often remark on the smell of baking bread that drifts through the streets of {town} at dawn.",
        f"The old market hall, with its sloping slate roof, is the oldest building still standing in {town}.",
        "Most of the houses are built from a pale local stone that turns golden in the evening light.",
        f"In winter the roads to {town} are often closed by snow for several weeks at a time.",
        f"Fishing was once the main trade of {town}, but today most people work in the workshops by the river.",
        f"The town library keeps a collection of maps of {province} drawn by hand over several centuries.",
        f"A narrow stone bridge links the two halves of {town} and is crossed by a procession every spring.",
        f"Local legend holds that a wolf guided the first settlers to the site of {town}.",
        f"Visitors from across {country} come to walk the paths that climb into the hills above the town.",
        f"The weekly market in {town} sells honey, wool, cheese and carved wooden toys.",
        f"An old watchtower on the hill above {town} has been turned into a small museum.",
        "The local dialect is known for its long vowels and its many words for rain.",
    ]
    return facts, fillers


def _expedition(rng: random.Random, names: Names) -> tuple[list[_Fact], list[str]]:
    name, port, island = f"{names.word()} Expedition", names.place(), names.word()
    leader, sponsor = names.person(), names.person()
    year, ships, crew, days = _distinct(rng, (1480, 1890), (3, 14), (40, 620), (45, 900))
    facts = [
        _Fact(
            _pick(
                rng,
                f"The {name} set out in the spring of {year}.",
                f"In {year} the {name} left harbour after two years of preparation.",
            ),
            f"In what year did the {name} set out?",
            f"When did the {name} begin?",
            str(year),
        ),
        _Fact(
            _pick(
                rng,
                f"The expedition's ships sailed from the port of {port} on a cold, grey morning.",
                f"The ships departed from {port}, where crowds gathered on the quays to watch.",
            ),
            f"From which port did the {name} depart?",
            f"Where did the {name} start its voyage?",
            port,
        ),
        _Fact(
            _pick(
                rng,
                f"The expedition was led by the navigator {leader}.",
                f"Command of the voyage was given to {leader}, an experienced navigator.",
            ),
            f"Who led the {name}?",
            f"Who was the commander of the {name}?",
            leader,
        ),
        _Fact(
            _pick(
                rng,
                f"The voyage was paid for by the merchant {sponsor}, who hoped to open new trade routes.",
                f"The costs of the voyage were met by the merchant {sponsor}, who expected a share of profits.",
            ),
            f"Who financed the {name}?",
            f"Which merchant paid for the {name}?",
            sponsor,
        ),
        _Fact(
            _pick(rng, f"The fleet consisted of {ships} ships.", f"In all, {ships} ships took part in the voyage."),
            f"How many ships took part in the {name}?",
            f"What was the number of vessels in the {name}'s fleet?",
            str(ships),
        ),
        _Fact(
            _pick(
                rng,
                f"Together the ships carried a crew of {crew} sailors.",
                f"Aboard the ships were {crew} sailors, many of them on their first long voyage.",
            ),
            f"How large was the crew of the {name}?",
            f"How many sailors sailed with the {name}?",
            str(crew),
        ),
        _Fact(
            _pick(
                rng,
                f"The goal of the voyage was the distant island of {island}.",
                f"The expedition hoped to reach the island of {island}, known until then only from rumours.",
            ),
            f"Which island was the {name} trying to reach?",
            f"What was the destination of the {name}?",
            island,
        ),
        _Fact(
            _pick(rng, f"The whole voyage lasted {days} days.", f"The expedition returned home after {days} days."),
            f"How many days did the {name} last?",
            f"For how many days was the {name} under way?",
            str(days),
        ),
    ]
    fillers = [
        "Storms scattered the fleet twice, and each time the ships regrouped at an agreed meeting point.",
        "The logbooks of the voyage describe strange lights seen on the water at night.",
        "Fresh water ran short during the crossing, and rations were cut by half for several weeks.",
        "Several sailors fell ill with fever, and the ship's surgeon worked without rest.",
        "On the return journey the ships carried home seeds, shells and carvings.",
        "A young cabin boy on the voyage later wrote a popular account of its adventures.",
        "The maps drawn during the voyage were kept secret for many years.",
        f"Rival merchants had predicted that the {name} would never return.",
        "Whales followed the fleet for days, which the sailors took as a good omen.",
        "A monument by the harbour lists the names of those who did not come back.",
        "The expedition's cook was remembered for a soup made from dried fish and wild herbs.",
        "Scholars still argue about the exact route the fleet took across the open sea.",
    ]
    return facts, fillers


_KINDS: tuple[Callable[[random.Random, Names], tuple[list[_Fact], list[str]]], ...] = (
    _person,
    _place,
    _expedition,
)


def _compose(rng: random.Random, facts: list[_Fact], fillers: list[str]) -> str:
    """Fact sentences in order, with filler sentences slotted in after the first until the length is right."""
    sentences = [f.sentence for f in facts]
    target = rng.randint(MIN_WORDS + 20, MAX_WORDS - 40)
    words = sum(len(s.split()) for s in sentences)
    for filler in rng.sample(fillers, len(fillers)):
        if words >= target or words + len(filler.split()) > MAX_WORDS:
            break
        sentences.insert(rng.randint(1, len(sentences)), filler)
        words += len(filler.split())
    return " ".join(sentences)


def synth_fiction(n_docs: int = FICTION_DOCS, seed: int = SEED) -> list[DocRecord]:
    """`n_docs` invented documents (person, place, expedition in turn), the same for the same seed."""
    rng = random.Random(seed)
    names = Names(rng)
    records = []
    for i in range(n_docs):
        facts, fillers = _KINDS[i % len(_KINDS)](rng, names)
        records.append(
            DocRecord(
                id=f"fiction-{i:03d}",
                document=_compose(rng, facts, fillers),
                qa=[QA(f.heldout_question, [f.answer]) for f in facts],
                train_qa=[TrainQA(f.train_question, f.answer) for f in facts],
            )
        )
    return records
