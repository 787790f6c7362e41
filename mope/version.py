"""The mope version: written into every saved config (``mope_version``) and read by the upgrades."""

MOPE_VERSION = "0.1.0"
