"""Vision-language models (``model.task: image-text-to-text``): conversations with images, through the model's own
processor.

A row of ``data.format: messages`` holds turns whose ``content`` is a string or a list of parts: ``{"type": "text",
"text": ...}`` and ``{"type": "image", "path": ...}`` (also ``"image"`` or ``"url"`` as the field). A local path is
read relative to the data file's folder; a URL is fetched when the machine is online (``HF_HUB_OFFLINE=1`` refuses
it before step 1, with the row named). Images may appear in system and user turns, not in assistant turns.

Tokenizing: the processor renders the conversation with its chat template (an image part becomes the model's image
token), and the processor's own call expands each image token into the image's feature positions. The labels are
the tokens an assistant turn adds: the conversation up to turn ``i`` with the generation prompt, and up to turn
``i + 1``, are tokenized with their images; the positions between the two lengths are labelled (the answer and the
template's end-of-turn marker), every other position, image tokens included, is -100. The images are read again
for each batch (``collate``): only their paths are held with the tokenized examples.

Adapters (``adapter.vision_tower``): by default the language model's linear layers only (the vision tower and the
projector between it and the language model stay frozen, as LLaVA-style fine-tuning does); ``vision_tower: true``
adapts the vision tower's and the projector's linear layers too.

Family: LLaVA (``LlavaForConditionalGeneration`` and its processor, whose pixel values are one fixed-size
tensor per image); tested on a tiny config with a processor built from local parts (:func:`tiny_processor`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .batches import collate as collate_text
from .chat import IGNORE_INDEX
from .examples import Examples, Tokenized
from .recipe import VISION_TASK

IMAGE_FIELDS = ("path", "image", "url")
# The modules of a LLaVA-style model outside its language model: excluded from "all-linear" unless
# adapter.vision_tower is true.
VISION_MODULES = ("vision_tower", "multi_modal_projector")


# ------------------------------------------------------------------------------------------ processor
class ProcessorTokenizer:
    """The processor's tokenizer, standing in for the tokenizer everywhere the loop uses one, except that
    ``save_pretrained`` writes the whole processor (tokenizer, image processor, chat template), so an adapter
    folder or checkpoint loads back with ``AutoProcessor.from_pretrained``."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def save_pretrained(self, directory, **kwargs):
        return self.processor.save_pretrained(directory, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("processor", "tokenizer"):  # not set yet (a copy or unpickling): no recursion through here
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("processor", "tokenizer"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)


def load_processor(name: str) -> ProcessorTokenizer:
    """The processor saved with the model (``AutoProcessor``), local files first: no download for a folder."""
    from transformers import AutoProcessor

    from ..resolve import resolve_model_ref

    path = resolve_model_ref(name)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:
        raise ConfigError(f"model.name: could not load a processor from '{name}' ({_first_line(exc)}); model.task "
                          f"{VISION_TASK} needs the model's processor (processor_config.json, tokenizer and image "
                          "processor files) in that folder or hub repository") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ConfigError(f"model.name: '{name}' has a {type(processor).__name__}, not a processor with a tokenizer "
                          f"and an image processor; model.task {VISION_TASK} needs a vision-language model")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return ProcessorTokenizer(processor)


def tiny_processor(image_size: int = 16, patch_size: int = 8):
    """A LLaVA processor built from local parts (peftkit's byte tokenizer with the image and turn tokens, a CLIP
    image processor resizing to ``image_size`` pixels, a ChatML-style template that renders image parts as
    ``<image>``): offline tests and examples. ``image_size / patch_size`` squared image tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from .demo_data import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}"
                "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=template,
                          num_additional_image_tokens=1)


def tiny_model(processor, image_size: int = 16, patch_size: int = 8, hidden: int = 16, seed: int = 0):
    """A randomly initialised LLaVA (one-layer CLIP vision tower, one-layer Llama) for ``processor``
    (:func:`tiny_processor`)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------ conversations
@dataclass
class VisionTokenized(Tokenized):
    """Tokenized conversations with images: ``images`` holds, per example, its image references (absolute paths or
    URLs) in the order of its image tokens; ``processor`` turns them into pixel values at each batch."""

    images: list = field(default_factory=list)
    processor: Any = None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def conversation(row: dict, data, where: str, base_dir: Path) -> tuple[list[dict], list[str]]:
    """One row as (turns whose content is a list of text/image parts, image references in order). Image parts
    keep only ``{"type": "image"}``: the template renders the image token from it."""
    column = data.conversation_column or "messages"
    role_key, content_key = data.role_key or "role", data.content_key or "content"
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: expected '{column}' to be a non-empty list of turns (data.conversation_column)")
    messages, images = [], []
    for t, turn in enumerate(turns):
        at = f"{where} turn {t}"
        if not isinstance(turn, dict):
            raise ConfigError(f"{at}: expected a {{{role_key}, {content_key}}} mapping")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ("system", "user", "assistant"):
            raise ConfigError(f"{at}: '{role_key}' is {role!r}; expected system, user or assistant")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise ConfigError(f"{at}: '{content_key}' must be a string or a non-empty list of text and image parts")
        parts = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                if role == "assistant":
                    raise ConfigError(f"{at} part {p}: an image in an assistant turn; images belong in user or "
                                      "system turns (the loss is on the assistant's text)")
                refs = [part.get(key) for key in IMAGE_FIELDS if isinstance(part.get(key), str) and part.get(key)]
                if len(refs) != 1:
                    raise ConfigError(f"{at} part {p}: an image part needs exactly one of {list(IMAGE_FIELDS)} "
                                      "(a local path, relative to the data file, or a URL)")
                images.append(_reference(refs[0], base_dir, f"{at} part {p}"))
                parts.append({"type": "image"})
            else:
                raise ConfigError(f"{at} part {p}: expected {{type: text, text: ...}} or {{type: image, path: ...}}, "
                                  f"got {str(part)[:120]}")
        messages.append({"role": role, "content": parts})
    if getattr(data, "system_prompt", None) and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": data.system_prompt}]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: no assistant turn: nothing to learn from")
    return messages, images


