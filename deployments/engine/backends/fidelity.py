"""The fidelity gate: a fast path serves only if it gives the exact path's vectors.

At load, a replica embeds a probe set with the configured fast path (bf16 autocast or OpenVINO on a CPU,
half-precision weights on a GPU) and with torch
float32, the reference that ``SentenceTransformer.encode`` computes. The promise is per served vector, so
the probes must look like what the pipeline sends, in number and variety: seven fixed probes that break
a compiled or low-precision pass (a one-word text, an empty one, unicode, a text past ``max_seq_length``),
then ``PROBE_COUNT`` texts drawn (seeded) from the model's own vocabulary: entity names, descriptions of
every length up to and past ``max_seq_length``, unicode in eight scripts, numbers and codes. Seven probes
said 0.99993 where an ordinary 20-word text gave 0.99982; the held-out check of this set against 1,000+
texts drawn otherwise is ``benchmarks/fidelity_gate.py`` (docs/performance.md). The OpenVINO path stores
the probes and their reference vectors with its compile-cache entry, so a cached start computes no
reference. Below the bound a replica serves the fastest path that holds it (``openvino_backend``,
``sentence_transformers``), and says why.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from deployments.engine.planner import plan_micro_batches

# Probes drawn from the vocabulary (plus the seven fixed ones), and their seed: part of what a compile-cache
# entry is keyed by (openvino_runtime.ENTRY_FORMAT), so a change here converts again.
PROBE_COUNT = 256
PROBE_SEED = 20261204
# How the drawn probes are embedded (``probe_groups``): MIXED_GROUP of them, shortest to longest, in one
# padded pass (short ones padded to a long one's length, as a small mixed queue's pass pads them); the rest in
# the passes the service's planner cuts them into (``plan_micro_batches``: the length-sorted run, at most
# PROBE_GROUP rows and PROBE_PASS_TOKENS padded tokens a pass), each padded to its neighbours' length.
# Padding every group of 32 to its longest probe cost 7.4x the probes' tokens (bge-large shape: 94,858
# padded against 12,738; a 2.6-minute gate on 2 cores), in pass shapes the service does not run.
PROBE_GROUP = 32
PROBE_PASS_TOKENS = 2048
MIXED_GROUP = 8
_FIXED = 7

# A long passage built from ordinary English words, repeated past any max_seq_length.
_LONG_WORDS = (
    "the knowledge tree links each entity to the communities it belongs to and the passages that "
    "describe it so that retrieval can follow relations as well as similarity"
).split()
_SCRIPTS = [
    "naïve café Zürich Ærøskøbing", "東京タワー 京都 大阪", "北京 上海 深圳 知识图谱",
    "Москва Санкт-Петербург", "Ελλάδα Αθήνα", "서울 부산", "القاهرة دبي", "मुंबई दिल्ली", "🙂 🚀 ✓ — …",
]  # fmt: skip


def probe_vocabulary(tokens: Iterable[str]) -> list[str]:
    """Whole words of a tokenizer's vocabulary: alphabetic entries (any script) of 3+ characters, or a
    single CJK character; sorted, so the probes depend only on the vocabulary."""
    words = set()
    for token in tokens:
        word = token.lstrip("▁Ġ")
        if word != token and not word:
            continue
        if word.isalpha() and (len(word) >= 3 or unicodedata.east_asian_width(word[0]) == "W"):
            words.add(word)
    return sorted(words)


def probe_texts(max_seq_length: int, vocabulary: Sequence[str] = (), count: int = PROBE_COUNT) -> list[str]:
    """The fixed probes (short, empty, unicode, medium), ``count`` drawn from ``vocabulary`` (or from a
    built-in list of words without one), and last one longer than ``max_seq_length``."""
    long_text = " ".join(_LONG_WORDS[i % len(_LONG_WORDS)] for i in range(2 * max_seq_length))
    fixed = [
        "Paris",
        "",
        "Marie Curie",
        "naïve café, Zürich – 東京タワー, Ελλάδα, Москва 🙂",
        "Alan Turing was a mathematician who formalised computation and broke ciphers during the war.",
        " ".join(_LONG_WORDS[:30]),
    ]
    words = list(vocabulary) or _LONG_WORDS
    rng = random.Random(PROBE_SEED)
    drawn = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.35:  # an entity name
            drawn.append(" ".join(rng.choice(words).capitalize() for _ in range(rng.randint(1, 4))))
        elif kind < 0.70:  # a description, punctuated
            text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 60)))
            drawn.append(text.capitalize().replace(" ", ", ", 1) + ".")
        elif kind < 0.80:  # a long description, some past max_seq_length
            drawn.append(" ".join(rng.choice(words) for _ in range(rng.randint(60, max(61, max_seq_length)))))
        elif kind < 0.90:  # scripts the vocabulary may not know
            parts = [rng.choice(_SCRIPTS), *(rng.choice(words) for _ in range(rng.randint(0, 6)))]
            rng.shuffle(parts)
            drawn.append(" ".join(parts))
        else:  # numbers, codes, punctuation
            code = f"{rng.choice(words).upper()}-{rng.randint(1, 9999)}"
            version = f"v{rng.randint(1, 9)}.{rng.randint(0, 99)}"
            date = f"{rng.randint(1, 31)}/{rng.randint(1, 12)}/{rng.randint(1900, 2030)}"
            tail = f"{rng.choice(words)} #{rng.randint(1, 999)} & {rng.random():.3f}%"
            drawn.append(f"{code} ({version}), {date}: {tail}")
    return [*fixed, *drawn, long_text]


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine between two [n, d] arrays, or two vectors (computed in float64): the
    figure every fidelity check in the project (gate, tests, benchmarks) reports."""
    a = np.atleast_2d(a).astype(np.float64)
    b = np.atleast_2d(b).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30)))


