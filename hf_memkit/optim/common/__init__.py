"""Pieces shared by the optimizer techniques: target-matrix selection and the fp32-state AdamW branch."""
