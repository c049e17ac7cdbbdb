"""Data for the training loop: read examples, tokenize them by format, plan the batch order, collate.

Formats (``data.format``):
- ``text``: causal LM on raw text; with ``packing`` the documents are joined (EOS between them) and cut into
  blocks of exactly ``max_length`` tokens, so no token is padding.
- ``instruction``: prompt/response pairs; the loss is only on the response tokens (prompt labels are -100).
  With a tokenizer that has a chat template, the pair is rendered as a user turn and an assistant turn.
- ``classification``: a text, an optional text pair, and a label (an integer or a class name).

The batch order is a pure function of (seed, position), so a resumed run reads exactly the batches the
uninterrupted run would have read, and 2 processes at batch B read the same examples as 1 process at 2B.
"""

from __future__ import annotations

import codecs
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .recipe import DataSection

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
GENERATED_PREFIX = "generated:"
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ reading rows
def read_rows(spec: str, split: str, data: DataSection, key: str) -> list[dict[str, Any]]:
    """The examples of one dataset as a list of dicts. ``key`` (``data.train``/``data.eval``) names errors."""
    if spec.startswith(GENERATED_PREFIX):
        name = spec[len(GENERATED_PREFIX):]
        if name not in GENERATED:
            raise ConfigError(f"{key}: unknown generated dataset '{name}'; available: {', '.join(sorted(GENERATED))}")
        return GENERATED[name](split)
    import datasets

    path = Path(spec)
    is_local = path.suffix.lower() in LOCAL_EXTENSIONS or path.exists() or spec.startswith((".", "/", "~"))
    datasets.disable_progress_bars()
    if is_local:
        path = path.expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: file not found: {path}; give a .json/.jsonl/.csv/.parquet/.txt file or a hub dataset id")
        builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"{key}: {path} has an unsupported extension; expected one of {sorted(LOCAL_EXTENSIONS)}")
        if builder != "parquet":
            check_utf8(path, key)
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise ConfigError(f"{key}: could not read {path} as {builder} ({_first_line(exc)}); check the file") from None
    else:
        try:
            table = datasets.load_dataset(spec, data.subset, split=split)
        except Exception as exc:
            raise ConfigError(
                f"{key}: could not load the hub dataset '{spec}' (subset {data.subset!r}, split '{split}'): "
                f"{_first_line(exc)}. Check the id, data.subset and the split, or give a local file"
            ) from None
    return table.to_list()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def required_columns(data: DataSection) -> dict[str, str]:
    """Column -> the recipe key that names it, for the chosen format."""
    if data.format == "text":
        return {data.text_column: "data.text_column"}
    if data.format == "instruction":
        return {data.prompt_column: "data.prompt_column", data.response_column: "data.response_column"}
    columns = {data.text_column: "data.text_column", data.label_column: "data.label_column"}
    if data.text_pair_column:
        columns[data.text_pair_column] = "data.text_pair_column"
    return columns


def check_columns(rows: list[dict[str, Any]], data: DataSection, key: str, spec: str) -> None:
    if not rows:
        raise ConfigError(f"{key}: {spec} has no examples")
    needed = required_columns(data)
    found = list(rows[0])
    missing = [c for c in needed if c not in found]
    if missing:
        raise ConfigError(
            f"{key}: {spec} lacks the column(s) {missing} that format '{data.format}' needs; expected columns "
            f"{list(needed)} (rename them with {', '.join(needed[c] for c in missing)}). Found: {found}"
        )


