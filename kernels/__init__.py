"""Triton kernels (installed as fastpeft.kernels): @triton.jit functions and their launch
wrappers, one file per hot path.  No autograd here: fastpeft.ops owns that."""
