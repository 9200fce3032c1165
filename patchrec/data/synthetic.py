"""A synthetic dataset with readable movie-like titles and users whose long history matters.

The generative story (all vectorised numpy, ~1M interactions in about a second):

- Topics (genres): ``num_topics`` clusters; every item belongs to one, round-robin over a seeded permutation
  so topics are balanced. Inside a topic, item popularity is Zipf-like (``popularity_exponent``).
- Titles are built from a topic's own word bank ("The Silent Harbor", "Midnight Garden II", "Echoes of the
  Crimson Orbit"), so the text carries the topic; they are unique.
- Each user has ``interests`` long-lived topics with fixed random weights, and a short-lived "drift" topic
  that is redrawn after ``drift_length`` items on average (geometric). Each interaction comes from the
  long-lived topics with probability ``long_term_share``, else from the current drift topic. The latest 5
  items are therefore dominated by the drift topic, while the older history is what reveals the long-lived
  interests: a predictor that reads the full history beats one that reads only the latest items
  (``tests/test_data_synthetic.py`` measures it).
- A user never interacts with the same item twice (like the real data, where the target is never in the
  history): items are drawn with replacement, over-drawn, and only first occurrences are kept.
- Timestamps: each user starts at a random time in the first 80% of ``time_span`` seconds and has
  exponential gaps with a per-user rate; the dataset is then split like MovieLens: the global 96 / 2 / 2
  timestamp cut of ``patchrec.data.interactions.global_time_split``.

The prompts are the MovieLens ones of docs/method.md §1 (the titles read like movie titles).
Same arguments, same seed -> an identical dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchrec.data.dataset import Dataset, ragged_arange
from patchrec.data.interactions import build_dataset
from patchrec.data.movielens import SYSTEM_PROMPT, USER_PROMPT

ADJECTIVES = (
    "Silent Crimson Hidden Broken Golden Midnight Frozen Burning Distant Forgotten Electric Wild Hollow "
    "Restless Velvet Iron Scarlet Silver Lonely Savage Secret Endless Fallen Bright Quiet Dark Lost Last "
    "Northern Eternal Shattered Sudden Gentle Wandering Bitter Sacred Painted Stolen Twisted Emerald"
).split()
# One word bank per topic (10 nouns). Up to 24 topics; past that a bank is reused with a volume number.
TOPIC_NOUNS = tuple(
    tuple(bank.split())
    for bank in (
        "Harbor Tide Lighthouse Voyage Island Reef Current Anchor Shore Storm",
        "Galaxy Orbit Comet Nebula Planet Starship Signal Eclipse Colony Horizon",
        "Alibi Heist Witness Verdict Detective Motive Suspect Getaway Ransom Informant",
        "Garden Meadow Orchard Blossom Valley River Spring Willow Harvest Field",
        "Castle Kingdom Dragon Crown Sword Throne Knight Prophecy Sorcerer Realm",
        "Haunting Shadow Cellar Curse Phantom Ritual Asylum Mask Grave Nightmare",
        "Ballroom Serenade Wedding Letter Promise Kiss Romance Affair Bride Waltz",
        "Frontier Outlaw Canyon Ranch Sheriff Saddle Prairie Rider Desert Gunfighter",
        "Circus Carnival Parade Clown Holiday Picnic Party Vacation Mixup Caper",
        "Battalion Trench Squadron Mission Bunker Front Siege Convoy Regiment Armistice",
        "Machine Circuit Android Network Code Algorithm Protocol Cyborg Reactor Drone",
        "Jungle Temple Expedition Treasure Map Volcano Safari Ruins Explorer Quest",
        "Symphony Melody Rhythm Ballad Encore Stage Chorus Overture Concert Duet",
        "Champion Stadium Rookie Marathon Knockout Season Comeback Trophy Playoff Coach",
        "Empire Dynasty Revolution Senate Palace Conspiracy Emperor Rebellion Treaty Exile",
        "Academy Classroom Dormitory Graduation Prom Locker Semester Yearbook Campus Tutor",
        "Metropolis Subway Rooftop Avenue Skyline Alley Tower Boulevard Neon Precinct",
        "Farmhouse Barn Homestead Family Cottage Kitchen Porch Sisters Inheritance Reunion",
        "Spy Cipher Embassy Agent Defector Dossier Courier Safehouse Operative Codename",
        "Mountain Summit Glacier Avalanche Blizzard Peak Ridge Tundra Pass Wilderness",
        "Vampire Werewolf Moon Fang Coven Witch Crypt Bloodline Talisman Lantern",
        "Cowboy Puppy Robot Wizard Penguin Unicorn Pirate Mermaid Elf Balloon",
        "Laboratory Virus Experiment Outbreak Formula Specimen Mutation Quarantine Cure Clone",
        "Casino Jackpot Gambler Dealer Wager Bluff Fortune Ace Hustle Roulette",
    )
)
SEQUELS = ("", " II", " III", " Returns", ": Part Two", ": The Beginning")
# Patterns over (adjective, its article, noun, second noun); some ignore fields, so repeats are redrawn.
PATTERNS = (
    "The {a} {n}",
    "{a} {n}",
    "{n} of the {a} {m}",
    "Return to the {a} {n}",
    "Beyond the {n}",
    "The {n} and the {m}",
    "{an} {a} {n}",
    "Echoes of the {a} {n}",
)


@dataclass
class SyntheticConfig:
    num_users: int = 1000  # users
    num_items: int = 2000  # catalog size
    mean_length: float = 60.0  # mean items per user (log-normal lengths)
    min_length: int = 5  # shortest user history
    max_length: int = 1000  # longest user history (also capped by the user's reachable items)
    num_topics: int = 20  # genre / topic clusters
    interests: int = 3  # long-lived topics per user
    long_term_share: float = 0.6  # probability an item comes from the long-lived topics
    drift_length: float = 6.0  # mean items before the drift topic changes
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity inside a topic
    time_span: int = 3 * 365 * 86400  # seconds covered by the timestamps
    seed: int = 0


def _check(config: SyntheticConfig) -> None:
    positive = (
        "num_users",
        "num_items",
        "mean_length",
        "min_length",
        "num_topics",
        "interests",
        "drift_length",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    if config.max_length < config.min_length:
        raise ValueError(f"max_length ({config.max_length}) must be >= min_length ({config.min_length})")
    if config.interests > config.num_topics:
        raise ValueError(f"interests ({config.interests}) must be <= num_topics ({config.num_topics})")
    if config.num_items < config.num_topics:
        raise ValueError(f"num_items ({config.num_items}) must be >= num_topics ({config.num_topics})")
    if not 0.0 <= config.long_term_share <= 1.0:
        raise ValueError(f"long_term_share must be in [0, 1], got {config.long_term_share}")
    if config.time_span < 1:
        raise ValueError(f"time_span must be >= 1, got {config.time_span}")


def _distinct_titles_per_topic() -> int:
    """How many different strings one topic's bank can produce (patterns ignore some fields)."""
    a, n = len(ADJECTIVES), 10
    per_pattern = {
        p: (a if "{a}" in p else 1) * (n if "{n}" in p else 1) * ((n - 1) if "{m}" in p else 1)
        for p in PATTERNS
    }
    return sum(per_pattern.values()) * len(SEQUELS)


