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

from deployments.backends.base import EncodedText
from deployments.errors import input_too_long

# The features a model may take, and the column of ``tokenizers.Encoding`` each one is.
_COLUMNS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class DirectTokenizer:
    """``prompt + text`` to token ids truncated at ``max_seq_length`` (or, with truncation off, at one more
    token, so an over-long input is told apart and refused)."""

    def __init__(self, tokenizer_json: str, feature_names: list[str], max_seq_length: int):
        unknown = set(feature_names) - set(_COLUMNS)
        if "input_ids" not in feature_names or "attention_mask" not in feature_names or unknown:
            raise ValueError(
                f"model inputs {feature_names} are not input_ids + attention_mask [+ token_type_ids]"
            )
        self.tokenizer_json = tokenizer_json
        self.feature_names = list(feature_names)
        self.max_seq_length = max_seq_length
        self._truncating = self._copy(max_seq_length)
        self._one_more = self._copy(max_seq_length + 1)

    def _copy(self, max_length: int) -> Tokenizer:
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        return tokenizer

    def encode(
        self, texts: list[str], prompt: str, truncate: bool = True, first_index: int = 0, check: bool = True
    ) -> list[EncodedText]:
        """One ``EncodedText`` (int64 numpy features, real length) per text; with ``truncate=False`` and
        ``check``, an input past ``max_seq_length`` raises ``input_too_long`` naming its index."""
        tokenizer = self._truncating if truncate else self._one_more
        items = []
        for i, encoding in enumerate(tokenizer.encode_batch([prompt + t for t in texts])):
            n = len(encoding.ids)
            if check and not truncate and n > self.max_seq_length:
                raise input_too_long(first_index + i, n, self.max_seq_length)
            features = {
                name: np.array(getattr(encoding, _COLUMNS[name]), dtype=np.int64)
                for name in self.feature_names
            }
            items.append(EncodedText(features, n))
        return items