def probe_groups(lengths: Sequence[int]) -> list[list[int]]:
    """How the probes (``probe_texts``, of ``lengths`` tokens) are embedded: the fixed ones each alone and
    together in one padded pass; of the drawn ones, ``MIXED_GROUP`` from shortest to longest in one pass,
    the rest in the planner's passes; the long one (last) alone. A few dozen passes, not one per probe,
    every probe checked unpadded or padded beside others, at about the tokens of the probes themselves."""
    count = len(lengths)
    fixed = min(_FIXED - 1, count - 1)
    groups: list[list[int]] = [[i] for i in range(fixed)] + [list(range(fixed))]
    drawn = list(range(fixed, count - 1))
    by_length = sorted(drawn, key=lambda i: lengths[i])
    if len(by_length) > MIXED_GROUP:  # shortest to longest, evenly spaced
        step = (len(by_length) - 1) / (MIXED_GROUP - 1)
        mixed = [by_length[round(k * step)] for k in range(MIXED_GROUP)]
    else:
        mixed = by_length
    groups.append(mixed)
    rest = sorted(set(drawn) - set(mixed))
    if rest:
        rest_lengths = [max(1, lengths[i]) for i in rest]
        budget = max(PROBE_PASS_TOKENS, *rest_lengths)
        plan = plan_micro_batches(rest_lengths, budget, PROBE_GROUP, forward_overhead_tokens=PROBE_GROUP)
        groups += [[rest[int(j)] for j in batch] for batch in plan.batches]
    return [g for g in groups if g] + [[count - 1]]


def probe_worst_cosine(
    candidate: Callable[[Sequence[int]], np.ndarray],
    reference: Callable[[Sequence[int]], np.ndarray],
    lengths: Sequence[int],
) -> float:
    """Worst cosine over the probes of ``lengths`` tokens, embedded as ``probe_groups`` says; ``candidate`` /
    ``reference`` embed the probes whose indices they are given. Non-finite output counts as -1."""
    worst = 1.0
    for group in probe_groups(lengths):
        got, want = candidate(group), reference(group)
        if not np.isfinite(got).all():
            return -1.0
        worst = min(worst, worst_cosine(got, want))
    return worst
