"""The shared core every package builds on: the one error type for bad input and its checks."""

from .errors import ConfigError, check_bool, check_choice, check_int, check_number

__all__ = ["ConfigError", "check_bool", "check_choice", "check_int", "check_number"]
