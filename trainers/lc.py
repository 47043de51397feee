"""Placeholder: filled in by the issue-12/13 work."""
