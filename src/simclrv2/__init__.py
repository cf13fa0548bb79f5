"""SimCLRv2: big self-supervised models are strong semi-supervised learners (Chen et al., 2020)."""

__version__ = "0.1.0"