def _is_url(ref: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref) is not None


def _reference(ref: str, base_dir: Path, where: str) -> str:
    """A local image as an absolute path (checked to exist now, not at its batch); a URL as given, refused
    when the hub is offline."""
    if _is_url(ref):
        if ref.startswith("file://"):
            ref = ref[len("file://"):]
        else:
            from huggingface_hub.constants import HF_HUB_OFFLINE

            if HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
                raise ConfigError(f"{where}: the image '{ref}' is a URL and this machine is offline (HF_HUB_OFFLINE); "
                                  "download it and give its local path")
            return ref
    path = (base_dir / Path(ref).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: image file not found: {path}; paths are relative to the data file's folder")
    return str(path)


def load_image(ref: str):
    """The image at a local path or URL, as RGB (``transformers.image_utils.load_image``)."""
    from transformers.image_utils import load_image as load

    try:
        return load(ref).convert("RGB")
    except Exception as exc:
        raise ConfigError(f"data: could not read the image '{ref}' ({_first_line(exc)}); check the file or URL, or "
                          "give a local path") from None


def _ids(processor, messages: list[dict], images: list, generation_prompt: bool) -> list[int]:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    out = processor(text=[text], images=images or None, return_tensors=None)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def encode_conversation(processor, messages: list[dict], images: list, assistant_turns: str = "all"
                        ) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt length) of one conversation: labels are the ids on the tokens the assistant turns
    add, -100 elsewhere (image tokens included). ``images``: PIL images in the order of the image parts."""
    full = _ids(processor, messages, images, False)
    labels = [IGNORE_INDEX] * len(full)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant_turns == "last":
        answers = answers[-1:]
    prompt_length = 0
    for i in answers:
        before = sum(1 for m in messages[:i] for part in m["content"] if part["type"] == "image")
        start = len(_ids(processor, messages[:i], images[:before], True))
        prefix = _ids(processor, messages[:i + 1], images[:before], False)
        end = len(prefix)
        if prefix != full[:end] or start > end:
            raise ConfigError("data: the processor's chat template renders a conversation's beginning differently "
                              "from the whole conversation, so the assistant turns cannot be located; use a "
                              "template that renders turns one after another")
        labels[start:end] = full[start:end]
        prompt_length = start
    return full, labels, prompt_length


def tokenize(rows, processor, data, *, key: str, base_dir: Path) -> VisionTokenized:
    """Every row as (input_ids, labels, image references). Overlong conversations (over ``data.max_length``) are
    dropped with ``data.overlong: drop`` and refused otherwise: cutting one would cut its image tokens."""
    ids_column, labels_column, images_column, prompts = [], [], [], []
    dropped = 0
    for r, row in enumerate(rows):
        where = f"{key} row {r}"
        messages, refs = conversation(row, data, where, base_dir)
        ids, labels, prompt_length = encode_conversation(processor, messages, [load_image(ref) for ref in refs],
                                                         data.assistant_turns)
        if len(ids) > data.max_length:
            if data.overlong == "drop":
                dropped += 1
                continue
            raise ConfigError(f"data.max_length: {where} has {len(ids)} tokens (its image tokens included), more "
                              f"than {data.max_length}; raise data.max_length or set data.overlong=drop (a "
                              "conversation with images is never cut)")
        ids_column.append(ids)
        labels_column.append(labels)
        images_column.append(refs)
        prompts.append(prompt_length)
    if not ids_column:
        raise ConfigError(f"data.max_length: every conversation of {key} is longer than {data.max_length} tokens")
    stats = {"dropped": dropped} if dropped else {}
    return VisionTokenized(ids_column, labels_column, prompt_lengths=prompts, stats=stats, images=images_column,
                           processor=processor)


def load_examples(recipe, tokenizer: ProcessorTokenizer):
    """data.train and data.eval of a vision recipe, as ``build.Examples``."""
    from .rows import as_list, head, read_rows

    data = recipe.data
    splits = []
    for key, spec, split, cap in (("data.train", data.train, data.train_split, data.max_train_samples),
                                  ("data.eval", data.eval, data.eval_split, data.max_eval_samples)):
        if spec is None:
            splits.append(None)
            continue
        rows = read_rows(spec, split, data, key)
        rows = head(rows, cap)
        base_dir = Path(spec).expanduser().resolve().parent if Path(spec).expanduser().is_file() else Path.cwd()
        splits.append(tokenize(as_list(rows), tokenizer.processor, data, key=f"{key} {spec}", base_dir=base_dir))
    return Examples(splits[0], splits[1])


# ------------------------------------------------------------------------------------------ batches
def pixel_inputs(examples: VisionTokenized, indices: list[int]) -> dict[str, torch.Tensor]:
    """The image processor's inputs for the images of ``examples[indices]``, in batch order (the order the model
    fills the image tokens in); no key when no example has an image."""
    refs = [ref for i in indices for ref in examples.images[i]]
    if not refs:
        return {}
    out = examples.processor.image_processor([load_image(ref) for ref in refs], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def collate(examples: Tokenized, indices: list[int], pad_id: int, classification: bool = False,
            padding_free: bool = False) -> dict[str, torch.Tensor]:
    """``data.collate``, plus the pixel values of the examples' images when ``examples`` are VisionTokenized
    (those batches are padded, never padding-free: each example keeps its own row)."""
    if not isinstance(examples, VisionTokenized):
        return collate_text(examples, indices, pad_id, classification, padding_free)
    batch = collate_text(examples, indices, pad_id, classification, False)
    batch.update(pixel_inputs(examples, indices))
    return batch


# ------------------------------------------------------------------------------------------ adapters
def vision_module_names(model: torch.nn.Module) -> list[str]:
    """Dotted names of the model's vision tower and projector (the modules the language model is fed by)."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_MODULES]


