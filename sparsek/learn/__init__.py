"""Learnability benchmark: does SparseK learn which keys to keep?

A synthetic long-range retrieval task (``task``), a tiny model in four attention variants of
equal key budget (``model``), a fixed-step training loop (``train``), the ``learn-*`` cases of
the benchmark suite (``bench``) and the plot and table of a committed run (``plot``).
See docs/learn.md.
"""

from .bench import CASES, run_learn_case
from .model import VARIANTS, RetrievalModel
from .task import RetrievalBatch, RetrievalTask
from .train import LearnConfig, run, train_run

__all__ = ["CASES", "VARIANTS", "LearnConfig", "RetrievalBatch", "RetrievalModel", "RetrievalTask", "run", "run_learn_case", "train_run"]
