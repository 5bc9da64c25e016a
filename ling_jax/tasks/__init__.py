"""Embedded verifiable tasks for post-training: generated problems, exact checkers, SFT traces.

`arithmetic` is the one task: multi-digit addition and subtraction (see its docstring).
"""
