"""Example: support-ticket triage (grown by later issues)."""
