"""Pure-PyTorch references of the ops: eager, readable, fp32 accumulation. Kernels never import these."""
