"""Generated problems shared by training (train/) and evaluation (eval/): GSM8K-format math word problems
(gsm.py) and HumanEval-shaped function tasks (code.py), seeded, with fixed splits."""
