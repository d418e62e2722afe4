"""The multi-host bed's fixture (``hostbed.sites``)."""

from hostbed import sites

__all__ = ["sites"]
