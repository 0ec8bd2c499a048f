"""The on-board daemon. Never imports torch or `ground` (a test checks)."""