# ------------------------------------------------------------------------------------------ row validation
# Checks on the rows as read, before tokenizing: nothing is silently turned into the string "None", dropped,
# or given another label id than the one it has in data.train.
def check_utf8(path: Path, key: str) -> None:
    """A text data file (.json/.jsonl/.csv/.txt) must be UTF-8; else one ConfigError naming file and offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{key}: {path} is not UTF-8 text (byte {offset + exc.start}: {exc.reason}); peftkit reads data "
                    "files as UTF-8: convert it (e.g. iconv -f latin1 -t utf-8 IN > OUT) and point the recipe at it"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text (it ends inside a multi-byte character); convert it "
                          "to UTF-8") from None


def _label_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    return None


def check_rows(rows: list[dict[str, Any]], data: DataSection, key: str, spec: str,
               train_rows: list[dict[str, Any]] | None = None) -> None:
    """Every row has a value (not null, not missing) in each column the format reads, and classification
    labels are all integers (class ids) or all strings (class names), of the same kind as data.train's
    (``train_rows``, given for data.eval). One ConfigError naming the file, the first bad row and the column."""
    for column, recipe_key in required_columns(data).items():
        bad = [i for i, row in enumerate(rows) if row.get(column) is None]
        if bad:
            raise ConfigError(
                f"{key}: {spec} row {bad[0] + 1} has no value (null or missing) in the column '{column}' "
                f"({recipe_key}), and {len(bad) - 1} more rows neither; fill them in or remove those rows"
            )
    if data.format == "text":
        empty = sum(1 for row in rows if row[data.text_column] == "")
        if empty:
            warnings.warn(f"{key}: {spec}: skipping {empty} of {len(rows)} rows whose '{data.text_column}' is an "
                          "empty string", stacklevel=2)
    if data.format != "classification":
        return
    column = data.label_column
    kinds = {}
    for i, row in enumerate(rows):
        kind = _label_kind(row[column])
        if kind is None:
            raise ConfigError(f"{key}: {spec} row {i + 1}: label {row[column]!r} in '{column}' is neither an integer "
                              "class id nor a string class name; fix that row")
        kinds.setdefault(kind, i)
    if len(kinds) > 1:
        raise ConfigError(
            f"{key}: {spec} mixes integer and string labels in '{column}' (row {kinds['integer'] + 1}: "
            f"{rows[kinds['integer']][column]!r}, row {kinds['string'] + 1}: {rows[kinds['string']][column]!r}); "
            "use integer class ids everywhere or class names everywhere"
        )
    if train_rows:
        train_kind = _label_kind(train_rows[0][column])
        (kind,) = kinds
        if kind != train_kind:
            raise ConfigError(
                f"{key}: {spec} has {kind} labels but data.train has {train_kind} labels; eval labels must use the "
                "same kind (class ids or class names) as data.train so that each class keeps its id"
            )


def check_lengths(examples: Any, model_config: Any, data: DataSection) -> None:
    """The longest tokenized example must fit the model's positions (``max_position_embeddings`` or
    ``n_positions``), so a run fails before step 1 instead of mid-training."""
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not isinstance(positions, int):
        return
    for split_key, split in (("data.train", examples.train), ("data.eval", examples.eval)):
        if split is None or not len(split):
            continue
        longest = max(len(ids) for ids in split.input_ids)
        if longest > positions:
            raise ConfigError(
                f"data.max_length: {split_key} has examples of {longest} tokens, more than the model's {positions} "
                f"positions (max_position_embeddings); set data.max_length to at most {positions}"
            )


# ------------------------------------------------------------------------------------------ tokenizing
@dataclass
class Tokenized:
    """Tokenized examples: ``input_ids`` (list of int lists), ``labels`` (int lists for LM, ints for
    classification), and for classification the class names (index = label id)."""

    input_ids: list[list[int]]
    labels: list[Any]
    token_type_ids: list[list[int]] | None = None
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(rows: list[dict[str, Any]], tokenizer, data: DataSection, label_names: list[str] | None = None) -> Tokenized:
    if data.format == "text":
        return _tokenize_text(rows, tokenizer, data)
    if data.format == "instruction":
        return _tokenize_instructions(rows, tokenizer, data)
    return _tokenize_classification(rows, tokenizer, data, label_names)


def _tokenize_text(rows, tokenizer, data: DataSection) -> Tokenized:
    texts = [str(r[data.text_column]) for r in rows if r[data.text_column]]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data.packing:
        stream = [t for ids in encoded for t in ids + eos]
        n = data.max_length
        blocks = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
        if not blocks:
            raise ConfigError(f"data.max_length: the text has only {len(stream)} tokens, fewer than one block of "
                              f"{n}; lower data.max_length or add text")
        return Tokenized(blocks, [list(b) for b in blocks])
    ids = [(x + eos)[: data.max_length] for x in encoded]
    return Tokenized(ids, [list(x) for x in ids])


def _tokenize_instructions(rows, tokenizer, data: DataSection) -> Tokenized:
    inputs, labels = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompt, response = str(row[data.prompt_column]), str(row[data.response_column])
        if getattr(tokenizer, "chat_template", None):
            user = [{"role": "user", "content": prompt}]
            prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
            if not full_text.startswith(prompt_text):
                raise ConfigError("model.tokenizer: its chat template does not render the prompt as a prefix of the "
                                  "conversation, so the response tokens cannot be isolated; use a tokenizer without it")
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + response_ids)[: data.max_length]
        label = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: data.max_length]
        if all(t == IGNORE_INDEX for t in label):
            continue  # the prompt fills max_length: nothing left to learn from this example
        inputs.append(ids)
        labels.append(label)
    if not inputs:
        raise ConfigError(f"data.max_length: every prompt is {data.max_length} tokens or longer, so no response "
                          "token is left to train on; raise data.max_length")
    return Tokenized(inputs, labels)


def _tokenize_classification(rows, tokenizer, data: DataSection, label_names: list[str] | None) -> Tokenized:
    raw = [r[data.label_column] for r in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        labels = list(raw)
    else:
        if label_names is None:
            label_names = sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({str(v) for v in raw} - set(index))
        if unknown:
            raise ConfigError(f"data.eval: labels {unknown[:5]} do not occur in data.train (classes {label_names})")
        labels = [index[str(v)] for v in raw]
    texts = [str(r[data.text_column]) for r in rows]
    pairs = [str(r[data.text_pair_column]) for r in rows] if data.text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=data.max_length)
    return Tokenized(encoded["input_ids"], labels, encoded.get("token_type_ids"), label_names)


# ------------------------------------------------------------------------------------------ batches
class BatchPlan:
    """The examples each process reads at each micro-batch.

    Epoch e is a permutation of the examples drawn from a generator seeded with (seed, e); it is cut into
    global batches of ``batch_size · world_size`` examples (the incomplete tail is dropped) and process
    ``rank`` takes the ``rank``-th slice of ``batch_size``. ``position`` counts global micro-batches from 0.
    """

    def __init__(self, num_examples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"training.batch_size: data.train has {num_examples} examples, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower training.batch_size or add data"
            )
        self._epoch = -1
        self._order: list[int] = []

    def indices(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            self._epoch = epoch
        start = (k * self.world_size + self.rank) * self.batch_size
        return self._order[start:start + self.batch_size]

    def epoch(self, position: int) -> float:
        return position / self.batches_per_epoch


def collate(examples: Tokenized, indices: list[int], pad_id: int, classification: bool) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest one: input_ids, attention_mask, labels (-100 on padding)."""
    length = max(len(examples.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if examples.token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(indices), length), dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long) if not classification else None
    for row, i in enumerate(indices):
        n = len(examples.input_ids[i])
        ids[row, :n] = torch.tensor(examples.input_ids[i])
        mask[row, :n] = 1
        if examples.token_type_ids is not None:
            batch["token_type_ids"][row, :n] = torch.tensor(examples.token_type_ids[i])
        if labels is not None:
            labels[row, :n] = torch.tensor(examples.labels[i])
    batch["labels"] = torch.tensor([examples.labels[i] for i in indices]) if classification else labels
    return batch


# ------------------------------------------------------------------------------------------ tokenizers
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


# ------------------------------------------------------------------------------------------ generated data
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
