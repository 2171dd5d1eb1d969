"""Shared building blocks; used by two or more papers, never importing a paper package."""
