"""dpolab: Direct Preference Optimization for GPT-2 on HH-RLHF, from data to a served model."""

__version__ = "0.1.0"
