"""meshscale: a decentralized compute mesh."""

__version__ = "0.1.0"
