"""Decisions as small functions over measured numbers: gate an update, when and how much to reduce."""
