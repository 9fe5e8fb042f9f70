"""sfp: Self-adaptive Feature Purification for CLIP ViTs, and instruments to study attention outliers."""

__version__ = "0.1.0"
