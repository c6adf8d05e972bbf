"""What every side shares: the encodings, the layer families and the representations.

Imports torch and numpy only, never another part of the package.
"""