def make_titles(topic_of_item: np.ndarray, num_topics: int, rng: np.random.Generator) -> list[str]:
    """Unique titles, each from its item's topic word bank."""
    titles = [""] * len(topic_of_item)
    limit = _distinct_titles_per_topic() // 2  # keeps the redraw loop below short
    for topic in range(num_topics):
        members = np.flatnonzero(topic_of_item == topic)
        if len(members) > limit:
            raise ValueError(
                f"num_items too large for the title generator: {len(members)} items in topic {topic}, "
                f"at most {limit} (use more num_topics)"
            )
        bank = TOPIC_NOUNS[topic % len(TOPIC_NOUNS)]
        # Distinct nouns for n and m, so "The Tide and the Tide" cannot occur.
        # Topics past the word banks reuse a bank with a volume number so titles stay unique.
        volume = f" Vol. {topic // len(TOPIC_NOUNS) + 1}" if topic >= len(TOPIC_NOUNS) else ""
        seen: set[str] = set()
        for item in members.tolist():
            title = ""
            while not title or title in seen:  # a repeat is redrawn (deterministic: same rng stream)
                a, p, s = (
                    rng.integers(len(ADJECTIVES)),
                    rng.integers(len(PATTERNS)),
                    rng.integers(len(SEQUELS)),
                )
                n, m = rng.choice(len(bank), size=2, replace=False)
                adjective = ADJECTIVES[a]
                article = "An" if adjective[0] in "AEIOU" else "A"
                title = (
                    PATTERNS[p].format(a=adjective, an=article, n=bank[n], m=bank[m]) + SEQUELS[s] + volume
                )
            seen.add(title)
            titles[item] = title
    return titles


def _topics(rng: np.random.Generator, num_items: int, num_topics: int) -> np.ndarray:
    topic_of_item = np.empty(num_items, dtype=np.int64)
    topic_of_item[rng.permutation(num_items)] = np.arange(num_items) % num_topics
    return topic_of_item


def item_topics(num_items: int = 2000, num_topics: int = 20, seed: int = 0) -> np.ndarray:
    """The hidden topic of every item of ``make_synthetic(..., num_items, num_topics=..., seed)`` (it is
    the generator's first draw, so it depends on nothing else); for tests and analysis."""
    return _topics(np.random.default_rng(seed), num_items, num_topics)


