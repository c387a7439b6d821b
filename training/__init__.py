"""difill.training"""
