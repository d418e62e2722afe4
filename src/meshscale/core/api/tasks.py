"""The tasks plane's methods (to be typed: #14 item 1)."""

from __future__ import annotations

from typing import Any

from meshscale.core.api.contract import Method

__all__ = ["METHODS"]

METHODS: tuple[Method[Any, Any], ...] = ()
