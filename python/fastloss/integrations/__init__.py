"""Integrations with other libraries (imported on demand, so fastloss does not depend on them)."""
