"""Vision-language models (peftkit/train/vision.py) on a tiny LLaVA with a processor built from local parts and
generated images: labels on the assistant tokens only, the loss against a hand-computed masked cross-entropy,
where the adapters go, that the images reach the loss, the recipe end to end with the processor saved and loaded
back, and the refusals before step 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.loss import loss_mode, share_of_global_mean
from peftkit.train import from_dict, train
from peftkit.train.recipe import apply_overrides, read_yaml
from peftkit.train.vision import (
    VisionTokenized,
    adapter_options,
    collate,
    conversation,
    tiny_model,
    tiny_processor,
    tokenize,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "vision" / "llava-images.yaml"
IMAGE_TOKENS = 4  # (16 / 8) ** 2 patches per image in tiny_processor


def _image(folder: Path, name: str, colour: tuple[int, int, int], size=(20, 24)) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    array = np.zeros((*size, 3), np.uint8)
    array[...] = colour
    array[::3, ::2] = 255 - np.array(colour, np.uint8)  # a pattern, so the crop is not one flat colour
    Image.fromarray(array).save(folder / name)
    return name


def _rows(folder: Path) -> list[dict]:
    """Conversations of different lengths: one image, two images over two user turns, and none."""
    a = _image(folder, "a.png", (200, 20, 20))
    b = _image(folder, "b.png", (20, 200, 20), size=(30, 18))
    c = _image(folder, "c.png", (20, 20, 200))
    return [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": a}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image", "path": b}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
                      {"role": "user", "content": [{"type": "image", "path": c}, {"type": "text", "text": "And?"}]},
                      {"role": "assistant", "content": "blue, darker"}]},
        {"messages": [{"role": "user", "content": "No picture."}, {"role": "assistant", "content": "fine"}]},
    ]


class _Data:  # the DataSection keys vision.tokenize reads
    conversation_column = role_key = content_key = system_prompt = None
    assistant_turns = "all"
    max_length = 256
    overlong = "truncate_left"


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _tokenized(processor, folder: Path, **data) -> VisionTokenized:
    section = _Data()
    for key, value in data.items():
        setattr(section, key, value)
    return tokenize(_rows(folder), processor, section, key="data.train", base_dir=folder)


def test_labels_are_the_assistant_tokens_and_never_an_image_token(processor, tmp_path):
    examples = _tokenized(processor, tmp_path)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # Written out by hand: what each conversation's assistant turns add (answer + end-of-turn marker).
    answers = [["red"], ["green", "blue, darker"], ["fine"]]
    for i, expected in enumerate(answers):
        ids, labels = examples.input_ids[i], examples.labels[i]
        assert sum(1 for t in ids if t == image_id) == IMAGE_TOKENS * len(examples.images[i])
        assert all(y == -100 for t, y in zip(ids, labels) if t == image_id)
        labelled = [t for t, y in zip(ids, labels) if y != -100]
        assert all(y == t for t, y in zip(ids, labels) if y != -100)
        want = [t for text in expected for t in tokenizer(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"]]
        assert labelled == want
    assert [len(refs) for refs in examples.images] == [1, 2, 0]
    prompted = _tokenized(processor, tmp_path / "system", system_prompt="Look.")
    decoded = [tokenizer.decode(ids) for ids in prompted.input_ids]
    assert decoded[0].startswith("<|im_start|>system\nLook.<|im_end|>") and decoded[0].count("system") == 1
    assert prompted.input_ids[1] == examples.input_ids[1]  # it has a system turn of its own
    assert prompted.labels[0][-3:] == examples.labels[0][-3:]
    last = _tokenized(processor, tmp_path / "last", assistant_turns="last")
    assert [t for t, y in zip(last.input_ids[1], last.labels[1]) if y != -100] == tokenizer(
        "blue, darker<|im_end|>\n", add_special_tokens=False)["input_ids"]


def _hand_loss(model, processor, rows, folder: Path) -> torch.Tensor:
    """Σ CE over the answer tokens / their count, each conversation on its own (no padding): the answer tokens
    found by searching the tokenized answer text in the conversation's ids."""
    total, count = 0.0, 0
    for row in rows:
        messages, refs = conversation(row, _Data(), "row", folder)
        text = processor.apply_chat_template(messages, tokenize=False)
        images = [Image.open(ref).convert("RGB") for ref in refs] or None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        logits = model(**inputs).logits[0]
        for message in messages:
            if message["role"] != "assistant":
                continue
            answer = processor.tokenizer(message["content"][0]["text"] + "<|im_end|>\n",
                                         add_special_tokens=False)["input_ids"]
            starts = [s for s in range(len(ids)) if ids[s:s + len(answer)] == answer]
            assert len(starts) == 1
            for position in range(starts[0], starts[0] + len(answer)):
                total = total + F.cross_entropy(logits[position - 1], torch.tensor(ids[position]), reduction="sum")
                count += 1
    return total / count


