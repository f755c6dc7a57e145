"""papa: online personalized active preference alignment of diffusion models (PAPA / ePAPA), performance-engineered.

Entry points: `python -m papa.train | sample | pretrain | oracle | evaluate | data`. Architecture: docs/ARCHITECTURE.md.
"""
__version__ = "0.1.0"
