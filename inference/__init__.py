"""difill.inference"""
