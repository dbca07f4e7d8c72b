"""Recipes shipped with EdgeRazor (installed as ``edgerazor.configs``): see README."""
