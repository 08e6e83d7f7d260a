"""Helpers plugins may use: joint sets and evaluation protocols, the mesh pyramid, the prepared
store, privacy accounting, geometry, feature encoders and transformer blocks, Flower helpers.

Imports the contracts below it, never the engine above it.
"""
