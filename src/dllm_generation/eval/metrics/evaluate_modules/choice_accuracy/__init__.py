"""Holds the ``choice_accuracy`` evaluate metric script (a package only so wheels ship it)."""
