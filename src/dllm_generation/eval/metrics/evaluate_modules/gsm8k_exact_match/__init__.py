"""Holds the ``gsm8k_exact_match`` evaluate metric script (a package only so wheels ship it)."""
