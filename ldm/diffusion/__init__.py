"""Stage-2 maths: noise paths (paths.py, THE time convention: t = 0 data, t = 1 noise), training objectives
(objectives.py), samplers (samplers.py), classifier-free guidance (guidance.py) and REPA (repa.py)."""
