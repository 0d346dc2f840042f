"""Supervised fine-tuning on the chosen answers: the stage before DPO in the standard recipe."""
