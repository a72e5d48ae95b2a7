"""The guard: a small prompt-injection / jailbreak classifier that stands in front of served models."""
