"""Chat data: rows of every chat-like format become one conversation (a list of ``{role, content}`` turns),
rendered with a chat template and labelled on the assistant turns only.

Formats (``data.format``) and the columns they read (every column name is a recipe key):
- ``messages``: ``data.conversation_column`` (default ``messages``) holds a list of ``{role, content}`` turns,
  roles system / user / assistant / tool (OpenAI and Hugging Face chat format);
- ``sharegpt``: the column (default ``conversations``) holds ``{from, value}`` turns, ``from`` one of
  human / gpt / system / tool (and their common aliases);
- ``alpaca``: ``instruction``, an optional ``input`` (appended to the instruction after a blank line) and
  ``output``;
- ``instruction``: one prompt/response pair;
- ``preference``: ``prompt``, ``chosen``, ``rejected`` (``data.prompt_column``, ``data.chosen_column``,
  ``data.rejected_column``), each a string or a list of turns; the completions are labelled (DPO, SimPO).

Labels come from the rendered text, not from re-tokenizing pieces: the full conversation is rendered once,
tokenized once with character offsets, and a token is labelled when it starts inside an assistant span. An
assistant span is the text that rendering ``turns[:i + 1]`` adds to rendering ``turns[:i]`` with the
generation prompt, so it holds the answer and the template's end-of-turn marker, never the role header.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError

IGNORE_INDEX = -100
CONVERSATION_FORMATS = ("messages", "sharegpt")
SINGLE_TURN_FORMATS = ("instruction", "alpaca")
CHAT_FORMATS = CONVERSATION_FORMATS + SINGLE_TURN_FORMATS
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_response": "tool"}
DEFAULT_KEYS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
SENTINEL = "\u2063peftkit-answer\u2063"  # an invisible separator: never in real data, survives every template

# Built-in templates, chosen by name with ``data.chat_template``. Written for peftkit; each renders tools (when
# a row has them) as a JSON system preamble, and ends every turn with a marker the model learns to emit.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{%- if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "zephyr": (
        "{%- if tools %}{{ '<|system|>\\nTools: ' + (tools | tojson) + eos_token + '\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nTools: ' + (tools | tojson) "
        "+ '<|eot_id|>' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
}
TOKENIZER_TEMPLATE = "tokenizer"
FALLBACK_TEMPLATE = "chatml"  # conversation formats on a tokenizer without a template


def resolve_template(tokenizer, data) -> str | None:
    """The Jinja template the data is rendered with, or None for the plain single-turn layout
    (``prompt\\n`` + ``response`` + EOS) that instruction/alpaca data gets on a tokenizer without a template.

    ``data.chat_template``: null or ``tokenizer`` (the tokenizer's own), a built-in name
    (``chatml``, ``zephyr``, ``llama3``) or a Jinja string."""
    choice = data.chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # a tokenizer with several named templates: its default one
        own = own.get("default")
    if choice in (None, TOKENIZER_TEMPLATE):
        if own:
            return own
        if choice == TOKENIZER_TEMPLATE:
            raise ConfigError("data.chat_template: 'tokenizer' was asked for, but the tokenizer has no chat "
                              f"template; name a built-in ({', '.join(BUILTIN_TEMPLATES)}) or give a Jinja string")
        return BUILTIN_TEMPLATES[FALLBACK_TEMPLATE] if data.format in CONVERSATION_FORMATS else None
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    if "{{" in choice or "{%" in choice:
        return choice
    raise ConfigError(f"data.chat_template: '{choice}' is neither a built-in template "
                      f"({', '.join(BUILTIN_TEMPLATES)}), "
                      "'tokenizer', nor a Jinja string (it has no '{{' or '{%')")


def required_columns(data) -> dict[str, str]:
    """Column -> the recipe key naming it, for the chat formats."""
    if data.format == "instruction":
        return {data.prompt_column: "data.prompt_column", data.response_column: "data.response_column"}
    if data.format == "alpaca":
        return {data.instruction_column: "data.instruction_column", data.output_column: "data.output_column"}
    if data.format == "preference":
        return {data.prompt_column: "data.prompt_column", data.chosen_column: "data.chosen_column",
                data.rejected_column: "data.rejected_column"}
    columns = {conversation_keys(data)[0]: "data.conversation_column"}
    if data.tools_column:
        columns[data.tools_column] = "data.tools_column"
    return columns


def conversation_keys(data) -> tuple[str, str, str]:
    """(column, role key, content key) of a conversation format, recipe keys over the format's defaults."""
    column, role, content = DEFAULT_KEYS[data.format]
    return data.conversation_column or column, data.role_key or role, data.content_key or content


def row_error(where: str, index: int, field: str, problem: str) -> ConfigError:
    """A bad row's error: names the file, the row (counted from 1, as the lines of a JSONL file) and the field.
    A plain ConfigError, so it survives the pickling that ``datasets.map(num_proc=...)`` workers do."""
    return ConfigError(f"{where}: row {index + 1}, field '{field}': {problem}")


def conversation(row: dict[str, Any], data, where: str, index: int) -> tuple[list[dict[str, str]], Any]:
    """One row as (turns, tools). Checks every turn; a bad one is an error naming file, row and field."""
    tools = None
    if data.format == "instruction":
        turns = [{"role": "user", "content": _text(row, data.prompt_column, where, index)},
                 {"role": "assistant", "content": _text(row, data.response_column, where, index)}]
    elif data.format == "alpaca":
        prompt = _text(row, data.instruction_column, where, index)
        extra = row.get(data.input_column) if data.input_column else None
        extra = _text(row, data.input_column, where, index) if extra is not None else None
        if extra is not None and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        turns = [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(row, data.output_column, where, index)}]
    else:
        column, role_key, content_key = conversation_keys(data)
        aliases = SHAREGPT_ROLES if data.format == "sharegpt" else {r: r for r in ROLES}
        turns = parse_turns(row.get(column), column, role_key, content_key, aliases, where, index)
        if data.tools_column:
            tools = row.get(data.tools_column)
            if isinstance(tools, str):
                try:
                    tools = json.loads(tools) if tools.strip() else None
                except json.JSONDecodeError:
                    raise row_error(where, index, data.tools_column,
                                    "expected a list of tool schemas or its JSON") from None
    if data.system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": data.system_prompt})
    if not any(t["role"] == "assistant" for t in turns):
        field = conversation_keys(data)[0] if data.format in CONVERSATION_FORMATS else "assistant"
        raise row_error(where, index, field, "the conversation has no assistant turn, so there is nothing to train "
                       "on; drop the row or add the answer")
    return turns, tools


