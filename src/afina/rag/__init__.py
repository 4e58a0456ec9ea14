"""Retrieval for RAG and few-shot selection: BM25 (bm25s), dense (packaged MiniLM) or both fused."""

from afina.rag.index import Passage, Retriever, embedder, load_passages, passages_from_rows

__all__ = ["Passage", "Retriever", "embedder", "load_passages", "passages_from_rows"]
