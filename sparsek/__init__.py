"""sparsek: trainable SparseK sparse attention for PyTorch."""

from .decode import SparseKCache
from .layer import SparseKSelfAttention
from .ops import sparsek_attention, sparsek_selection
from .scorer import SparseKScorer
from .selection import Selection
from .varlen import sparsek_attention_varlen

__all__ = ["SparseKCache", "sparsek_attention", "sparsek_attention_varlen", "sparsek_selection", "Selection", "SparseKScorer", "SparseKSelfAttention"]
__version__ = "0.1.0"
