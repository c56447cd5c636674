"""Data: byte-level corpora cached as memmaps (`load_corpus`) and truncated-BPTT stream batching (`StreamBatcher`)."""

from mlstm.data.batching import Batch, StreamBatcher
from mlstm.data.corpus import Corpus, load_corpus

__all__ = ["Batch", "Corpus", "StreamBatcher", "load_corpus"]
