"""Holds the ``math_verify_accuracy`` evaluate metric script (a package only so wheels ship it)."""
