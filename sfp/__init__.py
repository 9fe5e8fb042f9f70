"""sfp: Self-adaptive Feature Purification (SFP) for CLIP ViTs.

Also the instruments to study attention outliers: probes, detectors, figures and widgets.
"""

__version__ = "0.1.0"
