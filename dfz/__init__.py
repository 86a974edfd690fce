"""dfz: peer-to-peer distribution of files, container images and AI model weights on a ZeroMQ fabric."""

__version__ = "0.1.0"
