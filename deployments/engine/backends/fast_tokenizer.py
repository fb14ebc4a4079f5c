"""A model's fast tokenizer called directly (the ``tokenizers`` library, no torch, no transformers).

sentence-transformers' ``preprocess`` wraps the same Rust tokenizer in per-request work that costs several
times the tokenisation of a short text (120 us against 19 us for one entity name). ``DirectTokenizer`` is
built from the tokenizer's own serialised form (``backend_tokenizer.to_str()``, with the model's settings
already applied by transformers), so it can be kept with a compiled model and loaded without either
library. Whether it gives exactly ``preprocess``'s ids is checked where the model is loaded
(``SentenceTransformersBackend``); it is used only where it does.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from deployments.engine.backends.base import EncodedText

# The features a model may take, and the column of ``tokenizers.Encoding`` each one is.
_COLUMNS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class DirectTokenizer:
    """``prompt + text`` to token ids truncated at a given length (``max_seq_length`` unless told)."""

    def __init__(self, tokenizer_json: str, feature_names: list[str], max_seq_length: int):
        unknown = set(feature_names) - set(_COLUMNS)
        if "input_ids" not in feature_names or "attention_mask" not in feature_names or unknown:
            raise ValueError(
                f"model inputs {feature_names} are not input_ids + attention_mask [+ token_type_ids]"
            )
        self.tokenizer_json = tokenizer_json
        self.feature_names = list(feature_names)
        self.max_seq_length = max_seq_length
        self._by_length: dict[int, Tokenizer] = {}  # one per truncation length (the engine uses two)

    def _truncating_at(self, max_length: int) -> Tokenizer:
        tokenizer = self._by_length.get(max_length)
        if tokenizer is None:
            tokenizer = Tokenizer.from_str(self.tokenizer_json)
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length)
            self._by_length[max_length] = tokenizer
        return tokenizer

    def encode(self, texts: list[str], prompt: str, max_length: int | None = None) -> list[EncodedText]:
        """One ``EncodedText`` (int64 numpy features, real length) per text."""
        tokenizer = self._truncating_at(max_length or self.max_seq_length)
        items = []
        for encoding in tokenizer.encode_batch([prompt + t for t in texts]):
            n = len(encoding.ids)
            features = {
                name: np.array(getattr(encoding, _COLUMNS[name]), dtype=np.int64)
                for name in self.feature_names
            }
            items.append(EncodedText(features, n))
        return items
