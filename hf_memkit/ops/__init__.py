"""Fused operators. Each ``ops/<op>/`` holds ``reference.py`` (plain PyTorch, any device), ``triton.py`` (GPU
kernels, imported only when used) and ``function.py`` (autograd and the public function with an
``impl="auto"|"torch"|"triton"`` switch resolved at call time). Nothing here is imported by ``import hf_memkit``.
"""
