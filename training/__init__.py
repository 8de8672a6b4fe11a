"""MoLE training scripts (python -m training.<script> --help): stage 1 mole_finetune, stage 2
mole_expert, stage 3 mole_gates; common.py and data.py hold what they share. See README.md."""
