"""GPT-2 hyperparameters: the size table and the config dataclass shared by export and runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024  # context length: positions 0..1023
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self) -> int:
        """Parameter count with the LM head tied to wte (as published)."""
        C, L = self.n_embd, self.n_layer
        per_block = 4 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return self.vocab_size * C + self.n_positions * C + L * per_block + 2 * C


# Exact names only (no fuzzy matching); the hub ids map onto these.
SIZES: dict[str, GPT2Config] = {
    "distilgpt2": GPT2Config(n_layer=6, n_head=12, n_embd=768),     # 82M
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}

HUB_IDS: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


def canonical_size_name(name: str) -> str | None:
    """'openai-community/gpt2-xl' -> 'gpt2-xl'; unknown names -> None. Exact names, in any case, as the
    Hugging Face hub resolves them ('GPT2', 'OpenAI-Community/GPT2-XL')."""
    key = name.casefold()
    for short, hub in HUB_IDS.items():
        if key in (short, hub.casefold()):
            return short
    return None