def adapter_options(model: torch.nn.Module, options: dict[str, Any], vision_tower: bool) -> dict[str, Any]:
    """``peftkit.wrap`` options for a vision-language model: unless ``vision_tower``, the vision tower and the
    projector are added to ``exclude`` (a regex over dotted module names; a user's list or regex is kept in it)."""
    if vision_tower:
        return dict(options)
    names = vision_module_names(model)
    if not names:
        raise ConfigError(f"model.task: {type(model).__name__} has no module named {' or '.join(VISION_MODULES)}; "
                          f"model.task {VISION_TASK} supports LLaVA-style models")
    parts = [re.escape(name) + r"(?:\..*)?" for name in names]
    given = options.get("exclude")
    if isinstance(given, str):
        parts.append(f"(?:{given})")
    elif given:
        parts += [r"(?:.*\.)?" + re.escape(entry) for entry in given]
    return {**options, "exclude": "|".join(parts)}


def describe(recipe) -> str:
    """The banner's note on where the adapters go."""
    return ("adapters on the language model, the vision tower and the projector" if recipe.adapter.vision_tower
            else "adapters on the language model (vision tower frozen)")


__all__ = ["VISION_TASK", "ProcessorTokenizer", "VisionTokenized", "adapter_options", "collate", "conversation",
           "encode_conversation", "load_image", "load_processor", "pixel_inputs", "tiny_model", "tiny_processor",
           "tokenize"]
