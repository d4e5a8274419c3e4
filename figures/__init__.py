"""Figures of the AF1 analysis, drawn from saved results (no model needed)."""
