"""Scoring a model: metrics per region, sliding-window inference, post-processing, checkpoint evaluation."""
