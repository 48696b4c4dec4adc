"""Holds the ``ifeval_accuracy`` evaluate metric script (a package only so wheels ship it)."""
