"""Weighing a mesh against a central region: ``meshscale plan``."""
