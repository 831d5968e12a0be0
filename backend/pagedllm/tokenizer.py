"""The checkpoint's tokenizer, and the one way pagedllm turns a chat into prompt token ids (the tokenizer's
chat template with the generation prompt appended), used by the embed model, the client and the OpenAI API."""
from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path):
    """transformers' AutoTokenizer for the checkpoint, or None when it ships no tokenizer."""
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def max_token_chars(tokenizer) -> int:
    """The most characters of text one token can stand for (its longest entry, special tokens included):
    a text longer than this times a token budget cannot fit in that budget."""
    vocab = tokenizer.get_vocab()
    return max(1, max((len(t) for t in vocab), default=1))


def text_token_ids(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text)["input_ids"]]


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                   input_name: str = "messages") -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": ...}]) in the tokenizer's chat template. Raises
    InvalidRequest, naming the input that asked for the template, when the checkpoint has none or the template
    refuses the messages (its `raise_exception("roles must alternate ...")`, or a message it cannot render)."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"{input_name}: this checkpoint's tokenizer has no chat template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except TemplateSyntaxError:
        raise  # the checkpoint's fault, whatever the messages
    except TemplateError as e:
        raise InvalidRequest(f"{input_name}: the chat template refused them: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def prompt_token_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text`; with chat, of a one-message user turn ready for the assistant's answer."""
    if chat:
        return chat_token_ids(tokenizer, [{"role": "user", "content": text}], input_name="apply_chat_template")
    return text_token_ids(tokenizer, text)