def test_loss_is_the_masked_cross_entropy_on_assistant_tokens(processor, tmp_path):
    model = tiny_model(processor).double()
    examples = _tokenized(processor, tmp_path)
    batch = collate(examples, [0, 1, 2], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 3  # the batch's images, in order
    units = int(sum((batch["labels"][:, 1:] != -100).sum(1)))
    batch["pixel_values"] = batch["pixel_values"].double()
    got = share_of_global_mean(model, batch, units, units, loss_mode(model, causal_lm=True))
    expected = _hand_loss(model, processor, _rows(tmp_path), tmp_path)
    assert abs(got.item() - expected.item()) < 1e-10
    # a padded batch of two in another order: the same per-token losses
    pair = collate(examples, [1, 0], processor.tokenizer.pad_token_id)
    pair["pixel_values"] = pair["pixel_values"].double()
    both = share_of_global_mean(model, pair, 1, 1, "summed")  # the summed CE
    alone = sum(share_of_global_mean(model, collate(examples, [i], processor.tokenizer.pad_token_id) | {
        "pixel_values": collate(examples, [i], processor.tokenizer.pad_token_id)["pixel_values"].double()},
        1, 1, "summed") for i in (0, 1))
    assert abs(both.item() - alone.item()) < 1e-9


def _adapted(model) -> set[str]:
    return set(adapter_layers(model))


def test_adapters_go_on_the_language_model_unless_the_vision_tower_is_asked_for(processor):
    default = peftkit.wrap(tiny_model(processor), "lora", r=2, **adapter_options(tiny_model(processor), {}, False))
    names = _adapted(default)
    assert names and all(".language_model." in n for n in names)
    tower = peftkit.wrap(tiny_model(processor), "lora", r=2, **adapter_options(tiny_model(processor), {}, True))
    names = _adapted(tower)
    assert any(".vision_tower." in n for n in names) and any(".multi_modal_projector." in n for n in names)
    assert any(".language_model." in n for n in names)
    # a user's exclusions are kept with the vision tower's
    mixed = peftkit.wrap(tiny_model(processor), "lora", r=2,
                         **adapter_options(tiny_model(processor), {"exclude": ["down_proj"]}, False))
    names = _adapted(mixed)
    assert names and not any(n.endswith("down_proj") or ".vision_tower." in n for n in names)


def test_the_images_reach_the_loss(processor, tmp_path):
    """Another image changes the loss, and with the vision tower adapted its adapters get a gradient."""
    examples = _tokenized(processor, tmp_path)
    model = peftkit.wrap(tiny_model(processor), "lora", r=2, **adapter_options(tiny_model(processor), {}, True))
    for layer in adapter_layers(model).values():  # B = 0 at init: make the update non-zero so A gets gradient too
        for name, parameter in layer.named_parameters():
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.1)
    batch = collate(examples, [0], processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    tower = {n: p.grad for n, p in model.named_parameters() if ".vision_tower." in n and p.requires_grad}
    assert tower and all(g is not None and g.abs().sum() > 0 for g in tower.values())
    with torch.no_grad():
        other = dict(batch, pixel_values=torch.flip(batch["pixel_values"], dims=[1]))
        assert abs(model(**other).loss.item() - loss.item()) > 1e-6
    default = peftkit.wrap(tiny_model(processor), "lora", r=2, **adapter_options(tiny_model(processor), {}, False))
    assert not any(".vision_tower." in n for n, p in default.named_parameters() if p.requires_grad)


def _tiny_folder(root: Path, processor) -> Path:
    folder = root / "tiny-llava"
    processor.save_pretrained(folder)
    tiny_model(processor).save_pretrained(folder)
    return folder


def test_the_recipe_trains_and_saves_adapter_and_processor(processor, tmp_path):
    """recipes/vision/llava-images.yaml as written (its data, its images), on the tiny model: the saved adapter
    and processor load back and give the run's final eval loss."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _tiny_folder(tmp_path, processor)
    data = REPO / "recipes" / "vision" / "data" / "shapes.jsonl"
    raw = apply_overrides(read_yaml(RECIPE), [
        f"model.name={folder}", f"data.train={data}", f"data.eval={data}", "training.max_steps=2",
        f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false", "optimizer.lr=0.05"])
    result = train(from_dict(raw))
    assert result.status == "done"
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "processor_config.json").is_file()
    loaded_processor = AutoProcessor.from_pretrained(adapter)
    assert type(loaded_processor).__name__ == "LlavaProcessor"
    assert loaded_processor.chat_template == processor.chat_template
    base = AutoModelForImageTextToText.from_pretrained(folder)
    model = peftkit.api.load_model(folder, task="image-text-to-text")
    peftkit.load(model, adapter)
    assert all(".language_model." in n for n in adapter_layers(model))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    loss = _hand_loss(model, loaded_processor, rows, data.parent)
    assert abs(loss.item() - result.eval_metrics["eval_loss"]) < 1e-5
    assert abs(_hand_loss(base, loaded_processor, rows, data.parent).item() - loss.item()) > 1e-4  # it trained


def _recipe(folder: Path, tmp_path: Path, rows: list[dict], **sections) -> dict:
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {"model": {"name": str(folder), "task": "image-text-to-text"},
              "data": {"train": str(train_file), "format": "messages", "max_length": 256},
              "adapter": {"method": "lora", "r": 2},
              "training": {"max_steps": 1, "batch_size": 1, "output_dir": str(tmp_path / "run")},
              "logging": {"progress_bar": False}}
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


@pytest.mark.parametrize("change, message", [
    ({"data": {"format": "sharegpt"}}, "data.format: model.task image-text-to-text"),
    ({"data": {"packing": True}}, "data.packing"),
    ({"model": {"tokenizer": "bytes"}}, "model.tokenizer"),
    ({"training": {"eval_metrics": ["exact_match"]}}, "training.eval_metrics"),
    ({"model": {"task": "causal-lm"}, "adapter": {"vision_tower": True}}, "adapter.vision_tower: needs model.task"),
])
def test_refused_in_the_recipe(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(_recipe(tmp_path, tmp_path, _rows(tmp_path), **change))


def _with_image(part: dict, role: str = "user") -> list[dict]:
    return [{"messages": [{"role": role, "content": [part, {"type": "text", "text": "x"}]},
                          {"role": "assistant", "content": "y"}]}]


@pytest.mark.parametrize("rows, message", [
    (_with_image({"type": "image", "path": "missing.png"}), "image file not found"),
    (_with_image({"type": "image", "url": "https://example.com/a.png"}), "is a URL and this machine is offline"),
    (_with_image({"type": "image"}), "needs exactly one of"),
    ([{"messages": [{"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "image", "path": "a.png"}]}]}],
                    "an image in an assistant turn"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], "no assistant turn"),
])
def test_bad_rows_are_refused_before_step_1(rows, message, processor, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = _tiny_folder(tmp_path, processor)
    _image(tmp_path, "a.png", (1, 2, 3))
    with pytest.raises(ConfigError, match=message) as caught:
        train(from_dict(_recipe(folder, tmp_path, rows)))
    assert "row 0" in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_overlong_conversation_is_refused_or_dropped(processor, tmp_path):
    with pytest.raises(ConfigError, match="data.max_length: data.train row 1 has .* tokens .*overlong=drop"):
        _tokenized(processor, tmp_path, max_length=40)
    examples = _tokenized(processor, tmp_path / "drop", max_length=40, overlong="drop")
    assert len(examples) == 2 and examples.stats == {"dropped": 1}


def test_several_processes_are_refused_before_anything_is_built(tmp_path):
    """Vision runs are untested on several processes: prepare refuses them before loading or writing anything."""
    from types import SimpleNamespace

    from peftkit.train.run_setup import prepare

    recipe = from_dict(_recipe(tmp_path, tmp_path, _rows(tmp_path)))
    with pytest.raises(ConfigError, match="model.task: image-text-to-text runs on one process"):
        prepare(recipe, SimpleNamespace(num_processes=2))
    assert not (tmp_path / "run").exists()
