"""Scoring pieces every stage shares: batching pairs (padded or packed), answer-only log-probs,
scoring a data set of pairs, and the preference losses.

SFT, DPO, the reference pass, ``dpolab evaluate``, samples while training and ``dpolab serve`` all
score answers the same way through this package; it imports no stage.
"""
