"""swiftsvd: closed-form, activation-aware optimal low-rank compression of LLMs (Swift-SVD)."""

__version__ = "0.1.0"
