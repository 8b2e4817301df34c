"""The Python API of stage4; the CLI and the tests call these functions."""
