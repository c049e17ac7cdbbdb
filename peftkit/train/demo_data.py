"""Data that needs no download: a built-in byte-level tokenizer and the generated ``topics`` dataset
(``data.train: generated:topics``), for offline tests, demos and config-built models."""

from __future__ import annotations

import random
from typing import Any


def byte_tokenizer():
    """A byte-level tokenizer with no merges (vocabulary 259: <pad>=0, <s>=1, </s>=2, then the 256 bytes),
    built in memory: offline tests and config-built models need no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")



TOPIC_NOUNS = {
    # (train nouns, held-out eval nouns): eval sentences use nouns never seen in training, so accuracy
    # measures what the pretrained model knows about the topic, not memorised words.
    "sports": (["football", "basketball", "the marathon", "tennis", "the referee", "a penalty kick", "the stadium",
                "the goalkeeper", "swimming", "the league table", "a slam dunk", "the cycling race"],
               ["hockey", "the world cup", "a home run", "the boxing match", "the quarterback", "volleyball"]),
    "food": (["pasta", "the bakery", "chocolate cake", "a spicy curry", "fresh bread", "the sushi bar", "pancakes",
              "the recipe for soup", "grilled cheese", "the farmers market", "vanilla ice cream", "roast chicken"],
             ["pizza", "the dumplings", "a fruit salad", "the barbecue", "noodles", "apple pie"]),
    "weather": (["the thunderstorm", "heavy rain", "the heat wave", "snowfall", "the forecast", "a hurricane",
                 "strong winds", "the fog", "hail", "the drought", "a rainbow", "freezing temperatures"],
                ["the blizzard", "a tornado warning", "the humidity", "drizzle", "the cold front", "sunshine"]),
    "technology": (["the new smartphone", "a software update", "the laptop", "artificial intelligence",
                    "the computer virus", "a faster processor", "the robot", "cloud storage", "the web browser",
                    "the video game console", "a programming language", "the wifi router"],
                   ["the tablet", "a microchip", "the search engine", "cybersecurity", "the app store",
                    "quantum computing"]),
}
TOPIC_TEMPLATES = [
    "I read an article about {} yesterday.", "{} was all anyone talked about at lunch.",
    "My neighbour would not stop complaining about {}.", "Have you heard the latest news on {}?",
    "We spent the whole evening discussing {}.", "The documentary about {} was surprisingly good.",
    "Everyone at the office has an opinion on {}.", "She wrote a long blog post about {}.",
    "There was a question about {} on the quiz show.", "He keeps sending me videos about {}.",
    "The podcast this week covered {}.", "My grandmother asked me to explain {}.",
]


def topics(split: str) -> list[dict[str, Any]]:
    """The quickstart task: 4-way topic classification (sports, food, weather, technology) of template
    sentences. ``train``: 512 sentences from 12 nouns per topic; any other split: 192 sentences from 6
    held-out nouns per topic. Deterministic (a fixed seed per split)."""
    held_out = split != "train"
    rng = random.Random(1 if held_out else 0)
    count = 192 if held_out else 512
    rows = []
    labels = sorted(TOPIC_NOUNS)
    for i in range(count):
        label = labels[i % len(labels)]
        noun = rng.choice(TOPIC_NOUNS[label][1 if held_out else 0])
        sentence = rng.choice(TOPIC_TEMPLATES).format(noun)
        rows.append({"text": sentence[0].upper() + sentence[1:], "label": label})
    rng.shuffle(rows)
    return rows


GENERATED = {"topics": topics}
