"""Request bodies, validated strictly: a wrong type is a 400 naming the field, never a coercion or a 500.

Defaults are OpenAI's (a client that sends only a prompt gets what OpenAI would do): max_tokens 16,
temperature 1, top_p 1, n 1, no penalties. The engine's extensions default to "off" so they change
nothing unless asked for: top_k 0 (disabled; the engine's own default is 40, the server's is OpenAI's
"sample from the whole distribution"), repetition_penalty 1, ignore_eos false, min_tokens 0, no stop_token_ids.

Unknown fields are refused (OpenAI: "Unrecognized request argument supplied"), so that a typo such as
`max_new_tokens` is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from server.errors import bad_request, from_validation

# Stop sequences: OpenAI allows 4, vLLM any number; lm-eval's code tasks send 6. Each is bounded because the
# engine holds streamed text back by the longest stop string less one character (a prefix of one must not go
# out before it is known not to be one) and searches every new piece of text for each: 16 x 256 characters
# keep that hold-back under 256 characters (~60 tokens) and the search per token to a few KB, while clients'
# real stops are far shorter (lm-eval: "\n\n", "Question:", "\nclass", "\ndef", "\n#", "\nif", "\nprint").
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 5      # OpenAI's legacy completions: logprobs 0..5
MAX_N = 128           # OpenAI: n <= 128
DEFAULT_PROMPT = "<|endoftext|>"   # OpenAI's default: generate as if from the start of a new document


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class CompletionRequest(_Strict):
    model: str | None = None                 # optional: the served model when absent
    prompt: Any = DEFAULT_PROMPT             # str | list[str] | list[int] | list[list[int]] (checked below)
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None                         # str | list[str] (checked below)
    seed: int | None = None
    logprobs: int | None = None
    echo: bool | None = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    suffix: str | None = None                # refused unless empty
    best_of: int | None = None               # refused unless equal to n
    # engine extensions (vLLM spells them the same way)
    top_k: int | None = 0
    repetition_penalty: float | None = 1.0
    ignore_eos: bool | None = False          # go on past <|endoftext|> (fixed output lengths: aiperf's advice)
    min_tokens: int | None = 0               # no eos, stop token or stop string before this many tokens
    stop_token_ids: list[int] | None = None  # end when one is sampled (finish "stop"; not in the text)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(p, str) for p in v):
                return v
            if all(_is_int(t) for t in v):
                return v
            if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in v):
                return v
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters, stop[{i}] has "
                                 f"{len(s)}")
        return stops


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True          # accepted for vLLM compatibility; GPT-2 adds none
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse(model: type[BaseModel], body: bytes):
    """Validate a JSON body into `model`; every problem (bad JSON, wrong type, unknown field) is a 400."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object", None, "invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False)) from None
