"""What a client may put in a request, checked where it enters (the gateway) and again where it
is used (the LM service): prompt length and content, ids, adapter names, offline options.

A prompt that holds a special token of the model's chat template (``<|im_start|>``,
``<|AUDIO|>``, ``<|endoftext|>``...) is refused: it would change the conversation the model sees
or the number of audio spans (which fails every batch it shares).
"""

from __future__ import annotations

import re

from services import constants
from services.errors import InvalidArgument
from services.pb.midasheng.v1 import captions_pb2

SPECIAL_TOKEN = re.compile(r"<\|[^\s<>|]{1,64}\|>")  # <|im_start|>, <|AUDIO|>, <|audio_bos|>, ...
ADAPTER_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{constants.MAX_ADAPTER_CHARS - 1}}}$")


def check_prompt(prompt: str, max_chars: int, what: str = "prompt") -> None:
    if len(prompt) > max_chars:
        raise InvalidArgument(f"{what} is longer than {max_chars} characters")
    m = SPECIAL_TOKEN.search(prompt)
    if m:
        raise InvalidArgument(f"{what} may not contain the model's special tokens (found {m.group(0)!r})")
    if "\x00" in prompt:
        raise InvalidArgument(f"{what} may not contain NUL characters")


def check_adapter_name(name: str) -> None:
    """Adapter names are plain names (letters, digits, '.', '_', '-'; no path, no '..')."""
    if name and (not ADAPTER_NAME.match(name) or ".." in name):
        raise InvalidArgument(
            f"adapter names are 1 to {constants.MAX_ADAPTER_CHARS} letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, no '..')"
        )


def check_caption_request(req: captions_pb2.CaptionRequest) -> None:
    """The documented limits of one offline clip request (captions.proto CaptionRequest), before
    any audio is decoded."""
    check_prompt(req.prompt, constants.MAX_OFFLINE_PROMPT_CHARS)
    if len(req.request_id) > constants.MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {constants.MAX_REQUEST_ID_CHARS} characters")
    check_adapter_name(req.adapter)
    opts = req.options
    if opts.max_new_tokens > constants.MAX_OFFLINE_NEW_TOKENS:
        raise InvalidArgument(f"max_new_tokens is above the limit of {constants.MAX_OFFLINE_NEW_TOKENS}")
    if not 0.0 <= opts.temperature <= 2.0:
        raise InvalidArgument(f"temperature must be within [0, 2], got {opts.temperature}")
    if not 0.0 <= opts.top_p <= 1.0:
        raise InvalidArgument(f"top_p must be within [0, 1], got {opts.top_p}")
    which = req.WhichOneof("audio")
    if which is None:
        raise InvalidArgument("CaptionRequest needs encoded_audio or raw_audio")
    if which == "encoded_audio" and not req.encoded_audio:
        raise InvalidArgument("encoded_audio is empty")


def check_batch_size(n: int) -> None:
    if n > constants.MAX_BATCH_ITEMS:
        raise InvalidArgument(f"a batch holds at most {constants.MAX_BATCH_ITEMS} items, got {n}")
