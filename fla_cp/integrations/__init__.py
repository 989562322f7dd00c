"""Integrations of fla_cp's CP into training engines (each needs its extra, e.g. `pip install fla_cp[torchtitan]`)."""
