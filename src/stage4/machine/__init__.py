"""The machine stage4 runs guests on: the accelerator probe and the shared qemu command line."""