def make_synthetic(
    num_users: int = 1000,
    num_items: int = 2000,
    mean_length: float = 60.0,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """A deterministic synthetic ``Dataset``; ``options`` are the other ``SyntheticConfig`` fields."""
    unknown = set(options) - set(SyntheticConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown synthetic options {sorted(unknown)}")
    config = SyntheticConfig(
        num_users=num_users, num_items=num_items, mean_length=mean_length, seed=seed, **options
    )  # type: ignore[arg-type]
    _check(config)
    rng = np.random.default_rng(config.seed)
    U, V, T = config.num_users, config.num_items, config.num_topics

    topic_of_item = _topics(rng, V, T)
    titles = make_titles(topic_of_item, T, rng)
    # Items sorted by topic; cum[k] in (topic, topic + 1] is the popularity CDF inside the topic, so one
    # searchsorted on (topic + uniform) draws an item of that topic.
    by_topic = np.lexsort((rng.random(V), topic_of_item))
    sizes = np.bincount(topic_of_item, minlength=T)
    rank = ragged_arange(sizes)
    weight = 1.0 / (rank + 1.0) ** config.popularity_exponent
    topic_sorted = topic_of_item[by_topic]
    ends = np.cumsum(sizes)
    cum = np.cumsum(weight)
    before_topic = np.repeat(np.concatenate(([0.0], cum[ends[:-1] - 1])), sizes)
    totals = np.repeat(cum[ends - 1] - np.concatenate(([0.0], cum[ends[:-1] - 1])), sizes)
    cdf = topic_sorted + (cum - before_topic) / totals
    cdf[ends - 1] = np.arange(1, T + 1)  # exact upper ends: a draw never spills into the next topic

    # A user can reach at most their interest topics plus drift topics: cap lengths well inside that.
    sigma = 0.8
    lengths = rng.lognormal(np.log(config.mean_length) - sigma**2 / 2, sigma, size=U)
    cap = min(config.max_length, max(config.min_length, V // 2))
    lengths = np.clip(np.round(lengths), config.min_length, cap).astype(np.int64)
    # Over-draw: repeats are removed afterwards, and each user keeps its first `length` distinct items.
    draws = np.ceil(lengths * 1.6 + 10).astype(np.int64)
    total = int(draws.sum())
    user = np.repeat(np.arange(U), draws)
    starts = np.cumsum(draws) - draws
    position = ragged_arange(draws)

    interests = np.argsort(rng.random((U, T)), axis=1)[:, : config.interests]
    interest_weights = rng.dirichlet(np.ones(config.interests), size=U)
    pick = (rng.random(total)[:, None] > np.cumsum(interest_weights, axis=1)[user]).sum(axis=1)
    long_topic = interests[user, np.minimum(pick, config.interests - 1)]
    # Drift episodes: a new episode at each user's start and with probability 1/drift_length per step.
    new_episode = (rng.random(total) < 1.0 / config.drift_length) | (position == 0)
    episode = np.cumsum(new_episode) - 1
    drift_topic = rng.integers(0, T, size=int(episode[-1]) + 1)[episode]
    from_long = rng.random(total) < config.long_term_share
    topic = np.where(from_long, long_topic, drift_topic)
    item = by_topic[np.minimum(np.searchsorted(cdf, topic + rng.random(total)), V - 1)]

    # Keep first occurrences per user, then the first `length` of them.
    first = np.zeros(total, dtype=bool)
    first[np.unique(user * V + item, return_index=True)[1]] = True
    kept_rank = np.cumsum(first) - 1
    kept_before_user = np.repeat(np.concatenate(([0], np.cumsum(first)[starts[1:] - 1])), draws)
    keep = first & (kept_rank - kept_before_user < lengths[user])
    user, item = user[keep], item[keep]

    # Timestamps: per-user start and rate; gaps are exponential, at least one second apart.
    counts = np.bincount(user, minlength=U)
    start_time = rng.integers(0, int(config.time_span * 0.8) + 1, size=U)
    mean_gap = (config.time_span * 0.2) / np.maximum(counts, 1) * rng.uniform(0.3, 3.0, size=U)
    gaps = np.maximum(1, np.round(rng.exponential(1.0, size=len(user)) * mean_gap[user])).astype(np.int64)
    user_start = np.cumsum(counts) - counts
    gap_cum = np.cumsum(gaps)
    before = np.repeat(np.concatenate(([0], gap_cum[user_start[1:] - 1])), counts)
    timestamps = start_time[user] + gap_cum - before
    name = f"synthetic-u{U}-i{V}-s{config.seed}"
    return build_dataset(name, titles, user, item, timestamps, SYSTEM_PROMPT, USER_PROMPT)
