"""Exact and near-duplicate detection.

Exact: a 128-bit hash of the text with case and spacing folded, so "Hello  World" == "hello world".
Near: MinHash signatures of word shingles in datasketch's LSH index; a candidate the index returns
counts as a duplicate only when its estimated Jaccard similarity reaches the threshold (the index
alone also returns some pairs below it).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    """The identity of a text for exact deduplication: case-folded, whitespace-collapsed, hashed."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=16).digest()


class NearDuplicateIndex:
    """MinHash LSH over word shingles; `find` returns the key of an indexed near duplicate or None.

    index = NearDuplicateIndex(threshold=0.8)
    sig = index.signature("the quick brown fox jumps over the lazy dog")
    index.find(sig)                 # None: nothing indexed yet
    index.add("row-1", sig)
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3, seed: int = 1):
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, np.ndarray] = {}
        template = MinHash(num_perm=num_perm, seed=seed)
        self._permutations, self._scheme = template.permutations, template.scheme  # built once, shared
        self._seed = seed

    def signature(self, text: str) -> MinHash:
        words = WORD.findall(text.casefold())
        k = self.shingle
        if len(words) <= k:
            shingles = [" ".join(words).encode("utf-8")]
        else:
            shingles = [" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)]
        minhash = MinHash(num_perm=self.num_perm, seed=self._seed, permutations=self._permutations, scheme=self._scheme)
        minhash.update_batch(shingles)
        return minhash

    def minhash_from(self, hashvalues: np.ndarray) -> MinHash:
        """A MinHash for stored signature values (to query another index with them)."""
        return MinHash(num_perm=self.num_perm, seed=self._seed, hashvalues=hashvalues, scheme=self._scheme)

    def find(self, minhash: MinHash) -> tuple[str, float] | None:
        """The first indexed key whose estimated Jaccard similarity reaches the threshold, with it."""
        best = None
        for key in self.lsh.query(minhash):
            similarity = float(np.mean(self.signatures[key] == minhash.hashvalues))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (key, similarity)
        return best

    def add(self, key: str, minhash: MinHash) -> None:
        self.lsh.insert(key, minhash, check_duplication=False)
        self.signatures[key] = minhash.hashvalues.astype(np.uint32)

    def __len__(self) -> int:
        return len(self.signatures)
