"""Placeholder until its plugin lands: offers nothing yet."""
