"""Exact and near-duplicate detection (MinHash LSH) as vectorized numpy functions, no Ray.

The data stage wires these into Ray Data: a map computes each document's text hash, MinHash signature and band keys;
a hash repartition by key brings equal keys into the same block; `block_duplicates` finds the duplicates inside a
block. A document is a duplicate of the smallest `doc_id` that shares its text hash (exact) or shares an LSH band
and has an estimated Jaccard similarity at or above the threshold (near). Only the duplicates' ids travel back to
the driver, never the corpus.
"""

from __future__ import annotations

import math
import re

import numpy as np
import xxhash

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\w+", re.UNICODE)


def text_hash(text: str) -> int:
    """64-bit hash of the text after lowercasing and whitespace folding (the key of exact dedup), as int64."""
    folded = " ".join(text.lower().split())
    return np.uint64(xxhash.xxh64_intdigest(folded.encode("utf-8"))).astype(np.int64).item()


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of the universal hashes h(x) = (a*x + b) mod (2^61 - 1)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def shingles(text: str, words_per_shingle: int) -> list[str]:
    words = _WORD.findall(text.lower())
    if len(words) <= words_per_shingle:
        return [" ".join(words)] if words else [""]
    return [" ".join(words[i:i + words_per_shingle]) for i in range(len(words) - words_per_shingle + 1)]


def signature(text: str, a: np.ndarray, b: np.ndarray, words_per_shingle: int, chunk: int = 4096) -> np.ndarray:
    """MinHash signature, shape (num_perm,) uint32. Shingles are processed in chunks to bound memory."""
    hashes = np.fromiter((xxhash.xxh32_intdigest(s.encode("utf-8")) for s in set(shingles(text, words_per_shingle))), dtype=np.uint64)
    sig = np.full(a.shape[0], _MAX32, dtype=np.uint64)
    for start in range(0, hashes.shape[0], chunk):
        x = hashes[start:start + chunk]
        # (num_perm, chunk); a*x < 2^64 because both are < 2^32, so the product cannot overflow uint64.
        permuted = (a[:, None] * x[None, :] + b[:, None]) % _MERSENNE & _MAX32
        sig = np.minimum(sig, permuted.min(axis=1))
    return sig.astype(np.uint32)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1) -> tuple[int, int]:
    """Bands and rows per band minimizing weighted false-positive and false-negative probability mass.

    False positives are cheap here (every candidate pair is verified against the threshold with the full
    signature in `block_duplicates`), missed duplicates are not: so the weighting favours recall. At 0.8 and 128
    permutations this picks 14 bands of 9 rows: a pair at Jaccard 0.83 becomes a candidate with p = 0.95.
    """
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), math.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - xs ** rows) ** bands
            fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One int64 key per band: a hash of the band's rows, salted with the band index."""
    return np.array([np.uint64(xxhash.xxh64_intdigest(sig[i * rows:(i + 1) * rows].tobytes(), seed=i)).astype(np.int64)
                     for i in range(bands)], dtype=np.int64)


def block_duplicates(keys: np.ndarray, doc_ids: np.ndarray, sigs: np.ndarray | None = None,
                     threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Duplicates among rows that share a key: each row is compared with the smallest doc_id of its key.

    Args:
        keys: (N,) int64 keys (text hash, or LSH band key).
        doc_ids: (N,) int64 document ids.
        sigs: (N, num_perm) signatures; when given, a row is a duplicate only if its estimated Jaccard with the
            group's first row is >= threshold (near dedup); when None, equal keys suffice (exact dedup).
        threshold: Jaccard threshold for near dedup.

    Returns:
        (dup_ids, dup_of): the duplicate doc ids and the doc id each duplicates (unique by dup id).
    """
    if keys.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.lexsort((doc_ids, keys))
    keys, doc_ids = keys[order], doc_ids[order]
    starts = np.ones(keys.shape[0], dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(keys.shape[0]), 0))  # index of each group's first row
    candidate = (~starts) & (doc_ids != doc_ids[first])
    if sigs is not None:
        sigs = sigs[order]
        similarity = (sigs == sigs[first]).mean(axis=1)  # (N,) estimated Jaccard with the group's first row
        candidate &= similarity >= threshold
    dup_ids, dup_of = doc_ids[candidate], doc_ids[first][candidate]
    if dup_ids.shape[0]:
        # A document can collide in several bands: keep one row per duplicate, pointing at the smallest original.
        order = np.lexsort((dup_of, dup_ids))
        dup_ids, dup_of = dup_ids[order], dup_of[order]
        keep = np.ones(dup_ids.shape[0], dtype=bool)
        keep[1:] = dup_ids[1:] != dup_ids[:-1]
        dup_ids, dup_of = dup_ids[keep], dup_of[keep]
    return dup_ids, dup_of


def split_of(text_hash_value: int, val_fraction: float) -> str:
    """"val" or "train", by the document's hash: stable across runs, machines and input order."""
    bucket = xxhash.xxh64_intdigest(str(text_hash_value).encode(), seed=7) % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"
