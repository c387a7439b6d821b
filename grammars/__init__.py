"""difill.grammars"""