def parse_turns(raw: Any, column: str, role_key: str, content_key: str, aliases: dict[str, str], where: str,
                index: int) -> list[dict[str, str]]:
    """A column's list of turns (or its JSON) as ``{role, content}`` dicts; a bad turn is an error naming the row
    and the field (``column[t].key``)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise row_error(where, index, column, "expected a list of turns (or its JSON), got a string that is "
                           "not JSON") from None
    if not isinstance(raw, list):
        raise row_error(where, index, column, f"expected a list of turns, got {type(raw).__name__}")
    if not raw:
        raise row_error(where, index, column, "the conversation is empty; drop the row or give it turns")
    turns = []
    for t, turn in enumerate(raw):
        field = f"{column}[{t}]"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise row_error(where, index, field, f"expected a mapping with '{role_key}' and '{content_key}', got "
                           f"{keys} (set data.role_key / data.content_key if your keys differ)")
        role = aliases.get(str(turn[role_key]).lower())
        if role is None:
            raise row_error(where, index, f"{field}.{role_key}", f"unknown role {turn[role_key]!r}; expected one "
                           f"of {sorted(aliases)}")
        content = turn[content_key]
        if content is None or not isinstance(content, (str, int, float)):
            raise row_error(where, index, f"{field}.{content_key}", f"expected text, got {content!r}")
        turns.append({"role": role, "content": str(content)})
    return turns


def preference_turns(row: dict[str, Any], data, where: str, index: int
                     ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]], bool]:
    """A preference row as (prompt turns, chosen turns, rejected turns, all three were plain strings). Each field
    is a string (the prompt a user turn, a completion an assistant turn) or a list of ``{role, content}`` turns
    (keys ``data.role_key`` / ``data.content_key``, default role / content); the completions must hold an
    assistant turn and no system turn. A bad field is one error naming the row and the field."""
    role_key, content_key = data.role_key or "role", data.content_key or "content"
    aliases = {r: r for r in ROLES}
    parts, plain = [], True
    for column, role in ((data.prompt_column, "user"), (data.chosen_column, "assistant"),
                         (data.rejected_column, "assistant")):
        value = row.get(column)
        if isinstance(value, list):
            plain = False
            parts.append(parse_turns(value, column, role_key, content_key, aliases, where, index))
        else:
            parts.append([{"role": role, "content": _text(row, column, where, index)}])
    prompt, chosen, rejected = parts
    if data.system_prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": data.system_prompt})
    for column, turns in ((data.chosen_column, chosen), (data.rejected_column, rejected)):
        if not any(t["role"] == "assistant" for t in turns):
            raise row_error(where, index, column, "the completion has no assistant turn, so there is nothing to "
                            "compare; give the answer as text or as an assistant turn")
        if any(t["role"] == "system" for t in turns):
            raise row_error(where, index, column, "a completion cannot hold a system turn; move it to "
                            f"'{data.prompt_column}'")
    return prompt, chosen, rejected, plain


def _text(row: dict[str, Any], column: str, where: str, index: int) -> str:
    value = row.get(column)
    if value is None:
        raise row_error(where, index, column, "is null; expected text")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        # A list or mapping would be trained as its Python repr ("['a', 'b']"), a boolean as "True".
        shown = type(value).__name__ if not isinstance(value, bool) else "a boolean"
        raise row_error(where, index, column, f"is {shown}, expected text (a string); join or pick the text in "
                        "the data file")
    return str(value)


def render(template: str, tokenizer, turns: list[dict[str, str]], tools: Any, where: str, index: int,
           generation_prompt: bool = False) -> str:
    """The template applied to ``turns``; any failure is an error naming the row."""
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, tools=tools or None, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise row_error(where, index, "data.chat_template", "the template failed to render this conversation "
                       f"({type(exc).__name__}: {text[0] if text else ''}); fix the template or the row") from None


def assistant_spans(template: str, tokenizer, turns, tools, where: str, index: int,
                    last_only: bool) -> tuple[str, list[tuple[int, int]], str]:
    """(full text, character spans of the labelled assistant turns, the last assistant answer)."""
    full = render(template, tokenizer, turns, tools, where, index)
    positions = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if last_only:
        positions = positions[-1:]
    spans = []
    for i in positions:
        prefix = render(template, tokenizer, turns[:i], tools, where, index, generation_prompt=True)
        through = full if i == len(turns) - 1 else render(template, tokenizer, turns[: i + 1], tools, where, index)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise row_error(where, index, "data.chat_template", f"the template does not render the conversation up to "
                           f"turn {i} as a prefix of the whole conversation, so the assistant tokens cannot be "
                           "isolated; use another template (data.chat_template)")
        spans.append((len(prefix), len(through)))
    return full, spans, turns[positions[-1]]["content"]


def stop_strings(template: str | None, tokenizer) -> list[str]:
    """What the template writes after an answer (its end-of-turn marker, stripped): generation stops there."""
    if template is None:
        return []
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
    except Exception:
        return []
    tail = text.split(SENTINEL, 1)[-1].strip() if SENTINEL in text else ""
    return [tail] if tail else []
