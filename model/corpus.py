"""A generated corpus: short encyclopedia entries about a fictional world. Synthetic, and honest about it.

Engram helps where text continues a fixed multi-token pattern: names of entities, titles,
collocations. So the world has people, cities, rivers and organisations whose names are built
from syllables (several BPE tokens each) and whose facts never change: every document that
mentions a person gives the same birthplace, year and trade. Documents restate those facts with
varied templates and fixed phrases; recalling "Ostrava Kelmir was born in" -> "Dunmere" is
pure memory. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ["b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "br", "dr", "gr", "st", "th", "sh", "kh", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "sk", "nd"]
_TRADES = ["astronomer", "cartographer", "shipwright", "physician", "composer", "glassmaker", "jurist", "engineer"]
_ORG_ADJECTIVES = ["Royal", "Free", "Northern", "Old"]
_ORG_KINDS = ["Academy", "Guild", "Society", "Company"]
_PHRASES = [
    "at the end of the day",
    "in accordance with the charter",
    "for the first time in history",
    "on the other side of the river",
    "to the best of anyone's knowledge",
    "in the middle of the winter",
]


@dataclass(frozen=True)
class CorpusConfig:
    """Size of the generated world; the default is about 3 MB of text."""

    seed: int = 0
    num_people: int = 400
    num_cities: int = 60
    num_rivers: int = 25
    num_orgs: int = 80
    num_documents: int = 12_000


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    year: int
    trade: str
    org: str


@dataclass(frozen=True)
class World:
    """The fixed facts every document draws from."""

    people: list[Person]
    city_river: dict[str, str]
    org_city: dict[str, str]
    org_year: dict[str, int]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def _unique_words(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = _word(rng, rng.randint(*syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_world(config: CorpusConfig) -> World:
    """People, places and organisations with fixed attributes."""
    rng = random.Random(config.seed)
    taken: set[str] = set()
    cities = _unique_words(rng, config.num_cities, (2, 3), taken)
    rivers = [f"the {w} River" for w in _unique_words(rng, config.num_rivers, (2, 2), taken)]
    orgs = [
        f"the {rng.choice(_ORG_ADJECTIVES)} {rng.choice(_ORG_KINDS)} of {w}"
        for w in _unique_words(rng, config.num_orgs, (2, 3), taken)
    ]
    org_city = {org: rng.choice(cities) for org in orgs}
    org_year = {org: rng.randint(1500, 1800) for org in orgs}
    firsts = _unique_words(rng, config.num_people, (2, 2), taken)
    lasts = _unique_words(rng, config.num_people, (2, 3), taken)
    people = [
        Person(f"{first} {last}", rng.choice(cities), rng.randint(1600, 1900), rng.choice(_TRADES), rng.choice(orgs))
        for first, last in zip(firsts, lasts)
    ]
    return World(people, {city: rng.choice(rivers) for city in cities}, org_city, org_year)


def _sentences(rng: random.Random, world: World, person: Person) -> list[str]:
    river = world.city_river[person.city]
    org = person.org
    facts = [
        f"{person.name} was born in {person.city} in {person.year}.",
        f"{person.name} was {_article(person.trade)} {person.trade} from {person.city}.",
        f"{person.city} lies on {river}, and {person.name} spent a childhood there.",
        f"In {person.year + rng.randint(18, 40)}, {person.name} joined {org}.",
        f"{org} was founded in {world.org_year[org]} in {world.org_city[org]}.",
        f"As {_article(person.trade)} {person.trade}, {person.name} worked {rng.choice(_PHRASES)}.",
        f"The {person.trade} {person.name} is remembered in {person.city} {rng.choice(_PHRASES)}.",
    ]
    rng.shuffle(facts)
    return [fact[0].upper() + fact[1:] for fact in facts[: rng.randint(3, 6)]]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generate_corpus(config: CorpusConfig = CorpusConfig()) -> list[str]:
    """The documents: one short entry per document, about one person and their places."""
    world = build_world(config)
    rng = random.Random(config.seed + 1)
    return [" ".join(_sentences(rng, world, rng.choice(world.people))) for _ in range(config.num_documents)]
