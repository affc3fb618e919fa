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

_SHIFT = np.uint64(32)
_MAX32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\w+", re.UNICODE)


def text_hash(text: str) -> int:
    """64-bit hash of the text after lowercasing and whitespace folding (the key of exact dedup), as int64."""
    folded = " ".join(text.lower().split())
    return np.uint64(xxhash.xxh64_intdigest(folded.encode("utf-8"))).astype(np.int64).item()


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of the multiply-add-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32 of 32-bit x
    (Dietzfelbinger's strongly universal family; a odd): one multiply, add and shift per value, no modulo."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    return a, b


_EMPTY_SHINGLE = np.uint64(xxhash.xxh32_intdigest(b""))
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants of splitmix64
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _avalanche(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit flips about half the output bits (uint64 in, uint64 out)."""
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def shingle_hashes(texts: list[str], words_per_shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every text's word shingles, all texts concatenated, and where each text's run starts.

    A shingle is `words_per_shingle` consecutive lowercased words (the whole text when it has fewer; one empty
    shingle when it has none). Each word is hashed once (xxh32) and a shingle's hash mixes its words' hashes in
    order with numpy, so no shingle string is ever built. Every text gets at least one hash.
    """
    k = words_per_shingle
    if not texts:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    words = [_WORD.findall(t.lower()) for t in texts]
    counts = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    flat = np.fromiter((xxhash.xxh32_intdigest(w.encode("utf-8")) for ws in words for w in ws), dtype=np.uint64,
                       count=int(counts.sum()))
    # Rolling combination over the concatenated words: window i covers words i .. i+k-1; it is a shingle when all
    # of its words belong to one text.
    windows = max(0, flat.shape[0] - k + 1)
    h = np.zeros(windows, dtype=np.uint64)
    for j in range(k):
        h = (h ^ flat[j:j + windows]) * _MIX
    text_of_word = np.repeat(np.arange(len(texts)), counts)
    whole = text_of_word[:windows] == text_of_word[k - 1:k - 1 + windows]
    per_text = np.where(counts >= k, counts - k + 1, 1)
    offsets = np.concatenate([[0], np.cumsum(per_text)[:-1]]).astype(np.int64)
    out = np.empty(int(per_text.sum()), dtype=np.uint64)
    short = np.nonzero(counts < k)[0]  # one shingle of all their words, or the empty shingle
    long_slots = np.ones(out.shape[0], dtype=bool)
    long_slots[offsets[short]] = False
    out[long_slots] = _avalanche(h[whole]) & _MAX32  # windows come in text order, as the slots do
    first_word = np.cumsum(counts) - counts
    for i in short:
        if counts[i] == 0:
            out[offsets[i]] = _EMPTY_SHINGLE
            continue
        g = np.zeros(1, dtype=np.uint64)
        for w in flat[first_word[i]:first_word[i] + counts[i]]:
            g = (g ^ w) * _MIX
        out[offsets[i]] = _avalanche(g)[0] & _MAX32
    return out, offsets


def signatures(texts: list[str], a: np.ndarray, b: np.ndarray, words_per_shingle: int,
               chunk_shingles: int = 16384) -> np.ndarray:
    """MinHash signatures of many texts, shape (len(texts), num_perm) uint32, vectorized across texts.

    Each permutation is a multiply-add-shift hash (see `permutations`) of the 32-bit shingle hash x; a text's
    signature is the minimum over its shingles. Texts are processed in groups of about
    `chunk_shingles` shingles to bound memory ((num_perm, chunk) uint64 at a time).
    """
    sigs = np.empty((len(texts), a.shape[0]), dtype=np.uint32)
    start = 0
    while start < len(texts):
        # Grow the group until it holds about chunk_shingles shingles (one very long text is a group of its own).
        stop, budget = start, 0
        while stop < len(texts) and (stop == start or budget + len(texts[stop]) // 6 <= chunk_shingles):
            budget += len(texts[stop]) // 6
            stop += 1
        x, offsets = shingle_hashes(texts[start:stop], words_per_shingle)
        mins = np.full((a.shape[0], stop - start), _MAX32, dtype=np.uint64)
        for lo in range(0, x.shape[0], chunk_shingles):
            part = x[lo:lo + chunk_shingles]
            permuted = (a[:, None] * part[None, :] + b[:, None]) >> _SHIFT  # (num_perm, part), wraps mod 2^64
            # Texts whose shingles fall in this slice: reduce each one's run (clipped to the slice).
            first = np.searchsorted(offsets, lo, side="right") - 1
            last = np.searchsorted(offsets, lo + part.shape[0], side="left")
            seg = np.clip(offsets[first:last], lo, None) - lo
            mins[:, first:last] = np.minimum(mins[:, first:last], np.minimum.reduceat(permuted, seg, axis=1))
        sigs[start:stop] = mins.T.astype(np.uint32)
        start = stop
    return sigs


def signature(text: str, a: np.ndarray, b: np.ndarray, words_per_shingle: int) -> np.ndarray:
    """MinHash signature of one text, shape (num_perm,) uint32 (see `signatures`)."""
    return signatures([text], a, b, words_per_shingle)[0]


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
            err = float(fp_weight * fp + (1 - fp_weight) * fn)
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One int64 key per band of each signature, shape (n, bands) for (n, num_perm) signatures ((bands,) for one):
    the band's rows mixed in order, salted with the band index, then avalanched."""
    one = sigs.ndim == 1
    s = np.atleast_2d(sigs)[:, :bands * rows].astype(np.uint64).reshape(-1, bands, rows)
    h = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * _MIX1, s.shape[:2]).copy()
    for r in range(rows):
        h = (h ^ s[:, :, r]) * _MIX
    keys = _avalanche(h).view(np.int64)
    return keys[0] if one else keys


def bbit(sigs: np.ndarray) -> np.ndarray:
    """The low 8 bits of each MinHash value (b-bit MinHash, Li and Koenig 2010): a quarter of the bytes to carry
    through the shuffle; `block_duplicates` corrects the chance matches this adds."""
    return (sigs & 0xFF).astype(np.uint8)


def block_duplicates(keys: np.ndarray, doc_ids: np.ndarray, sigs: np.ndarray | None = None,
                     threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Duplicates among rows that share a key: each row is compared with the smallest doc_id of its key.

    Args:
        keys: (N,) int64 keys (text hash, or LSH band key).
        doc_ids: (N,) int64 document ids.
        sigs: (N, num_perm) signatures (uint32, or b-bit uint8 from `bbit`); when given, a row is a duplicate only if
            its estimated Jaccard with the group's first row is >= threshold (near dedup); when None, equal keys
            suffice (exact dedup).
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
        if sigs.dtype.itemsize < 4:  # b-bit values also match by chance, with probability 2^-b: unbias
            chance = 2.0 ** (-8 * sigs.dtype.itemsize)
            similarity = (similarity - chance) / (1.0 - chance)
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
