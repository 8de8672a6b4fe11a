"""Training scripts (python -m training.<script> --help): MoLE stage 1 mole_finetune, stage 2
mole_expert, stage 3 mole_gates; MoA moa_train. What they share, one job per module: host, cli,
accelerate_setup, base_model, data, datasets, encoding, losses, optim, grad_checkpoint, loop.
See README.md."""
