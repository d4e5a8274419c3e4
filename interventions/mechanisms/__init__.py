"""The mechanisms: what AF1 computes (plan, in-trace code, adapters, models, CAMA tables)."""
