"""Chat data (issue 16): the messages / ShareGPT / Alpaca formats, labels on assistant turns checked token by
token against the rendered template, chat templates, column names, mixing, overlong examples, packing without
cross-contamination (loss equal to the unpacked loss), the datasets cache, and every bad row ending in one
error naming file, row and field with nothing written. Files are made in tmp_path; the byte tokenizer keeps
every character one token, so expected labels are read straight off the rendered text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_gpt2, tiny_llama
from train_fixtures import TINY_CONFIGS, write_jsonl

from peftkit.errors import ConfigError
from peftkit.train import from_dict
from peftkit.train.build import load_examples, load_tokenizer
from peftkit.train.chat import BUILTIN_TEMPLATES, stop_strings
from peftkit.train.cli import main
from peftkit.train.data import IGNORE_INDEX, byte_tokenizer, check_packed_attention, collate, tokenize
from peftkit.train.recipe import DataSection

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
            for t in CONVERSATION]


def chatml(turns) -> str:
    return "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)


def labelled_text(tokenizer, ids, labels) -> list[str]:
    """The labelled tokens' text, one string per contiguous labelled run."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def expected_labels(tokenizer, text: str, spans: list[str]) -> list[int]:
    """Labels built by hand: every byte of each span (found in order in ``text``) labelled, the rest -100."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    at = 0
    for span in spans:
        start = text.index(span, at)
        for k in range(start, start + len(span)):
            labels[k] = ids[k]
        at = start + len(span)
    return labels


def test_messages_multi_turn_labels_every_assistant_turn_token_by_token():
    tokenizer = byte_tokenizer()
    out = tokenize([{"messages": CONVERSATION}], tokenizer, DataSection(train="x", format="messages", max_length=512))
    text = chatml(CONVERSATION)
    ids, labels = out.input_ids[0], out.labels[0]
    assert tokenizer.decode(ids) == text  # no tokenizer (chatml is the fallback): the built-in renders it
    assert labels == expected_labels(tokenizer, text, ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"])
    assert labelled_text(tokenizer, ids, labels) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    # The eval prompt ends exactly where the last answer starts; the reference is that answer.
    assert tokenizer.decode(ids[: out.prompt_lengths[0]]) == text[: text.rindex("Rome.")]
    assert out.references[0] == "Rome."

    last = tokenize([{"messages": CONVERSATION}], tokenizer,
                    DataSection(train="x", format="messages", max_length=512, assistant_turns="last"))
    assert last.input_ids[0] == ids
    assert last.labels[0] == expected_labels(tokenizer, text, ["Rome.<|im_end|>\n"])


def test_sharegpt_and_custom_columns_give_the_messages_result():
    tokenizer = byte_tokenizer()
    reference = tokenize([{"messages": CONVERSATION}], tokenizer, DataSection(train="x", format="messages"))
    share = tokenize([{"conversations": SHAREGPT}], tokenizer, DataSection(train="x", format="sharegpt"))
    assert share.input_ids[0] == reference.input_ids[0] and share.labels[0] == reference.labels[0]
    renamed = [{"dialog": [{"speaker": t["role"], "text": t["content"]} for t in CONVERSATION]}]
    custom = tokenize(renamed, tokenizer, DataSection(train="x", format="messages", conversation_column="dialog",
                                                      role_key="speaker", content_key="text"))
    assert custom.labels[0] == reference.labels[0]


def test_alpaca_keeps_the_input_column_and_labels_only_the_output():
    tokenizer = byte_tokenizer()
    rows = [{"instruction": "Translate.", "input": "chat", "output": "cat"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    out = tokenize(rows, tokenizer, DataSection(train="x", format="alpaca", chat_template="chatml"))
    first = chatml([{"role": "user", "content": "Translate.\n\nchat"}, {"role": "assistant", "content": "cat"}])
    assert tokenizer.decode(out.input_ids[0]) == first
    assert out.labels[0] == expected_labels(tokenizer, first, ["cat<|im_end|>\n"])
    # empty input: no blank line
    assert tokenizer.decode(out.input_ids[1]).startswith("<|im_start|>user\nSay hi.<|im_end|>")
    # Without a template: the plain layout, prompt (with BOS) + newline, then the output and EOS.
    plain = tokenize(rows[:1], tokenizer, DataSection(train="x", format="alpaca", system_prompt="Sys"))
    prompt = tokenizer("Sys\n\nTranslate.\n\nchat\n")["input_ids"]
    answer = tokenizer("cat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert plain.input_ids[0] == prompt + answer and plain.labels[0] == [IGNORE_INDEX] * len(prompt) + answer


def test_chat_template_tokenizers_builtin_or_jinja_and_tools():
    tokenizer = byte_tokenizer()
    turns = CONVERSATION[1:3]
    own = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer.chat_template = own
    data = DataSection(train="x", format="messages")
    assert tokenizer.decode(tokenize([{"messages": turns}], tokenizer, data).input_ids[0]) == \
        "[user]Capital of France?[assistant]Paris."
    zephyr = tokenize([{"messages": turns}], tokenizer,
                      DataSection(train="x", format="messages", chat_template="zephyr"))
    assert tokenizer.decode(zephyr.input_ids[0]) == "<|user|>\nCapital of France?</s>\n<|assistant|>\nParis.</s>\n"
    assert labelled_text(tokenizer, zephyr.input_ids[0], zephyr.labels[0]) == ["Paris.</s>\n"]
    jinja = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
             "{% if add_generation_prompt %}a:{% endif %}")
    custom = tokenize([{"messages": turns}], tokenizer, DataSection(train="x", format="messages", chat_template=jinja))
    assert tokenizer.decode(custom.input_ids[0]) == "u:Capital of France?;a:Paris.;"
    assert labelled_text(tokenizer, custom.input_ids[0], custom.labels[0]) == ["Paris.;"]
    assert stop_strings(BUILTIN_TEMPLATES["chatml"], tokenizer) == ["<|im_end|>"]

    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    rows = [{"messages": turns, "tools": tools}]
    passed = tokenize(rows, tokenizer, DataSection(train="x", format="messages", chat_template="chatml",
                                                   tools_column="tools"))
    text = tokenizer.decode(passed.input_ids[0])
    assert text.startswith("<|im_start|>system\nTools: [") and '"lookup"' in text
    assert labelled_text(tokenizer, passed.input_ids[0], passed.labels[0]) == ["Paris.<|im_end|>\n"]
    ignored = tokenize(rows, tokenizer, DataSection(train="x", format="messages", chat_template="chatml"))
    assert tokenizer.decode(ignored.input_ids[0]) == chatml(turns)


BAD_ROWS = [
    ({"messages": [{"role": "wizard", "content": "x"}]}, ["row 2", "messages[0].role", "unknown role 'wizard'"]),
    ({"messages": []}, ["row 2", "'messages'", "empty"]),
    ({"messages": [{"role": "user", "content": "hi"}]}, ["row 2", "no assistant turn"]),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     ["row 2", "messages[0].content", "expected text"]),
    ({"messages": [{"user": "hi"}]}, ["row 2", "messages[0]", "'role' and 'content'"]),
]


@pytest.mark.parametrize("bad,needles", BAD_ROWS, ids=["unknown-role", "empty", "no-assistant", "null", "keys"])
def test_a_bad_row_is_one_error_naming_file_row_field_and_nothing_is_written(tmp_path, capsys, bad, needles):
    good = {"messages": CONVERSATION[1:3]}
    train = write_jsonl(tmp_path / "chat.jsonl", [good, bad, good])
    recipe = tiny_chat_recipe(tmp_path, train)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit: error: ") and "\n" not in err and "Traceback" not in err
    for needle in [str(tmp_path / "chat.jsonl"), *needles]:
        assert needle in err, (needle, err)
    assert not (tmp_path / "run").exists()


def test_a_template_that_fails_to_render_names_the_row(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}])
    broken = "{{ raise_exception('only two turns') if messages | length > 1 else '' }}"
    with pytest.raises(ConfigError, match=r"chat.jsonl: row 1, field 'data.chat_template': the template failed "
                                          r"to render .*only two turns"):
        load_examples(from_dict(tiny_chat_recipe(tmp_path, train, data={"chat_template": broken})), byte_tokenizer())
    unknown = "not-a-template"
    with pytest.raises(ConfigError, match="data.chat_template: 'not-a-template' is neither"):
        load_examples(from_dict(tiny_chat_recipe(tmp_path, train, data={"chat_template": unknown})), byte_tokenizer())


def test_overlong_examples_are_counted_and_handled_as_the_recipe_says(tmp_path):
    tokenizer = byte_tokenizer()
    long = {"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "tail"}]}
    short = {"messages": CONVERSATION[1:3]}
    rows = [short, long, short]
    n = len(chatml(long["messages"])) - 10  # the long one is 10 tokens over; the short ones fit
    with pytest.warns(UserWarning, match=rf"1 of 3 examples are longer than data.max_length={n} tokens \(longest "
                                         rf"{n + 10}\); data.overlong=truncate_left"):
        cut = tokenize(rows, tokenizer, DataSection(train="x", format="messages", max_length=n), key="data.train f")
    ids = cut.input_ids[1]
    assert len(cut) == 3 and len(ids) == n
    assert tokenizer.decode(ids) == chatml(long["messages"])[10:]  # cut from the left: the answer is whole
    assert labelled_text(tokenizer, ids, cut.labels[1]) == ["tail<|im_end|>\n"]
    with pytest.warns(UserWarning, match="1 of 3 examples .* data.overlong=drop dropped them"):
        dropped = tokenize(rows, tokenizer, DataSection(train="x", format="messages", max_length=n, overlong="drop"))
    assert len(dropped) == 2 and dropped.input_ids[1] == cut.input_ids[2]
    with pytest.raises(ConfigError, match=rf"data.train f: row 2, field 'data.max_length': the example has {n + 10} "
                                          rf"tokens, more than data.max_length={n}"):
        tokenize(rows, tokenizer, DataSection(train="x", format="messages", max_length=n, overlong="error"),
                 key="data.train f")


def tiny_chat_recipe(tmp_path: Path, train: str | None, *, data: dict | None = None, **sections) -> dict:
    recipe = {
        "model": {"config": dict(TINY_CONFIGS["llama"], max_position_embeddings=256), "tokenizer": "bytes"},
        "data": {"train": train, "format": "messages", "max_length": 256, **(data or {})},
        "adapter": {"method": "lora", "r": 4},
        "optimizer": {"lr": 1e-2},
        "training": {"max_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "run"), "log_every": 1},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


def test_mixing_datasets_by_weight(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": f"a{i}"},
                                                        {"role": "assistant", "content": "A"}]} for i in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"b{i}"},
                                                        {"role": "assistant", "content": "B"}]} for i in range(60)])
    recipe = from_dict(tiny_chat_recipe(tmp_path, None, data={"mix": {a: 3, b: 1}}))
    tokenizer = load_tokenizer(recipe)
    mixed = load_examples(recipe, tokenizer).train
    answers = [labelled_text(tokenizer, mixed.input_ids[i], mixed.labels[i])[0][0] for i in range(len(mixed))]
    # Sampled with probabilities 3/4, 1/4 until a runs out: all 60 of a, and about 20 of b.
    assert answers.count("A") == 60 and 8 <= answers.count("B") <= 35
    again = load_examples(recipe, tokenizer).train
    assert list(again.input_ids) == list(mixed.input_ids)  # seeded

    for weights, needle in [({a: 0, b: 0}, "summing to a positive number"), ({a: -1, b: 2}, "non-negative")]:
        with pytest.raises(ConfigError, match=needle):
            from_dict(tiny_chat_recipe(tmp_path, None, data={"mix": weights}))
    other = write_jsonl(tmp_path / "other.jsonl", [{"dialog": []}])
    with pytest.raises(ConfigError, match=rf"data.mix: {other} lacks the column\(s\) \['messages'\]"):
        load_examples(from_dict(tiny_chat_recipe(tmp_path, None, data={"mix": {a: 1, other: 1}})), tokenizer)


def _loss_sum(model, batch) -> tuple[float, int]:
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    shifted = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), reduction="sum")
    return loss.item(), int((shifted != IGNORE_INDEX).sum())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_loss_equals_the_unpacked_loss(make):
    tokenizer = byte_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "q" * (3 + i % 4)},
                          {"role": "assistant", "content": "a" * (1 + i)}]}
            for i in range(6)]
    data = DataSection(train="x", format="messages", max_length=64, chat_template="{% for m in messages %}"
                       "{{ m['role'][0] }}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}a{% endif %}")
    unpacked = tokenize(rows, tokenizer, data, pack=False)
    packed = tokenize(rows, tokenizer, data, pack=True, batch_size=6)
    assert len(packed) < len(unpacked) and packed.position_ids is not None
    assert sum(map(len, packed.input_ids)) == sum(map(len, unpacked.input_ids))
    model = make()
    # The byte tokenizer's ids are < 259; the tiny models have 97: map them into range the same way for both.
    for examples in (unpacked, packed):
        examples.input_ids = [[t % 97 for t in x] for x in examples.input_ids]
        examples.labels = [[t % 97 if t != IGNORE_INDEX else t for t in y] for y in examples.labels]
    with torch.no_grad():
        a = _loss_sum(model, collate(unpacked, list(range(len(unpacked))), 0, False))
        b = _loss_sum(model, collate(packed, list(range(len(packed))), 0, False))
    assert a[1] == b[1] + 0 and a[0] == pytest.approx(b[0], rel=1e-5)  # same targets, same loss
    assert check_packed_attention(model)
    # Per-conversation positions restart at 0; each conversation's first label is ignored.
    first = collate(packed, [0], 0, False)
    starts = (first["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2 and all(first["labels"][0, s] == IGNORE_INDEX for s in starts)
    stats = packed.stats
    assert stats["rows"] == len(packed) and stats["padding_packed"] < stats["padding_unpacked"]


def test_tokenized_data_is_cached_by_tokenizer_and_recipe(tmp_path, monkeypatch):
    # Files read through datasets (hub sets, parquet, text over local_rows.MAX_BYTES) are cached; a small local
    # JSON file is read and tokenized in memory (tests/test_local_rows.py): sent through datasets here.
    monkeypatch.setattr("peftkit.train.rows.LOCAL_READERS", {})
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    recipe = from_dict(tiny_chat_recipe(tmp_path, train))
    first = load_examples(recipe, load_tokenizer(recipe)).train
    cache = {f["filename"] for f in first.input_ids.source.cache_files}
    again = load_examples(recipe, load_tokenizer(recipe)).train
    assert {f["filename"] for f in again.input_ids.source.cache_files} == cache  # read back, not recomputed
    other = from_dict(tiny_chat_recipe(tmp_path, train, data={"chat_template": "zephyr"}))
    changed = load_examples(other, load_tokenizer(other)).train
    assert {f["filename"] for f in changed.input_ids.source.cache_files} != cache
    assert list(changed.input_ids) != list(first.input_ids)


def test_two_map_processes_give_the_same_examples(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    one = tokenize(rows, byte_tokenizer(), DataSection(train="x", format="messages"))
    two = tokenize(rows, byte_tokenizer(), DataSection(train="x", format="messages", num_proc=2))
    assert list(two.input_ids) == list(one.input_ids) and list(two.labels) == list(one.labels)


def test_text_eval_is_cut_into_the_blocks_training_uses(tmp_path):
    """A long eval document is evaluated whole, in max_length blocks, not cut to its first max_length tokens."""
    from train_fixtures import llama_text_recipe, write_jsonl

    from peftkit.train.build import load_examples
    from peftkit.train.data import byte_tokenizer
    from peftkit.train.recipe import from_dict

    recipe = llama_text_recipe(tmp_path)
    recipe["data"]["eval"] = write_jsonl(tmp_path / "long.jsonl", [{"text": "abcdefgh " * 40}])  # 360 bytes
    examples = load_examples(from_dict(recipe), byte_tokenizer())
    # blocks of data.max_length = 16 tokens, consecutive, from the document's first token (the last partial one
    # dropped, as in training): 22 blocks, where a cut to max_length would give 1
    document = byte_tokenizer()("abcdefgh " * 40)["input_ids"]
    assert len(document) == 360 and len(examples.eval) == 360 // 16
    assert [t for block in examples.eval.input_ids for t in list(block)] == document[:22 * 16]
