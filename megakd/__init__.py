"""megakd: knowledge distillation on megatron-core (TP, PP, VPP, DP), vocab-parallel losses."""

__version__ = "0.1.0"
