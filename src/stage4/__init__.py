"""stage4: build network-bootable Stage4 images for OpenSLX / bwLehrpool DNBD3 clients."""

__version__ = "0.1.0"
