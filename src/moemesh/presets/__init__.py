"""Shipped config presets (`moemesh train tiny`); `tiny` is the default."""
